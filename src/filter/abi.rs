//! The proxy-wasm host calls tollgate makes, bound directly so that every failure is a `Result`,
//! and the ABI's enums (proxy-wasm ABI v0.2.1 values).
//!
//! The proxy-wasm Rust SDK's `hostcalls::` wrappers `panic!` on any status they do not expect (a
//! header write in a phase where the map is gone, a local reply the host refuses, a context that has
//! ended), and a panic traps the VM for every later request on the worker. These bindings return
//! the status. (The SDK's dispatcher is replaced too: see `dispatch`.)
//!
//! Each call is wrapped in a `prof::span`, which counts and times it in profiling builds
//! (`make profile`) and compiles to nothing otherwise.

/// Only the variants tollgate uses; the numbers are the ABI's.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    HttpRequestHeaders = 0,
    HttpResponseHeaders = 2,
}

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    PluginConfiguration = 7,
}

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
}

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// A host call's result (`proxy_status_t`). The host's raw value is read as a `u32` and mapped
/// here, never transmuted: a value outside the enum would be undefined behaviour.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    BadExpression = 5,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    ResultMismatch = 9,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    /// A code the spec does not define reads as `InternalFailure`.
    fn from_raw(raw: u32) -> Status {
        use Status::*;
        match raw {
            0 => Ok,
            1 => NotFound,
            2 => BadArgument,
            3 => SerializationFailure,
            4 => ParseFailure,
            5 => BadExpression,
            6 => InvalidMemoryAccess,
            7 => Empty,
            8 => CasMismatch,
            9 => ResultMismatch,
            11 => BrokenConnection,
            12 => Unimplemented,
            _ => InternalFailure,
        }
    }
}

/// The raw status every import returns.
type Raw = u32;
const OK: Raw = Status::Ok as Raw;
const NOT_FOUND: Raw = Status::NotFound as Raw;
const CAS_MISMATCH: Raw = Status::CasMismatch as Raw;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map: MapType,
        key: *const u8,
        key_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> Raw;
    fn proxy_get_header_map_pairs(map: MapType, out: *mut *mut u8, out_len: *mut usize) -> Raw;
    fn proxy_replace_header_map_value(
        map: MapType,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> Raw;
    fn proxy_remove_header_map_value(map: MapType, key: *const u8, key_len: usize) -> Raw;
    fn proxy_get_buffer_bytes(
        buffer: BufferType,
        start: usize,
        max: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> Raw;
    fn proxy_set_buffer_bytes(
        buffer: BufferType,
        start: usize,
        size: usize,
        data: *const u8,
        data_len: usize,
    ) -> Raw;
    fn proxy_get_property(
        path: *const u8,
        path_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> Raw;
    fn proxy_set_property(
        path: *const u8,
        path_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> Raw;
    fn proxy_get_shared_data(
        key: *const u8,
        key_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
        cas: *mut u32,
    ) -> Raw;
    fn proxy_set_shared_data(
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
        cas: u32,
    ) -> Raw;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_len: usize,
        body: *const u8,
        body_len: usize,
        headers: *const u8,
        headers_len: usize,
        grpc_status: i32,
    ) -> Raw;
    fn proxy_define_metric(
        kind: MetricType,
        name: *const u8,
        name_len: usize,
        out: *mut u32,
    ) -> Raw;
    fn proxy_increment_metric(id: u32, offset: i64) -> Raw;
    fn proxy_record_metric(id: u32, value: u64) -> Raw;
    fn proxy_set_effective_context(context_id: u32) -> Raw;
    fn proxy_continue_stream(stream: u32) -> Raw;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_len: usize,
        args: *const u8,
        args_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> Raw;
    fn proxy_get_current_time_nanoseconds(out: *mut u64) -> Raw;
    fn proxy_get_log_level(out: *mut u32) -> Raw;
    fn proxy_log(level: LogLevel, message: *const u8, message_len: usize) -> Raw;
}

/// Takes ownership of memory the host allocated through `dispatch::proxy_on_memory_allocate`.
fn owned(ptr: *mut u8, len: usize) -> Option<Vec<u8>> {
    if ptr.is_null() {
        return if len == 0 { Some(Vec::new()) } else { None };
    }
    // SAFETY: the host filled `len` bytes of a buffer it obtained from proxy_on_memory_allocate,
    // which allocates exactly `len` bytes (align 1) with the global allocator, as a Vec<u8> of
    // capacity `len` would, and leaves it to the host.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

fn fetch(call: impl FnOnce(*mut *mut u8, *mut usize) -> Raw) -> Result<Option<Vec<u8>>, Status> {
    let mut ptr: *mut u8 = core::ptr::null_mut();
    let mut len: usize = 0;
    match call(&mut ptr, &mut len) {
        OK => Ok(owned(ptr, len)),
        NOT_FOUND => Ok(None),
        s => Err(Status::from_raw(s)),
    }
}

fn status(s: Raw) -> Result<(), Status> {
    if s == OK {
        Ok(())
    } else {
        Err(Status::from_raw(s))
    }
}

pub fn header(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: pointers come from live slices; out-pointers point at locals.
    fetch(|o, l| {
        let _p = super::prof::span("host proxy_get_header_map_value");
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), o, l) }
    })
}

/// All headers of a map as (name, value bytes). Malformed host data yields what parsed.
pub fn header_pairs(map: MapType) -> Result<Vec<(String, Vec<u8>)>, Status> {
    // SAFETY: as above.
    let raw = fetch(|o, l| {
        let _p = super::prof::span("host proxy_get_header_map_pairs");
        unsafe { proxy_get_header_map_pairs(map, o, l) }
    })?
    .unwrap_or_default();
    Ok(decode_pairs(&raw))
}

/// The ABI's map encoding: u32 count, then (u32 key len, u32 value len) per pair, then each key
/// and value followed by a NUL.
fn decode_pairs(b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let u32_at = |i: usize| {
        b.get(i..i.saturating_add(4))
            .and_then(|s| s.try_into().ok())
            .map(|a: [u8; 4]| u32::from_le_bytes(a) as usize)
    };
    let Some(n) = u32_at(0) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(n.min(256));
    let mut p = 4usize.saturating_add(n.saturating_mul(8));
    for i in 0..n {
        let (Some(kl), Some(vl)) = (u32_at(4 + i * 8), u32_at(8 + i * 8)) else {
            break;
        };
        let Some(k) = b.get(p..p.saturating_add(kl)) else {
            break;
        };
        p = p.saturating_add(kl).saturating_add(1);
        let Some(v) = b.get(p..p.saturating_add(vl)) else {
            break;
        };
        p = p.saturating_add(vl).saturating_add(1);
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    out
}

pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> Result<(), Status> {
    // SAFETY: pointers come from live slices.
    status(match value {
        Some(v) => {
            let _p = super::prof::span("host proxy_replace_header_map_value");
            unsafe {
                proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
        }
        None => {
            let _p = super::prof::span("host proxy_remove_header_map_value");
            unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) }
        }
    })
}

pub fn buffer(kind: BufferType, start: usize, max: usize) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: as above.
    fetch(|o, l| {
        let _p = super::prof::span("host proxy_get_buffer_bytes");
        unsafe { proxy_get_buffer_bytes(kind, start, max, o, l) }
    })
}

pub fn set_buffer(kind: BufferType, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: as above.
    status({
        let _p = super::prof::span("host proxy_set_buffer_bytes");
        unsafe { proxy_set_buffer_bytes(kind, start, size, data.as_ptr(), data.len()) }
    })
}

fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let p = property_path(path);
    // SAFETY: as above.
    fetch(|o, l| {
        let _p = super::prof::span("host proxy_get_property");
        unsafe { proxy_get_property(p.as_ptr(), p.len(), o, l) }
    })
}

pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), Status> {
    let p = property_path(path);
    // SAFETY: as above.
    status({
        let _p = super::prof::span("host proxy_set_property");
        unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) }
    })
}

pub enum SharedError {
    CasMismatch,
    Other,
}

pub fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), Status> {
    let mut cas: u32 = 0;
    let mut ptr: *mut u8 = core::ptr::null_mut();
    let mut len: usize = 0;
    let _p = super::prof::span("host proxy_get_shared_data");
    // SAFETY: as above.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas) };
    match status {
        OK => Ok((owned(ptr, len), (cas != 0).then_some(cas))),
        NOT_FOUND => Ok((None, None)),
        s => Err(Status::from_raw(s)),
    }
}

pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
    let _p = super::prof::span("host proxy_set_shared_data");
    // SAFETY: as above.
    let status = unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    };
    match status {
        OK => Ok(()),
        CAS_MISMATCH => Err(SharedError::CasMismatch),
        _ => Err(SharedError::Other),
    }
}

pub fn send_local_response(code: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        h.extend_from_slice(&(k.len() as u32).to_le_bytes());
        h.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        h.extend_from_slice(k.as_bytes());
        h.push(0);
        h.extend_from_slice(v.as_bytes());
        h.push(0);
    }
    let details = b"tollgate";
    // SAFETY: as above.
    status({
        let _p = super::prof::span("host proxy_send_local_response");
        unsafe {
            proxy_send_local_response(
                u32::from(code),
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                h.as_ptr(),
                h.len(),
                -1,
            )
        }
    })
}

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0;
    // SAFETY: as above.
    status({
        let _p = super::prof::span("host proxy_define_metric");
        unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) }
    })
    .map(|()| id)
}

pub fn increment_metric(id: u32, by: i64) -> Result<(), Status> {
    // SAFETY: plain values.
    status({
        let _p = super::prof::span("host proxy_increment_metric");
        unsafe { proxy_increment_metric(id, by) }
    })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: plain values.
    status({
        let _p = super::prof::span("host proxy_record_metric");
        unsafe { proxy_record_metric(id, value) }
    })
}

pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: plain values.
    status({
        let _p = super::prof::span("host proxy_set_effective_context");
        unsafe { proxy_set_effective_context(context_id) }
    })
}

/// Resumes the effective context's paused request.
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: plain values. 0 is the ABI's HttpRequest stream.
    status({
        let _p = super::prof::span("host proxy_continue_stream");
        unsafe { proxy_continue_stream(0) }
    })
}

pub fn call_foreign_function(name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: as above.
    fetch(|o, l| {
        let _p = super::prof::span("host proxy_call_foreign_function");
        unsafe {
            proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), o, l)
        }
    })
}

pub fn now_nanos() -> Result<u64, Status> {
    let mut t = 0;
    // SAFETY: out-pointer to a local.
    status({
        let _p = super::prof::span("host proxy_get_current_time_nanoseconds");
        unsafe { proxy_get_current_time_nanoseconds(&mut t) }
    })
    .map(|()| t)
}

/// The level Envoy logs the `wasm` component at (it can change at runtime through the admin API).
pub fn log_level() -> Result<LogLevel, Status> {
    let mut level = 2;
    // SAFETY: out-pointer to a local.
    status(unsafe { proxy_get_log_level(&mut level) })?;
    Ok(match level {
        0 => LogLevel::Trace,
        1 => LogLevel::Debug,
        2 => LogLevel::Info,
        3 => LogLevel::Warn,
        4 => LogLevel::Error,
        _ => LogLevel::Critical,
    })
}

/// One line to Envoy's log (not counted by `prof`: logging is not part of a request's work).
pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    // SAFETY: pointer and length come from a live str.
    status(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
}
