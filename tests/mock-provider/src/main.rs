//! Mock OpenAI / Azure OpenAI / Anthropic provider for tollgate's end-to-end tests and demo.
//! HTTP/1.1 with keep-alive and chunked request bodies (what Envoy sends), one thread per connection.
//!
//! Serves OpenAI (`/v1/chat/completions`, `/v1/embeddings`), Azure OpenAI
//! (`/openai/deployments/{d}/chat/completions|embeddings?api-version=..`) and Anthropic (`/v1/messages`)
//! with deterministic answers; `/_mock/script`, `/_mock/reset`, `/_mock/requests`,
//! `/_mock/concurrency` and `/_mock/health` let tests script failures and inspect what arrived, and
//! how many requests were being answered at once (see tests/e2e/mock_client.py); `/_mock/limits`
//! enforces and announces rate limits per key (see `limits`).

mod api;
mod http;
mod limits;
mod state;
mod validate;

use serde_json::{json, Map, Value};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: mock-provider --port PORT [--host 127.0.0.1] [--name NAME] [--verbose]";

struct Shared {
    name: String,
    verbose: bool,
    state: Mutex<state::State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, state::State> {
        // Nothing panics while holding the lock, but a poisoned log is still better than none.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Args {
    host: String,
    port: u16,
    name: String,
    verbose: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        host: "127.0.0.1".into(),
        port: 18001,
        name: "mock".into(),
        verbose: false,
    };
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--port" => {
                args.port = value()?
                    .parse()
                    .map_err(|_| "--port must be 0..65535".to_string())?
            }
            "--host" => args.host = value()?,
            "--name" => args.name = value()?,
            "-v" | "--verbose" => args.verbose = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// As PID 1 in a container SIGTERM/SIGINT have no default action, so `docker stop` would hang:
/// exit explicitly on both.
#[cfg(unix)]
fn exit_on_signals() {
    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }
    extern "C" fn on_signal(_: i32) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { _exit(0) }
    }
    // SAFETY: the handler only calls an async-signal-safe function. 2 and 15 are SIGINT and SIGTERM
    // on every Unix.
    unsafe {
        signal(2, on_signal);
        signal(15, on_signal);
    }
}

fn main() {
    #[cfg(unix)]
    exit_on_signals();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            if msg.is_empty() {
                println!("{USAGE}");
                std::process::exit(0);
            }
            eprintln!("mock-provider: {msg}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind((args.host.as_str(), args.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "mock-provider {}: cannot listen on {}:{}: {e}",
                args.name, args.host, args.port
            );
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().map_or_else(
        |_| format!("{}:{}", args.host, args.port),
        |a| a.to_string(),
    );
    println!("mock-provider {} listening on {addr}", args.name);
    let _ = io::stdout().flush();
    let shared = Arc::new(Shared {
        name: args.name,
        verbose: args.verbose,
        state: Mutex::default(),
    });
    serve(&listener, &shared);
}

fn serve(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let shared = Arc::clone(shared);
                if let Err(e) =
                    std::thread::Builder::new().spawn(move || handle_conn(stream, &shared))
                {
                    eprintln!("mock-provider: cannot spawn a connection thread: {e}");
                }
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                eprintln!("mock-provider: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle_conn(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut w = stream;
    loop {
        let mut req = match http::read_head(&mut reader) {
            Ok(Some(req)) => req,
            Ok(None) | Err(http::Error::Io) => return,
            Err(http::Error::Bad(msg)) => return bad_request(&mut w, &mut reader, msg),
        };
        if req.expects_continue() && w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        match http::read_body(&mut reader, &mut req) {
            Ok(()) => {}
            Err(http::Error::Io) => return,
            Err(http::Error::Bad(msg)) => return bad_request(&mut w, &mut reader, msg),
        }
        let wait = |d: Duration| waited(reader.get_ref(), d);
        let conn = conn_fd(&w);
        match respond(shared, &req, &mut w, conn, &wait) {
            Ok(true) => continue,
            Ok(false) => return close(&w, &mut reader),
            Err(_) => return,
        }
    }
}

fn bad_request(w: &mut TcpStream, reader: &mut BufReader<TcpStream>, msg: &str) {
    let body = json!({"error": {"message": format!("bad request: {msg}"), "type": "invalid_request_error"}});
    let headers = [("content-type".to_string(), "application/json".to_string())];
    let _ = http::write_response(
        w,
        400,
        &headers,
        body.to_string().as_bytes(),
        true,
        false,
        false,
    );
    close(w, reader);
}

/// Half-close, then drain briefly: closing with unread input would send a RST that can destroy
/// the response still in flight to the client.
fn close(w: &TcpStream, reader: &mut BufReader<TcpStream>) {
    let _ = w.shutdown(Shutdown::Write);
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)));
    let _ = io::copy(&mut reader.take(1 << 20), &mut io::sink());
}

#[cfg(unix)]
fn conn_fd(s: &TcpStream) -> i32 {
    std::os::unix::io::AsRawFd::as_raw_fd(s)
}

#[cfg(not(unix))]
fn conn_fd(_: &TcpStream) -> i32 {
    -1
}

/// Waits `d` on a connection whose request was read: true when the time is up, false as soon as
/// the peer hangs up (a gateway that gave up on the request: a timeout, its client gone).
fn waited(stream: &TcpStream, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    let mut probe = [0u8; 1];
    let still_there = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break true;
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.peek(&mut probe) {
            Ok(0) => break false,
            // Bytes of a next request (pipelining): whether the peer leaves cannot be told.
            Ok(_) => {
                std::thread::sleep(left);
                break true;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break false,
        }
    };
    let _ = stream.set_read_timeout(None);
    still_there
}

/// Whether the peer closed (or reset) the connection `fd`, without waiting and without taking
/// anything from it.
#[cfg(target_os = "linux")]
fn peer_gone(fd: i32) -> bool {
    extern "C" {
        fn recv(fd: i32, buf: *mut u8, len: usize, flags: i32) -> isize;
    }
    const MSG_PEEK: i32 = 0x2;
    const MSG_DONTWAIT: i32 = 0x40;
    let mut probe = [0u8; 1];
    // SAFETY: a one-byte buffer on the stack; `fd` is a connection another thread keeps open for
    // as long as its request is registered (it counts itself out before closing).
    let n = unsafe { recv(fd, probe.as_mut_ptr(), 1, MSG_PEEK | MSG_DONTWAIT) };
    n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

#[cfg(not(target_os = "linux"))]
fn peer_gone(_fd: i32) -> bool {
    false
}

/// One request being answered, counted in `/_mock/concurrency` until its answer starts to go out
/// (or the connection is gone): `leave` early, or on drop.
struct InFlight<'a> {
    shared: &'a Shared,
    id: u64,
}

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared, key: Option<&str>, conn: i32) -> Self {
        let id = shared
            .state()
            .concurrency
            .enter(key.unwrap_or("-"), conn, &peer_gone);
        InFlight { shared, id }
    }

    fn leave(&mut self) {
        self.shared.state().concurrency.leave(self.id);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Answers one request; `Ok(true)` when the connection may carry another one. `wait` sleeps,
/// and says false when the peer hung up meanwhile.
fn respond<W: Write>(
    shared: &Shared,
    req: &http::Request,
    w: &mut W,
    conn: i32,
    wait: &dyn Fn(Duration) -> bool,
) -> io::Result<bool> {
    let keep = req.keep_alive();
    if req.path().starts_with("/_mock/") {
        let (status, ctype, body) = control(shared, req);
        let headers = [("content-type".to_string(), ctype.to_string())];
        http::write_response(w, status, &headers, &body, !keep, req.http10, false)?;
        return Ok(keep);
    }
    let time_ms = now_ms();
    let seq = shared.state().next_seq();
    let ctx = api::Ctx {
        name: &shared.name,
        seq,
        now_ms: time_ms,
    };
    let key = api::extract_key(req);
    let mut in_flight = InFlight::enter(shared, key.as_deref(), conn);
    let mut reset = false;
    let reply = match api::prepare(req, &ctx) {
        Err(reply) => reply,
        Ok(target) => {
            let lane = key.as_deref().unwrap_or("-");
            let anthropic = target.flavor == api::Flavor::Anthropic;
            let over = shared.state().limits.admit(lane, time_ms);
            let rule = match over {
                Err(wait_ms) => Some(state::Rule {
                    status: Some(429),
                    headers: [(
                        "retry-after".to_string(),
                        json!(wait_ms.div_ceil(1000).to_string()),
                    )]
                    .into_iter()
                    .collect(),
                    ..state::Rule::default()
                }),
                Ok(()) => shared
                    .state()
                    .take_rule(key.as_deref(), &req.target, &req.body),
            };
            reset = rule.as_ref().is_some_and(|r| r.reset);
            let mut reply = api::answer(&target, req, rule, &ctx);
            let mut st = shared.state();
            if let Some(u) = reply.usage.filter(|_| reply.status < 400) {
                st.limits.charge(lane, u.input + u.output);
            }
            reply
                .headers
                .extend(st.limits.announce(lane, time_ms, anthropic));
            reply
        }
    };
    let mut headers = Map::new();
    for (n, v) in &req.headers {
        let joined = match headers.get(n).and_then(Value::as_str) {
            Some(prev) => format!("{prev}, {v}"),
            None => v.clone(),
        };
        headers.insert(n.clone(), Value::String(joined));
    }
    let entry = state::Entry {
        seq,
        method: req.method.clone(),
        path: req.target.clone(),
        headers,
        body: String::from_utf8_lossy(&req.body).into_owned(),
        key: key.clone(),
        status: reply.status,
        usage: reply.usage,
        stream: api::requested_stream(req),
        chunked_request: req.chunked,
        time_ms,
    };
    // Logged before answering, so a client that got its answer always finds it in the log.
    shared.state().log.push(entry);
    if shared.verbose {
        eprintln!(
            "[{}] #{seq} {} {} key={} -> {}",
            shared.name,
            req.method,
            req.target,
            key.as_deref().unwrap_or("-"),
            reply.status
        );
    }
    if reply.delay_ms > 0 && !wait(Duration::from_millis(reply.delay_ms)) {
        return Ok(false);
    }
    if reset {
        // Counted out before the connection goes: the gateway learns of the end after this.
        in_flight.leave();
        return Ok(false);
    }
    match reply.body {
        api::Body::Full(body) => {
            in_flight.leave();
            http::write_response(
                w,
                reply.status,
                &reply.headers,
                &body,
                !keep,
                req.http10,
                reply.latin1_headers,
            )?;
            Ok(keep)
        }
        api::Body::Stream {
            events,
            cut,
            chunk_delay_ms,
        } => {
            http::write_stream_head(
                w,
                reply.status,
                &reply.headers,
                !keep,
                req.http10,
                reply.latin1_headers,
            )?;
            for (i, event) in events.iter().enumerate() {
                if i > 0 && chunk_delay_ms > 0 {
                    std::thread::sleep(Duration::from_millis(chunk_delay_ms));
                }
                if i + 1 == events.len() {
                    in_flight.leave();
                }
                http::write_chunk(w, event.as_bytes(), req.http10)?;
            }
            in_flight.leave();
            if cut {
                return Ok(false); // the caller closes without the terminating chunk
            }
            http::write_last_chunk(w, req.http10)?;
            Ok(keep && !req.http10)
        }
    }
}

fn control(shared: &Shared, req: &http::Request) -> (u16, &'static str, Vec<u8>) {
    const JSON: &str = "application/json";
    let reply = |status, v: Value| (status, JSON, v.to_string().into_bytes());
    match (req.method.as_str(), req.path()) {
        ("GET", "/_mock/health") => (200, "text/plain", b"ok".to_vec()),
        ("POST", "/_mock/reset") => {
            shared.state().reset();
            reply(200, json!({"ok": true}))
        }
        ("POST", "/_mock/script") => match shared.state().add_rules(&req.body) {
            Ok(n) => reply(200, json!({"ok": true, "rules": n})),
            Err(e) => reply(400, json!({"error": e})),
        },
        ("GET", "/_mock/concurrency") => {
            let c = shared.state().concurrency.clone();
            reply(
                200,
                serde_json::to_value(c).unwrap_or_else(|e| json!(e.to_string())),
            )
        }
        ("POST", "/_mock/limits") => match shared.state().limits.set(&req.body) {
            Ok(()) => reply(200, json!({"ok": true})),
            Err(e) => reply(400, json!({"error": e})),
        },
        ("GET", "/_mock/limits") => {
            let l = serde_json::to_value(&shared.state().limits)
                .unwrap_or_else(|e| json!(e.to_string()));
            reply(200, l)
        }
        ("GET", "/_mock/requests") => {
            let log =
                serde_json::to_value(&shared.state().log).unwrap_or_else(|e| json!(e.to_string()));
            reply(200, json!({"requests": log}))
        }
        (
            _,
            "/_mock/health" | "/_mock/reset" | "/_mock/script" | "/_mock/requests"
            | "/_mock/concurrency" | "/_mock/limits",
        ) => reply(405, json!({"error": "method not allowed"})),
        _ => reply(404, json!({"error": "unknown control endpoint"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn start() -> (std::net::SocketAddr, Arc<Shared>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: "t".into(),
            verbose: false,
            state: Mutex::default(),
        });
        let s = Arc::clone(&shared);
        std::thread::spawn(move || serve(&listener, &s));
        (addr, shared)
    }

    /// Reads one response (content-length or chunked) and returns (status, body).
    fn read_response(r: &mut impl BufRead) -> (u16, String) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let (mut len, mut chunked) = (0, false);
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length: ") {
                len = v.parse().unwrap();
            }
            chunked |= l == "transfer-encoding: chunked";
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                let n = usize::from_str_radix(line.trim_end(), 16).unwrap();
                let mut buf = vec![0; n + 2];
                r.read_exact(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
        } else {
            body.resize(len, 0);
            r.read_exact(&mut body).unwrap();
        }
        (status, String::from_utf8(body).unwrap())
    }

    #[test]
    fn pipelined_requests_on_one_connection() {
        let (addr, shared) = start();
        let mut s = TcpStream::connect(addr).unwrap();
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let (a, b) = chat.split_at(10);
        let stream_body = r#"{"stream":true,"messages":[]}"#;
        let pipelined = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer sk-1\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n\
             POST /v1/messages HTTP/1.1\r\nx-api-key: ant\r\nContent-Length: {}\r\n\r\n{stream_body}\
             GET /_mock/requests HTTP/1.1\r\nConnection: close\r\n\r\n",
            a.len(), b.len(), stream_body.len()
        );
        // Two writes split mid-header, to exercise reassembly across reads.
        let (p1, p2) = pipelined.split_at(37);
        s.write_all(p1.as_bytes()).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(p2.as_bytes()).unwrap();
        let mut r = BufReader::new(s);

        let (status, body) = read_response(&mut r);
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from t.");
        assert_eq!(v["usage"]["prompt_tokens"], (chat.len() / 10) as u64);

        let (status, body) = read_response(&mut r);
        assert_eq!(status, 200);
        assert!(body.starts_with("event: message_start\n"), "{body}");
        assert!(body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

        let (status, body) = read_response(&mut r);
        assert_eq!(status, 200);
        let log: Value = serde_json::from_str(&body).unwrap();
        let reqs = log["requests"].as_array().unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            (
                reqs[0]["seq"].as_u64(),
                reqs[0]["key"].as_str(),
                reqs[0]["chunked_request"].as_bool()
            ),
            (Some(1), Some("sk-1"), Some(true))
        );
        assert_eq!(reqs[0]["body"], chat);
        assert_eq!(
            (reqs[1]["key"].as_str(), reqs[1]["stream"].as_bool()),
            (Some("ant"), Some(true))
        );
        assert_eq!(reqs[1]["usage"]["output"], 3);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "connection closed after Connection: close");
        assert_eq!(shared.state().log.len(), 2);
    }

    fn concurrency(addr: std::net::SocketAddr) -> Value {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /_mock/concurrency HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (status, body) = read_response(&mut BufReader::new(s));
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    fn chat_request(key: &str, content: &str) -> String {
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#);
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn requests_being_answered_are_counted_per_key_until_answered_reset_or_abandoned() {
        let (addr, shared) = start();
        shared
            .state()
            .add_rules(
                br#"{"rules":[{"body_contains":"slow","delay_ms":3000},
                              {"body_contains":"reset","delay_ms":300,"reset":true},
                              {"delay_ms":300}]}"#,
            )
            .unwrap();
        let send = |key: &str, content: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(chat_request(key, content).as_bytes()).unwrap();
            s
        };
        let answered = [send("sk-1", "hi"), send("sk-1", "hi"), send("sk-2", "hi")];
        let reset = send("sk-2", "please reset");
        let abandoned = send("sk-1", "slow");
        std::thread::sleep(Duration::from_millis(150));
        let c = concurrency(addr);
        assert_eq!(
            (
                c["in_flight"]["sk-1"].as_u64(),
                c["in_flight"]["sk-2"].as_u64()
            ),
            (Some(3), Some(2))
        );
        // The gateway gives up on the slow one: counted out as soon as it hangs up.
        drop(abandoned);
        for s in answered {
            let (status, _) = read_response(&mut BufReader::new(s));
            assert_eq!(status, 200);
        }
        let mut rest = Vec::new();
        let mut r = reset;
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without an answer");
        std::thread::sleep(Duration::from_millis(50));
        let c = concurrency(addr);
        assert_eq!(c["total"], 0, "{c}");
        assert_eq!(
            (c["max_in_flight"]["sk-1"].as_u64(), c["max_total"].as_u64()),
            (Some(3), Some(5))
        );
    }

    #[test]
    fn garbage_gets_400_and_close() {
        let (addr, _) = start();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"\x00\xff nonsense\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("malformed request line"));
    }

    #[test]
    fn args() {
        let a = parse_args(
            ["--port=0", "--name", "x", "-v"]
                .map(String::from)
                .into_iter(),
        )
        .unwrap();
        assert_eq!(
            (a.port, a.name.as_str(), a.verbose, a.host.as_str()),
            (0, "x", true, "127.0.0.1")
        );
        assert!(parse_args(["--port", "70000"].map(String::from).into_iter()).is_err());
        assert!(parse_args(["--name"].map(String::from).into_iter()).is_err());
        assert!(parse_args(["--bogus"].map(String::from).into_iter()).is_err());
    }
}
