"""Issue: token accounting, exact for every request, streamed or not, in Envoy shared data."""
from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from conftest import KEYS, STATUS, anthropic_provider, openai_provider, status, status_as
from harness import chat, request, sse_data




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
    plugin = {"consumers": consumers(), "providers": [openai_provider()], "status": STATUS,
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
    plugin = {"providers": [anthropic_provider(models={})], "status": STATUS}
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
    gw = gateway({"providers": [openai_provider(n=1)], "status": STATUS})
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
    gw = gateway({"providers": [openai_provider(n=1)], "status": STATUS})
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
    gw = gateway({"providers": [openai_provider()], "status": STATUS})
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
    gw = gateway({"providers": [anthropic_provider(models={})], "status": STATUS},
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


# ---------------------------------------------------------------- defects found by trying it as a new user

def logged_tokens(line: str) -> tuple[int, int]:
    return int(re.search(r" in=(\d+)", line).group(1)), int(re.search(r" out=(\d+)", line).group(1))


def post(port: int, path: str, body: dict) -> "object":
    """A POST whose answer may be cut short by an upstream reset (the partial body is kept)."""
    import http.client

    from harness import Response
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"content-type": "application/json", "authorization": "Bearer x", "x-api-key": "x"})
    r = conn.getresponse()
    try:
        raw = r.read()
    except http.client.IncompleteRead as e:
        raw = e.partial
    conn.close()
    return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, raw)


@pytest.fixture(scope="module")
def translating(module_gateway, mocks):
    """Gateways that translate: OpenAI clients served by Anthropic, Anthropic clients served by OpenAI."""
    return {
        "openai_client": module_gateway({"providers": [anthropic_provider()]},
                                        endpoints=[{"provider": "anthropic", "port": mocks["anthropic"].port}]),
        "anthropic_client": module_gateway({"providers": [openai_provider(models={"claude-haiku-4-5": "gpt-4o-mini"})]},
                                           endpoints=[{"provider": "openai", "port": mocks["openai"].port}]),
    }


def translated_request(gws: dict, client: str, stream: bool, content: str):
    gw = gws[client]
    if client == "openai_client":
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
        path = "/v1/chat/completions"
    else:
        body = {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": content}]}
        path = "/v1/messages"
    return gw, post(gw.port, path, {**body, **({"stream": True} if stream else {})})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("client", ["openai_client", "anthropic_client"])
def test_translated_answer_without_usage_is_estimated(translating, mocks, client, stream):
    """A provider answer without `usage`, translated for a client of the other API, is charged as an
    estimate (access log usage=estimated, input and output tokens > 0): a count the provider did not
    give is never an exact zero."""
    provider = mocks["anthropic" if client == "openai_client" else "openai"]
    provider.script({"omit_usage": True, "words": 30, "times": 1})
    since = len(translating[client].access_log(at_least=0))
    gw, r = translated_request(translating, client, stream, "Tell me about lighthouses " * 5)
    assert r.status == 200, r
    assert len(provider.requests()) == 1
    (line,) = gw.access_log(since=since)
    assert "usage=estimated" in line, line
    tokens_in, tokens_out = logged_tokens(line)
    assert tokens_in > 5 and tokens_out > 5, line


@pytest.mark.parametrize("cut", [False, True], ids=["no_message_delta_usage", "cut_after_message_start"])
def test_translated_stream_with_only_message_start_counts_is_estimated(translating, mocks, cut):
    """Anthropic reports the output count in `message_delta`; `message_start`'s output (1) is
    provisional. A stream translated for an OpenAI client whose only counts came in `message_start`
    (no usage in `message_delta`, or the stream cut after `message_start` and a few deltas) is charged
    as an estimate, not as exact with 1 output token."""
    rule = {"cut_after_chunks": 3} if cut else {"omit_delta_usage": True}
    mocks["anthropic"].script({"words": 30, "times": 1, **rule})
    since = len(translating["openai_client"].access_log(at_least=0))
    gw, r = translated_request(translating, "openai_client", True, "Tell me about lighthouses")
    assert r.status == 200, r
    (line,) = gw.access_log(since=since)
    assert "usage=estimated" in line, line
    tokens_in, tokens_out = logged_tokens(line)
    assert tokens_in > 0 and tokens_out >= (2 if cut else 10), line


def test_stream_without_include_usage_gets_no_usage_chunk(module_gateway, mocks):
    """A client streaming chat completions without `stream_options.include_usage` gets no usage
    chunk. tollgate asks the provider for it to count the request and removes it (clients that index
    `choices[0]` break on its empty `choices`); the other chunks pass as the provider sent them, with
    the `"usage": null` OpenAI puts in every chunk when usage is asked for (not rewritten: one host
    call per event). The openai SDK reads them as chunks without usage. The request is still
    charged exactly."""
    gw = module_gateway({"providers": [openai_provider(n=1)]})
    since = len(gw.access_log(at_least=0))
    r = chat(gw.port, stream=True, content="hi there")
    assert r.status == 200, r
    events = sse_data(r.body)
    assert events[-1] == "[DONE]" and len(events) > 3, events
    assert json.loads(mocks["openai"].requests()[-1]["body"])["stream_options"] == {"include_usage": True}
    chunks = events[:-1]
    assert all(isinstance(c, dict) and c["choices"] for c in chunks), chunks
    assert all(c["usage"] is None for c in chunks), chunks
    (line,) = gw.access_log(since=since)
    assert "usage=exact" in line and logged_tokens(line)[1] == 3, line

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="whatever", max_retries=0)
    parsed = list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert len(parsed) == len(chunks) and all(c.usage is None for c in parsed), parsed
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == "Hello from openai."
    assert parsed[-1].choices[0].finish_reason == "stop"
    assert json.loads(mocks["openai"].requests()[-1]["body"])["stream_options"] == {"include_usage": True}


def consumer_standing_plugin() -> dict:
    return {"consumers": {"list": [
                {"name": "team-a", "key_env": "TEAM_A_KEY",
                 "limits": [{"metric": "cost_usd", "amount": 0.5, "window": "1h"},
                            {"metric": "requests", "amount": 100, "window": "1h"}]},
                {"name": "team-b", "key_env": "TEAM_B_KEY"}]},
            "providers": [openai_provider()], "status": STATUS,
            "prices": {"gpt-4o-mini": {"input": 10.0, "output": 30.0}}}


def numbers_under(value, path: str = ""):
    """(path, number) for every number in a JSON value, the path made of its keys."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers_under(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers_under(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


# Fields of a cost_usd limit that hold money (not its window or reset time).
MONEY_FIELD = re.compile(r"amount|remaining|used|spent|usd|cost")


def cost_limits(value) -> list[dict]:
    if isinstance(value, dict):
        found = [value] if value.get("metric") == "cost_usd" else []
        return found + [c for v in value.values() for c in cost_limits(v)]
    if isinstance(value, list):
        return [c for v in value for c in cost_limits(v)]
    return []


def test_status_needs_a_credential_and_a_consumer_sees_only_its_own_standing(gateway, mocks):
    """The status endpoint: without a credential (or with a wrong one) 401 in OpenAI's error shape; a
    consumer presenting its own key sees its own standing (usage, limits) and nothing about other
    consumers or the provider keys; the admin key sees everything. Money is in USD, never micro-USD."""
    gw = gateway(consumer_standing_plugin())
    mocks["openai"].script({"usage": {"input": 100, "output": 100}})  # $0.001 + $0.003 per request
    assert chat(gw.port, key=KEYS["TEAM_A_KEY"]).status == 200
    assert chat(gw.port, key=KEYS["TEAM_B_KEY"]).status == 200

    for key in (None, "tg-not-a-key", KEYS["OPENAI_KEY_1"]):
        r = status_as(gw, key)
        assert r.status == 401, (key, r)
        err = r.json()["error"]
        assert {"message", "type", "code"} <= set(err) and isinstance(err["message"], str), err

    r = status_as(gw, KEYS["TEAM_A_KEY"])
    assert r.status == 200, r
    own = r.json()
    text = r.body.decode()
    assert "team-a" in text and "usage" in text, own
    assert "team-b" not in text, "a consumer sees another consumer's standing"
    for key_id in ("oa-1", "oa-2", "oa-3"):
        assert key_id not in text, f"a consumer sees the provider key {key_id}"
    assert any(path.endswith(".requests") and v == 1 for path, v in numbers_under(own)), own
    limits = cost_limits(own)
    assert limits and all(l["amount"] == 0.5 for l in limits), limits
    money = [(p, v) for p, v in numbers_under(own) if "usd" in p.lower() or "cost" in p.lower()]
    money += [(p, v) for l in limits for p, v in numbers_under(l) if MONEY_FIELD.search(p)]
    assert money and all(v <= 0.5 for _, v in money), f"money not in USD: {money}"
    # The budget refills continuously (0.5 USD an hour: ~0.14 milli-USD a second), so `remaining`
    # can be a little above 0.496 by the time it is read.
    assert any(abs(v - 0.004) < 1e-6 or 0.496 <= v < 0.497 for _, v in money), f"spend of $0.004 not shown: {money}"

    everything = status(gw)
    text = json.dumps(everything)
    assert "team-a" in text and "team-b" in text and "oa-2" in text, everything
    assert [k["id"] for k in everything["providers"]["openai"]["keys"]] == ["oa-1", "oa-2", "oa-3"]
    assert all(v <= 0.5 for l in cost_limits(everything) for p, v in numbers_under(l) if MONEY_FIELD.search(p))
