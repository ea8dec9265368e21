//! A small Envoy rate limit service: the RLS gRPC API (`ShouldRateLimit`, unary, over cleartext
//! HTTP/2) in front of Limitador's engine with its counters in Redis, so every Envoy replica, and
//! every restart of this server or of the Envoys, sees the same spending.
//!
//! ```text
//! rls-server --listen 127.0.0.1:8081 --redis redis://127.0.0.1:6379 --limits limits.json [-v]
//! ```
//!
//! `limits.json` is Limitador's limits format as JSON, e.g. 1000 tokens per minute per consumer:
//! `[{"namespace": "tollgate", "max_value": 1000, "seconds": 60, "conditions": [],
//!    "variables": ["descriptors[0].consumer"]}]` (the namespace is the Envoy filter's `domain`).

mod proto;
mod service;

use bytes::{BufMut, Bytes, BytesMut};
use limitador::limit::Limit;
use limitador::storage::redis::AsyncRedisStorage;
use limitador::AsyncRateLimiter;
use prost::Message;
use service::Rls;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

const METHOD: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// Envoy's requests are a few hundred bytes; anything this large is not one.
const MAX_MESSAGE: usize = 1 << 20;
const USAGE: &str = "usage: rls-server --listen HOST:PORT --redis redis://HOST:PORT --limits FILE.json [-v]";

#[derive(Debug, PartialEq)]
struct Args {
    listen: String,
    redis: String,
    limits: String,
    verbose: bool,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut redis, mut limits, mut verbose) = (None, None, None, false);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--listen" => &mut listen,
            "--redis" => &mut redis,
            "--limits" => &mut limits,
            "-v" | "--verbose" => {
                verbose = true;
                continue;
            }
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        };
        *slot = Some(it.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?);
    }
    let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("{name} is required\n{USAGE}"));
    Ok(Args { listen: need(listen, "--listen")?, redis: need(redis, "--redis")?, limits: need(limits, "--limits")?, verbose })
}

fn parse_limits(text: &str) -> Result<Vec<Limit>, String> {
    let limits: Vec<Limit> = serde_json::from_str(text).map_err(|e| format!("limits: {e}"))?;
    if limits.is_empty() {
        return Err("limits: no limit defined".into());
    }
    Ok(limits)
}

/// A gRPC length-prefixed message: compressed flag (must be 0: we never negotiate compression),
/// big-endian length, payload; exactly one per unary call.
fn unframe(buf: &[u8]) -> Result<&[u8], String> {
    let (head, rest) = buf.split_at_checked(5).ok_or("truncated gRPC frame")?;
    if head.first() != Some(&0) {
        return Err("compressed gRPC messages are not supported".into());
    }
    let len = head.get(1..5).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes).ok_or("bad frame")? as usize;
    if rest.len() != len {
        return Err(format!("gRPC frame says {len} bytes, body has {}", rest.len()));
    }
    Ok(rest)
}

fn frame(msg: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(msg.len() + 5);
    out.put_u8(0);
    out.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    out.put_slice(msg);
    out.freeze()
}

enum Reply {
    Ok(Vec<u8>),
    /// gRPC status code and message, sent as a trailers-only response.
    Status(u32, String),
}

async fn read_body(body: &mut h2::RecvStream) -> Result<BytesMut, String> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len().saturating_add(chunk.len()) > MAX_MESSAGE.saturating_add(5) {
            return Err("request too large".into());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

async fn handle(req: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>, rls: Arc<Rls>) {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    let reply = match read_body(&mut body).await {
        Err(e) => Reply::Status(3, e),
        Ok(_) if path != METHOD => Reply::Status(12, format!("unknown method {path}")),
        Ok(buf) => match unframe(&buf).and_then(|m| proto::RateLimitRequest::decode(m).map_err(|e| e.to_string())) {
            Err(e) => Reply::Status(3, e),
            Ok(req) => match rls.should_rate_limit(&req).await {
                Ok(resp) => Reply::Ok(resp.encode_to_vec()),
                Err(e) => {
                    eprintln!("rls-server: {e}");
                    Reply::Status(14, e)
                }
            },
        },
    };
    let head = |extra: &[(&'static str, String)]| {
        let mut b = http::Response::builder().status(200).header("content-type", "application/grpc");
        for (k, v) in extra {
            b = b.header(*k, v.as_str());
        }
        b.body(())
    };
    let sent = match reply {
        Reply::Ok(msg) => match head(&[]) {
            Ok(r) => async {
                let mut stream = respond.send_response(r, false)?;
                stream.send_data(frame(&msg), false)?;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                stream.send_trailers(trailers)
            }
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Reply::Status(code, msg) => {
            // grpc-message is percent-encoded text; keep it to safe characters.
            let msg: String = msg.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
            match head(&[("grpc-status", code.to_string()), ("grpc-message", msg.replace('%', "%25"))]) {
                Ok(r) => respond.send_response(r, true).map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    if let Err(e) = sent {
        eprintln!("rls-server: reply not sent: {e}");
    }
}

async fn serve_connection(sock: TcpStream, rls: Arc<Rls>) -> Result<(), h2::Error> {
    let mut conn = h2::server::handshake(sock).await?;
    while let Some(next) = conn.accept().await {
        let (req, respond) = next?;
        tokio::spawn(handle(req, respond, Arc::clone(&rls)));
    }
    Ok(())
}

async fn run() -> Result<(), String> {
    let args = parse_args(std::env::args().skip(1))?;
    let text = std::fs::read_to_string(&args.limits).map_err(|e| format!("{}: {e}", args.limits))?;
    let limits = parse_limits(&text)?;
    let storage = AsyncRedisStorage::new(&args.redis).await.map_err(|e| format!("redis {}: {e}", args.redis))?;
    let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
    let n = limits.len();
    for l in limits {
        limiter.add_limit(l);
    }
    let rls = Arc::new(Rls::new(limiter, args.verbose));
    let listener = TcpListener::bind(&args.listen).await.map_err(|e| format!("{}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("rls-server: listening on {addr}, counters in {}, {n} limit(s)", args.redis);
    loop {
        let (sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = sock.set_nodelay(true);
        let rls = Arc::clone(&rls);
        tokio::spawn(async move {
            if let Err(e) = serve_connection(sock, rls).await {
                if !e.is_io() {
                    eprintln!("rls-server: connection: {e}");
                }
            }
        });
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("rls-server: {e}");
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args() {
        let a = parse_args(strings(&["--redis", "redis://127.0.0.1:1", "-v", "--listen", "127.0.0.1:2", "--limits", "l.json"])).unwrap();
        assert_eq!(a, Args { listen: "127.0.0.1:2".into(), redis: "redis://127.0.0.1:1".into(), limits: "l.json".into(), verbose: true });
        assert!(parse_args(strings(&["--listen", "x", "--redis", "y"])).unwrap_err().starts_with("--limits is required"));
        assert!(parse_args(strings(&["--listen"])).unwrap_err().starts_with("--listen needs a value"));
        assert!(parse_args(strings(&["--port", "1"])).unwrap_err().starts_with("unknown argument \"--port\""));
    }

    #[test]
    fn limits_in_limitadors_format() {
        let l = parse_limits(
            r#"[{"namespace": "tollgate", "max_value": 300, "seconds": 60, "conditions": [],
                 "variables": ["descriptors[0].consumer"]},
                {"namespace": "tollgate", "max_value": 50, "seconds": 60,
                 "conditions": ["descriptors[0].consumer == 'team-b'"], "variables": []}]"#,
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        let a = l.iter().find(|l| l.max_value() == 300).unwrap();
        assert_eq!((a.namespace().as_ref(), a.seconds()), ("tollgate", 60));
        assert!(a.has_variable("descriptors"));
        let b = l.iter().find(|l| l.max_value() == 50).unwrap();
        assert_eq!(b.conditions().into_iter().collect::<Vec<_>>(), ["descriptors[0].consumer == 'team-b'"]);
        assert!(parse_limits("[]").unwrap_err().contains("no limit"));
        assert!(parse_limits(r#"[{"namespace": "t", "max_value": 1, "seconds": 60, "conditions": ["(("], "variables": []}]"#).is_err());
    }

    #[test]
    fn grpc_frames() {
        let f = frame(b"abc");
        assert_eq!(&f[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(unframe(&f).unwrap(), b"abc");
        assert_eq!(unframe(&[0, 0, 0, 0, 0]).unwrap(), b"");
        assert!(unframe(&[0, 0, 0]).unwrap_err().contains("truncated"));
        assert!(unframe(&[1, 0, 0, 0, 1, 9]).unwrap_err().contains("compressed"));
        assert!(unframe(&[0, 0, 0, 0, 4, 1]).unwrap_err().contains("says 4 bytes"));
        assert!(unframe(&[0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
