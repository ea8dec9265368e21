//! The module's side of the proxy-wasm ABI v0.2.1: the exported entry points, and the registry that
//! routes each callback to its context.
//!
//! Envoy creates a root context per plugin (`parent_context_id` 0; `super::new_root` makes it) and
//! one HTTP context per stream of that plugin (its root's `create_http_context` makes it).
//!
//! Exported: what the host calls for tollgate's HTTP filters. Left out: the callbacks of stream
//! (TCP) filters, and those the host calls only after the module asked for them (ticks, HTTP and
//! gRPC calls, shared queues, foreign functions), which tollgate never does. Trailers are left out
//! too: every callback is optional (ABI spec, "Callbacks exposed by the Wasm module"), and Envoy
//! treats a missing one as Continue, which is what tollgate would answer, without entering the VM.
//!
//! No entry point can panic: an unknown context id, or a callback arriving while another one
//! runs, gets the callback's safe default (Continue, done, nothing) instead of a trap.

use super::abi::LogLevel;
use core::cell::RefCell;
use core::hash::{BuildHasher, Hasher};
use hashbrown::HashMap;

/// What a stream callback tells the host: go on, or hold the stream (data is then buffered).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

pub trait RootContext {
    /// The plugin's configuration is `config_size` bytes of `BufferType::PluginConfiguration`.
    /// False makes Envoy refuse it.
    fn on_configure(&mut self, config_size: usize) -> bool;
    fn create_http_context(&self, context_id: u32) -> Box<dyn HttpContext>;
}

/// One HTTP stream (request and response). Every callback defaults to what Envoy does when the
/// module does not export it.
pub trait HttpContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
    /// The stream is over; true lets the host go on to `on_log` and `on_delete` at once.
    fn on_done(&mut self) -> bool {
        true
    }
    fn on_log(&mut self) {}
}

/// Context ids are small integers the host hands out in sequence, never client input: a multiply
/// spreads them over the table's buckets and control bytes, without the seeded hasher's set-up.
struct IdHash;

struct IdHasher(u64);

impl BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u32(u32::from(*b));
        }
    }
    fn write_u32(&mut self, id: u32) {
        // Fibonacci hashing; hashbrown takes the bucket from the low bits and the control byte
        // from the top seven of the low 32 (on wasm32), both well mixed by this.
        self.0 = (self.0 ^ u64::from(id)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

struct Registry {
    /// A handful at most (one per plugin sharing this VM): a scan beats hashing.
    roots: Vec<(u32, Box<dyn RootContext>)>,
    http: HashMap<u32, Box<dyn HttpContext>, IdHash>,
}

thread_local! {
    // A Wasm VM runs on one thread, and std's thread_local for wasm32 without threads is a plain
    // static (const-initialized: no lazy set-up check), so this costs what a `static` would,
    // without `unsafe`. The RefCell's flag is what turns a re-entrant callback into the default
    // answer below instead of aliasing a context.
    static REGISTRY: RefCell<Registry> = const {
        RefCell::new(Registry { roots: Vec::new(), http: HashMap::with_hasher(IdHash) })
    };
}

/// Runs `f` on the HTTP context `id`, or answers `default` when there is none (or the registry
/// is busy: the host called back into the VM from inside a callback).
fn http<R>(id: u32, default: R, f: impl FnOnce(&mut dyn HttpContext) -> R) -> R {
    REGISTRY.with(|r| match r.try_borrow_mut() {
        Ok(mut r) => match r.http.get_mut(&id) {
            Some(ctx) => f(ctx.as_mut()),
            None => default,
        },
        Err(_) => default,
    })
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// The WASI reactor's start, called once when the module is loaded (before any other export).
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the linker's static constructors (wasi-libc's among them), run once, first, as a
    // reactor must; nothing has touched the module's memory yet.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
    super::logger::init(LogLevel::Info);
}

/// Memory the host fills for a host call's answer; `abi::owned` takes it back as a `Vec<u8>`.
/// Null (which the host reads as a failed allocation) instead of an abort when memory is short.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    if size == 0 {
        // What an empty Vec<u8> holds; freeing it with capacity 0 deallocates nothing.
        return core::ptr::NonNull::<u8>::dangling().as_ptr();
    }
    match std::alloc::Layout::array::<u8>(size) {
        // SAFETY: a non-zero size, with the layout `Vec::<u8>::from_raw_parts(p, size, size)`
        // frees with.
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => core::ptr::null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    REGISTRY.with(|r| {
        let Ok(mut r) = r.try_borrow_mut() else {
            return;
        };
        let r = &mut *r;
        if parent_context_id == 0 {
            r.roots.retain(|(id, _)| *id != context_id);
            r.roots.push((context_id, super::new_root(context_id)));
        } else if let Some((_, root)) = r.roots.iter().find(|(id, _)| *id == parent_context_id) {
            r.http
                .insert(context_id, root.create_http_context(context_id));
        } else {
            // Its callbacks will find no context and answer Continue.
            log::error!(
                "context {context_id} created for unknown root context {parent_context_id}"
            );
        }
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> bool {
    // tollgate reads no VM configuration.
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_context_id: u32, config_size: usize) -> bool {
    REGISTRY.with(|r| {
        let Ok(mut r) = r.try_borrow_mut() else {
            return false;
        };
        match r.roots.iter_mut().find(|(id, _)| *id == root_context_id) {
            Some((_, root)) => root.on_configure(config_size),
            // No plugin to configure: Envoy refuses the configuration rather than run without.
            None => false,
        }
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(id: u32, num_headers: usize, end: u32) -> Action {
    http(id, Action::Continue, |c| {
        c.on_http_request_headers(num_headers, end != 0)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(id: u32, body_size: usize, end: u32) -> Action {
    http(id, Action::Continue, |c| {
        c.on_http_request_body(body_size, end != 0)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(id: u32, num_headers: usize, end: u32) -> Action {
    http(id, Action::Continue, |c| {
        c.on_http_response_headers(num_headers, end != 0)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(id: u32, body_size: usize, end: u32) -> Action {
    http(id, Action::Continue, |c| {
        c.on_http_response_body(body_size, end != 0)
    })
}

/// Root contexts (at shutdown) and unknown ids are done at once.
#[no_mangle]
pub extern "C" fn proxy_on_done(id: u32) -> bool {
    http(id, true, |c| c.on_done())
}

#[no_mangle]
pub extern "C" fn proxy_on_log(id: u32) {
    http(id, (), |c| c.on_log())
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(id: u32) {
    REGISTRY.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            if r.http.remove(&id).is_none() {
                r.roots.retain(|(root, _)| *root != id);
            }
        }
    })
}
