#!/usr/bin/env bash
# CI check of deploy/ (called by .ci/run), end to end with Docker:
#  1. every YAML under deploy/ parses, the Kubernetes manifests agree with each other
#     (validate-manifests.py), the compose file is valid (`compose config -q`), the systemd unit
#     verifies (when systemd-analyze exists);
#  2. builds the image raftbridge:dev (build-image.sh: FROM scratch, no registry);
#  3. brings up deploy/compose.yml as project raftbridge-ci and checks the cluster: all nodes
#     ready, a write through node 1 read back through node 3, three voters and one leader,
#     Docker HEALTHCHECK healthy, requests through the alias `raftbridge` from inside the network,
#     the leader killed and restarted (the others keep serving, it rejoins from its volume), all
#     with a fresh RAFTBRIDGE_CLUSTER_SECRET and peer links over mutual TLS (compose.tls.yml with
#     certificates from `raftbridge certs`, a throwaway CA), so both run end to end;
#  4. always tears the project down (containers, network, volumes), also on failure or Ctrl-C.
#
# Every wait polls against a deadline. On failure it prints the nodes' log tails and exits 1.
# Env: RAFTBRIDGE_CHECK_PROJECT (raftbridge-ci), RAFTBRIDGE_HOST_PORT_1..3 (18401..18403),
#      RAFTBRIDGE_SKIP_DOCKER=1 (only step 1, for machines without Docker),
#      RAFTBRIDGE_CHECK_TLS=0 (plain peer links),
#      SKIP_CARGO_BUILD=1 (image from the existing target/release/raftbridge),
#      RAFTBRIDGE_BIN (image and certificates from that binary, no cargo build: build-image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

project="${RAFTBRIDGE_CHECK_PROJECT:-raftbridge-ci}"
image="${RAFTBRIDGE_IMAGE:-raftbridge:dev}"
export RAFTBRIDGE_IMAGE="$image"
# The nodes authenticate each other with a cluster secret (compose passes it on), fresh per run.
export RAFTBRIDGE_CLUSTER_SECRET="${RAFTBRIDGE_CLUSTER_SECRET:-ci-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
# The nodes' API token: every request below but the probes and /metrics sends it.
export RAFTBRIDGE_API_TOKEN="${RAFTBRIDGE_API_TOKEN:-ci-api-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
ports=("${RAFTBRIDGE_HOST_PORT_1:-18401}" "${RAFTBRIDGE_HOST_PORT_2:-18402}" "${RAFTBRIDGE_HOST_PORT_3:-18403}")
export RAFTBRIDGE_HOST_PORT_1="${ports[0]}" RAFTBRIDGE_HOST_PORT_2="${ports[1]}" RAFTBRIDGE_HOST_PORT_3="${ports[2]}"
# HTTPS for clients (with compose.tls.yml): node N on 127.0.0.1:1844N.
https_ports=("${RAFTBRIDGE_HTTPS_HOST_PORT_1:-18441}" "${RAFTBRIDGE_HTTPS_HOST_PORT_2:-18442}" "${RAFTBRIDGE_HTTPS_HOST_PORT_3:-18443}")
export RAFTBRIDGE_HTTPS_HOST_PORT_1="${https_ports[0]}" RAFTBRIDGE_HTTPS_HOST_PORT_2="${https_ports[1]}" RAFTBRIDGE_HTTPS_HOST_PORT_3="${https_ports[2]}"
start=$SECONDS

say() { echo "deploy-check [$((SECONDS - start))s] $*"; }
fail() { echo "deploy-check [$((SECONDS - start))s] FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. static validation
say "validating YAML and manifests"
if ! python3 -c 'import yaml' 2>/dev/null; then
  # From the distribution (CI machines reach apt and crates.io, not PyPI).
  say "python3 or PyYAML missing: apt-get install python3 python3-yaml"
  { apt-get update -qq && apt-get install -y -qq python3 python3-yaml; } || fail "installing python3-yaml"
fi
python3 deploy/validate-manifests.py deploy || fail "manifest validation"

if [[ "${RAFTBRIDGE_SKIP_DOCKER:-0}" == 1 ]]; then
  say "RAFTBRIDGE_SKIP_DOCKER=1: skipping the image and the compose cluster"
  exit 0
fi
command -v docker >/dev/null || fail "docker not found (set RAFTBRIDGE_SKIP_DOCKER=1 to skip the cluster check)"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  fail "neither 'docker compose' nor docker-compose found"
fi
files=(-f deploy/compose.yml)
tls="${RAFTBRIDGE_CHECK_TLS:-1}"
[[ $tls == 1 ]] && files+=(-f deploy/compose.tls.yml)
dc() { "${compose[@]}" -p "$project" "${files[@]}" "$@"; }
RAFTBRIDGE_PKI_DIR="${RAFTBRIDGE_PKI_DIR:-/pki-made-later}" dc config -q || fail "deploy/compose.yml (with compose.tls.yml) is not a valid compose file"

if command -v systemd-analyze >/dev/null; then
  # The unit names /usr/local/bin/raftbridge, which is not installed here: ignore only that.
  out="$(systemd-analyze verify deploy/systemd/raftbridge.service 2>&1 | grep -v 'is not executable' || true)"
  [[ -z "$out" ]] || fail "systemd-analyze verify: $out"
fi
say "static checks passed"

# ---------------------------------------------------------------- 2. image
say "building image $image"
deploy/build-image.sh "$image"
[[ "$(docker image inspect -f '{{.Config.User}}' "$image")" == 10001* ]] || fail "image does not run as uid 10001"
docker run --rm "$image" --version

# ---------------------------------------------------------------- 3. compose cluster
ok=0
pki=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n "$pki" ]] && rm -rf "$pki"
  if [[ $ok != 1 ]]; then
    echo "---- container logs (tail) ----" >&2
    dc logs --no-color --tail=60 >&2 2>&1 || true
    dc ps >&2 || true
  fi
  say "tearing down project $project"
  dc down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || dc down -v --remove-orphans || true
  say "done ($([[ $ok == 1 ]] && echo passed || echo failed), $((SECONDS - start)) s in all)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $tls == 1 ]]; then
  # A throwaway CA: each node's certificate names the node and the seed alias `raftbridge`, and
  # is bound to its node id (compose.tls.yml requires that).
  # The binary build-image.sh packed (RAFTBRIDGE_BIN when set).
  bin="${RAFTBRIDGE_BIN:-${CARGO_TARGET_DIR:-target}/release/raftbridge}"
  pki="$(mktemp -d "${TMPDIR:-/tmp}/raftbridge-pki.XXXXXX")"
  for n in 1 2 3; do
    "$bin" certs --dir "$pki" --name "raftbridge-$n" --san "raftbridge-$n" --san raftbridge --node-id "$n" --days 10 >/dev/null \
      || fail "raftbridge certs for raftbridge-$n"
    # Node N mounts the directory raftbridge-N as /pki: its certificate and key and the CA.
    mkdir "$pki/raftbridge-$n"
    mv "$pki/raftbridge-$n.pem" "$pki/raftbridge-$n-key.pem" "$pki/raftbridge-$n/"
    cp "$pki/ca.pem" "$pki/raftbridge-$n/"
  done
  # The nodes get no CA key; they run as uid 10001, so the (throwaway) keys must be readable.
  rm "$pki/ca-key.pem"
  chmod 755 "$pki" "$pki"/raftbridge-* && chmod 644 "$pki"/*.pem "$pki"/raftbridge-*/*.pem
  export RAFTBRIDGE_PKI_DIR="$pki"
  say "peer links over mutual TLS (certificates in $pki)"
fi

# Leftovers of an interrupted earlier run would hold the ports and the volumes.
dc down -v --remove-orphans >/dev/null 2>&1 || true
say "starting the three-node compose cluster (project $project)"
dc up -d

http() { curl -sS -m 3 -H "Authorization: Bearer $RAFTBRIDGE_API_TOKEN" "$@"; }

# wait_until DEADLINE_SECONDS DESCRIPTION COMMAND...: poll every 0.5 s until COMMAND succeeds.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$what: not within ${limit}s"
    sleep 0.5
  done
  say "$what"
}

all_ready() { for p in "${ports[@]}"; do curl -fsS -m 2 "http://127.0.0.1:$p/readyz" || return 1; done; }
wait_until 90 "all three nodes ready" all_ready
if [[ $tls == 1 ]]; then
  [[ "$(dc logs --no-color 2>&1 | grep 'peer links over mutual TLS' | grep -c 'require_node_id=true')" -ge 3 ]] \
    || fail "not every node reports peer TLS with certificates bound to node ids"
  # Each certificate is bound to its node: the /metrics of every node publish its expiry too.
  for p in "${ports[@]}"; do
    metrics="$(curl -fsS -m 2 "http://127.0.0.1:$p/metrics")" || fail "node on port $p: no /metrics"
    grep -q '^raftbridge_tls_cert_expiry_timestamp_seconds{listener="peer"}' <<<"$metrics" \
      || fail "node on port $p publishes no peer certificate expiry"
  done
  say "every node runs its peer links over mutual TLS, certificates bound to node ids"
fi

key="ci-$$-$RANDOM"
refused="$(curl -sS -m 3 -X PUT -w ' %{http_code}' "http://127.0.0.1:${ports[0]}/v1/state/default/$key" -d '{"via":"no token"}')"
[[ "$refused" == *' 401' ]] || fail "a write without the API token: $refused"
put="$(http -X PUT -w ' %{http_code}' "http://127.0.0.1:${ports[0]}/v1/state/default/$key" -d '{"via":"node1"}')"
[[ "$put" == *' 200' ]] || fail "write through node 1: $put"
got="$(http -w ' %{http_code}' "http://127.0.0.1:${ports[2]}/v1/state/default/$key")"
[[ "$got" == '{"via":"node1"} 200' ]] || fail "read back through node 3: $got"
say "a write without the API token refused (401); write through node 1 read back through node 3"

if [[ $tls == 1 ]]; then
  # HTTPS on every node, checked against the cluster CA for the shared name `raftbridge`.
  https() { local p=$1; shift; curl -sS -m 3 -H "Authorization: Bearer $RAFTBRIDGE_API_TOKEN" --cacert "$pki/ca.pem" --resolve "raftbridge:$p:127.0.0.1" "$@"; }
  for p in "${https_ports[@]}"; do
    code="$(https "$p" -o /dev/null -w '%{http_code} %{http_version}' --http2 "https://raftbridge:$p/readyz")"
    [[ "$code" == '200 2' ]] || fail "HTTPS (h2) readyz on port $p: $code"
  done
  put="$(https "${https_ports[1]}" -X PUT -w ' %{http_code}' "https://raftbridge:${https_ports[1]}/v1/state/default/$key-tls" -d '{"via":"https"}')"
  [[ "$put" == *' 200' ]] || fail "write over HTTPS through node 2: $put"
  got="$(http -w ' %{http_code}' "http://127.0.0.1:${ports[0]}/v1/state/default/$key-tls")"
  [[ "$got" == '{"via":"https"} 200' ]] || fail "HTTPS write read back through node 1: $got"
  say "HTTPS on every node; a write over HTTPS through node 2 read back through node 1"
fi

# /cluster on every node: three voters at the advertised names, one leader all agree on.
cluster_ok() {
  local leaders=""
  for p in "${ports[@]}"; do
    leaders+="$(http "http://127.0.0.1:$p/cluster" | python3 -c '
import json, sys
c = json.load(sys.stdin)
voters = sorted(m["addr"] for m in c["members"] if m["voter"])
assert voters == ["raftbridge-1:7400", "raftbridge-2:7400", "raftbridge-3:7400"], voters
assert c["leader"] is not None
print(c["leader"])')" || return 1
    leaders+=" "
  done
  [[ "$(tr ' ' '\n' <<<"$leaders" | sort -u | grep -c .)" == 1 ]]
}
wait_until 30 "/cluster: 3 voters, one leader on every node" cluster_ok

containers=()
for n in 1 2 3; do containers+=("$(dc ps -q "raftbridge-$n")"); done
healthy() { for c in "${containers[@]}"; do [[ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" == healthy ]] || return 1; done; }
wait_until 60 "docker HEALTHCHECK healthy on all nodes" healthy
hc="$(docker inspect -f '{{json .Config.Healthcheck.Test}}' "$image")"
[[ "$hc" == *'http://127.0.0.1:8400/readyz'* ]] || fail "the image's HEALTHCHECK is not on /readyz: $hc"
say "the image's HEALTHCHECK probes /readyz"

net="$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "${containers[0]}")"
for _ in 1 2 3; do
  docker run --rm --network "$net" "$image" probe "http://raftbridge:8400/readyz" || fail "probe through the alias raftbridge"
  docker run --rm --network "$net" -e RAFTBRIDGE_API_TOKEN "$image" probe "http://raftbridge:8400/v1/state/default/$key" || fail "read through the alias raftbridge"
done
say "requests through the alias raftbridge inside network $net"

# Kill the leader: the others elect a new one and keep serving; the restarted node rejoins.
leader="$(http "http://127.0.0.1:${ports[0]}/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')"
[[ "$leader" =~ ^[123]$ ]] || fail "unexpected leader id $leader"
others=(); for n in 1 2 3; do [[ $n == "$leader" ]] || others+=("$n"); done
say "killing the leader raftbridge-$leader"
docker kill "${containers[$((leader - 1))]}" >/dev/null
write_via_other() {
  http -f -X PUT "http://127.0.0.1:${ports[$((others[0] - 1))]}/v1/state/default/$key" -d '{"via":"survivor"}'
}
wait_until 30 "write accepted by raftbridge-${others[0]} with the leader down" write_via_other
docker start "${containers[$((leader - 1))]}" >/dev/null
node_ready() { curl -fsS -m 2 "http://127.0.0.1:${ports[$((leader - 1))]}/readyz"; }
wait_until 60 "raftbridge-$leader restarted and ready" node_ready
read_back() { [[ "$(http "http://127.0.0.1:${ports[$((leader - 1))]}/v1/state/default/$key")" == '{"via":"survivor"}' ]]; }
wait_until 30 "raftbridge-$leader serves the write made while it was down" read_back
wait_until 30 "/cluster: 3 voters, one leader after the restart" cluster_ok

ok=1
say "compose cluster check passed"
