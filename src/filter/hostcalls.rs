//! The few host calls tollgate makes through the raw ABI instead of the SDK's `hostcalls`.
//!
//! The SDK's wrappers `panic!` on any status they do not expect, and a panic traps the VM for every
//! later request on the worker. Envoy 1.40 returns such statuses for writes in these cases, so these
//! calls return the status instead:
//! - header writes: `BadArgument` once the request headers went on (or the map is gone);
//! - body writes: `BadArgument`/`NotFound` when the buffer is not available in this phase;
//! - property (filter-state) writes: `BadArgument`/`NotFound` on a stream that is being destroyed;
//! - local replies: refused when the stream was already answered or is gone;
//! - foreign functions: `clear_route_cache` answers `NotFound` where there is no route cache;
//! - continuing a held request and the tick period: the SDK's wrappers panic on any status but Ok,
//!   and a stream released by the tick may be going away.
//!
//! And one WASI call, `random_get` ([`random_u64`]), whose std wrapper panics on failure.
//!
//! Reads go through the SDK (`get_map_value_bytes`, `get_buffer`, ...), which return bytes and expect
//! only the statuses Envoy gives for them; but a whole header map is read here, kept in the bytes the
//! host wrote (the SDK's getter makes a String and a Vec of every name and value).

use crate::host::{encode_pairs, Headers};
use proxy_wasm::types::{BufferType, MapType};

/// The raw status every import returns; only Ok (0) is success here.
type Raw = u32;
const OK: Raw = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_replace_header_map_value(
        map: MapType,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> Raw;
    fn proxy_remove_header_map_value(map: MapType, key: *const u8, key_len: usize) -> Raw;
    fn proxy_set_header_map_pairs(map: MapType, data: *const u8, data_len: usize) -> Raw;
    fn proxy_get_header_map_pairs(map: MapType, out: *mut *mut u8, out_len: *mut usize) -> Raw;
    fn proxy_set_buffer_bytes(
        buffer: BufferType,
        start: usize,
        size: usize,
        data: *const u8,
        data_len: usize,
    ) -> Raw;
    fn proxy_set_property(
        path: *const u8,
        path_len: usize,
        value: *const u8,
        value_len: usize,
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
    fn proxy_call_foreign_function(
        name: *const u8,
        name_len: usize,
        args: *const u8,
        args_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> Raw;
    fn proxy_continue_stream(stream: proxy_wasm::types::StreamType) -> Raw;
    fn proxy_set_tick_period_milliseconds(period: u32) -> Raw;
}

/// Lets the current stream's request go on (a request held for capacity, from the tick).
pub fn continue_request() -> bool {
    let _p = crate::host::prof::span("host proxy_continue_stream");
    // SAFETY: no pointers.
    OK == unsafe { proxy_continue_stream(proxy_wasm::types::StreamType::HttpRequest) }
}

/// Sets the tick period of the current (or effective) context's root.
pub fn set_tick_period_ms(ms: u32) -> bool {
    // SAFETY: no pointers.
    OK == unsafe { proxy_set_tick_period_milliseconds(ms) }
}

pub fn replace_header(map: MapType, name: &str, value: &str) -> bool {
    let _p = crate::host::prof::span("host proxy_replace_header_map_value");
    // SAFETY: pointers and lengths come from live str slices.
    OK == unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    }
}

pub fn remove_header(map: MapType, name: &str) -> bool {
    let _p = crate::host::prof::span("host proxy_remove_header_map_value");
    // SAFETY: as above.
    OK == unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) }
}

/// Replaces a whole header map.
pub fn set_header_pairs(map: MapType, headers: &[(&[u8], &[u8])]) -> bool {
    let data = encode_pairs(headers.iter().copied());
    let _p = crate::host::prof::span("host proxy_set_header_map_pairs");
    // SAFETY: pointer and length come from a live Vec.
    OK == unsafe { proxy_set_header_map_pairs(map, data.as_ptr(), data.len()) }
}

/// A whole header map, as the host encodes it ([`Headers::decode`] indexes it in place; the SDK's
/// getter would copy each name and value into a String and a Vec of its own).
pub fn get_header_pairs(map: MapType) -> Headers {
    let mut out: *mut u8 = core::ptr::null_mut();
    let mut len: usize = 0;
    let _p = crate::host::prof::span("host proxy_get_header_map_pairs");
    // SAFETY: out-pointers point at locals.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut out, &mut len) };
    if out.is_null() {
        return Headers::default();
    }
    // SAFETY: the host allocated `len` bytes through the SDK's proxy_on_memory_allocate (a
    // Vec<u8> of that capacity) and hands them over.
    let buf = unsafe { Vec::from_raw_parts(out, len, len) };
    if status == OK {
        Headers::decode(buf)
    } else {
        Headers::default()
    }
}

pub fn set_buffer(kind: BufferType, start: usize, size: usize, data: &[u8]) -> bool {
    let _p = crate::host::prof::span("host proxy_set_buffer_bytes");
    // SAFETY: as above.
    OK == unsafe { proxy_set_buffer_bytes(kind, start, size, data.as_ptr(), data.len()) }
}

pub fn set_property(name: &str, value: &[u8]) -> bool {
    let _p = crate::host::prof::span("host proxy_set_property");
    // SAFETY: as above (a one-segment path needs no separators).
    OK == unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) }
}

pub fn send_local_response(code: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    let h = encode_pairs(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
    let details = b"tollgate";
    let _p = crate::host::prof::span("host proxy_send_local_response");
    // SAFETY: as above.
    OK == unsafe {
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
}

/// Calls a foreign function for its effect; whatever it returns is dropped.
pub fn call_foreign_function(name: &str) -> bool {
    let mut out: *mut u8 = core::ptr::null_mut();
    let mut len: usize = 0;
    let _p = crate::host::prof::span("host proxy_call_foreign_function");
    // SAFETY: as above; out-pointers point at locals.
    let status = unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            core::ptr::null(),
            0,
            &mut out,
            &mut len,
        )
    };
    if !out.is_null() {
        // SAFETY: the host allocated `len` bytes through the SDK's proxy_on_memory_allocate (a
        // Vec<u8> of that capacity) and hands them over: dropping them frees them.
        drop(unsafe { Vec::from_raw_parts(out, len, len) });
    }
    status == OK
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, buf_len: usize) -> u16;
}

/// Random bytes from the host (WASI `random_get`, which Envoy's Wasm host provides). Called
/// directly rather than through std, whose wrapper panics (traps the VM) when the host fails it.
pub fn random_u64() -> Option<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: pointer and length come from a live local array.
    let errno = unsafe { random_get(buf.as_mut_ptr(), buf.len()) };
    (errno == 0).then(|| u64::from_le_bytes(buf))
}
