//! Instructions tollgate's two roles execute per callback, counted by Valgrind's Callgrind through
//! gungraun: whole requests driven through `roles::listener` and `roles::upstream` on the fake host
//! (`host::fake`), the way Envoy calls them. A count of instructions is the same on every run,
//! whatever else the machine is doing, where wall-clock profiles of the module differ by 30-50%
//! from one run to the next on these machines: a map of where the module's own work goes, and a
//! regression test that cannot be noise (tests/bench/instructions.py compares it with the committed
//! baseline).
//!
//! What it counts: the roles compiled natively (x86-64, the module's release profile), so the
//! figures are a proxy for the work the module does in Envoy's VM, not a count of Wasm
//! instructions; host calls cost what the fake host costs (a copy, a map lookup), not the ~1-2 µs
//! of a crossing into Envoy (`make bench` measures those). Metrics and usage totals go to a
//! per-worker tally as the Envoy adapter keeps them (`filter/sdk_host.rs`), so the figures carry
//! the same work per request; the tick that flushes them is not per request and is not counted.
//!
//! Each benchmark is one callback of one case. Its setup (not counted) parses the configuration,
//! runs a few whole requests on the same worker first (so that the measured one finds the shared
//! data, the round-robin tickets and the tally as a busy worker does), then drives a fresh request
//! up to that callback. The requests, configurations and answers are those of `make bench`
//! (tests/bench/bench.py), written by tests/bench/instructions.py to target/instructions/inputs.

use gungraun::{library_benchmark, library_benchmark_group, main, Callgrind, LibraryBenchmarkConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{RefCell, UnsafeCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::hint::black_box;
use std::rc::Rc;
use tollgate::config::{parse, Config};
use tollgate::host::fake::FakeHost;
use tollgate::host::tally::{Attempt, Charge, LimitUse, Tally, ROW};
use tollgate::host::{Body, Headers, Host, Map};
use tollgate::limit::in_flight::Leases;
use tollgate::limit::waiting::WaitList;
use tollgate::pool::keypool::Tickets;
use tollgate::roles::listener::Listener;
use tollgate::roles::upstream::Upstream;
use tollgate::roles::Flow;
use tollgate::store::{FakeStore, SharedStore};

/// The allocator the counts are taken with (see [`Classes`]).
#[global_allocator]
static ALLOCATOR: Classes = Classes::new();

/// Blocks in size classes, each class a free list, carved from one arena reserved up front: an
/// allocation or a free costs the same few instructions whatever came before. The system
/// allocator's cost depends on the heap's history: the same request measured after parsing a
/// configuration of 10,000 consumers took up to 5% more instructions in a callback, all of them in
/// glibc's `_int_malloc`, which would hide the module's own work. Hand-written because the
/// allocator crates (dlmalloc, linked lists, buddies) are history-dependent in the same way: their
/// point is to reuse memory well, this one's is to cost the same every time. (The module's own
/// allocator in Envoy is wasi-libc's dlmalloc; these counts charge each allocation a constant.)
struct Classes {
    lock: AtomicBool,
    state: UnsafeCell<Arena>,
}

struct Arena {
    /// The next unused byte of the arena, and its end.
    next: usize,
    end: usize,
    /// Freed blocks of each class, linked through their first word.
    free: [usize; CLASSES],
}

/// 64-byte steps up to 1 KiB, then powers of two up to 1 MiB; larger blocks go to the system.
/// Every block starts on a 64-byte boundary, whatever was allocated before it: glibc's memcpy takes
/// more or fewer instructions with the alignment of what it copies.
const CLASSES: usize = 16 + 10;
const ARENA_BYTES: usize = 1 << 30;

fn class_of(size: usize) -> Option<(usize, usize)> {
    let size = size.max(1);
    if size <= 1024 {
        let c = size.div_ceil(64) - 1;
        return Some((c, (c + 1) * 64));
    }
    let bytes = size.next_power_of_two();
    let c = 16 + bytes.trailing_zeros() as usize - 11;
    (c < CLASSES).then_some((c, bytes))
}

impl Classes {
    const fn new() -> Self {
        Classes {
            lock: AtomicBool::new(false),
            state: UnsafeCell::new(Arena {
                next: 0,
                end: 0,
                free: [0; CLASSES],
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Arena) -> T) -> T {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock gives this thread the only access to the arena.
        let out = f(unsafe { &mut *self.state.get() });
        self.lock.store(false, Ordering::Release);
        out
    }
}

// SAFETY: the arena is only reached under the lock.
unsafe impl Sync for Classes {}

impl Arena {
    fn owns(&self, at: usize) -> bool {
        self.end != 0 && at >= self.end - ARENA_BYTES && at < self.end
    }
}

unsafe impl GlobalAlloc for Classes {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((class, bytes)) = class_of(layout.size()).filter(|_| layout.align() <= 16) else {
            return System.alloc(layout);
        };
        let block = self.with(|a| {
            let head = a.free[class];
            if head != 0 {
                a.free[class] = *(head as *const usize);
                return head;
            }
            if a.end == 0 {
                let base = System.alloc(Layout::from_size_align_unchecked(ARENA_BYTES, 4096)) as usize;
                if base == 0 {
                    return 0;
                }
                (a.next, a.end) = (base, base + ARENA_BYTES);
            }
            if a.next + bytes > a.end {
                return 0;
            }
            a.next += bytes;
            a.next - bytes
        });
        if block == 0 {
            System.alloc(layout)
        } else {
            block as *mut u8
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let at = ptr as usize;
        let class = class_of(layout.size())
            .filter(|_| layout.align() <= 16)
            .map(|(c, _)| c);
        let kept = self.with(|a| match class {
            Some(c) if a.owns(at) => {
                *(at as *mut usize) = a.free[c];
                a.free[c] = at;
                true
            }
            _ => false,
        });
        if !kept {
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let class = |s| class_of(s).map(|(c, _)| c);
        let at = ptr as usize;
        if layout.align() <= 16
            && class(layout.size()).is_some()
            && class(layout.size()) == class(new_size)
            && self.with(|a| a.owns(at))
        {
            return ptr;
        }
        let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

const INPUTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/instructions/inputs"
);

/// Whole requests a worker has served before the measured one.
const WARM_UP: usize = 4;

fn input(name: &str) -> Vec<u8> {
    let path = format!("{INPUTS}/{name}");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{path}: {e} (tests/bench/instructions.py writes the inputs: run `make instructions`)")
    })
}

/// One case, as tests/bench/instructions.py describes it in `cases.json`.
#[derive(Clone)]
struct Case {
    config: Rc<Config>,
    body: Vec<u8>,
    answer: Vec<u8>,
    content_type: String,
    /// The answer split as it reaches the filter: whole, or one SSE event per chunk.
    chunks: Vec<(usize, usize)>,
    consumer_key: String,
    /// Every request's body made new (its `__N__` numbered): each one a response cache miss.
    unique: bool,
    /// Answered by the listener from the response cache: no attempt, no answer from upstream.
    served_from_cache: bool,
}

fn case(name: &str) -> Case {
    let cases: serde_json::Value =
        serde_json::from_slice(&input("cases.json")).expect("cases.json");
    let c = &cases[name];
    let text = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("{name}.{k}")).to_string();
    let env: serde_json::Value = serde_json::from_slice(&input("env.json")).expect("env.json");
    let config = parse(&input(&text("config")), &|var| {
        env[var].as_str().map(str::to_string)
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let answer = input(&text("answer"));
    let chunks = if c["event_per_chunk"].as_bool() == Some(true) {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, w) in answer.windows(2).enumerate() {
            if w == b"\n\n" {
                out.push((start, i + 2));
                start = i + 2;
            }
        }
        if start < answer.len() {
            out.push((start, answer.len()));
        }
        out
    } else {
        vec![(0, answer.len())]
    };
    Case {
        config: Rc::new(config),
        body: input(&text("body")),
        answer,
        content_type: text("content_type"),
        chunks,
        consumer_key: text("consumer_key"),
        unique: c["unique"].as_bool() == Some(true),
        served_from_cache: c["served_from_cache"].as_bool() == Some(true),
    }
}

/// The fake host, with metrics and usage totals kept as the Envoy adapter keeps them: by their
/// parts, in the worker's tally, named at the tick.
struct BenchHost {
    fake: FakeHost,
    tally: Rc<RefCell<Tally>>,
}

impl Host for BenchHost {
    fn now_ms(&self) -> u64 {
        self.fake.now_ms()
    }
    fn header(&self, map: Map, name: &str) -> Option<Vec<u8>> {
        self.fake.header(map, name)
    }
    fn headers(&self, map: Map) -> Headers {
        self.fake.headers(map)
    }
    fn set_header(&mut self, map: Map, name: &str, value: &str) -> bool {
        self.fake.set_header(map, name, value)
    }
    fn remove_header(&mut self, map: Map, name: &str) -> bool {
        self.fake.remove_header(map, name)
    }
    fn set_headers(&mut self, map: Map, headers: &[(&[u8], &[u8])]) -> bool {
        self.fake.set_headers(map, headers)
    }
    fn body(&self, which: Body, size: usize) -> Vec<u8> {
        self.fake.body(which, size)
    }
    fn set_body(&mut self, which: Body, size: usize, data: &[u8]) -> bool {
        self.fake.set_body(which, size, data)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.fake.property(path)
    }
    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> bool {
        self.fake.set_filter_state(name, value)
    }
    fn clear_route_cache(&mut self) {
        self.fake.clear_route_cache()
    }
    fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
        self.fake.respond(status, headers, body)
    }
    fn count(&mut self, name: &str, by: u64) {
        self.tally.borrow_mut().count(name, by);
    }
    fn gauge(&mut self, name: &str, value: u64) {
        self.tally.borrow_mut().gauge(name, value);
    }
    fn add_to_row(&mut self, key: &str, row: [u64; ROW]) {
        self.tally.borrow_mut().add_row(key, row);
    }
    fn charge(&mut self, c: &Charge<'_>, row: [u64; ROW]) {
        self.tally.borrow_mut().charge(c, row);
    }
    fn limit_use(&mut self, consumer: &str, uses: &[LimitUse]) {
        self.tally.borrow_mut().limit_use(consumer, uses);
    }
    fn attempt(&mut self, provider: &str, what: Attempt) {
        self.tally.borrow_mut().attempt(provider, what);
    }
    fn store(&self) -> &dyn SharedStore {
        self.fake.store()
    }
    fn with_rotation(&mut self, f: &mut dyn FnMut(&mut Tickets, &dyn SharedStore)) {
        self.fake.with_rotation(f)
    }
    fn with_leases(&mut self, f: &mut dyn FnMut(&mut Leases, &dyn SharedStore)) {
        self.fake.with_leases(f)
    }
    fn with_waiting(&mut self, f: &mut dyn FnMut(&mut WaitList)) {
        self.fake.with_waiting(f)
    }
    fn gauge_add(&mut self, name: &str, delta: i64) {
        self.fake.gauge_add(name, delta)
    }
    fn histogram(&mut self, name: &str, value: u64) {
        self.fake.histogram(name, value)
    }
}

/// The callbacks of one request, by role and phase. (Envoy interleaves the two roles' response
/// callbacks; what each one does does not depend on it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Listener role: `on_http_request_headers` (held for the body).
    ListenerRequestHeaders,
    /// Listener role: the body's data callbacks (HTTP/1: the data, then an empty end of stream):
    /// identification, admission, the plan.
    ListenerRequestBody,
    /// Upstream role: `on_http_request_headers`: the key, the provider's headers.
    UpstreamRequestHeaders,
    /// Upstream role: the request body (rewritten or translated for the provider when it must be).
    UpstreamRequestBody,
    /// Upstream role: `on_http_response_headers`: what the answer says of the key and provider.
    UpstreamResponseHeaders,
    /// Upstream role: the response body's callbacks and the attempt's end.
    UpstreamResponseBody,
    /// Listener role: `on_http_response_headers`.
    ListenerResponseHeaders,
    /// Listener role: every response body callback but the last (counting, stream edits).
    ListenerResponseBody,
    /// Listener role: the last body callback (HTTP/1's empty end of stream) and `on_log`: charging
    /// (settlement, metrics, the access-log record), and a buffered answer's translation.
    Charge,
}

const STEPS: [Step; 9] = [
    Step::ListenerRequestHeaders,
    Step::ListenerRequestBody,
    Step::UpstreamRequestHeaders,
    Step::UpstreamRequestBody,
    Step::UpstreamResponseHeaders,
    Step::UpstreamResponseBody,
    Step::ListenerResponseHeaders,
    Step::ListenerResponseBody,
    Step::Charge,
];

/// One worker's state: shared data, round-robin tickets, leases on requests in flight, the tally.
struct Worker {
    store: Rc<FakeStore>,
    tickets: Rc<RefCell<Tickets>>,
    leases: Rc<RefCell<Leases>>,
    tally: Rc<RefCell<Tally>>,
    /// Requests begun on this worker.
    begun: std::cell::Cell<u64>,
}

/// A request in flight, between two callbacks.
pub struct Request {
    case: Rc<Case>,
    worker: Rc<Worker>,
    listener: Listener,
    lh: BenchHost,
    upstream: Upstream,
    uh: Option<BenchHost>,
    /// The answer's chunks, made ready before the step that hands them to a role.
    chunks: Vec<Vec<u8>>,
    /// Response bytes the listener role held (it answered Pause), handed to it again at the end.
    held: Vec<u8>,
    next: Step,
}

impl Request {
    fn new(case: Rc<Case>, worker: Rc<Worker>) -> Request {
        let n = worker.begun.get() + 1;
        worker.begun.set(n);
        let body = if case.unique {
            let text = String::from_utf8_lossy(&case.body);
            text.replace("__N__", &format!("{n:08}")).into_bytes()
        } else {
            case.body.clone()
        };
        let auth = format!("Bearer {}", case.consumer_key);
        let len = body.len().to_string();
        let mut fake = FakeHost::new(worker.store.clone()).with_request(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", auth.as_bytes()),
                ("content-type", b"application/json"),
                ("content-length", len.as_bytes()),
                ("user-agent", b"OpenAI/Python 1.82.0"),
                ("accept", b"application/json"),
            ],
        );
        fake.tickets = worker.tickets.clone();
        fake.leases = worker.leases.clone();
        fake.bodies.insert(Body::Request, body);
        Request {
            listener: Listener::new(case.config.clone()),
            upstream: Upstream::new(case.config.clone()),
            lh: BenchHost {
                fake,
                tally: worker.tally.clone(),
            },
            uh: None,
            chunks: Vec::new(),
            held: Vec::new(),
            next: Step::ListenerRequestHeaders,
            case,
            worker,
        }
    }

    /// What Envoy does before the next step's callbacks (not counted): the attempt's stream, the
    /// answer's headers and chunks.
    fn arrange(&mut self) {
        if self.case.served_from_cache && self.next > Step::ListenerRequestBody {
            return;
        }
        let answer_chunks = |c: &Case| -> Vec<Vec<u8>> {
            c.chunks.iter().map(|&(f, t)| c.answer[f..t].to_vec()).collect()
        };
        match self.next {
            Step::UpstreamRequestHeaders => {
                let mut fake = FakeHost::attempt_of(&self.lh.fake);
                fake.attributes.insert(
                    vec!["upstream".into(), "request_attempt_count".into()],
                    1u64.to_le_bytes().to_vec(),
                );
                self.uh = Some(BenchHost {
                    fake,
                    tally: self.worker.tally.clone(),
                });
            }
            Step::UpstreamResponseHeaders => {
                let length = self.case.answer.len().to_string();
                let mut headers = vec![
                    ("content-type", self.case.content_type.as_str()),
                    ("x-request-id", "req_8f1c2b7d9e0a4c6b"),
                    ("openai-processing-ms", "412"),
                    ("x-ratelimit-remaining-requests", "9999"),
                    ("x-ratelimit-remaining-tokens", "1999000"),
                ];
                if !self.case.content_type.contains("event-stream") {
                    headers.push(("content-length", length.as_str()));
                }
                let uh = self.uh.as_mut().expect("attempt");
                uh.fake.set_response(200, &headers, &[]);
            }
            Step::UpstreamResponseBody | Step::ListenerResponseBody => {
                self.chunks = answer_chunks(&self.case);
                // Taken from the end: the first chunk last.
                self.chunks.reverse();
            }
            Step::ListenerResponseHeaders => {
                let uh = self.uh.as_ref().expect("attempt");
                let answered = uh.fake.maps.get(&Map::ResponseHeaders).cloned();
                self.lh
                    .fake
                    .maps
                    .insert(Map::ResponseHeaders, answered.unwrap_or_default());
            }
            Step::Charge => {
                let held = core::mem::take(&mut self.held);
                self.lh.fake.bodies.insert(Body::Response, held);
            }
            Step::ListenerRequestHeaders | Step::ListenerRequestBody | Step::UpstreamRequestBody => {}
        }
    }

    /// The step's callbacks, as Envoy makes them (counted).
    fn act(&mut self) {
        let len = self.lh.fake.bodies.get(&Body::Request).map_or(0, Vec::len);
        let local = self.case.served_from_cache;
        match self.next {
            Step::ListenerRequestHeaders => {
                expect(self.listener.on_request_headers(&mut self.lh, false), Flow::Pause);
            }
            Step::ListenerRequestBody => {
                expect(self.listener.on_request_body(&mut self.lh, len, false), Flow::Pause);
                let served = if local { Flow::Stop } else { Flow::Continue };
                expect(self.listener.on_request_body(&mut self.lh, len, true), served);
                self.lh.fake.request_headers_sent = true;
            }
            // Answered from the cache: the stream ends with the log.
            Step::Charge if local => self.listener.on_log(&mut self.lh),
            _ if local => {}
            Step::UpstreamRequestHeaders => {
                let uh = self.uh.as_mut().expect("attempt");
                expect(self.upstream.on_request_headers(uh), Flow::Continue);
            }
            Step::UpstreamRequestBody => {
                let uh = self.uh.as_mut().expect("attempt");
                if self.upstream.on_request_body(uh, len, false) == Flow::Pause {
                    let len = uh.fake.bodies.get(&Body::Request).map_or(0, Vec::len);
                    expect(self.upstream.on_request_body(uh, len, true), Flow::Continue);
                }
            }
            Step::UpstreamResponseHeaders => {
                let uh = self.uh.as_mut().expect("attempt");
                expect(self.upstream.on_response_headers(uh), Flow::Continue);
            }
            Step::UpstreamResponseBody => {
                let uh = self.uh.as_mut().expect("attempt");
                while let Some(chunk) = self.chunks.pop() {
                    let size = chunk.len();
                    uh.fake.bodies.insert(Body::Response, chunk);
                    self.upstream.on_response_body(uh, size, false);
                }
                uh.fake.bodies.insert(Body::Response, Vec::new());
                self.upstream.on_response_body(uh, 0, true);
                self.upstream.on_done(uh);
            }
            Step::ListenerResponseHeaders => {
                expect(self.listener.on_response_headers(&mut self.lh, false), Flow::Continue);
            }
            Step::ListenerResponseBody => {
                while let Some(chunk) = self.chunks.pop() {
                    // A role that held the body before gets what it held and this chunk (Envoy's
                    // buffer); none of the cases does that for more than the last chunk.
                    let chunk = if self.held.is_empty() {
                        chunk
                    } else {
                        let mut all = core::mem::take(&mut self.held);
                        all.extend_from_slice(&chunk);
                        all
                    };
                    let size = chunk.len();
                    self.lh.fake.bodies.insert(Body::Response, chunk);
                    if self.listener.on_response_body(&mut self.lh, size, false) == Flow::Pause {
                        self.held = self.lh.fake.bodies.remove(&Body::Response).unwrap_or_default();
                    }
                }
            }
            Step::Charge => {
                let size = self.lh.fake.bodies.get(&Body::Response).map_or(0, Vec::len);
                expect(self.listener.on_response_body(&mut self.lh, size, true), Flow::Continue);
                self.listener.on_log(&mut self.lh);
            }
        }
    }

    /// Moves on to the next step, its inputs made ready.
    fn advance(&mut self) {
        if let Some(next) = STEPS.iter().copied().find(|s| *s > self.next) {
            self.next = next;
            self.arrange();
        }
    }
}

fn expect(got: Flow, want: Flow) {
    assert_eq!(got, want, "a callback answered otherwise than a served request's");
}

/// The request of case `name` ready for callback `step`, on a worker that has served a few.
fn prepare(name: &str, step: Step) -> Request {
    let case = Rc::new(case(name));
    let worker = Rc::new(Worker {
        store: Rc::new(FakeStore::new()),
        tickets: Rc::default(),
        leases: Rc::new(RefCell::new(Leases::new(1))),
        tally: Rc::default(),
        begun: Default::default(),
    });
    for i in 0..WARM_UP {
        // A case answered from the cache has its first request answered by the provider (and
        // stored).
        let local = case.served_from_cache && i > 0;
        let mut r = Request::new(case.clone(), worker.clone());
        r.case = Rc::new(Case {
            served_from_cache: local,
            ..(*case).clone()
        });
        for _ in STEPS {
            r.act();
            r.advance();
        }
        // A served request was charged: its usage reached the tally (or the cache answered).
        let want = if local { "cache=hit" } else { "usage=exact" };
        let record = r.lh.fake.state("tollgate");
        assert!(record.is_some_and(|rec| rec.contains(want)), "{name}: {want}");
    }
    let mut r = Request::new(case, worker);
    while r.next != step {
        r.act();
        r.advance();
    }
    r
}

fn json(step: Step) -> Request {
    prepare("json", step)
}
fn stream(step: Step) -> Request {
    prepare("stream", step)
}
fn prompt_16k(step: Step) -> Request {
    prepare("prompt_16k", step)
}
fn translated(step: Step) -> Request {
    prepare("translated", step)
}
fn json_10k_consumers(step: Step) -> Request {
    prepare("json_10k_consumers", step)
}
fn stream_null_usage(step: Step) -> Request {
    prepare("stream_null_usage", step)
}
fn context(step: Step) -> Request {
    prepare("context", step)
}
fn trim(step: Step) -> Request {
    prepare("trim", step)
}
fn trim_16k(step: Step) -> Request {
    prepare("trim_16k", step)
}
fn in_flight(step: Step) -> Request {
    prepare("in_flight", step)
}
fn allow(step: Step) -> Request {
    prepare("allow", step)
}
fn alias(step: Step) -> Request {
    prepare("alias", step)
}
fn cache_miss(step: Step) -> Request {
    prepare("cache_miss", step)
}
fn cache_hit(step: Step) -> Request {
    prepare("cache_hit", step)
}
fn waiting(step: Step) -> Request {
    prepare("waiting", step)
}
fn paced(step: Step) -> Request {
    prepare("paced", step)
}

/// The measured part: one callback (or the few Envoy makes for one step). The request is handed
/// back so that dropping it is not counted.
fn run(mut r: Request) -> Request {
    r.act();
    black_box(r)
}

// Each case's benchmarks are its steps in STEPS' order: `<case>_<i>` is STEPS[i].
#[library_benchmark]
#[benches::json(iter = STEPS, setup = json)]
#[benches::stream(iter = STEPS, setup = stream)]
#[benches::prompt_16k(iter = STEPS, setup = prompt_16k)]
#[benches::translated(iter = STEPS, setup = translated)]
#[benches::json_10k_consumers(iter = STEPS, setup = json_10k_consumers)]
#[benches::stream_null_usage(iter = STEPS, setup = stream_null_usage)]
#[benches::context(iter = STEPS, setup = context)]
#[benches::trim(iter = STEPS, setup = trim)]
#[benches::trim_16k(iter = STEPS, setup = trim_16k)]
#[benches::in_flight(iter = STEPS, setup = in_flight)]
#[benches::allow(iter = STEPS, setup = allow)]
#[benches::alias(iter = STEPS, setup = alias)]
#[benches::cache_miss(iter = STEPS, setup = cache_miss)]
#[benches::cache_hit(iter = STEPS, setup = cache_hit)]
#[benches::waiting(iter = STEPS, setup = waiting)]
#[benches::paced(iter = STEPS, setup = paced)]
fn step(r: Request) -> Request {
    run(r)
}

library_benchmark_group!(name = roles; benchmarks = step);

// Instructions only: no cache simulation (it would only slow the runs down).
main!(
    config = LibraryBenchmarkConfig::default().tool(Callgrind::with_args(["cache-sim=no"]));
    library_benchmark_groups = roles
);
