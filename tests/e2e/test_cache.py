"""Issue: a response cache. The same deterministic question is answered once, not once per caller.

Real Envoy, the built module, the Rust mocks in echo mode (an answer says which question it
answers: "Echo: <the last user message>"), the official SDKs as clients.
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from conftest import KEYS, STATUS, anthropic_provider, openai_provider, status
from harness import request, sse_data

TEAM_A, TEAM_B = KEYS["TEAM_A_KEY"], KEYS["TEAM_B_KEY"]
PRICES = {"gpt-4o-mini": {"input": 0.15, "output": 0.6}, "claude-haiku-4-5": {"input": 1.0, "output": 5.0}}


def plugin(**cache):
    return {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY"},
                                   {"name": "team-b", "key_env": "TEAM_B_KEY"}]},
            "providers": [openai_provider(models={"gpt-4o-mini": "gpt-4o-mini"}),
                          anthropic_provider(models={"claude-haiku-4-5": "claude-haiku-4-5"})],
            "prices": PRICES, "status": STATUS, "cache": {"ttl": "1h", **cache}}


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(plugin())


@pytest.fixture(autouse=True)
def echo(mocks, _fresh_mocks):
    for m in mocks.values():
        m.script({"echo": True})


def prompt(tag: str) -> str:
    """A question no other test asks: each has its own entry."""
    return f"{tag} {uuid.uuid4().hex}"


def asked(mock, text: str) -> int:
    """How many requests with this question reached the provider."""
    return sum(text in r["body"] for r in mock.requests())


def oa(gw, key=TEAM_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)


def an(gw, key=TEAM_A) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0)


def chat_json(gw, text, key=TEAM_A, headers=None, **kw):
    """(content, usage, response headers) of a chat completion at temperature 0."""
    raw = oa(gw, key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": text}],
        extra_headers=headers or {}, **kw)
    c = raw.parse()
    return c.choices[0].message.content, c.usage, raw.headers


def chat_stream(gw, text, key=TEAM_A, include_usage=False):
    """(content, usage chunk's usage or None, response headers) of a streamed chat completion."""
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    s = oa(gw, key).chat.completions.create(
        model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": text}], stream=True, **extra)
    content, usage, finish = "", None, None
    for chunk in s:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop"
    return content, usage, s.response.headers


# This Anthropic SDK has no `temperature` parameter any more; the API still reads one from the body.
DETERMINISTIC = {"extra_body": {"temperature": 0}}


def messages_json(gw, text, key=TEAM_A):
    raw = an(gw, key).messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": text}], **DETERMINISTIC)
    m = raw.parse()
    return m.content[0].text, m.usage, raw.headers


def messages_stream(gw, text, key=TEAM_A):
    with an(gw, key).messages.stream(model="claude-haiku-4-5", max_tokens=100,
                                     messages=[{"role": "user", "content": text}], **DETERMINISTIC) as s:
        m = s.get_final_message()
        return m.content[0].text, m.usage, s.response.headers


def test_openai_json_then_json_and_stream_from_the_cache(gw, mocks):
    text = prompt("classify")
    first, usage, h = chat_json(gw, text)
    assert first == f"Echo: {text}" and h["x-tollgate-cache"] == "miss"
    again, usage2, h = chat_json(gw, text)
    assert (again, h["x-tollgate-cache"]) == (first, "hit")
    assert int(h["age"]) >= 0
    assert usage2.prompt_tokens == usage.prompt_tokens and usage2.completion_tokens == usage.completion_tokens
    # A stream replayed from the stored JSON answer, with the usage the client asked for.
    streamed, su, h = chat_stream(gw, text, include_usage=True)
    assert (streamed, h["x-tollgate-cache"]) == (first, "hit")
    assert su.completion_tokens == usage.completion_tokens
    streamed, su, _ = chat_stream(gw, text)
    assert (streamed, su) == (first, None)
    assert asked(mocks["openai"], text) == 1


def test_openai_stream_then_json_from_the_cache(gw, mocks):
    text = prompt("extract")
    first, _, h = chat_stream(gw, text)
    assert first == f"Echo: {text}" and h["x-tollgate-cache"] == "miss"
    again, usage, h = chat_json(gw, text)
    assert (again, h["x-tollgate-cache"]) == (first, "hit")
    # The usage tollgate asked the provider for, though the client did not, was stored with it.
    assert usage.completion_tokens == len(first.split())
    streamed, _, h = chat_stream(gw, text)
    assert (streamed, h["x-tollgate-cache"]) == (first, "hit")
    assert asked(mocks["openai"], text) == 1


def test_anthropic_both_ways(gw, mocks):
    text = prompt("translate")
    first, usage, h = messages_json(gw, text)
    assert first == f"Echo: {text}" and h["x-tollgate-cache"] == "miss"
    streamed, su, h = messages_stream(gw, text)
    assert (streamed, h["x-tollgate-cache"]) == (first, "hit")
    assert (su.input_tokens, su.output_tokens) == (usage.input_tokens, usage.output_tokens)
    other = prompt("summarize")
    streamed, su, h = messages_stream(gw, other)
    assert h["x-tollgate-cache"] == "miss"
    again, u2, h = messages_json(gw, other)
    assert (again, h["x-tollgate-cache"]) == (streamed, "hit")
    assert u2.output_tokens == su.output_tokens
    assert asked(mocks["anthropic"], text) == 1 and asked(mocks["anthropic"], other) == 1
    assert asked(mocks["openai"], text) == 0


def test_what_is_not_deterministic_bypasses_unless_asked(gw, mocks):
    text = prompt("poem")
    c = oa(gw)
    for _ in range(2):
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0.7, messages=[{"role": "user", "content": text}])
        assert raw.headers["x-tollgate-cache"] == "bypass"
    assert asked(mocks["openai"], text) == 2
    # A seed makes it deterministic; so does the client's own request header.
    for headers, extra, tag in [({}, {"seed": 7}, "seeded"), ({"x-tollgate-cache": "on"}, {}, "asked")]:
        t = prompt(tag)
        seen = []
        for _ in range(2):
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", temperature=0.7, messages=[{"role": "user", "content": t}],
                extra_headers=headers, **extra)
            seen.append(raw.headers["x-tollgate-cache"])
        assert seen == ["miss", "hit"], (tag, seen)
        assert asked(mocks["openai"], t) == 1
        assert "x-tollgate-cache" not in mocks["openai"].requests()[-1]["headers"]


def test_no_cache_and_no_store_are_honoured(gw, mocks):
    text = prompt("no-store")
    _, _, h = chat_json(gw, text, headers={"Cache-Control": "no-store"})
    assert h["x-tollgate-cache"] == "miss"
    _, _, h = chat_json(gw, text)
    assert h["x-tollgate-cache"] == "miss", "no-store kept it out"
    _, _, h = chat_json(gw, text, headers={"Cache-Control": "no-cache"})
    assert h["x-tollgate-cache"] == "bypass", "no-cache skipped the lookup"
    assert asked(mocks["openai"], text) == 3
    _, _, h = chat_json(gw, text)
    assert h["x-tollgate-cache"] == "hit"
    assert asked(mocks["openai"], text) == 3


def test_two_consumers_do_not_share_entries(gw, mocks):
    text = prompt("isolated")
    chat_json(gw, text, key=TEAM_A)
    _, _, h = chat_json(gw, text, key=TEAM_B)
    assert h["x-tollgate-cache"] == "miss"
    assert asked(mocks["openai"], text) == 2


def test_a_shared_scope_shares_them(module_gateway, mocks):
    shared = module_gateway(plugin(shared_scope=True))
    text = prompt("shared")
    first, _, _ = chat_json(shared, text, key=TEAM_A)
    again, _, h = chat_json(shared, text, key=TEAM_B)
    assert (again, h["x-tollgate-cache"]) == (first, "hit")
    assert asked(mocks["openai"], text) == 1


def test_a_cut_stream_and_an_error_are_not_stored(gw, mocks):
    m = mocks["openai"]
    m.reset()
    text = prompt("cut")
    m.script({"cut_after_chunks": 2, "times": 1, "echo": True}, {"echo": True})
    body = {"model": "gpt-4o-mini", "temperature": 0, "stream": True, "messages": [{"role": "user", "content": text}]}
    try:
        r = request(gw.port, "POST", "/v1/chat/completions", body, {"authorization": f"Bearer {TEAM_A}"})
        assert "[DONE]" not in r.body.decode(), "the stream was cut"
    except (http.client.IncompleteRead, ConnectionError):
        pass
    _, _, h = chat_json(gw, text)
    assert h["x-tollgate-cache"] == "miss"
    assert asked(m, text) == 2

    m.reset()
    text = prompt("error")
    m.script({"status": 400, "times": 1}, {"echo": True})
    with pytest.raises(openai.BadRequestError):
        chat_json(gw, text)
    _, _, h = chat_json(gw, text)
    assert h["x-tollgate-cache"] == "miss"
    assert asked(m, text) == 2


def test_a_hit_is_a_request_and_saved_tokens_not_spent_ones(gw, mocks):
    before = status(gw)["consumers"]["team-b"]
    text = prompt("totals")
    chat_json(gw, text, key=TEAM_B)
    spent = mocks["openai"].requests()[-1]["usage"]
    since = len(gw.access_log())
    for _ in range(3):
        _, _, h = chat_json(gw, text, key=TEAM_B)
        assert h["x-tollgate-cache"] == "hit"
    after = status(gw)["consumers"]["team-b"]
    assert after["usage"]["requests"] - before["usage"]["requests"] == 4
    assert after["usage"]["input_tokens"] - before["usage"]["input_tokens"] == spent["input"]
    assert after["usage"]["output_tokens"] - before["usage"]["output_tokens"] == spent["output"]
    saved = {k: after["cache_saved"][k] - before["cache_saved"][k] for k in ("answers", "input_tokens", "output_tokens")}
    assert saved == {"answers": 3, "input_tokens": 3 * spent["input"], "output_tokens": 3 * spent["output"]}
    usd = 3 * (spent["input"] * 0.15 + spent["output"] * 0.6) / 1e6
    assert after["cache_saved"]["cost_usd"] - before["cache_saved"]["cost_usd"] == pytest.approx(usd, abs=3e-6)
    lines = gw.access_log(contains="cache=hit", at_least=3, since=since)
    assert len(lines) == 3 and all("consumer=team-b" in l and " age=" in l and "in=0 out=0" in l for l in lines), lines
    stats = gw.stats()
    assert stats.get("wasmcustom.tollgate.cache.hits", 0) >= 3
    assert stats.get("wasmcustom.tollgate.cache.saved_tokens_out", 0) >= 3 * spent["output"]
    assert stats.get("wasmcustom.tollgate.outcome.cache_hit.requests", 0) >= 3


def test_ttl_then_stale_while_every_key_cools_and_never_once_a_key_is_back(gateway, mocks):
    p = plugin(ttl="2s", stale_window="1h")
    p["providers"] = [openai_provider(n=2, models={"gpt-4o-mini": "gpt-4o-mini"})]
    gw = gateway(p)
    m = mocks["openai"]
    text = prompt("stale")
    first, _, h = chat_json(gw, text)
    assert h["x-tollgate-cache"] == "miss"
    assert chat_json(gw, text)[2]["x-tollgate-cache"] == "hit"
    time.sleep(2.2)
    again, _, h = chat_json(gw, text)
    assert (again, h["x-tollgate-cache"]) == (first, "miss"), "expired: asked again"
    assert asked(m, text) == 2

    # Expired, and both keys answer 429: the stale entry instead, then while they cool, without asking.
    time.sleep(2.2)
    m.reset()
    m.script({"status": 429, "headers": {"retry-after": "3"}})
    stale, _, h = chat_json(gw, text)
    assert (stale, h["x-tollgate-cache"]) == (first, "stale")
    assert int(h["age"]) >= 2
    tried = len(m.requests())
    assert tried >= 2
    stale, _, h = chat_json(gw, text)
    assert (stale, h["x-tollgate-cache"]) == (first, "stale")
    assert len(m.requests()) == tried, "no attempt while every key cools"
    with pytest.raises(openai.RateLimitError):
        chat_json(gw, prompt("never-cached"))
    # A key is back: the provider answers, never the stale entry.
    m.reset()
    m.script({"echo": True})
    time.sleep(3.2)
    fresh, _, h = chat_json(gw, text)
    assert (fresh, h["x-tollgate-cache"]) == (first, "miss")
    assert asked(m, text) == 1

    # Expired, and the provider fails with 5xx on every attempt: the stale entry instead.
    time.sleep(2.2)
    m.reset()
    m.script({"status": 503})
    stale, _, h = chat_json(gw, text)
    assert (stale, h["x-tollgate-cache"]) == (first, "stale")
    assert all(r["status"] == 503 for r in m.requests()) and m.requests(), "the provider was asked, and failed"
    streamed, _, h = chat_stream(gw, text)
    assert (streamed, h["x-tollgate-cache"]) == (first, "stale")
    assert gw.stat("wasmcustom.tollgate.cache.stale_served") >= 4


def test_under_concurrency_no_answer_is_ever_another_requests(gateway, mocks):
    """64 connections, 2 workers, a cache of 16 slots: repeated and fresh questions, streamed and
    not, from two consumers, evicting each other all the time. Every answer must be its own."""
    gw = gateway(plugin(capacity=16, max_entry_bytes=4096), concurrency=2)
    repeated = [prompt(f"repeat-{i}") for i in range(24)]
    rng = random.Random(7)
    lock = threading.Lock()
    outcomes: dict[str, int] = {}

    def one(i: int) -> None:
        r = random.Random(i)
        text = r.choice(repeated) if r.random() < 0.7 else prompt("fresh")
        key = TEAM_A if r.random() < 0.5 else TEAM_B
        stream = r.random() < 0.4
        body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": text}],
                **({"stream": True} if stream else {})}
        resp = request(gw.port, "POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
        assert resp.status == 200, resp
        if stream:
            content = "".join(e["choices"][0]["delta"].get("content") or ""
                              for e in sse_data(resp.body) if isinstance(e, dict) and e.get("choices"))
        else:
            content = resp.json()["choices"][0]["message"]["content"]
        assert content == f"Echo: {text}", (text, content, resp.headers.get("x-tollgate-cache"))
        with lock:
            o = resp.headers.get("x-tollgate-cache", "none")
            outcomes[o] = outcomes.get(o, 0) + 1

    n = 1500
    order = list(range(n))
    rng.shuffle(order)
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, order))
    assert sum(outcomes.values()) == n
    assert outcomes.get("hit", 0) > 50 and outcomes.get("miss", 0) > 50, outcomes
    stats = gw.stats()
    assert stats.get("wasmcustom.tollgate.cache.evictions", 0) > 0, "the slots were contended"
    assert stats.get("wasmcustom.tollgate.cache.hits", 0) == outcomes["hit"]
