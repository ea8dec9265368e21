//! Minimal HTTP/1.x server side: request parsing (Content-Length and chunked bodies, pipelining) and
//! response writing (fixed-length and chunked streams). Generic over readers/writers so it is testable.

use std::io::{self, BufRead, Read, Write};

const MAX_LINE: usize = 16 * 1024;
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 200;
pub const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub enum Error {
    /// The peer closed or the socket failed: nothing sensible to answer.
    Io,
    /// Malformed request: answer 400 and close.
    Bad(&'static str),
}

impl From<io::Error> for Error {
    fn from(_: io::Error) -> Self {
        Error::Io
    }
}

#[derive(Debug, Default, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub http10: bool,
    /// Lowercased names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of a header joined with ", " (the RFC 9110 way to combine repeated fields).
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!vals.is_empty()).then(|| vals.join(", "))
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query_param(&self, name: &str) -> Option<&str> {
        let query = self.target.split_once('?')?.1;
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_joined(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    pub fn keep_alive(&self) -> bool {
        if self.http10 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    pub fn expects_continue(&self) -> bool {
        !self.http10
            && self
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// One line without its CRLF (a bare LF is tolerated). `Ok(None)` on EOF before any byte.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<Option<Vec<u8>>, Error> {
    let limit = MAX_LINE.min(*budget);
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return if buf.len() > limit {
            Err(Error::Bad("header line too long"))
        } else {
            Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
        };
    }
    *budget = budget.saturating_sub(n);
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(buf))
}

fn eof() -> Error {
    io::Error::from(io::ErrorKind::UnexpectedEof).into()
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads the request line and the headers. `Ok(None)` on a clean EOF between requests.
pub fn read_head<R: BufRead>(r: &mut R) -> Result<Option<Request>, Error> {
    let mut budget = MAX_HEAD;
    // RFC 9112 2.2: ignore empty lines before the request line (some clients send a CRLF after a body).
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let line = String::from_utf8_lossy(&line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::Bad("malformed request line"));
    };
    if !is_token(method) || target.is_empty() {
        return Err(Error::Bad("malformed request line"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(Error::Bad("unsupported HTTP version")),
    };
    let mut req = Request {
        method: method.into(),
        target: target.into(),
        http10,
        ..Request::default()
    };
    loop {
        let line = read_line(r, &mut budget)?.ok_or_else(eof)?;
        if line.is_empty() {
            break;
        }
        if req.headers.len() >= MAX_HEADERS {
            return Err(Error::Bad("too many headers"));
        }
        let line = String::from_utf8_lossy(&line);
        let Some((name, value)) = line.split_once(':') else {
            return Err(Error::Bad("malformed header"));
        };
        // Rejects obsolete line folding and "name :" as RFC 9112 requires.
        if !is_token(name) {
            return Err(Error::Bad("malformed header name"));
        }
        req.headers
            .push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Some(req))
}

fn read_exact_into<R: BufRead>(r: &mut R, body: &mut Vec<u8>, len: usize) -> Result<(), Error> {
    let got = r.by_ref().take(len as u64).read_to_end(body)?;
    if got < len {
        return Err(eof());
    }
    Ok(())
}

/// Reads the body announced by `req`'s headers into `req.body`.
pub fn read_body<R: BufRead>(r: &mut R, req: &mut Request) -> Result<(), Error> {
    if let Some(te) = req.header_joined("transfer-encoding") {
        // Only "chunked" as the final coding frames a request body (RFC 9112 6.3).
        let last = te.rsplit(',').next().unwrap_or("").trim();
        if !last.eq_ignore_ascii_case("chunked") {
            return Err(Error::Bad("unsupported transfer-encoding"));
        }
        req.chunked = true;
        return read_chunked(r, &mut req.body);
    }
    let Some(cl) = req.header_joined("content-length") else {
        return Ok(());
    };
    let mut values = cl.split(',').map(str::trim);
    let first = values.next().unwrap_or("");
    if values.any(|v| v != first) || first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Error::Bad("invalid content-length"));
    }
    let len: usize = first
        .parse()
        .map_err(|_| Error::Bad("invalid content-length"))?;
    if len > MAX_BODY {
        return Err(Error::Bad("body too large"));
    }
    read_exact_into(r, &mut req.body, len)
}

fn read_chunked<R: BufRead>(r: &mut R, body: &mut Vec<u8>) -> Result<(), Error> {
    loop {
        let mut budget = MAX_LINE;
        let line = read_line(r, &mut budget)?.ok_or_else(eof)?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or("").trim();
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Bad("invalid chunk size"));
        }
        let size = usize::from_str_radix(size, 16).map_err(|_| Error::Bad("invalid chunk size"))?;
        if size == 0 {
            // Trailer fields: read and drop them.
            let mut budget = MAX_HEAD;
            while !read_line(r, &mut budget)?.ok_or_else(eof)?.is_empty() {}
            return Ok(());
        }
        if size > MAX_BODY.saturating_sub(body.len()) {
            return Err(Error::Bad("body too large"));
        }
        read_exact_into(r, body, size)?;
        let mut budget = 2;
        if !read_line(r, &mut budget)?.ok_or_else(eof)?.is_empty() {
            return Err(Error::Bad("missing CRLF after chunk data"));
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Status",
    }
}

/// Header values go out as UTF-8, or as Latin-1 when `latin1` (values already checked to be
/// U+0000..U+00FF), which is how a test gets bytes that are not UTF-8 onto the wire.
fn head(
    status: u16,
    headers: &[(String, String)],
    close: bool,
    http10: bool,
    latin1: bool,
) -> Vec<u8> {
    let mut s = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (n, v) in headers {
        s.extend_from_slice(n.as_bytes());
        s.extend_from_slice(b": ");
        if latin1 {
            s.extend(
                v.chars()
                    .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')),
            );
        } else {
            s.extend_from_slice(v.as_bytes());
        }
        s.extend_from_slice(b"\r\n");
    }
    if close {
        s.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        s.extend_from_slice(b"connection: keep-alive\r\n");
    }
    s
}

/// A complete response with a content-length. `headers` must not contain framing headers.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
    http10: bool,
    latin1: bool,
) -> io::Result<()> {
    let mut out = head(status, headers, close, http10, latin1);
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// Starts a streamed response: chunked for HTTP/1.1; HTTP/1.0 has no chunking, so the body is
/// delimited by closing the connection (the caller must close).
pub fn write_stream_head<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    close: bool,
    http10: bool,
    latin1: bool,
) -> io::Result<()> {
    let mut out = head(status, headers, close || http10, false, latin1);
    if !http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    w.write_all(&out)?;
    w.flush()
}

/// One chunk in a single write so each SSE event leaves as its own segment.
pub fn write_chunk<W: Write>(w: &mut W, data: &[u8], http10: bool) -> io::Result<()> {
    if data.is_empty() {
        return Ok(()); // a zero-length chunk would end the body
    }
    if http10 {
        w.write_all(data)?;
    } else {
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        w.write_all(&out)?;
    }
    w.flush()
}

pub fn write_last_chunk<W: Write>(w: &mut W, http10: bool) -> io::Result<()> {
    if !http10 {
        w.write_all(b"0\r\n\r\n")?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    /// Hands out the input a few bytes at a time, like a socket under load.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        calls: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // Vary the slice size (1..=step) so boundaries land everywhere.
            self.calls += 1;
            let n = (self.calls % self.step + 1)
                .min(buf.len())
                .min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn reader(data: &[u8], step: usize) -> BufReader<Trickle> {
        BufReader::with_capacity(
            4,
            Trickle {
                data: data.to_vec(),
                pos: 0,
                step,
                calls: 0,
            },
        )
    }

    fn read_request<R: BufRead>(r: &mut R) -> Result<Option<Request>, Error> {
        let Some(mut req) = read_head(r)? else {
            return Ok(None);
        };
        read_body(r, &mut req)?;
        Ok(Some(req))
    }

    fn bad(input: &[u8]) -> &'static str {
        match read_request(&mut reader(input, 7)) {
            Err(Error::Bad(m)) => m,
            other => panic!("expected Bad, got {other:?}"),
        }
    }

    const CHUNKED: &[u8] = b"POST /v1/chat/completions?api-version=1 HTTP/1.1\r\nHost: x\r\n\
        Transfer-Encoding: chunked\r\nX-Dup: a\r\nx-dup: b\r\n\r\n\
        5;ext=1\r\nhello\r\n1\r\n \r\nA\r\nworld 1234\r\n0\r\nTrailer: t\r\n\r\n";

    #[test]
    fn chunked_body_split_at_every_boundary() {
        for step in 1..12 {
            let req = read_request(&mut reader(CHUNKED, step)).unwrap().unwrap();
            assert_eq!(req.body, b"hello world 1234", "step {step}");
            assert!(req.chunked);
            assert_eq!(req.method, "POST");
            assert_eq!(req.path(), "/v1/chat/completions");
            assert_eq!(req.query_param("api-version"), Some("1"));
            assert_eq!(req.header("host"), Some("x"));
            assert_eq!(req.header_joined("x-dup").as_deref(), Some("a, b"));
            assert!(req.keep_alive());
        }
    }

    #[test]
    fn pipelined_keep_alive_requests() {
        let mut input = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_vec();
        input.extend_from_slice(CHUNKED);
        input.extend_from_slice(b"\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n");
        for step in [1, 3, 64] {
            let mut r = reader(&input, step);
            let a = read_request(&mut r).unwrap().unwrap();
            assert_eq!(
                (a.target.as_str(), a.body.as_slice(), a.chunked),
                ("/a", &b"abc"[..], false)
            );
            let b = read_request(&mut r).unwrap().unwrap();
            assert_eq!(b.body, b"hello world 1234");
            let c = read_request(&mut r).unwrap().unwrap();
            assert_eq!(
                (c.method.as_str(), c.path(), c.body.len()),
                ("GET", "/c", 0)
            );
            assert!(!c.keep_alive());
            assert!(
                read_request(&mut r).unwrap().is_none(),
                "clean EOF after the last request"
            );
        }
    }

    #[test]
    fn http10_defaults_to_close_and_expect_continue() {
        let r = read_head(&mut reader(b"GET / HTTP/1.0\r\n\r\n", 3))
            .unwrap()
            .unwrap();
        assert!(r.http10 && !r.keep_alive());
        let r = read_head(&mut reader(
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
            3,
        ));
        assert!(r.unwrap().unwrap().keep_alive());
        let r = read_head(&mut reader(
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            3,
        ));
        assert!(r.unwrap().unwrap().expects_continue());
    }

    #[test]
    fn malformed_requests_are_bad_not_panics() {
        assert_eq!(bad(b"GARBAGE\r\n\r\n"), "malformed request line");
        assert_eq!(bad(b"GET / HTTP/2.0\r\n\r\n"), "unsupported HTTP version");
        assert_eq!(
            bad(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            "malformed header"
        );
        assert_eq!(
            bad(b"GET / HTTP/1.1\r\n folded: x\r\n\r\n"),
            "malformed header name"
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            "invalid content-length"
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            "invalid content-length"
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            "invalid content-length"
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n"),
            "body too large"
        );
        let te = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (tail, msg) in [
            (&b"zz\r\n"[..], "invalid chunk size"),
            (b"\r\n", "invalid chunk size"),
            (b"ffffffffffffffffffffffff\r\n", "invalid chunk size"),
            (b"fffffffffff\r\n", "body too large"),
            (b"3\r\nabcd\r\n0\r\n\r\n", "missing CRLF after chunk data"),
        ] {
            assert_eq!(bad(&[&te[..], tail].concat()), msg);
        }
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "unsupported transfer-encoding"
        );
        let long = [
            b"GET /".as_slice(),
            &vec![b'a'; MAX_LINE + 10],
            b" HTTP/1.1\r\n\r\n",
        ]
        .concat();
        assert_eq!(bad(&long), "header line too long");
    }

    #[test]
    fn truncated_input_is_an_io_error() {
        for input in [
            &b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"GET / HTTP/1.1\r\nHost: x",
        ] {
            assert!(
                matches!(read_request(&mut reader(input, 5)), Err(Error::Io)),
                "{input:?}"
            );
        }
    }

    #[test]
    fn latin1_header_values_go_out_as_single_bytes() {
        let mut out = Vec::new();
        let hdrs = [("retry-after".to_string(), "1\u{ff}\u{80}".to_string())];
        write_response(&mut out, 429, &hdrs, b"", true, false, true).unwrap();
        assert!(
            out.windows(16).any(|w| w == b"retry-after: 1\xff\x80"),
            "{out:?}"
        );
        let mut out = Vec::new();
        write_response(&mut out, 429, &hdrs, b"", true, false, false).unwrap();
        assert!(out
            .windows(18)
            .any(|w| w == "retry-after: 1\u{ff}\u{80}".as_bytes()));
    }

    #[test]
    fn writes_chunked_stream_framing() {
        let mut out = Vec::new();
        let hdrs = [("content-type".to_string(), "text/event-stream".to_string())];
        write_stream_head(&mut out, 200, &hdrs, false, false, false).unwrap();
        write_chunk(&mut out, b"data: x\n\n", false).unwrap();
        write_chunk(&mut out, b"", false).unwrap();
        write_last_chunk(&mut out, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
             9\r\ndata: x\n\n\r\n0\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, 429, &[], b"{}", true, false, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
        );
    }
}
