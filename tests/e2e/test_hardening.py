"""Hardening: bad client input, bad upstream answers. Each case checks the exact client-visible answer,
whether the provider was called, that the request was counted exactly once, and that the gateway
(its Wasm VM) still serves the next request."""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.request

import pytest

from conftest import KEYS, STATUS, anthropic_provider, openai_provider, status
from harness import Envoy, Response, chat, free_port, gateway_config, raw_request, request, sse_data

TEAM_A = KEYS["TEAM_A_KEY"]
MAX_REQUEST = 2048
MAX_EVENT = 1024
COOLDOWN_S = 3


def plugin(**extra) -> dict:
    p = {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY"}]},
         "providers": [openai_provider()], "status": STATUS,
         "max_request_bytes": MAX_REQUEST, "max_sse_event_bytes": MAX_EVENT,
         "health": {"default_cooldown_s": COOLDOWN_S}, "sticky_header": "x-session"}
    p.update(extra)
    return p


# ---------------------------------------------------------------- helpers

def send(port: int, path: str, body: bytes, headers: list[tuple[str, str]], timeout: float = 30) -> Response:
    """A request with an explicit header list (repeats allowed); a body cut by a reset comes back partial."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.putrequest("POST", path, skip_accept_encoding=True)
    for k, v in headers:
        conn.putheader(k, v)
    conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    return _read(conn)


def _read(conn: http.client.HTTPConnection) -> Response:
    r = conn.getresponse()
    try:
        raw = r.read()
    except http.client.IncompleteRead as e:
        raw = e.partial
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    conn.close()
    return Response(r.status, hdrs, raw)



def usage(gw) -> dict:
    return status(gw)["consumers"]["team-a"]["usage"]


def outcomes(gw) -> dict[str, int]:
    out = {}
    for k, v in gw.stats().items():
        m = re.fullmatch(r"wasmcustom\.tollgate\.outcome\.(.+)\.requests", k)
        if m and v:
            out[m.group(1)] = v
    return out


def vm_stats(gw) -> dict[str, int]:
    return {k: v for k, v in gw.stats().items() if k.startswith("wasm.")}


class Probe:
    """A gateway under test and what it had counted when the case began: assertions are on deltas, so
    cases can share one Envoy."""

    def __init__(self, gw, mock, baseline: dict[str, int]):
        self.gw, self.mock, self.baseline, self.port = gw, mock, baseline, gw.port
        self.u0, self.o0 = usage(gw), outcomes(gw)
        self.log0 = len(gw.log())
        self.access0 = len(gw.access_log(at_least=0))

    def usage(self) -> dict:
        return {k: v - self.u0.get(k, 0) for k, v in usage(self.gw).items()}

    def outcomes(self) -> dict[str, int]:
        return {k: v - self.o0.get(k, 0) for k, v in outcomes(self.gw).items() if v != self.o0.get(k, 0)}

    def log(self) -> str:
        return self.gw.log()[self.log0:]

    def access_lines(self, contains: str = "", at_least: int = 1) -> list[str]:
        deadline = time.time() + 5
        while True:
            lines = [l for l in self.gw.access_log(at_least=0)[self.access0:] if contains in l]
            if len(lines) >= at_least or time.time() > deadline:
                return lines
            time.sleep(0.1)

    def charged(self, n: int, timeout: float = 10) -> dict:
        """Waits until `n` requests are charged, then checks no second charge follows."""
        deadline = time.time() + timeout
        while self.usage()["requests"] < n and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        u = self.usage()
        assert u["requests"] == n, f"charged {u['requests']} times, expected {n}: {u}"
        return u

    def assert_vm_healthy(self) -> None:
        now = vm_stats(self.gw)
        failures = {k: v for k, v in now.items() if re.search(r"fail|crash|reload", k) and v}
        assert not failures, failures
        for k in ("wasm.envoy.wasm.runtime.v8.created", "wasm.envoy.wasm.runtime.v8.active"):
            assert now.get(k) == self.baseline.get(k), f"{k}: {self.baseline.get(k)} -> {now.get(k)} (a VM was replaced)"
        bad = [l for l in self.gw.log().splitlines() if "panicked" in l or re.search(r"Function: proxy_on_\w+ failed", l)]
        assert not bad, "\n".join(bad[:5])

    def next_request_ok(self, charged: int) -> None:
        """The gateway still serves: a plain request succeeds, is charged (`charged` in all since the case
        began), and no VM trapped."""
        before = len(self.mock.requests())
        r = chat(self.port, key=TEAM_A)
        assert r.status == 200, r
        assert r.json()["choices"][0]["message"]["content"] == f"Hello from {self.mock.name}."
        assert len(self.mock.requests()) == before + 1
        self.charged(charged)
        self.assert_vm_healthy()


def openai_error(r: Response, status: int, *needles: str, code: str | None = None) -> dict:
    assert r.status == status, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and isinstance(err["type"], str), err
    for n in needles:
        assert n in err["message"], (n, err)
    if code is not None:
        assert err["code"] == code, err
    return err


def anthropic_error(r: Response, status: int, kind: str, *needles: str) -> dict:
    assert r.status == status, r
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert "code" not in body["error"], body
    for n in needles:
        assert n in body["error"]["message"], (n, body)
    return body["error"]


@pytest.fixture(scope="module")
def shared_gateway(mocks, tmp_path_factory):
    """One gateway with plugin() for the cases that leave no state behind (no cooldown, no quota)."""
    tmp = tmp_path_factory.mktemp("hardening")
    cfg = gateway_config(plugin(), [{"provider": "openai", "port": mocks["openai"].port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(), access_log=str(tmp / "access.log"),
                         env_keys=sorted(KEYS))
    gw = Envoy(cfg, env=KEYS)
    gw.access_log_path = tmp / "access.log"
    gw.start()
    yield gw, vm_stats(gw)
    gw.stop()


@pytest.fixture
def gw_openai(shared_gateway, mocks) -> Probe:
    gw, baseline = shared_gateway
    return Probe(gw, mocks["openai"], baseline)


def fresh(gateway, mocks, provider: dict | None = None, **kw) -> Probe:
    """A gateway of its own, for cases that change its state or need another config."""
    provider = provider or openai_provider()
    mock = mocks["anthropic" if provider["type"] == "anthropic" else "openai"]
    gw = gateway(plugin(providers=[provider]), endpoints=[{"provider": provider["name"], "port": mock.port}], **kw)
    return Probe(gw, mock, vm_stats(gw))


# ---------------------------------------------------------------- request bodies

GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
JSON_AUTH = [("content-type", "application/json"), ("authorization", f"Bearer {TEAM_A}")]

BAD_BODIES = [
    # (id, body bytes, status, message fragments)
    ("invalid_json", b'{"model": "gpt-4o-mini", "messages": [', 400, ["not valid JSON"]),
    ("array", b'[{"model": "gpt-4o-mini"}]', 400, ["must be a JSON object"]),
    ("messages_string", json.dumps({**GOOD, "messages": "hi"}).encode(), 400, ["'messages' must be an array"]),
    ("model_number", json.dumps({**GOOD, "model": 4}).encode(), 400, ["'model' must be a string"]),
    ("invalid_utf8", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', 400,
     ["not valid UTF-8"]),
    ("empty_messages", json.dumps({**GOOD, "messages": []}).encode(), 400, ["'messages' must be a non-empty array"]),
    ("too_large", json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 3000}]}).encode(), 413,
     [f"larger than the gateway's limit of {MAX_REQUEST} bytes"]),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_request_body_gets_a_4xx_naming_the_problem(gw_openai, case):
    g = gw_openai
    _, body, code, needles = case
    r = send(g.port, "/v1/chat/completions", body, JSON_AUTH)
    err = openai_error(r, code, *needles, code="request_too_large" if code == 413 else "invalid_request")
    assert err["type"] == "invalid_request_error"
    assert g.mock.requests() == []
    assert g.outcomes() == {"rejected_invalid": 1}
    assert g.charged(0)["requests"] == 0, "a refused request is not billed"
    g.next_request_ok(1)


ANTHROPIC_BAD = [
    ("invalid_json", b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [', 400, "invalid_request_error",
     ["not valid JSON"]),
    ("messages_string", json.dumps({"model": "m", "max_tokens": 5, "messages": "hi"}).encode(), 400,
     "invalid_request_error", ["'messages' must be an array"]),
    ("empty_messages", json.dumps({"model": "m", "max_tokens": 5, "messages": []}).encode(), 400,
     "invalid_request_error", ["'messages' must be a non-empty array"]),
    ("too_large", json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 3000}]}).encode(),
     413, "request_too_large", [f"limit of {MAX_REQUEST} bytes"]),
]


@pytest.mark.parametrize("case", ANTHROPIC_BAD, ids=[c[0] for c in ANTHROPIC_BAD])
def test_bad_messages_body_gets_an_anthropic_shaped_error(gw_openai, case):
    g = gw_openai
    _, body, code, kind, needles = case
    r = send(g.port, "/v1/messages", body, [("content-type", "application/json"), ("x-api-key", TEAM_A)])
    anthropic_error(r, code, kind, *needles)
    assert g.mock.requests() == []
    assert g.outcomes() == {"rejected_invalid": 1}
    assert g.charged(0)["requests"] == 0
    g.next_request_ok(1)


def test_chunked_body_over_the_limit_gets_413(gw_openai):
    g = gw_openai
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
    for k, v in JSON_AUTH + [("transfer-encoding", "chunked")]:
        conn.putheader(k, v)
    conn.endheaders()
    body = json.dumps({**GOOD, "messages": [{"role": "user", "content": "y" * 4000}]}).encode()
    try:
        for i in range(0, len(body), 1000):
            part = body[i:i + 1000]
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            time.sleep(0.05)
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the gateway answered early and closed: the answer is still readable
    r = _read(conn)
    openai_error(r, 413, f"limit of {MAX_REQUEST} bytes", code="request_too_large")
    assert g.mock.requests() == []
    assert g.outcomes() == {"rejected_invalid": 1}
    assert g.charged(0)["requests"] == 0
    g.next_request_ok(1)


REFUSED_AFTER_ADMISSION = [
    # (id, provider, chat kwargs, message fragments, code)
    ("unknown_model", openai_provider(models={"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}), {"model": "gpt-9-ultra"},
     ["gpt-9-ultra", "not served"], "model_not_found"),
    ("untranslatable", anthropic_provider(), {"extra": {"n": 3}}, ["n"], "untranslatable_request"),
]


@pytest.mark.parametrize("case", REFUSED_AFTER_ADMISSION, ids=[c[0] for c in REFUSED_AFTER_ADMISSION])
def test_request_refused_once_the_model_is_known_gets_400_and_is_counted_once(gateway, mocks, case):
    """Refused after quota admission (only the body tells the model): still one 400, no provider call,
    one outcome, nothing billed."""
    _, provider, kw, needles, code = case
    g = fresh(gateway, mocks, provider)
    r = chat(g.port, key=TEAM_A, **kw)
    err = openai_error(r, 400, *needles, code=code)
    assert err["type"] == "invalid_request_error"
    assert g.mock.requests() == []
    assert g.charged(0)["requests"] == 0, "a refused request is not billed"
    assert g.outcomes() == {"rejected_invalid": 1}
    g.next_request_ok(1)
    if provider["type"] == "openai":
        assert json.loads(g.mock.requests()[-1]["body"])["model"] == "gpt-4o-mini-2024-07-18"


def test_body_cut_short_then_closed(gw_openai):
    g = gw_openai
    body = json.dumps(GOOD).encode()
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              f"authorization: Bearer {TEAM_A}\r\ncontent-length: {len(body) + 500}\r\n\r\n".encode() + body[:30])
    time.sleep(0.3)
    s.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    if got:  # Envoy may answer the broken request itself; if it does, with a 4xx
        code = int(got.split(b" ", 2)[1])
        assert 400 <= code < 500, got[:300]
    time.sleep(0.5)
    assert g.mock.requests() == []
    assert g.charged(0)["requests"] == 0
    assert g.outcomes() in ({}, {"rejected_invalid": 1}, {"incomplete": 1}), g.outcomes()
    g.next_request_ok(1)


# ---------------------------------------------------------------- headers

def test_repeated_authorization_headers_get_401(gw_openai):
    g = gw_openai
    for second in (TEAM_A, "someone-else"):
        r = send(g.port, "/v1/chat/completions", json.dumps(GOOD).encode(),
                 JSON_AUTH + [("authorization", f"Bearer {second}")])
        openai_error(r, 401, code="invalid_api_key")
    assert g.mock.requests() == []
    assert g.outcomes() == {"rejected_auth": 2}
    g.next_request_ok(1)


def test_very_long_header_value_is_refused_without_a_crash(gw_openai):
    g = gw_openai
    r = send(g.port, "/v1/chat/completions", json.dumps(GOOD).encode(),
             [("content-type", "application/json"), ("authorization", "Bearer " + "k" * 60 * 1024)])
    assert r.status in (401, 431), r
    if r.status == 401:
        openai_error(r, 401, code="invalid_api_key")
        assert g.outcomes() == {"rejected_auth": 1}
    assert g.mock.requests() == []
    g.next_request_ok(1)


def test_odd_casing_of_authorization_works(gw_openai):
    g = gw_openai
    r = send(g.port, "/v1/chat/completions", json.dumps(GOOD).encode(),
             [("Content-Type", "application/json"), ("AUTHORIZATION", f"bearer {TEAM_A}")])
    assert r.status == 200, r
    assert g.mock.requests()[0]["key"] in {KEYS[f"OPENAI_KEY_{i}"] for i in (1, 2, 3)}
    assert g.charged(1)["estimated_requests"] == 0
    g.next_request_ok(2)


def test_non_bearer_authorization_gets_401_naming_bearer(gw_openai):
    g = gw_openai
    for value in ("Basic dGVhbS1hOnNlY3JldA==", TEAM_A, f"Token {TEAM_A}"):
        r = send(g.port, "/v1/chat/completions", json.dumps(GOOD).encode(),
                 [("content-type", "application/json"), ("authorization", value)])
        openai_error(r, 401, "Bearer", code="invalid_api_key")
    assert g.mock.requests() == []
    assert g.outcomes() == {"rejected_auth": 3}
    g.next_request_ok(1)


# ---------------------------------------------------------------- upstream answers

def test_garbage_json_with_200_is_passed_on_and_estimated(gw_openai):
    g = gw_openai
    g.mock.script({"body": "not json", "times": 1})
    r = chat(g.port, key=TEAM_A, content="count these words please")
    assert r.status == 200 and r.body == b"not json", r
    u = g.charged(1)
    assert u["estimated_requests"] == 1 and u["input_tokens"] >= 1
    assert g.outcomes() == {"ok": 1}
    assert len(g.access_lines("usage=estimated")) == 1
    g.next_request_ok(2)


def test_truncated_json_with_200_is_passed_on_and_estimated(gw_openai):
    g = gw_openai
    cut = '{"id":"chatcmpl-x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello the'
    g.mock.script({"body": cut, "times": 1})
    r = chat(g.port, key=TEAM_A)
    assert r.status == 200 and r.body == cut.encode(), r
    assert g.charged(1)["estimated_requests"] == 1
    assert g.outcomes() == {"ok": 1}
    g.next_request_ok(2)


def test_garbage_json_through_translation_is_a_clean_error(gateway, mocks):
    """OpenAI client, Anthropic provider answering 200 "not json": the client gets an OpenAI-shaped
    error naming the problem. Its status stays the provider's 200: by the time the body shows it cannot
    be translated, proxy-wasm has already let the response headers go (README, limits)."""
    g = fresh(gateway, mocks, anthropic_provider())
    g.mock.script({"body": "not json", "times": 1})
    r = chat(g.port, key=TEAM_A)
    body = r.json()
    assert body["error"]["type"] == "server_error" and "could not be translated" in body["error"]["message"], r
    g.charged(1)
    g.next_request_ok(2)


MALFORMED_SSE = (
    'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    "data: {broken json\n\n"
    "dat: not a field\n\n"
    "data:\n\n"
    ": a comment\n\n"
    'event: weird\ndata: {"choices": "not-a-list"}\n\n'
    "data: \xe2\x82\n\n"
    'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\r\n\r\n'
    "retry: banana\n\n"
    "data: [DONE]\n\n"
)


def test_malformed_sse_events_pass_through_and_are_estimated(gw_openai):
    g = gw_openai
    g.mock.script({"body": MALFORMED_SSE, "headers": {"content-type": "text/event-stream"}, "times": 1})
    r = chat(g.port, key=TEAM_A, stream=True)
    assert r.status == 200, r
    assert r.body == MALFORMED_SSE.encode(), r.body
    # tollgate asked the provider for a usage chunk (the client did not): none came, so it estimates.
    assert json.loads(g.mock.requests()[0]["body"])["stream_options"] == {"include_usage": True}
    u = g.charged(1)
    assert u["estimated_requests"] == 1 and u["output_tokens"] >= 1
    assert g.outcomes() == {"ok": 1}
    g.next_request_ok(2)


def test_malformed_sse_through_translation_does_not_break_the_gateway(gateway, mocks):
    g = fresh(gateway, mocks, anthropic_provider())
    raw = ("event: message_start\ndata: {broken\n\n"
           'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
           'event: message_delta\ndata: {"type":"message_delta","usage":"many"}\n\n'
           "data: \n\n")
    g.mock.script({"body": raw, "headers": {"content-type": "text/event-stream"}, "times": 1})
    r = chat(g.port, key=TEAM_A, stream=True)
    assert r.status == 200, r
    events = sse_data(r.body)
    assert events and events[-1] == "[DONE]", r.body
    assert all(isinstance(e, dict) for e in events[:-1]), events
    assert g.charged(1)["estimated_requests"] == 1
    g.next_request_ok(2)


@pytest.mark.parametrize("client_asked_usage", [True, False], ids=["include_usage", "usage_stripped"])
def test_sse_event_over_max_sse_event_bytes_passes_through(gw_openai, client_asked_usage):
    g = gw_openai
    big = "z" * 2048
    first = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "A"}}]}
    large = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": big}}]}
    usage_chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 11, "completion_tokens": 600, "total_tokens": 611}}
    raw = "".join(f"data: {json.dumps(e)}\n\n" for e in (first, large, usage_chunk)) + "data: [DONE]\n\n"
    g.mock.script({"body": raw, "headers": {"content-type": "text/event-stream"}, "times": 1})
    extra = {"stream_options": {"include_usage": True}} if client_asked_usage else {}
    r = chat(g.port, key=TEAM_A, stream=True, extra=extra)
    assert r.status == 200, r
    u = g.charged(1)
    assert (u["input_tokens"], u["output_tokens"], u["estimated_requests"]) == (11, 600, 0), u
    assert "sse: dropped an event that reached" in g.log()
    # The client still gets the big event, intact. (Where tollgate was removing the usage chunk it
    # added, it stops filtering from there on: the stream passes through as the provider sent it.)
    if client_asked_usage:
        assert r.body == raw.encode()
    else:
        assert r.body == raw.encode(), r.body[:500]
    g.next_request_ok(2)


def test_sse_event_over_max_sse_event_bytes_through_translation(gateway, mocks):
    """Anthropic provider, OpenAI client: a text delta over the cap must still reach the client."""
    g = fresh(gateway, mocks, anthropic_provider())
    big = "z" * 2048
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                                "model": "claude-haiku-4-5", "content": [],
                                                                "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": big}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 700}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    raw = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events)
    g.mock.script({"body": raw, "headers": {"content-type": "text/event-stream"}, "times": 1})
    r = chat(g.port, key=TEAM_A, stream=True)
    assert r.status == 200, r
    u = g.charged(1)
    assert (u["input_tokens"], u["output_tokens"], u["estimated_requests"]) == (9, 700, 0), u
    got = sse_data(r.body)
    assert got[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in got[:-1] if isinstance(e, dict) and e["choices"])
    # An event over max_sse_event_bytes cannot be translated (it was never held whole): it is dropped
    # and logged, and the rest of the stream stays well formed (README, limits).
    assert text == "A", f"client got {len(text)} chars of text"
    assert "sse: dropped an event that reached" in g.log()
    g.next_request_ok(2)


def test_upstream_reset_mid_stream_is_charged_once_as_estimated(gw_openai):
    g = gw_openai
    g.mock.script({"words": 40, "cut_after_chunks": 3, "times": 1})
    r = send(g.port, "/v1/chat/completions", json.dumps({**GOOD, "stream": True}).encode(), JSON_AUTH)
    assert r.status == 200
    events = sse_data(r.body)
    assert "[DONE]" not in events and 1 <= len(events) <= 4, events
    u = g.charged(1)
    assert u["estimated_requests"] == 1 and u["output_tokens"] >= 1, u
    assert g.outcomes() == {"incomplete": 1}
    assert len(g.access_lines("usage=estimated")) == 1
    g.next_request_ok(2)


def test_upstream_timeout_once_is_retried_on_another_key(gateway, mocks):
    g = fresh(gateway, mocks, per_try_timeout="1s")
    g.mock.script({"delay_ms": 2500, "times": 1})
    t0 = time.monotonic()
    r = chat(g.port, key=TEAM_A)
    assert r.status == 200, r
    assert 0.9 < time.monotonic() - t0 < 2.4
    assert r.headers["x-tollgate-key-id"] != "oa-1"
    assert g.charged(1)["estimated_requests"] == 0
    assert g.outcomes() == {"ok": 1}
    time.sleep(1.5)  # the timed-out attempt's late answer must not be charged either
    assert g.usage()["requests"] == 1
    g.next_request_ok(2)


def test_upstream_timeout_on_every_attempt_is_charged_once(gateway, mocks):
    g = fresh(gateway, mocks, per_try_timeout="1s")
    g.mock.script({"delay_ms": 2500, "times": 4})
    r = chat(g.port, key=TEAM_A)
    assert r.status == 504, r
    time.sleep(2)
    assert len(g.mock.requests()) == 4, "one attempt and three retries"
    u = g.charged(1)
    assert (u["input_tokens"], u["output_tokens"]) == (0, 0), "a failed request is not billed tokens"
    assert g.outcomes() == {"upstream_5xx": 1}
    g.next_request_ok(2)


def test_gateway_timeout_answer_is_openai_shaped(gateway, mocks):
    """Envoy's own 504 ("upstream request timeout", text/plain) reaches an OpenAI client as is, while
    every other error the gateway makes is OpenAI-shaped JSON."""
    g = fresh(gateway, mocks, per_try_timeout="1s", num_retries=1)
    g.mock.script({"delay_ms": 1500, "times": 2})
    r = chat(g.port, key=TEAM_A)
    openai_error(r, 504, "timeout")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_200_without_usage_is_estimated_and_flagged(gw_openai, stream):
    g = gw_openai
    g.mock.script({"omit_usage": True, "words": 30, "times": 1})
    r = chat(g.port, key=TEAM_A, stream=stream, content="tell me about lighthouses " * 4)
    assert r.status == 200, r
    u = g.charged(1)
    assert u["estimated_requests"] == 1 and u["input_tokens"] > 5 and u["output_tokens"] >= 15, u
    assert g.outcomes() == {"ok": 1}
    assert len(g.access_lines("usage=estimated")) == 1
    g.next_request_ok(2)


ODD_RESETS = [
    ("retry_after_word", {"retry-after": "soon"}),
    ("openai_reset_garbage", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1x2y"}),
    ("all_garbage", {"retry-after": "-5", "retry-after-ms": "NaN", "x-ratelimit-reset-tokens": "∞",
                     "x-ratelimit-remaining-tokens": "zero", "anthropic-ratelimit-requests-reset": "yesterday"}),
]


@pytest.mark.parametrize("case", ODD_RESETS, ids=[c[0] for c in ODD_RESETS])
def test_429_with_unparseable_reset_headers_cools_the_key_for_the_default(gateway, mocks, case):
    g = fresh(gateway, mocks)
    g.mock.script({"key": KEYS["OPENAI_KEY_1"], "status": 429, "headers": case[1], "times": 1})
    r = chat(g.port, key=TEAM_A)
    assert r.status == 200, r
    assert r.headers["x-tollgate-key-id"] != "oa-1"
    seen = [q["key"] for q in g.mock.requests()]
    assert len(seen) == 2 and seen[0] == KEYS["OPENAI_KEY_1"] and seen[1] != KEYS["OPENAI_KEY_1"], seen
    st = status(g.gw)
    k1 = st["providers"]["openai"]["keys"][0]
    assert k1["state"] == "rate_limited", k1
    left = k1["cooldown_until_ms"] - st["now_ms"]
    assert (COOLDOWN_S - 1) * 1000 < left <= COOLDOWN_S * 1000, left
    assert g.charged(1)["estimated_requests"] == 0
    assert g.outcomes() == {"ok": 1}
    g.next_request_ok(2)
    # oa-1 is skipped while it cools, then comes back.
    assert g.mock.requests()[-1]["key"] != KEYS["OPENAI_KEY_1"]
    time.sleep(COOLDOWN_S)
    keys = set()
    for _ in range(3):
        assert chat(g.port, key=TEAM_A).status == 200
        keys.add(g.mock.requests()[-1]["key"])
    assert KEYS["OPENAI_KEY_1"] in keys


# ---------------------------------------------------------------- operability

def test_debug_lines_follow_envoys_log_level_changed_at_runtime(gateway):
    """The module formats log lines only at the level Envoy prints them (so debug lines cost nothing
    in production) and follows a level changed through the admin API without a restart."""
    gw = gateway(plugin(), concurrency=1, log_level="info")
    for _ in range(20):
        assert chat(gw.port, TEAM_A).status == 200
    time.sleep(0.3)  # the log file is flushed every 100 ms
    assert "tollgate: charged" not in gw.log(), "a debug line was logged at Envoy's info level"

    req = urllib.request.Request(f"http://127.0.0.1:{gw.admin_port}/logging?wasm=debug", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    # The module re-reads the level every 256 contexts (two per request here).
    for _ in range(300):
        assert chat(gw.port, TEAM_A).status == 200
    assert "tollgate: charged consumer=team-a" in gw.wait_log("tollgate: charged"), \
        "the debug level set at runtime never reached the module"


# ---------------------------------------------------------------- defects found by trying it as a new user
# These gateways have no status endpoint: the checks read what the client, the mock and Envoy's log saw.

TRAP = re.compile(r"panicked|Function: \S+ failed|wasm trap|Uncaught \w*Error|VM (?:crashed|failed)")


def lean_plugin(**extra) -> dict:
    p = plugin(**extra)
    del p["status"]
    return p


@pytest.fixture(scope="module")
def lean(module_gateway):
    return module_gateway(lean_plugin())


@pytest.fixture(scope="module")
def trusted(module_gateway):
    return module_gateway(lean_plugin(consumers={"trusted_header": "x-team", "list": [{"name": "team-a"}]}))


def assert_still_serves(gw, mock, log0: int, headers: dict | None = None) -> None:
    """No trap in Envoy's log since offset `log0`, and the next plain request is served 200."""
    before = len(mock.requests())
    r = chat(gw.port, key=None if headers else TEAM_A, headers=headers)
    assert r.status == 200, r
    assert r.json()["choices"][0]["message"]["content"] == f"Hello from {mock.name}."
    assert len(mock.requests()) == before + 1
    time.sleep(0.2)  # Envoy flushes its log file every 100 ms here
    bad = [l for l in gw.log()[log0:].splitlines() if TRAP.search(l)]
    assert not bad, "\n".join(bad[:5])
    crashed = {k: v for k, v in gw.stats().items() if k.startswith("wasm.") and re.search(r"crash|fail", k) and v}
    assert not crashed, crashed


BODY = json.dumps(GOOD).encode()
MSG_BODY = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}).encode()
AUTH = (b"authorization", b"Bearer " + TEAM_A.encode())
CT = (b"content-type", b"application/json")

BAD_REQUEST_HEADERS = [
    # (id, path, headers)
    ("authorization", b"/v1/chat/completions", [CT, (b"authorization", b"Bearer \xff\xfe\xc3(")]),
    ("authorization_key_then_bytes", b"/v1/chat/completions", [CT, (b"authorization", b"Bearer " + TEAM_A.encode() + b"\xff")]),
    ("x_api_key", b"/v1/messages", [CT, (b"x-api-key", b"\xff\xfe")]),
    ("api_key", b"/v1/chat/completions", [CT, (b"api-key", b"k\xff")]),
    ("sticky_header", b"/v1/chat/completions", [CT, AUTH, (b"x-session", b"s\xff\xfe")]),
    ("tollgate_header", b"/v1/chat/completions", [CT, AUTH, (b"x-tollgate-consumer", b"\xff")]),
    ("content_type", b"/v1/chat/completions", [(b"content-type", b"application/json\xff"), AUTH]),
    ("content_length", b"/v1/chat/completions", [CT, AUTH, (b"content-length", b"1\xff")]),
    ("path", b"/v1/chat/completions?\xff=\xfe", [CT, AUTH]),
]


@pytest.mark.parametrize("case", BAD_REQUEST_HEADERS, ids=[c[0] for c in BAD_REQUEST_HEADERS])
def test_non_utf8_request_header_does_not_trap_the_vm(lean, mocks, case):
    """Header values are bytes, not text: a client sending bytes that are not UTF-8 in any header the
    module reads gets an answer (whatever it is), no Wasm VM traps, and the next request is served."""
    _, path, headers = case
    log0 = len(lean.log())
    r = raw_request(lean.port, "POST", path, headers, MSG_BODY if path == b"/v1/messages" else BODY)
    assert r is None or 200 <= r.status < 600, r
    assert_still_serves(lean, mocks["openai"], log0)


def test_non_utf8_trusted_consumer_header_does_not_trap_the_vm(trusted, mocks):
    """The same for the trusted consumer header (consumers.trusted_header)."""
    log0 = len(trusted.log())
    r = raw_request(trusted.port, "POST", b"/v1/chat/completions", [CT, (b"x-team", b"team-\xff\xfe")], BODY)
    assert r is not None and r.status in (200, 401, 403), r
    assert_still_serves(trusted, mocks["openai"], log0, headers={"x-team": "team-a"})


BAD_RESPONSE_HEADERS = [
    # (id, provider type, stream, mock rule headers)
    ("retry_after", "openai", False, 429, {"retry-after": "1\u00ff"}),
    ("openai_reset", "openai", False, 429, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1\u00ffs",
                                             "x-ratelimit-remaining-tokens": "\u00fe", "x-ratelimit-reset-tokens": "\u00ff"}),
    ("anthropic_reset", "anthropic", False, 429, {"anthropic-ratelimit-requests-remaining": "0",
                                                  "anthropic-ratelimit-requests-reset": "2026-\u00ff",
                                                  "anthropic-ratelimit-tokens-reset": "\u00fe", "retry-after": "\u00ff"}),
    ("reset_on_success", "openai", False, 200, {"x-ratelimit-remaining-requests": "\u00ff", "x-ratelimit-reset-requests": "\u00ff"}),
    ("content_type_json", "openai", False, 200, {"content-type": "application/json\u00ff"}),
    ("content_type_sse", "openai", True, 200, {"content-type": "text/event-stream; charset=\u00ff"}),
]


@pytest.mark.parametrize("case", BAD_RESPONSE_HEADERS, ids=[c[0] for c in BAD_RESPONSE_HEADERS])
def test_non_utf8_provider_response_header_does_not_trap_the_vm(gateway, mocks, case):
    """A provider answering with header bytes that are not UTF-8 (reset times, Retry-After,
    content-type) cannot break the gateway: the client gets an answer, no Wasm VM traps, and the next
    request is served."""
    _, kind, stream, code, headers = case
    provider = anthropic_provider(n=2) if kind == "anthropic" else openai_provider()
    gw = gateway(lean_plugin(providers=[provider]), endpoints=[{"provider": provider["name"], "port": mocks[kind].port}])
    mock = mocks[kind]
    mock.script({"status": code, "headers": headers, "latin1_headers": True, "times": 1})
    log0 = len(gw.log())
    r = chat(gw.port, key=TEAM_A, stream=stream)
    assert 200 <= r.status < 600, r
    assert mock.requests(), "the provider was called"
    assert_still_serves(gw, mock, log0)


def test_non_utf8_authorization_with_a_consumer_x_api_key_is_not_sent_to_anthropic(gateway, mocks):
    """A client authenticating with its consumer key in `x-api-key` and sending an `Authorization`
    header of bytes that are not UTF-8: the Anthropic provider never receives the client's
    Authorization header (it carries only the pool key tollgate injects)."""
    gw = gateway(lean_plugin(providers=[anthropic_provider(models={})]),
                 endpoints=[{"provider": "anthropic", "port": mocks["anthropic"].port}])
    r = raw_request(gw.port, "POST", b"/v1/messages",
                    [CT, (b"x-api-key", TEAM_A.encode()), (b"authorization", b"Bearer \xff\xfe\x80secret")], MSG_BODY)
    assert r is not None and r.status == 200, r
    (sent,) = mocks["anthropic"].requests()
    assert "authorization" not in sent["headers"], sent["headers"]
    assert sent["headers"]["x-api-key"] == KEYS["ANTHROPIC_KEY_1"]


EMPTY_OR_NO_MESSAGES = [
    # (id, path, body, client API)
    ("chat_empty_body", b"/v1/chat/completions", b"", "openai"),
    ("chat_without_messages", b"/v1/chat/completions", json.dumps({"model": "gpt-4o-mini"}).encode(), "openai"),
    ("messages_empty_body", b"/v1/messages", b"", "anthropic"),
    ("messages_without_messages", b"/v1/messages", json.dumps({"model": "claude-haiku-4-5", "max_tokens": 5}).encode(),
     "anthropic"),
]


@pytest.mark.parametrize("case", EMPTY_OR_NO_MESSAGES, ids=[c[0] for c in EMPTY_OR_NO_MESSAGES])
def test_empty_body_or_missing_messages_gets_400_in_the_clients_shape(lean, mocks, case):
    """An empty body, or a chat/messages request without `messages`, is refused by the gateway with
    400 in the client API's error shape (OpenAI for /v1/chat/completions, Anthropic for /v1/messages),
    and no provider is called."""
    _, path, body, api = case
    auth = AUTH if api == "openai" else (b"x-api-key", TEAM_A.encode())
    log0 = len(lean.log())
    r = raw_request(lean.port, "POST", path, [CT, auth], body)
    assert r is not None, "no answer"
    if api == "openai":
        err = openai_error(r, 400)
        assert err["type"] == "invalid_request_error", err
        message = err["message"]
    else:
        message = anthropic_error(r, 400, "invalid_request_error")["message"]
    assert ("empty" in message.lower()) if not body else ("messages" in message), message
    assert mocks["openai"].requests() == [] and mocks["anthropic"].requests() == []
    assert_still_serves(lean, mocks["openai"], log0)


def h2_post_with_trailers(port: int, path: str, body: bytes, headers: list[tuple[str, str]],
                          timeout: float = 10) -> tuple[int | None, bytes, bool]:
    """HTTP/2 over cleartext with prior knowledge: HEADERS, DATA, then trailing HEADERS carrying
    END_STREAM. Returns (status, body, whether the response stream ended) within `timeout`."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    status, data, ended = None, b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "x"),
                                *headers])
        conn.send_data(sid, body)
        conn.send_headers(sid, [("x-trailer", "done")], end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        while not ended and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = ev.stream_id == sid
            s.sendall(conn.data_to_send())
    return status, data, ended


def test_http2_request_ending_in_trailers_is_answered(lean, mocks):
    """An HTTP/2 client may end its request with trailers instead of an END_STREAM on the last DATA
    frame (gRPC-style clients do): the request is still served and does not hang."""
    t0 = time.monotonic()
    status, body, ended = h2_post_with_trailers(
        lean.port, "/v1/chat/completions", BODY, [("content-type", "application/json"), ("authorization", f"Bearer {TEAM_A}")])
    assert ended, f"no complete answer after {time.monotonic() - t0:.1f}s (status {status}, {body[:200]!r})"
    assert status == 200, (status, body[:300])
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello from openai."
    assert len(mocks["openai"].requests()) == 1


def test_a_listener_config_without_allow_on_headers_stop_iteration_fails_loudly_not_silently(mocks, tmp_path):
    """The listener role holds request headers while it reads the body; without
    `allow_on_headers_stop_iteration: true` Envoy never hands it the body. A user who upgrades the
    module but not the config must get an error and a log line naming the setting, not a hang."""
    plugin = {"providers": [openai_provider()], "passthrough_paths": ["/v1/files"]}
    endpoints = [{"provider": "openai", "port": mocks["openai"].port, "priority": 0}]
    cfg = gateway_config(plugin, endpoints, listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp_path / "access.log"), env_keys=sorted(KEYS))

    def drop_flag(node):
        if isinstance(node, dict):
            node.pop("allow_on_headers_stop_iteration", None)
            for v in node.values():
                drop_flag(v)
        elif isinstance(node, list):
            for v in node:
                drop_flag(v)

    drop_flag(cfg)
    assert "allow_on_headers_stop_iteration" not in json.dumps(cfg)
    e = Envoy(cfg, env=dict(KEYS), concurrency=1).start()
    try:
        started = time.time()
        r = chat(e.port)
        took = time.time() - started
        assert r.status == 500, r
        assert "misconfigured" in r.json()["error"]["message"]
        assert took < 15, f"answered after {took:.1f}s"
        e.wait_log("allow_on_headers_stop_iteration: true", timeout=5)
        assert mocks["openai"].requests() == [], "the provider was never called"
        # A request without a body is not held: it reaches the provider (a path passed through,
        # which the mock does not serve).
        r = request(e.port, "GET", "/v1/files", headers={"authorization": "Bearer x"})
        assert r.status == 404 and b"Invalid URL" in r.body, r
    finally:
        e.stop()
