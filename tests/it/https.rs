//! HTTPS for clients (`--https-addr`, `--http-tls-*`), checked with curl as a client would:
//! HTTP/1.1 and HTTP/2 by ALPN, writes that go through Raft, client certificates when a client
//! CA is configured, plain bytes on the TLS port, and a certificate renewed on SIGHUP.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use serde_json::Value;

use crate::harness::free_loopback_ports;
use crate::harness::Cluster;
use crate::harness::CATCH_UP;

/// What curl saw: the HTTP status (0 when no response came), the HTTP version, the body, and
/// curl's own exit code.
#[derive(Debug)]
struct Curled {
    status: u16,
    version: String,
    body: String,
    exit: i32,
}

/// Marks the end of the body in curl's output, before the `--write-out` fields.
const SEP: &str = "\n--curl-write-out--\n";

fn curl(args: &[&str]) -> Curled {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "10", "--write-out"])
        .arg(format!("{SEP}%{{http_code}} %{{http_version}}"))
        .args(args);
    let out = cmd.output().unwrap_or_else(|e| panic!("run curl (is it installed?): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once(SEP).unwrap_or((text.as_str(), "0 0"));
    let mut fields = tail.split_whitespace();
    let status = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = fields.next().unwrap_or("0").to_string();
    Curled { status, version, body: body.to_string(), exit: out.status.code().unwrap_or(-1) }
}

/// `raftbridge certs` for `name` in `dir` (its CA made on first use); returns (cert, key) paths.
fn issue(c: &Cluster, dir: &Path, name: &str) -> (String, String) {
    c.certs(dir, name)
}

fn https_flags(addr: SocketAddr, (cert, key): &(String, String), client_ca: Option<&str>) -> Vec<String> {
    let mut flags = vec![
        "--https-addr".to_string(),
        addr.to_string(),
        "--http-tls-cert".to_string(),
        cert.clone(),
        "--http-tls-key".to_string(),
        key.clone(),
    ];
    if let Some(ca) = client_ca {
        flags.extend(["--http-tls-client-ca".to_string(), ca.to_string()]);
    }
    flags
}

/// Node 1 serves HTTPS to any client, node 2 only to clients with a certificate from the client
/// CA, node 3 plain HTTP only; all three are one cluster.
#[test]
fn https_serves_http1_and_h2_checks_client_certificates_and_reloads() {
    let mut c = Cluster::new("https", 3, &[]);
    let pki = c.dir().join("pki");
    let server = issue(&c, &pki, "web");
    let client = issue(&c, &pki, "client");
    let outsider = issue(&c, &c.dir().join("other-pki"), "outsider");
    let ca = pki.join("ca.pem").display().to_string();
    let ports = free_loopback_ports(2);
    c.add_node_flags(1, &https_flags(ports[0], &server, None));
    c.add_node_flags(2, &https_flags(ports[1], &server, Some(&ca)));
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], crate::harness::FORMATION);
    let url = |port: usize, path: &str| format!("https://127.0.0.1:{}{path}", ports[port].port());

    // HTTP/1.1 and HTTP/2 (ALPN) on node 1, checked against the CA.
    let h1 = curl(&["--cacert", &ca, "--http1.1", &url(0, "/healthz")]);
    assert_eq!((h1.status, h1.version.as_str()), (200, "1.1"), "{h1:?}");
    let value = json!({"over": "https", "n": 1});
    let put = curl(&["--cacert", &ca, "--http2", "-X", "PUT", "--data", &value.to_string(), &url(0, "/v1/state/default/via-https")]);
    assert_eq!((put.status, put.version.as_str()), (200, "2"), "{put:?}");
    // HEAD over HTTP/2 too: no DATA on the stream (curl fails the transfer on one), the length
    // as GET's.
    for version in ["--http2", "--http1.1"] {
        let head = curl(&["--cacert", &ca, version, "--head", &url(0, "/v1/state/default/via-https")]);
        assert_eq!((head.status, head.exit), (200, 0), "HEAD {version}: {head:?}");
        let length = head.body.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()));
        assert_eq!(length.as_deref(), Some(value.to_string().len().to_string().as_str()), "HEAD {version}: {head:?}");
    }
    // The write went through Raft: node 3 reads it back over plain HTTP.
    let resp = c.api(3).get("via-https").expect("read at node 3");
    let body: Value = serde_json::from_slice(&resp.body).expect("JSON body");
    assert_eq!((resp.status, body), (200, value.clone()));
    let event = curl(&["--cacert", &ca, "-X", "POST", "--data", "{\"order\":7}", &url(0, "/v1/events/httpsPlaced")]);
    assert_eq!(event.status, 201, "{event:?}");
    // The bench's client speaks HTTPS too (`--cacert`): a short run of state writes through it.
    let target = format!("https://127.0.0.1:{}", ports[0].port());
    // `bench events` also reads the log and every target's /metrics (CPU, delivery) over it.
    let status = c.run_cli(
        "bench-https",
        &["bench", "events", "--targets", &target, "--cacert", &ca, "--concurrency", "2", "--duration", "1s", "--warmup", "0s"],
        Duration::from_secs(60),
    );
    let out = std::fs::read_to_string(c.dir().join("bench-https.cli.log")).unwrap_or_default();
    assert!(status.success(), "bench over HTTPS: {out}");
    let acked: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("acknowledged: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no acknowledged count in: {out}"));
    assert!(acked > 0 && out.contains("errors: 0"), "bench over HTTPS: {out}");
    assert!(!out.contains("n/a") && !out.contains("metrics unavailable"), "the nodes' /metrics were read over HTTPS: {out}");
    // `raftbridge probe` speaks HTTPS too (with the CA), and says what is missing without it.
    let probe = c.run_cli("probe-https", &["probe", &url(0, "/readyz"), "--cacert", &ca], Duration::from_secs(30));
    assert!(probe.success(), "probe over HTTPS: {}", std::fs::read_to_string(c.dir().join("probe-https.cli.log")).unwrap_or_default());
    let probe = c.run_cli("probe-https-no-ca", &["probe", &url(0, "/readyz")], Duration::from_secs(30));
    let log = std::fs::read_to_string(c.dir().join("probe-https-no-ca.cli.log")).unwrap_or_default();
    assert!(!probe.success() && log.contains("needs --cacert"), "{log}");
    // The certificate's expiry is published for an alert (`raftbridge certs` gives 825 days).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs_f64();
    let expiry = c.api(1).metric("raftbridge_tls_cert_expiry_timestamp_seconds", &["listener=\"https\""]).expect("expiry metric");
    let days = (expiry - now) / 86_400.0;
    assert!((823.0..=825.0).contains(&days), "HTTPS certificate expires in {days} days");
    // Bad input over TLS gets the same JSON error as over plain HTTP.
    let bad = curl(&["--cacert", &ca, "-X", "PUT", "--data", "{not json", &url(0, "/v1/state/default/k")]);
    assert_eq!(bad.status, 400, "{bad:?}");

    // Plain HTTP on the TLS port gets no HTTP answer but a closed connection (not a hang: curl's
    // exit 28 is its timeout), the failed handshake is counted, and the node keeps serving.
    let plain = curl(&[&format!("http://127.0.0.1:{}/healthz", ports[0].port())]);
    assert!(plain.status == 0 && plain.exit != 0 && plain.exit != 28, "plain HTTP on the HTTPS port: {plain:?}");
    c.wait_for("node 1 counted the failed handshake", CATCH_UP, || {
        let failed = c.api(1).metric("raftbridge_https_handshake_failures_total", &["cause=\"error\""])?;
        if failed >= 1.0 { Ok(()) } else { Err(format!("{failed} failed handshakes counted")) }
    });
    assert_eq!(curl(&["--cacert", &ca, &url(0, "/healthz")]).status, 200);
    // A client that connects and says nothing is cut off after the handshake timeout (10 s), so
    // it holds a connection slot for a bounded time.
    let mut silent = std::net::TcpStream::connect(ports[0]).expect("connect to the HTTPS port");
    silent.set_read_timeout(Some(Duration::from_secs(30))).expect("set a read timeout");
    let mut buf = [0u8; 64];
    let read = std::io::Read::read(&mut silent, &mut buf);
    assert!(matches!(read, Ok(0)) || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "the node closes a silent connection: {read:?}");
    c.wait_for("node 1 counted the handshake timeout", CATCH_UP, || {
        let timeouts = c.api(1).metric("raftbridge_https_handshake_failures_total", &["cause=\"timeout\""])?;
        if timeouts >= 1.0 { Ok(()) } else { Err(format!("{timeouts} handshake timeouts counted")) }
    });
    // A client that does not trust the node's CA refuses the connection (curl's own check).
    let untrusted = curl(&[&url(0, "/healthz")]);
    assert!(untrusted.status == 0 && untrusted.exit != 0, "{untrusted:?}");

    // Node 2 wants a client certificate from the client CA.
    let without = curl(&["--cacert", &ca, &url(1, "/healthz")]);
    assert!(without.status == 0 && without.exit != 0, "no client certificate: {without:?}");
    let with = curl(&["--cacert", &ca, "--cert", &client.0, "--key", &client.1, &url(1, "/v1/state/default/via-https")]);
    let read: Value = serde_json::from_str(&with.body).unwrap_or(Value::Null);
    assert_eq!((with.status, read), (200, value), "{with:?}");
    let foreign = curl(&["--cacert", &ca, "--cert", &outsider.0, "--key", &outsider.1, &url(1, "/healthz")]);
    assert!(foreign.status == 0 && foreign.exit != 0, "a certificate of another CA: {foreign:?}");
    c.wait_for("node 2 counted the refused handshakes", CATCH_UP, || {
        let refused = c.api(2).metric("raftbridge_https_handshake_failures_total", &["cause=\"error\""])?;
        if refused >= 2.0 { Ok(()) } else { Err(format!("{refused} refused handshakes counted")) }
    });

    // A renewed certificate written over the files is served after SIGHUP, without a restart.
    let renewed = issue(&c, &pki, "web-renewed");
    let old_pem = std::fs::read_to_string(&server.0).expect("read the certificate in use");
    std::fs::copy(&renewed.0, &server.0).expect("copy the renewed certificate");
    std::fs::copy(&renewed.1, &server.1).expect("copy the renewed key");
    c.signal(1, "HUP");
    c.wait_for("node 1 reloaded its HTTPS certificate", CATCH_UP, || {
        let reloads = c.api(1).metric("raftbridge_https_reloads_total", &["outcome=\"ok\"", "trigger=\"signal\""])?;
        if reloads > 0.0 { Ok(()) } else { Err("no successful reload on SIGHUP counted yet".to_string()) }
    });
    let pem = std::fs::read_to_string(&renewed.0).expect("read the renewed certificate");
    // A line of the new certificate's base64 that the old one does not have (its key differs).
    let marker = pem.lines().find(|l| !old_pem.contains(l)).expect("the renewed certificate differs").to_string();
    c.wait_for("node 1 serves the renewed certificate", CATCH_UP, || {
        let out = Command::new("curl")
            .args(["--silent", "--max-time", "10", "--cacert", &ca, "--output", "/dev/null", "--write-out", "%{certs}", &url(0, "/healthz")])
            .output()
            .map_err(|e| e.to_string())?;
        let served = String::from_utf8_lossy(&out.stdout).into_owned();
        if served.contains(&marker) { Ok(()) } else { Err(format!("served chain: {served}")) }
    });
    c.assert_alive();

    // `raftbridge leave` over HTTPS removes the plain-HTTP node from the cluster.
    let leave = c.run_cli("leave-https", &["leave", "--http-addr", &target, "--cacert", &ca, "--id", "3"], Duration::from_secs(60));
    assert!(leave.success(), "leave over HTTPS: {}", std::fs::read_to_string(c.dir().join("leave-https.cli.log")).unwrap_or_default());
    c.wait_for_membership_seen_by(&[1, 2], &[1, 2], &[], crate::harness::FORMATION);
}

/// A node refuses to start with HTTPS files it cannot use, saying which.
#[test]
fn https_with_a_missing_or_mismatched_key_is_refused_at_start() {
    let c = Cluster::new("https-bad", 1, &[]);
    let pki = c.dir().join("pki");
    let (cert, _) = issue(&c, &pki, "web");
    let (_, other_key) = issue(&c, &pki, "other");
    let missing = pki.join("missing.pem").display().to_string();
    for (case, key, expect) in [("missing", missing.as_str(), "missing.pem"), ("mismatched", other_key.as_str(), "key")] {
        let ports = free_loopback_ports(3);
        let data = c.dir().join(format!("bad-{case}")).display().to_string();
        let name = format!("node-{case}-key");
        let status = c.run_cli(
            &name,
            &[
                "node", "--id", "1", "--data-dir", &data, "--peer-addr", &ports[0].to_string(), "--http-addr",
                &ports[1].to_string(), "--https-addr", &ports[2].to_string(), "--http-tls-cert", &cert, "--http-tls-key", key,
            ],
            Duration::from_secs(20),
        );
        assert!(!status.success(), "a node with a {case} HTTPS key must not start");
        let log = std::fs::read_to_string(c.dir().join(format!("{name}.cli.log"))).unwrap_or_default();
        assert!(log.contains("HTTPS") && log.contains(expect), "the error says HTTPS and names {expect}: {log}");
    }
}

/// A node refuses to start with an expired HTTPS certificate (rustls would serve it, and every
/// client's handshake would fail), naming the file and the date.
#[test]
fn https_with_an_expired_certificate_is_refused_at_start() {
    let c = Cluster::new("https-expired", 1, &[]);
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("certificate parameters");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(400);
    params.not_after = now - time::Duration::days(35);
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a self-signed certificate");
    let (cert_path, key_path) = (c.dir().join("expired.pem"), c.dir().join("expired-key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
    let ports = free_loopback_ports(3);
    let data = c.dir().join("data").display().to_string();
    let (cert_arg, key_arg) = (cert_path.display().to_string(), key_path.display().to_string());
    let status = c.run_cli(
        "node-expired",
        &[
            "node", "--id", "1", "--data-dir", &data, "--peer-addr", &ports[0].to_string(), "--http-addr", &ports[1].to_string(),
            "--https-addr", &ports[2].to_string(), "--http-tls-cert", &cert_arg, "--http-tls-key", &key_arg,
        ],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "a node with an expired HTTPS certificate must not start");
    let log = std::fs::read_to_string(c.dir().join("node-expired.cli.log")).unwrap_or_default();
    assert!(log.contains("HTTPS") && log.contains("expired.pem") && log.contains("expired at"), "{log}");
}
