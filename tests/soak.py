"""`make soak`: a long mixed run through one real Envoy that proves nothing is lost or leaked.

Two mock providers (openai: 3 keys, anthropic: 1 key) behind one Envoy (2 workers) with tollgate; many
client threads on keep-alive connections send a deterministic mix: chat completions streamed or not
(with and without include_usage), Anthropic /v1/messages, an over-quota consumer, wrong keys, and
clients that hang up mid-stream. A chaos thread scripts 429s (retry-after: 1) on one openai key and
occasional 503s on both providers. Afterwards the shared-data totals (`/tollgate/status`) must equal,
per consumer and per key, what the mocks reported for the answers clients received; Envoy's RSS must
be flat; no VM may have trapped; no 5xx may reach a client unless a mock answered one.

    .venv/bin/python tests/soak.py                   # 200k requests (or --seconds, whichever first)
    .venv/bin/python tests/soak.py --requests 20000  # a short run

Every request carries `x-soak-id`, which the mocks log, so each client answer is matched to the
provider attempts behind it. Writes SOAK.md (the latest run's figures). Exit code 1 on any failure.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import http.client
import itertools
import json
import os
import platform
import random
import re
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import ACCESS_LOG_FORMAT, ENVOY, MOCK_BIN, WASM, Envoy, free_port, gateway_config  # noqa: E402
from mock_client import start_mock, stop_mock  # noqa: E402

OUT = ROOT / "SOAK.md"
STATUS = "/tollgate/status"
ENV = {
    "SOAK_OPENAI_KEY_1": "sk-soak-oa1", "SOAK_OPENAI_KEY_2": "sk-soak-oa2", "SOAK_OPENAI_KEY_3": "sk-soak-oa3",
    "SOAK_ANTHROPIC_KEY_1": "sk-soak-an1",
    "SOAK_TEAM_A": "tg-soak-team-a", "SOAK_TEAM_B": "tg-soak-team-b",
    "SOAK_TEAM_DC": "tg-soak-team-dc", "SOAK_TEAM_TIGHT": "tg-soak-team-tight",
    "SOAK_ADMIN": "tg-soak-admin",
}
KEY_OF_SECRET = {ENV[f"SOAK_OPENAI_KEY_{i}"]: ("openai", f"oa-{i}") for i in (1, 2, 3)}
KEY_OF_SECRET[ENV["SOAK_ANTHROPIC_KEY_1"]] = ("anthropic", "an-1")
THROTTLED_KEY = ENV["SOAK_OPENAI_KEY_1"]
GENEROUS = [{"metric": "requests", "amount": 1_000_000_000, "window": "1m"},
            {"metric": "total_tokens", "amount": 1_000_000_000_000, "window": "1m"}]
TIGHT_RPS = 10  # the tight consumer's budget; it is offered several times that
PLUGIN = {
    "consumers": {"list": [
        {"name": "team-a", "key_env": "SOAK_TEAM_A", "limits": GENEROUS},
        {"name": "team-b", "key_env": "SOAK_TEAM_B", "limits": GENEROUS},
        # Clients that hang up mid-stream, on their own consumer: its tokens are estimates by design,
        # so the other consumers' tokens can be held to exact equality.
        {"name": "team-dc", "key_env": "SOAK_TEAM_DC", "limits": GENEROUS},
        {"name": "team-tight", "key_env": "SOAK_TEAM_TIGHT",
         "limits": [{"metric": "requests", "amount": TIGHT_RPS * 10, "window": "10s"}]},
    ]},
    "providers": [
        {"name": "openai", "type": "openai", "rotation": "round_robin",
         "keys": [{"id": f"oa-{i}", "env": f"SOAK_OPENAI_KEY_{i}"} for i in (1, 2, 3)]},
        {"name": "anthropic", "type": "anthropic", "keys": [{"id": "an-1", "env": "SOAK_ANTHROPIC_KEY_1"}],
         "models": {"gpt-4o-mini": "claude-haiku-4-5", "gpt-4o": "claude-sonnet-4-5",
                    "claude-haiku-4-5": "claude-haiku-4-5"}},
    ],
    "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}, "gpt-4o": {"input": 2.5, "output": 10}},
    "health": {"default_cooldown_s": 2},
    "status": {"path": STATUS, "admin_key_env": "SOAK_ADMIN"},
}
# kind -> (weight, consumer). Weights are per mille of requests.
MIX = {
    "chat": (330, "team-a"), "chat_stream": (150, "team-b"), "chat_stream_usage": (150, "team-a"),
    "messages": (100, "team-b"), "messages_stream": (100, "team-a"),
    "tight": (140, "team-tight"), "bad_key": (15, None), "disconnect": (15, "team-dc"),
}
CONSUMER_KEY = {"team-a": ENV["SOAK_TEAM_A"], "team-b": ENV["SOAK_TEAM_B"], "team-dc": ENV["SOAK_TEAM_DC"],
                "team-tight": ENV["SOAK_TEAM_TIGHT"], None: "tg-soak-wrong-key"}
SLOW = "soak=slow"  # query marker the openai mock matches (path_contains) to stream slowly
CUT_AFTER_EVENTS = 20  # a disconnecting client reads this many SSE events of a 1000-word stream
FIELDS = ("requests", "input_tokens", "output_tokens", "estimated_requests")


class Result:
    __slots__ = ("kind", "status", "complete", "provider", "key_id", "code", "error", "problem", "tail")

    def __init__(self, kind, status=0, complete=False, provider="", key_id="", code="", error="", problem="", tail=b""):
        self.kind, self.status, self.complete, self.provider = kind, status, complete, provider
        self.key_id, self.code, self.error, self.problem, self.tail = key_id, code, error, problem, tail


# ---------------------------------------------------------------- traffic

def body_for(i: int, kind: str) -> tuple[str, dict]:
    words = "soak " * (i % 37 + 1)
    model = "gpt-4o" if i % 5 == 0 else "gpt-4o-mini"
    if kind.startswith("messages"):
        body = {"model": "claude-haiku-4-5", "max_tokens": 64 + i % 64,
                "messages": [{"role": "user", "content": f"request {i}: {words}"}]}
        if kind == "messages_stream":
            body["stream"] = True
        return "/v1/messages", body
    body = {"model": model, "messages": [{"role": "user", "content": f"request {i}: {words}"}]}
    if i % 3 == 0:
        body["max_tokens"] = 50 + i % 200
    if kind in ("chat_stream", "chat_stream_usage", "disconnect"):
        body["stream"] = True
    if kind == "chat_stream_usage":
        body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions?" + SLOW) if kind == "disconnect" else "/v1/chat/completions", body


def error_code(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error") or {}
        return str(err.get("code") or err.get("type") or "")
    except (ValueError, AttributeError):
        return "unparsed"


def check_body(kind: str, status: int, raw: bytes) -> str:
    """A problem with the answer's shape ("" if none): the dialect and stream the client asked for."""
    if not 200 <= status < 300:
        return ""
    if kind in ("chat_stream", "chat_stream_usage"):
        if not raw.rstrip().endswith(b"data: [DONE]"):
            return "stream without [DONE]"
        usage_chunks = raw.count(b'"usage":{')
        return "" if usage_chunks == (kind == "chat_stream_usage") else f"stream with {usage_chunks} usage chunks"
    if kind == "messages_stream":
        return "" if b"event: message_stop" in raw else "stream without message_stop"
    try:
        j = json.loads(raw)
    except ValueError:
        return "unparsable JSON answer"
    if kind.startswith("messages"):
        ok = j.get("type") == "message" and j.get("content")
    else:
        ok = j.get("object") == "chat.completion" and j.get("choices")
    return "" if ok else "unexpected JSON answer shape"


def one_request(conn: http.client.HTTPConnection, i: int, kind: str) -> Result:
    path, body = body_for(i, kind)
    consumer = MIX[kind][1]
    headers = {"content-type": "application/json", "x-soak-id": str(i)}
    if kind.startswith("messages"):
        headers["x-api-key"] = CONSUMER_KEY[consumer]
        headers["anthropic-version"] = "2023-06-01"
    else:
        headers["authorization"] = f"Bearer {CONSUMER_KEY[consumer]}"
    conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    r = conn.getresponse()
    raw = r.read()
    problem = check_body(kind, r.status, raw)
    # http.client read the whole body (framing checked), so tollgate saw the whole response too.
    return Result(kind, r.status, True, r.getheader("x-tollgate-provider") or "",
                  r.getheader("x-tollgate-key-id") or "", "" if r.status < 300 else error_code(raw), problem=problem,
                  tail=raw[-300:] if problem or r.status >= 300 else b"")


def disconnecting_request(port: int, i: int) -> Result:
    """A raw client that reads part of a (slow) stream and hangs up; a fast stream (one that
    failed over to anthropic, which the slow rule does not reach) is read to its end."""
    path, body = body_for(i, "disconnect")
    data = json.dumps(body)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall((f"POST {path} HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
                   f"authorization: Bearer {CONSUMER_KEY['team-dc']}\r\nx-soak-id: {i}\r\n"
                   f"content-length: {len(data)}\r\n\r\n{data}").encode())
        buf, head, status, hdrs = b"", None, 0, {}
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return Result("disconnect", status, False, hdrs.get("x-tollgate-provider", ""),
                              hdrs.get("x-tollgate-key-id", ""), error="server closed mid-response")
            buf += chunk
            if head is None and b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ")[1])
                hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
            if head is None:
                continue
            res = Result("disconnect", status, False, hdrs.get("x-tollgate-provider", ""), hdrs.get("x-tollgate-key-id", ""))
            if "content-length" in hdrs:
                if len(buf) >= int(hdrs["content-length"]):
                    res.complete, res.code = True, ("" if status < 300 else error_code(buf))
                    return res
            elif buf.endswith(b"0\r\n\r\n"):
                res.complete = True
                return res
            elif status == 200 and buf.count(b"data:") >= CUT_AFTER_EVENTS:
                return res  # hang up mid-stream
    finally:
        s.close()


class Traffic:
    def __init__(self, port: int, n: int, seconds: float, workers: int, seed: int):
        self.port, self.n, self.deadline = port, n, time.monotonic() + seconds
        rng = random.Random(seed)
        kinds, weights = zip(*((k, w) for k, (w, _) in MIX.items()))
        self.kinds = rng.choices(kinds, weights=weights, k=n)
        self.results: list[Result | None] = [None] * n
        self.next_id = itertools.count()
        self.done = 0
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]

    def work(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        # The deadline is checked before an id is taken, so the ids sent are exactly 0..sent-1.
        while time.monotonic() < self.deadline:
            i = next(self.next_id)
            if i >= self.n:
                break
            kind = self.kinds[i]
            try:
                if kind == "disconnect":
                    res = disconnecting_request(self.port, i)
                else:
                    res = one_request(conn, i, kind)
            except (OSError, http.client.HTTPException) as e:
                res = Result(kind, error=f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.results[i] = res
            with self.lock:
                self.done += 1
        conn.close()

    def start(self) -> None:
        for t in self.workers:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.workers)

    def join(self) -> None:
        for t in self.workers:
            t.join()


def chaos(mocks: dict, stop: threading.Event, scripted: collections.Counter) -> None:
    """Every second two 429s (retry-after: 1) on key oa-1; every 3 s one 503 on openai; every 10 s
    one 503 on anthropic. Rules are appended after the slow-stream rule, which disconnecting
    clients always hit first, so those streams stay slow."""
    tick = 0
    while not stop.wait(1.0):
        tick += 1
        mocks["openai"].script({"key": THROTTLED_KEY, "status": 429, "headers": {"retry-after": "1"}, "times": 2})
        scripted["openai 429 (oa-1)"] += 2
        if tick % 3 == 0:
            mocks["openai"].script({"status": 503, "times": 1})
            scripted["openai 503"] += 1
        if tick % 10 == 0:
            mocks["anthropic"].script({"status": 503, "times": 1})
            scripted["anthropic 503"] += 1


# ---------------------------------------------------------------- measurements

def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def status(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", STATUS, headers={"authorization": f"Bearer {ENV['SOAK_ADMIN']}"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return json.loads(body)


def settled_status(port: int, timeout: float = 20) -> dict:
    """Teardown charges (hung-up clients) land shortly after the last answer: wait until the
    totals stop moving."""
    prev, stable_since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while True:
        st = status(port)
        cur = json.dumps(st["consumers"], sort_keys=True)
        if cur != prev:
            prev, stable_since = cur, time.monotonic()
        elif time.monotonic() - stable_since > 2 or time.monotonic() > deadline:
            return st
        time.sleep(0.3)


def mock_log(mock) -> dict[int, list[dict]]:
    """Attempts by soak id: (status, usage, key, path)."""
    by_id: dict[int, list[dict]] = collections.defaultdict(list)
    # The mock serializes its whole log in one answer: minutes' worth takes a while.
    for e in mock._call("GET", "/_mock/requests", timeout=600)["requests"]:
        sid = e["headers"].get("x-soak-id")
        by_id[int(sid) if sid and sid.isdigit() else -1].append(
            {"mock": mock.name, "status": e["status"], "usage": e["usage"], "key": e["key"], "path": e["path"]})
    return by_id


def zero() -> dict:
    return dict.fromkeys(FIELDS, 0)


def expected_totals(results, by_id):
    """What tollgate must have counted, from what the clients got and what the mocks reported.

    - Refused by the listener (wrong key 401, quota 429, providers exhausted 429): no provider
      attempt and no tollgate provider header. Counted nowhere.
    - Anything else was admitted and is charged once: a complete 2xx with the usage the mock
      reported for the one 2xx attempt (provider 429s/503s that were retried are not billed); a
      non-2xx answer (every retry failed) as a request with 0 tokens; a 2xx the client hung up on
      (or one without reported usage) as an estimated request, tokens unknown here.
    """
    cons = collections.defaultdict(zero)
    keys = collections.defaultdict(zero)
    est_ids, anomalies = collections.defaultdict(list), []
    refused = collections.Counter()
    for i, r in enumerate(results):
        if r is None or r.error:
            continue
        attempts = by_id.get(i, [])
        if not attempts and not r.provider and r.status in (400, 401, 413, 429):
            refused[f"{r.status} {r.code or '-'}"] += 1
            continue
        consumer = MIX[r.kind][1]
        if consumer is None:
            anomalies.append(f"#{i} wrong-key request was not refused: {r.status}")
            continue
        row, krow = cons[consumer], (keys[(r.provider, r.key_id)] if r.provider and r.key_id else zero())
        row["requests"] += 1
        krow["requests"] += 1
        if not 200 <= r.status < 300:
            continue
        ok = [a for a in attempts if 200 <= a["status"] < 300]
        if len(ok) != 1:
            anomalies.append(f"#{i} {r.kind}: client got {r.status}, mocks logged {len(ok)} 2xx attempts")
            continue
        a = ok[0]
        if KEY_OF_SECRET.get(a["key"]) != (r.provider, r.key_id):
            anomalies.append(f"#{i} answered by {KEY_OF_SECRET.get(a['key'])} but headers say {r.provider}/{r.key_id}")
        u = a["usage"]
        if not r.complete or u is None:
            row["estimated_requests"] += 1
            krow["estimated_requests"] += 1
            est_ids[consumer].append(i)
            continue
        for rw in (row, krow):
            rw["input_tokens"] += u["input"] + u["cache_read"] + u["cache_write"]
            rw["output_tokens"] += u["output"]
    return cons, keys, est_ids, refused, anomalies


def access_log_by_id(path: Path) -> dict[int, str]:
    out = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            m = re.search(r" soak_id=(\d+)", line)
            if m:
                out[int(m.group(1))] = line
    return out


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=600, help="stop sending after this long")
    ap.add_argument("--workers", type=int, default=48, help="client threads")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help="do not write SOAK.md")
    args = ap.parse_args()
    missing = [str(p) for p in (WASM, MOCK_BIN, ENVOY) if not p.exists()]
    if missing:
        print(f"run through `make soak` (missing: {', '.join(missing)})")
        return 2

    procs, mocks = [], {}
    envoy = None
    try:
        for name in ("openai", "anthropic"):
            proc, mocks[name] = start_mock(str(MOCK_BIN), 0, name)
            procs.append(proc)
        mocks["openai"].script({"path_contains": SLOW, "words": 1000, "chunk_delay_ms": 5})
        endpoints = [{"provider": "openai", "port": mocks["openai"].port, "priority": 0},
                     {"provider": "anthropic", "port": mocks["anthropic"].port, "priority": 1}]
        cfg = gateway_config(PLUGIN, endpoints, listener_port=free_port(), admin_port=free_port(),
                             access_log="/dev/null", env_keys=sorted(ENV))
        envoy = Envoy(cfg, env=ENV, concurrency=2)
        access_log = envoy.tmp / "access.log"
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        log_cfg = hcm["access_log"][0]["typed_config"]
        log_cfg["path"] = str(access_log)
        log_cfg["log_format"]["text_format_source"]["inline_string"] = \
            ACCESS_LOG_FORMAT.rstrip("\n") + " soak_id=%REQ(X-SOAK-ID)%\n"
        envoy.config_path.write_text(json.dumps(cfg, indent=1))
        envoy.start()
        pid = envoy.proc.pid
        print(f"envoy pid {pid} on :{envoy.port} (admin :{envoy.admin_port}), logs in {envoy.tmp}")
        rss = {"start": rss_kb(pid)}
        stats0 = envoy.stats()

        traffic = Traffic(envoy.port, args.requests, args.seconds, args.workers, args.seed)
        stop, scripted = threading.Event(), collections.Counter()
        chaos_thread = threading.Thread(target=chaos, args=(mocks, stop, scripted), daemon=True)
        t0 = time.monotonic()
        traffic.start()
        chaos_thread.start()
        marks = [10, 20, 30, 40, 50, 60, 70, 80, 90]
        last_print = t0
        while traffic.alive():
            time.sleep(0.2)
            done = traffic.done
            progress = max(done / args.requests, (time.monotonic() - t0) / args.seconds) * 100
            while marks and progress >= marks[0]:
                rss[f"{marks.pop(0)}%"] = rss_kb(pid)
            if time.monotonic() - last_print >= 10:
                last_print = time.monotonic()
                el = last_print - t0
                print(f"  {el:6.0f}s  {done:7d} done  {done / el:6.0f} req/s  rss {rss_kb(pid) / 1024:.1f} MiB", flush=True)
        traffic.join()
        elapsed = time.monotonic() - t0
        stop.set()
        chaos_thread.join()
        rss["100%"] = rss_kb(pid)
        sent = sum(r is not None for r in traffic.results)
        results = traffic.results[:sent]
        print(f"sent {sent} in {elapsed:.0f}s ({sent / elapsed:.0f} req/s); settling...", flush=True)

        st = settled_status(envoy.port)
        by_id: dict[int, list[dict]] = collections.defaultdict(list)
        mock_statuses = collections.Counter()
        for m in mocks.values():
            for sid, attempts in mock_log(m).items():
                by_id[sid].extend(attempts)
                mock_statuses.update(f"{a['mock']} {a['status']}" for a in attempts)
        stats = envoy.stats()
        log = envoy.log()
        acc = access_log_by_id(access_log)
        return report(args, results, elapsed, rss, st, by_id, mock_statuses, scripted, stats0, stats, log, acc)
    finally:
        if envoy:
            envoy.stop()
        for p in procs:
            stop_mock(p)


def report(args, results, elapsed, rss, st, by_id, mock_statuses, scripted, stats0, stats, log, acc) -> int:
    failures: list[str] = []
    sent = len(results)
    outcomes = collections.Counter()
    for r in results:
        if r.error:
            outcomes[f"{r.kind}: client error {r.error[:60]}"] += 1
        else:
            tag = "" if r.kind != "disconnect" or r.status != 200 else (" complete" if r.complete else " hung up")
            outcomes[f"{r.kind}: {r.status}{' ' + r.code if r.code else ''}{tag}"] += 1
    errors = [r for r in results if r.error]
    if errors:
        failures.append(f"{len(errors)} requests failed at the client (connection errors/timeouts): "
                        f"{collections.Counter(r.error[:80] for r in errors).most_common(3)}")
    problems = collections.Counter(f"{r.kind}: {r.problem}" for r in results if r.problem)
    if problems:
        failures.append(f"answers not in the shape the client asked for: {dict(problems)}")
    # Unexpected answers: wrong shape, or a status other than 200 (429 for the tight consumer, 401
    # for a wrong key). Up to two examples of each, with the provider attempts and the access log.
    expected_status = {"tight": (200, 429), "bad_key": (401,)}
    odd = collections.defaultdict(list)
    for i, r in enumerate(results):
        if r.error:
            continue
        if r.problem:
            odd[f"{r.kind}: {r.problem}"].append(i)
        elif r.status not in expected_status.get(r.kind, (200,)):
            odd[f"{r.kind}: status {r.status} {r.code}"].append(i)
    unexpected_status = {k: len(v) for k, v in odd.items() if ": status " in k}
    if unexpected_status:
        failures.append(f"unexpected statuses: {unexpected_status}")
    diagnosis = []
    for what, ids in sorted(odd.items()):
        for i in ids[:2]:
            r = results[i]
            tries = ", ".join(f"{a['mock']} {a['status']} {KEY_OF_SECRET.get(a['key'], ('?', '?'))[1]} {a['path']}"
                              for a in by_id.get(i, []))
            diagnosis.append(f"{what} ({len(ids)}x), e.g. #{i}: client got {r.status} from {r.provider or '-'}/"
                             f"{r.key_id or '-'}; attempts: {tries or 'none'}; access log: `{acc.get(i, '-')}`"
                             + (f"; body ends {r.tail[-200:]!r}" if r.tail else ""))

    cons, keys, est_ids, refused, anomalies = expected_totals(results, by_id)
    if anomalies:
        failures.append(f"{len(anomalies)} client/mock mismatches, e.g. {anomalies[:5]}")
    if -1 in by_id:
        failures.append(f"{len(by_id[-1])} provider requests without x-soak-id")
    tight = [r for r in results if r.kind == "tight" and not r.error]
    tight_refused = sum(1 for r in tight if r.status == 429 and not r.provider)
    if not tight_refused or tight_refused == len(tight):
        failures.append(f"the tight consumer should be partly refused: {tight_refused} of {len(tight)}")

    # Totals: tollgate's shared data vs what the mocks reported.
    rows = []
    for c in ("team-a", "team-b", "team-dc", "team-tight"):
        got = st["consumers"][c]["usage"]
        exp = cons[c]
        estimated = exp["estimated_requests"] > 0
        for f in FIELDS:
            g, e = got[f], exp[f]
            if f.endswith("tokens") and estimated:
                ok = g > e  # exact part plus the estimates (each > 0) of the hung-up requests
                rows.append((c, f, g, f"{e} + estimates", g - e, ok))
            else:
                ok = g == e
                rows.append((c, f, g, e, g - e, ok))
            if not ok:
                failures.append(f"consumer {c} {f}: tollgate {g}, mocks {e} (diff {g - e:+d})")
    key_rows = []
    est_tokens = {f: sum(st["consumers"][c]["usage"][f] - cons[c][f] for c in est_ids) for f in ("input_tokens", "output_tokens")}
    key_delta = collections.Counter()
    for p, pst in st["providers"].items():
        for k in pst["keys"]:
            got, exp = k["usage"], keys[(p, k["id"])]
            for f in FIELDS:
                g, e = got[f], exp[f]
                if f.endswith("tokens") and exp["estimated_requests"]:
                    key_delta[f] += g - e
                    ok = g > e
                else:
                    ok = g == e
                if not ok:
                    failures.append(f"key {p}/{k['id']} {f}: tollgate {g}, mocks {e} (diff {g - e:+d})")
            key_rows.append((f"{p}/{k['id']}", got["requests"], exp["requests"], got["input_tokens"], exp["input_tokens"],
                             got["output_tokens"], exp["output_tokens"], got["estimated_requests"]))
    for f in ("input_tokens", "output_tokens"):
        if key_delta[f] != est_tokens[f]:
            failures.append(f"estimated {f}: {est_tokens[f]} on consumers but {key_delta[f]} on keys")
    model_sum = {f: sum(m[f] for m in st["models"].values()) for f in FIELDS}
    cons_sum = {f: sum(c["usage"][f] for c in st["consumers"].values()) for f in FIELDS}
    if model_sum != cons_sum:
        failures.append(f"per-model totals {model_sum} != per-consumer totals {cons_sum}")

    # Where totals differ, the access log (one line per request, with its soak id) says which requests.
    if any(not ok for *_, ok in rows):
        for c, ids in est_ids.items():
            not_est = [i for i in ids if "usage=estimated" not in acc.get(i, "")]
            if not_est:
                diagnosis.append(f"{c}: {len(not_est)} hung-up requests not logged as estimated, e.g. "
                                 + "; ".join(acc.get(i, f'#{i} not in access log') for i in not_est[:3]))
        exact_est = [i for i, l in acc.items() if "usage=estimated" in l and i < len(results)
                     and i not in {x for v in est_ids.values() for x in v}]
        if exact_est:
            diagnosis.append(f"{len(exact_est)} requests estimated by tollgate that the mocks reported usage for, e.g. "
                             + "; ".join(f"#{i} {results[i].kind} {results[i].status}: {acc[i]}" for i in exact_est[:3]))

    # Memory.
    growth = (rss["100%"] - rss["50%"]) / rss["50%"] * 100 if rss.get("50%") else float("nan")
    if not growth < 5:
        failures.append(f"Envoy RSS grew {growth:.1f}% from 50% to 100% of the run ({rss.get('50%')} -> {rss['100%']} kB)")

    # VM health.
    trap_lines = [l for l in log.splitlines() if "panicked" in l or "Function: proxy_on_" in l]
    if trap_lines:
        failures.append(f"{len(trap_lines)} VM failure lines in Envoy's log, first: {trap_lines[0][:300]}")
    wasm_stats = {k: v for k, v in stats.items() if "wasm" in k and not k.startswith("wasmcustom.")}
    bad_wasm = {k: v for k, v in wasm_stats.items() if v and re.search(r"fail|crash|trap|error|abort", k)}
    if bad_wasm:
        failures.append(f"wasm failure stats: {bad_wasm}")
    recreated = {k: f"{stats0.get(k, 0)} -> {v}" for k, v in wasm_stats.items()
                 if k.endswith((".created", "wasm_vm_count")) and v != stats0.get(k, 0)}
    if recreated:
        failures.append(f"wasm VMs were created during the run (a trapped VM is replaced): {recreated}")
    degraded = {k: v for k, v in stats.items() if v and k.startswith("wasmcustom.tollgate.")
                and re.search(r"degraded|shared_data\.failures|rejected_other|rejected_invalid", k)}
    if degraded:
        failures.append(f"tollgate degraded/failure counters: {degraded}")

    # 5xx.
    client_5xx = sum(1 for r in results if r.status >= 500)
    mock_5xx = sum(v for k, v in mock_statuses.items() if int(k.rsplit(" ", 1)[1]) >= 500)
    if client_5xx > mock_5xx:
        failures.append(f"{client_5xx} 5xx reached clients but the mocks answered only {mock_5xx} 5xx")

    verdict = "PASS" if not failures else "FAIL"
    md = render(args, sent, elapsed, outcomes, refused, rss, growth, rows, key_rows, est_tokens, mock_statuses,
                scripted, client_5xx, mock_5xx, wasm_stats, stats, failures, diagnosis, verdict)
    print(md)
    if not args.no_write:
        OUT.write_text(md)
        print(f"wrote {OUT}")
    return 0 if not failures else 1


def render(args, sent, elapsed, outcomes, refused, rss, growth, rows, key_rows, est_tokens, mock_statuses,
           scripted, client_5xx, mock_5xx, wasm_stats, stats, failures, diagnosis, verdict) -> str:
    out = [
        "# Soak run (`make soak`)", "",
        f"Latest run: {datetime.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, `tests/soak.py --requests {args.requests} --seconds {args.seconds:g} "
        f"--workers {args.workers} --seed {args.seed}`. One Envoy (`--concurrency 2`), two mock providers, "
        f"all on this machine. The script replaces this file on each run.", "",
        f"**Verdict: {verdict}**", "",
        f"- Requests sent: {sent} in {elapsed:.0f} s ({sent / elapsed:.0f} req/s, {args.workers} client threads)",
        f"- Envoy RSS (MiB): " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in rss.items())
        + f"; 50% -> 100%: {growth:+.2f}% (limit +5%)",
        f"- Client-visible 5xx: {client_5xx}; 5xx answered by the mocks: {mock_5xx}",
        f"- Scripted: " + ", ".join(f"{k} x{v}" for k, v in sorted(scripted.items())),
        f"- Provider attempts by mock and status: " + ", ".join(f"{k}: {v}" for k, v in sorted(mock_statuses.items())),
        f"- Refused by tollgate itself (counted nowhere): " + (", ".join(f"{k}: {v}" for k, v in sorted(refused.items())) or "none"),
        f"- Envoy retries: " + (", ".join(f"{k.replace('cluster.', '')} {v}" for k, v in sorted(stats.items())
                                          if k.startswith("cluster.llm") and "_retry" in k and v) or "none"),
        f"- tollgate outcomes: " + ", ".join(f"{k.split('.')[3]} {v}" for k, v in sorted(stats.items())
                                             if k.startswith("wasmcustom.tollgate.outcome.")),
        "", "## Requests by kind and outcome", "", "| kind: status | count |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(outcomes.items())),
        "", "## Totals: `/tollgate/status` vs what the mocks reported", "",
        "Tokens of requests whose client hung up mid-stream are tollgate's estimates (flagged `estimated`); "
        f"their sum: input {est_tokens['input_tokens']}, output {est_tokens['output_tokens']}.", "",
        "| consumer | field | tollgate | mocks | diff | ok |", "|---|---|---|---|---|---|",
        *(f"| {c} | {f} | {g} | {e} | {d:+d} | {'yes' if ok else '**NO**'} |" for c, f, g, e, d, ok in rows),
        "", "Per key, the expected tokens are the exact part only; tollgate's figure adds the estimates of the "
        "requests counted as estimated on that key.", "",
        "| key | requests | expected | input | expected | output | expected | estimated |",
        "|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(map(str, r)) + " |" for r in key_rows),
        "", "## VM health", "",
        "Envoy's log has no `panicked` / `Function: proxy_on_` line, and these wasm stats show no failure:" if
        not any("VM" in f or "wasm" in f for f in failures) else "VM failures found (see below). Wasm stats:", "",
        *(f"- `{k}`: {v}" for k, v in sorted(wasm_stats.items())),
        "", "## Failures", "", *(f"- {f}" for f in failures or ["none"]),
    ]
    if stats.get("cluster.llm.upstream_rq_retry_overflow"):
        diagnosis = [*diagnosis, "Envoy's `upstream_rq_retry_overflow` is not 0: a provider 429/5xx reached a client "
                     "unretried because the cluster's retry circuit breaker (`max_retries`, 3 by default) was full."]
    if diagnosis:
        out += ["", "## Diagnosis (from the access log; attempts listed by mock, not in time order)", "",
                *(f"- {d}" for d in diagnosis)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
