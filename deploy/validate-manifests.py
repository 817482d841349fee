#!/usr/bin/env python3
"""Parse every YAML file under deploy/ and check the Kubernetes manifests for the mistakes that
would only show up on a real cluster (none is available in CI).

Checks:
- every *.yml / *.yaml under deploy/ parses (all documents);
- every document in deploy/k8s/ has apiVersion, kind and metadata.name, no namespace (the
  manifests are namespace-agnostic), and kustomization.yaml lists every manifest file;
- the StatefulSet, the headless Service, the client Service and the PodDisruptionBudget agree:
  selectors match the pod labels, serviceName is the headless Service, named target ports exist,
  seeds point at the headless Service, probes hit /readyz and /healthz, the pod runs as non-root.

Usage: deploy/validate-manifests.py [DEPLOY_DIR]   (exit 1 with one line per problem)
"""
import os
import sys

try:
    import yaml
except ImportError:  # check.sh installs PyYAML first; say so plainly if run by hand
    sys.exit("validate-manifests: PyYAML missing (apt-get install python3-yaml)")

deploy = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
problems = []
docs_by_file = {}

for dirpath, dirnames, filenames in os.walk(deploy):
    dirnames.sort()
    for name in sorted(filenames):
        if not name.endswith((".yml", ".yaml")):
            continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, deploy)
        try:
            with open(path) as f:
                docs_by_file[rel] = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{rel}: does not parse: {e}")

k8s = {rel: docs for rel, docs in docs_by_file.items() if rel.startswith("k8s" + os.sep)}
objects = {}
for rel, docs in k8s.items():
    if rel.endswith("kustomization.yaml"):
        continue
    for d in docs:
        kind, name = d.get("kind"), (d.get("metadata") or {}).get("name")
        if not d.get("apiVersion") or not kind or not name:
            problems.append(f"{rel}: a document lacks apiVersion, kind or metadata.name")
            continue
        if "namespace" in d["metadata"]:
            problems.append(f"{rel}: {kind}/{name} sets a namespace (keep the manifests namespace-agnostic)")
        objects[(kind, name)] = d

kust = (k8s.get(os.path.join("k8s", "kustomization.yaml")) or [{}])[0]
listed = set(kust.get("resources", []))
for rel in k8s:
    base = os.path.basename(rel)
    if base != "kustomization.yaml" and base not in listed:
        problems.append(f"{rel}: not listed in k8s/kustomization.yaml resources")


def need(cond, msg):
    if not cond:
        problems.append(msg)


sts = objects.get(("StatefulSet", "raftbridge"))
peers = objects.get(("Service", "raftbridge-peers"))
client = objects.get(("Service", "raftbridge"))
pdb = objects.get(("PodDisruptionBudget", "raftbridge"))
for what, obj in [("StatefulSet raftbridge", sts), ("Service raftbridge-peers", peers),
                  ("Service raftbridge", client), ("PodDisruptionBudget raftbridge", pdb)]:
    need(obj is not None, f"k8s: {what} missing")

if sts and peers and client and pdb:
    spec = sts["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    matches = lambda sel: bool(sel) and all(labels.get(k) == v for k, v in sel.items())
    need(matches(spec["selector"].get("matchLabels")), "StatefulSet: selector does not match the pod labels")
    need(spec.get("serviceName") == "raftbridge-peers", "StatefulSet: serviceName must be the headless Service")
    need(spec.get("podManagementPolicy") == "Parallel", "StatefulSet: podManagementPolicy should be Parallel")
    need(spec.get("replicas", 1) >= 3, "StatefulSet: fewer than 3 replicas")
    need(peers["spec"].get("clusterIP") == "None", "raftbridge-peers: not headless (clusterIP: None)")
    need(peers["spec"].get("publishNotReadyAddresses") is True,
         "raftbridge-peers: publishNotReadyAddresses must be true (nodes meet before they are ready)")
    for svc in (peers, client):
        need(matches(svc["spec"].get("selector")), f"Service {svc['metadata']['name']}: selector matches no pod")
    need(matches(pdb["spec"]["selector"].get("matchLabels")), "PodDisruptionBudget: selector matches no pod")
    need(pdb["spec"].get("maxUnavailable") == 1, "PodDisruptionBudget: maxUnavailable should be 1")

    pspec = pod["spec"]
    need((pspec.get("securityContext") or {}).get("runAsNonRoot") is True, "pod: runAsNonRoot not set")
    # The drain's worst case: the drain delay and the HTTP grace as configured, plus about 30 s
    # of fixed steps (registry 7, aborted connections 1, commands 3, hand-over 3, every-instance
    # handlers, last entries, delivery outcomes, peer requests and links 5 x 3, margin 1):
    # SIGKILL must not cut it.
    env = {e["name"]: e.get("value") for e in pspec["containers"][0].get("env", [])}
    drain_s = int(env.get("RAFTBRIDGE_DRAIN_DELAY_MS") or 500) / 1000
    http_s = int(env.get("RAFTBRIDGE_SHUTDOWN_GRACE_MS") or 10_000) / 1000
    grace = pspec.get("terminationGracePeriodSeconds") or 30
    need(grace >= drain_s + http_s + 30,
         f"pod: terminationGracePeriodSeconds {grace} is shorter than the drain's worst case ({drain_s + http_s + 30:.0f} s)")
    c = pspec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for svc in (peers, client):
        for p in svc["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            need(t in ports or t in ports.values(), f"Service {svc['metadata']['name']}: targetPort {t} not a container port")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    need(env.get("RAFTBRIDGE_SEEDS", "").split(":")[0] == "raftbridge-peers", "env: seeds must be the headless Service name")
    need("$(POD_NAME).raftbridge-peers" in (env.get("RAFTBRIDGE_ADVERTISE") or ""), "env: advertise must be <pod>.raftbridge-peers")
    need(env.get("RAFTBRIDGE_BOOTSTRAP_EXPECT") == str(spec.get("replicas")), "env: bootstrap-expect differs from replicas")
    need(list(env).index("POD_NAME") < list(env).index("RAFTBRIDGE_ADVERTISE") if "POD_NAME" in env and "RAFTBRIDGE_ADVERTISE" in env else False,
         "env: POD_NAME must be defined before RAFTBRIDGE_ADVERTISE uses it")
    need(((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path") == "/readyz", "readinessProbe must GET /readyz")
    need(((c.get("livenessProbe") or {}).get("httpGet") or {}).get("path") == "/healthz", "livenessProbe must GET /healthz")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    claims = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])]
    need(mounts.get("data") == "/data" and "data" in claims, "StatefulSet: /data must be a volumeClaimTemplate")

compose = docs_by_file.get("compose.yml")
if compose:
    services = compose[0].get("services", {})
    need(len(services) == 3, "compose.yml: expected three nodes")
    for name, svc in services.items():
        nets = svc.get("networks") or {}
        aliases = [a for n in (nets.values() if isinstance(nets, dict) else []) for a in ((n or {}).get("aliases") or [])]
        need("raftbridge" in aliases, f"compose.yml: {name} lacks the network alias raftbridge")
        need(svc.get("environment", {}).get("RAFTBRIDGE_ADVERTISE") == f"{name}:7400", f"compose.yml: {name} must advertise {name}:7400")

for p in problems:
    print(f"validate-manifests: {p}", file=sys.stderr)
print(f"validate-manifests: {len(docs_by_file)} YAML files parsed, {len(objects)} Kubernetes objects checked, "
      f"{len(problems)} problems")
sys.exit(1 if problems else 0)
