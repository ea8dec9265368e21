"""Issue: token accounting, exact for every request, streamed or not, in Envoy shared data."""
from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai

from conftest import KEYS, anthropic_provider, openai_provider
from harness import chat, request, sse_data

STATUS = "/tollgate/status"


def status(gw) -> dict:
    return request(gw.port, "GET", STATUS).json()


def reported(mock) -> dict:
    """What the mock provider told tollgate, summed: the truth the gateway must match."""
    tot = {"requests": 0, "input": 0, "output": 0}
    for r in mock.requests():
        if r["usage"]:
            tot["requests"] += 1
            tot["input"] += r["usage"]["input"]
            tot["output"] += r["usage"]["output"]
    return tot


def prom_sum(gw, metric: str, **labels) -> int:
    total = 0
    for line in gw.admin("/stats/prometheus").splitlines():
        if not line.startswith(metric + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def consumers():
    return {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY"}, {"name": "team-b", "key_env": "TEAM_B_KEY"}]}


def test_concurrent_openai_traffic_is_counted_exactly(gateway, mocks):
    plugin = {"consumers": consumers(), "providers": [openai_provider()], "status_path": STATUS,
              "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}}
    gw = gateway(plugin, concurrency=2)

    def one(i: int) -> int:
        key = KEYS["TEAM_A_KEY"] if i % 3 else KEYS["TEAM_B_KEY"]
        stream = i % 2 == 0
        extra = {"stream_options": {"include_usage": True}} if stream and i % 4 == 0 else {}
        r = chat(gw.port, key=key, stream=stream, content="word " * (i % 50 + 1), extra=extra)
        assert r.status == 200, r
        if stream:
            events = sse_data(r.body)
            assert events[-1] == "[DONE]"
            usage_chunks = [e for e in events if isinstance(e, dict) and e.get("usage")]
            # The client sees exactly the stream it asked for.
            assert len(usage_chunks) == (1 if extra else 0), events
        return i

    n = 3000
    with ThreadPoolExecutor(64) as pool:
        assert len(list(pool.map(one, range(n)))) == n
    truth = reported(mocks["openai"])
    assert truth["requests"] == n
    st = status(gw)
    a, b = st["consumers"]["team-a"]["usage"], st["consumers"]["team-b"]["usage"]
    assert a["requests"] + b["requests"] == n
    assert a["input_tokens"] + b["input_tokens"] == truth["input"]
    assert a["output_tokens"] + b["output_tokens"] == truth["output"]
    assert a["estimated_requests"] + b["estimated_requests"] == 0
    assert st["models"]["gpt-4o-mini"]["input_tokens"] == truth["input"]
    keys = st["providers"]["openai"]["keys"]
    assert sum(k["usage"]["output_tokens"] for k in keys) == truth["output"]
    assert all(k["usage"]["requests"] > 0 for k in keys)
    # Envoy's Prometheus endpoint, labelled by Envoy's own tag extraction, agrees.
    time.sleep(0.2)
    assert prom_sum(gw, "tollgate_consumer_model_tokens_in", model="gpt-4o-mini") == truth["input"]
    assert prom_sum(gw, "tollgate_consumer_model_tokens_out", consumer="team-a") == a["output_tokens"]
    assert prom_sum(gw, "tollgate_provider_key_tokens_out", provider="openai") == truth["output"]
    # The access log has one line per request with the counts.
    lines = gw.access_log("model=gpt-4o-mini", at_least=n)
    assert len(lines) == n
    logged_in = sum(int(re.search(r" in=(\d+)", l).group(1)) for l in lines)
    assert logged_in == truth["input"]
    assert all("usage=exact" in l for l in lines)


def test_anthropic_messages_counted_with_cache_tokens(gateway, mocks):
    plugin = {"providers": [anthropic_provider(models={})], "status_path": STATUS}
    gw = gateway(plugin, endpoints=[{"provider": "anthropic", "port": mocks["anthropic"].port}])
    mocks["anthropic"].script({"times": 1, "usage": {"input": 10, "output": 7, "cache_read": 100, "cache_write": 20}})
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    r = request(gw.port, "POST", "/v1/messages", body, {"x-api-key": "x"})
    assert r.status == 200, r
    for stream in (True, False, True):
        r = request(gw.port, "POST", "/v1/messages", {**body, "stream": stream}, {"x-api-key": "x"})
        assert r.status == 200
    truth = reported(mocks["anthropic"])
    u = status(gw)["consumers"]["anonymous"]["usage"]
    # Anthropic's input_tokens excludes cache tokens; tollgate's input is everything billed as input.
    assert u["input_tokens"] == truth["input"] + 120
    assert u["cache_read_tokens"] == 100 and u["cache_write_tokens"] == 20
    assert u["output_tokens"] == truth["output"]
    assert u["requests"] == 4 and u["estimated_requests"] == 0


def test_missing_usage_is_estimated_and_flagged(gateway, mocks):
    gw = gateway({"providers": [openai_provider(n=1)], "status_path": STATUS})
    mocks["openai"].script({"omit_usage": True, "words": 40})
    assert chat(gw.port, content="Tell me a story about a lighthouse keeper " * 5).status == 200
    assert chat(gw.port, stream=True, content="again " * 30).status == 200
    u = status(gw)["consumers"]["anonymous"]["usage"]
    assert u["requests"] == 2 and u["estimated_requests"] == 2
    assert u["input_tokens"] > 20 and u["output_tokens"] > 20
    assert prom_sum(gw, "tollgate_consumer_model_estimated_requests", consumer="anonymous") == 2
    lines = gw.access_log("model=gpt-4o-mini", at_least=2)
    assert [l.count("usage=estimated") for l in lines] == [1, 1], lines


def test_client_disconnect_mid_stream_is_still_charged_once(gateway, mocks):
    gw = gateway({"providers": [openai_provider(n=1)], "status_path": STATUS})
    mocks["openai"].script({"words": 200, "chunk_delay_ms": 20})
    s = socket.create_connection(("127.0.0.1", gw.port))
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "long answer please"}]})
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              f"content-length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while got.count(b"data:") < 5:
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        u = status(gw)["consumers"]["anonymous"]["usage"]
        if u["requests"]:
            break
        time.sleep(0.1)
    assert u["requests"] == 1 and u["estimated_requests"] == 1
    assert u["output_tokens"] >= 4 and u["input_tokens"] >= 1
    time.sleep(1)
    assert status(gw)["consumers"]["anonymous"]["usage"]["requests"] == 1, "charged exactly once"


def test_openai_sdk_streams_are_well_formed(gateway, mocks):
    gw = gateway({"providers": [openai_provider()], "status_path": STATUS})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="whatever", max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from openai."
    assert all(c.usage is None for c in chunks)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from openai."
    u = status(gw)["consumers"]["anonymous"]["usage"]
    assert u["requests"] == 3 and u["output_tokens"] == 9 and u["estimated_requests"] == 0


def test_anthropic_sdk_stream(gateway, mocks):
    gw = gateway({"providers": [anthropic_provider(models={})], "status_path": STATUS},
                 endpoints=[{"provider": "anthropic", "port": mocks["anthropic"].port}])
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw.port}", api_key="whatever", max_retries=0)
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=50,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from anthropic."
    assert final.usage.output_tokens == 3
    u = status(gw)["consumers"]["anonymous"]["usage"]
    assert u["output_tokens"] == 3 and u["input_tokens"] == final.usage.input_tokens
