"""Tests of the mock provider itself (no Envoy). Needs `cargo build -p mock-provider --release`."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from mock_client import MockProvider, start_mock, stop_mock

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MOCK_PROVIDER_BIN", ROOT / "target" / "release" / "mock-provider"))

pytestmark = pytest.mark.skipif(
    not BINARY.exists(), reason=f"{BINARY} not built: run `cargo build -p mock-provider --release`")

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running():
    proc, mock = start_mock(BINARY, free_port(), "openai-a")
    yield proc, mock
    stop_mock(proc)


@pytest.fixture
def mock(running) -> MockProvider:
    proc, mock = running
    assert proc.poll() is None, "the mock died during an earlier test"
    mock.reset()
    return mock


def call(mock, path, body, key="sk-a1", header="authorization", conn=None, **kw):
    """POST; returns (status, lowercased headers, raw body)."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    data = body if isinstance(body, (bytes, str)) or kw.get("encode_chunked") else json.dumps(body)
    conn.request("POST", path, body=data, headers=headers, **kw)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name = data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data))
    return events


def test_bind_error_exits_1(running):
    _, mock = running
    out = subprocess.run([str(BINARY), "--port", str(mock.port)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mock.port}" in out.stderr


def test_start_on_port_0_reports_the_real_port():
    proc, m = start_mock(BINARY, 0, "zero")
    try:
        assert m.port > 0
        assert call(m, "/v1/chat/completions", CHAT)[0] == 200
    finally:
        stop_mock(proc)
    assert proc.returncode == 0, "SIGTERM is a clean exit"


def test_chunked_request_body_and_keep_alive(mock):
    pieces = [b'{"model":"gpt-4o",', b'"messages":[{"role":"us', b'er","content":"hi"}]}']
    body = b"".join(pieces)
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
    status, headers, raw = call(mock, "/v1/chat/completions", iter(pieces), conn=conn, encode_chunked=True)
    assert status == 200, raw
    sock = conn.sock
    reply = json.loads(raw)
    assert reply["id"] == "chatcmpl-mock-1"
    assert reply["object"] == "chat.completion"
    assert reply["model"] == "gpt-4o"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Hello from openai-a.", "refusal": None}
    assert reply["usage"]["prompt_tokens"] == len(body) // 10
    assert reply["usage"]["completion_tokens"] == 3
    assert headers["x-mock-name"] == "openai-a"

    status, _, raw = call(mock, "/v1/chat/completions", body, key="sk-a2", conn=conn)
    assert status == 200
    assert conn.sock is sock, "the connection was kept alive"
    assert json.loads(raw)["id"] == "chatcmpl-mock-2"

    first, second = mock.requests()
    assert (first["seq"], first["chunked_request"], first["key"]) == (1, True, "sk-a1")
    assert first["body"] == body.decode()
    assert "content-length" not in first["headers"] and first["headers"]["transfer-encoding"] == "chunked"
    assert first["usage"] == {"input": len(body) // 10, "output": 3, "cache_read": 0, "cache_write": 0}
    assert (first["status"], first["stream"], first["method"]) == (200, False, "POST")
    assert (second["seq"], second["chunked_request"], second["key"]) == (2, False, "sk-a2")


def test_openai_stream_without_usage(mock):
    status, headers, raw = call(mock, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = sse(raw)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello from openai-a."
    assert len(chunks) == 1 + 3 + 1, "role chunk, one per word, finish chunk"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert b'"usage"' not in raw
    assert mock.requests()[0]["usage"] is None
    assert mock.requests()[0]["stream"] is True


def test_openai_stream_with_include_usage(mock):
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    status, _, raw = call(mock, "/v1/chat/completions", body)
    assert status == 200
    events = sse(raw)
    assert events[-1] == (None, "[DONE]")
    last = json.loads(events[-2][1])
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == len(body) // 10
    assert last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == len(body) // 10 + 3
    assert json.loads(events[-3][1])["choices"][0]["finish_reason"] == "stop"
    assert mock.requests()[0]["usage"]["output"] == 3


def test_anthropic_stream(mock):
    body = json.dumps({"model": "claude-3-5-haiku", "max_tokens": 50, "stream": True,
                       "messages": [{"role": "user", "content": "Say hello"}]})
    mock.script({"words": 5, "chunk_delay_ms": 5})
    status, headers, raw = call(mock, "/v1/messages", body, key="sk-ant-1", header="x-api-key")
    assert status == 200
    events = sse(raw)
    names = [n for n, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5 + \
        ["content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == n for n, d in zip(names, data))
    start = data[0]["message"]
    assert (start["id"], start["model"]) == ("msg_mock_1", "claude-3-5-haiku")
    assert start["usage"]["input_tokens"] == len(body) // 10
    assert "".join(d["delta"]["text"] for d in data[3:8]) == "Hello from openai-a. lorem ipsum"
    assert data[9]["delta"]["stop_reason"] == "end_turn"
    assert data[9]["usage"] == {"output_tokens": 5}
    log = mock.requests()[0]
    assert (log["key"], log["usage"]["input"], log["usage"]["output"]) == ("sk-ant-1", len(body) // 10, 5)


def test_scripted_429_for_one_key_once(mock):
    mock.script({"key": "sk-a1", "times": 1, "status": 429, "headers": {"retry-after": "30"}})
    status, headers, raw = call(mock, "/v1/chat/completions", CHAT, key="sk-a1")
    assert status == 429
    assert headers["retry-after"] == "30"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert call(mock, "/v1/chat/completions", CHAT, key="sk-a2")[0] == 200, "other keys unaffected"
    assert call(mock, "/v1/chat/completions", CHAT, key="sk-a1")[0] == 200, "times=1 is used up"
    # Same rule shape on Anthropic answers in Anthropic's error format.
    mock.script({"path_contains": "/v1/messages", "times": 1, "status": 529})
    status, _, raw = call(mock, "/v1/messages", CHAT, key="k", header="x-api-key")
    assert (status, json.loads(raw)) == (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert [(r["key"], r["status"], r["usage"] is None) for r in mock.requests()] == [
        ("sk-a1", 429, True), ("sk-a2", 200, False), ("sk-a1", 200, False), ("k", 529, True)]


def test_scripted_usage_raw_body_and_bad_script(mock):
    mock.script({"times": 1, "usage": {"input": 10, "output": 5, "cache_read": 4}},
                {"times": 1, "omit_usage": True},
                {"times": 1, "status": 500, "body": "not json at all"})
    usage = json.loads(call(mock, "/v1/chat/completions", CHAT)[2])["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"]) == (10, 5, 4)
    assert json.loads(call(mock, "/v1/chat/completions", CHAT)[2])["usage"] is None
    status, _, raw = call(mock, "/v1/chat/completions", CHAT)
    assert (status, raw) == (500, b"not json at all")
    logs = mock.requests()
    assert logs[0]["usage"] == {"input": 10, "output": 5, "cache_read": 4, "cache_write": 0}
    assert logs[1]["usage"] is None
    assert logs[2]["status"] == 500
    with pytest.raises(RuntimeError, match="unknown field"):
        mock.script({"stauts": 429})


def test_tool_calls(mock):
    ask = {"model": "gpt-4o", "tools": TOOLS, "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    reply = json.loads(call(mock, "/v1/chat/completions", ask)[2])
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}

    _, _, raw = call(mock, "/v1/chat/completions", {**ask, "stream": True})
    chunks = [json.loads(d) for _, d in sse(raw)[:-1]]
    pieces = [tc["function"].get("arguments", "") for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert len(pieces) == 4 and "".join(pieces) == '{"city":"Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    ant = {"model": "claude", "max_tokens": 100, "stream": True, "tools": [{"name": "get_weather", "input_schema": {}}],
           "messages": [{"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]}]}
    data = [json.loads(d) for _, d in sse(call(mock, "/v1/messages", ant, header="x-api-key")[2])]
    assert data[1]["content_block"]["type"] == "tool_use" and data[1]["content_block"]["name"] == "get_weather"
    parts = [d["delta"]["partial_json"] for d in data if d["type"] == "content_block_delta"]
    assert len(parts) == 3 and json.loads("".join(parts)) == {"city": "Paris"}
    assert data[-2]["delta"]["stop_reason"] == "tool_use"

    # Once the tool result is in, a normal answer.
    done = {**ask, "messages": ask["messages"] + [choice["message"], {"role": "tool", "tool_call_id": choice["message"]["tool_calls"][0]["id"], "content": "sunny"}]}
    assert json.loads(call(mock, "/v1/chat/completions", done)[2])["choices"][0]["finish_reason"] == "stop"


def read_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_cut_after_chunks(mock):
    mock.script({"cut_after_chunks": 2, "words": 6, "times": 1})
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    raw = read_raw(mock.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-a1\r\n"
                   b"content-length: %d\r\n\r\n%s" % (len(body), body))
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    chunks = []
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        chunks.append(rest[:n])
        rest = rest[n + 2:]
    assert 0 not in [len(c) for c in chunks], "no terminating zero-length chunk"
    deltas = [json.loads(c.decode()[6:])["choices"][0]["delta"] for c in chunks]
    assert [d.get("content") for d in deltas] == ["", "Hello", " from"]
    assert mock.requests()[0]["usage"] is None

    # http.client sees the truncation as an incomplete read.
    mock.script({"cut_after_chunks": 1, "times": 1})
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
    conn.request("POST", "/v1/messages", body=json.dumps({**CHAT, "stream": True}), headers={"x-api-key": "k"})
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()


def test_api_errors(mock):
    status, _, raw = call(mock, "/v1/chat/completions", CHAT, key=None)
    assert (status, json.loads(raw)["error"]["code"]) == (401, "invalid_api_key")
    status, _, raw = call(mock, "/v1/messages", CHAT, key=None)
    assert (status, json.loads(raw)["error"]["type"]) == (401, "authentication_error")
    status, _, raw = call(mock, "/openai/deployments/gpt4o/chat/completions", CHAT, key="az", header="api-key")
    assert (status, json.loads(raw)["error"]["code"]) == (404, "404")
    status, _, raw = call(mock, "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21",
                          {"messages": []}, key="az", header="api-key")
    assert status == 200 and json.loads(raw)["model"] == "gpt4o"
    assert call(mock, "/v1/chat/completions", b"{not json")[0] == 400
    assert [r["key"] for r in mock.requests()] == [None, None, "az", "az", "sk-a1"]
    # Garbage on the wire: 400 and the mock survives.
    assert read_raw(mock.port, b"\x16\x03\x01 garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert read_raw(mock.port, b"POST /v1/messages HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").startswith(b"HTTP/1.1 400 ")
    assert call(mock, "/v1/chat/completions", CHAT)[0] == 200
