//! The machine's plain-HTTP ceiling, for reading our benchmark figures against: a hyper server
//! that answers every request with 200 and a short body, doing nothing else (no routing, no
//! Raft). Run it and point `raftbridge bench commands` at it:
//!
//! ```sh
//! cargo run --release --example plain_http -- 127.0.0.1:8499 &
//! raftbridge bench commands --targets 127.0.0.1:8499 --path /x --concurrency 64 --duration 10s
//! ```
//!
//! It stops on its own after `--seconds` (default 60) so a forgotten one does not linger.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8499".into());
    let seconds: u64 = match (args.next().as_deref(), args.next()) {
        (Some("--seconds"), Some(s)) => s.parse()?,
        _ => 60,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("plain_http on {addr} for {seconds} s");
        let serve = async {
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}"))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        };
        tokio::select! {
            r = serve => r,
            _ = tokio::time::sleep(Duration::from_secs(seconds)) => Ok(()),
        }
    })
}
