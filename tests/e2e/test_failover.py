"""Issue: a throttled key cools down, the attempt moves to another key, then to another provider."""
from __future__ import annotations

import json
import time

import openai

from conftest import KEYS, STATUS, anthropic_provider, openai_provider, status
import pytest

from harness import chat, request, sds_from_env, sse_data



def two_providers(**health):
    p = {"providers": [openai_provider(), anthropic_provider()], "status": STATUS}
    if health:
        p["health"] = health
    return p


def keys_seen(mock):
    return [r["key"] for r in mock.requests()]


def test_throttled_keys_cool_down_then_traffic_fails_over_to_anthropic(gateway, mocks):
    gw = gateway(two_providers())
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 429, "headers": {"retry-after": "30"}})
    results = []
    for i in range(8):
        r = chat(gw.port, stream=(i % 2 == 1), content="What is 2+2?",
                 extra={"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]})
        assert r.status == 200, r
        results.append(r)
    # Each of A's keys was tried exactly once: never again during its 30 s cooldown.
    assert sorted(keys_seen(a)) == sorted([KEYS["OPENAI_KEY_1"], KEYS["OPENAI_KEY_2"], KEYS["OPENAI_KEY_3"]])
    assert len(b.requests()) == 8
    for r in results:
        assert r.headers["x-tollgate-provider"] == "anthropic" and r.headers["x-tollgate-key-id"] == "an-1"
    sent = b.requests()[0]
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == KEYS["ANTHROPIC_KEY_1"] and "authorization" not in sent["headers"]
    body = json.loads(sent["body"])
    assert body["model"] == "claude-haiku-4-5" and body["system"] == "Be brief."
    content = body["messages"][0]["content"]
    text = content if isinstance(content, str) else "".join(b["text"] for b in content if b["type"] == "text")
    assert body["messages"][0]["role"] == "user" and text == "What is 2+2?" and body["max_tokens"] > 0
    # The client got OpenAI-shaped answers, streamed and not.
    j = results[0].json()
    assert j["object"] == "chat.completion" and j["model"] == "gpt-4o-mini"
    assert j["choices"][0]["message"]["content"] == "Hello from anthropic."
    assert j["choices"][0]["finish_reason"] == "stop"
    events = sse_data(results[1].body)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if isinstance(e, dict) and e["choices"]) \
        == "Hello from anthropic."
    st = status(gw)
    assert [k["state"] for k in st["providers"]["openai"]["keys"]] == ["rate_limited"] * 3
    assert st["providers"]["anthropic"]["keys"][0]["usage"]["requests"] == 8
    assert st["providers"]["openai"]["keys"][0]["usage"]["requests"] == 0


def test_traffic_returns_to_the_first_provider_after_the_cooldown(gateway, mocks):
    gw = gateway(two_providers())
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 429, "headers": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}, "times": 3})
    for _ in range(4):
        assert chat(gw.port).status == 200
    assert len(a.requests()) == 3 and len(b.requests()) == 4
    time.sleep(1.7)
    r = chat(gw.port)
    assert r.status == 200 and r.headers["x-tollgate-provider"] == "openai"


def test_dead_key_leaves_the_rotation(gateway, mocks):
    gw = gateway(two_providers())
    a = mocks["openai"]
    a.script({"key": KEYS["OPENAI_KEY_2"], "status": 401})
    for _ in range(10):
        assert chat(gw.port).status == 200
    seen = keys_seen(a)
    assert seen.count(KEYS["OPENAI_KEY_2"]) == 1, seen
    # The other two keys share the rest; each worker takes round-robin tickets in blocks of 4
    # (src/pool/keypool.rs), so over 9 requests on 2 workers the split is even within a block.
    assert seen.count(KEYS["OPENAI_KEY_1"]) >= 3 and seen.count(KEYS["OPENAI_KEY_3"]) >= 3, seen
    st = status(gw)
    assert [k["state"] for k in st["providers"]["openai"]["keys"]] == ["healthy", "disabled", "healthy"]
    log = gw.wait_log("key openai/oa-2 refused by the provider with 401")
    assert "key openai/oa-2 refused by the provider with 401" in log
    assert KEYS["OPENAI_KEY_2"] not in log


def test_503_burst_opens_the_circuit_and_a_half_open_probe_closes_it(gateway, mocks):
    gw = gateway(two_providers(circuit_failures=3, circuit_open_s=2, half_open_probes=1))
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 503, "times": 3})
    for _ in range(3):
        assert chat(gw.port).status == 200  # 503 on A, retried on B
    assert status(gw)["providers"]["openai"]["circuit"] == "open"
    for _ in range(3):
        assert chat(gw.port).headers["x-tollgate-provider"] == "anthropic"
    assert len(a.requests()) == 3, "no attempt on A while its circuit is open"
    time.sleep(2.1)
    r = chat(gw.port)  # the half-open probe
    assert r.headers["x-tollgate-provider"] == "openai"
    assert status(gw)["providers"]["openai"]["circuit"] == "closed"
    assert chat(gw.port).headers["x-tollgate-provider"] == "openai"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_openai_sdk_across_a_failover_to_anthropic_with_tool_calls(gateway, mocks):
    gw = gateway(two_providers())
    mocks["openai"].script({"status": 429, "headers": {"retry-after": "60"}})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    sent = json.loads(mocks["anthropic"].requests()[-1]["body"])
    assert sent["tools"][0]["name"] == "get_weather" and sent["tools"][0]["input_schema"]["required"] == ["city"]
    # Streamed, the tool call's arguments arrive in pieces and join into the same JSON.
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, tools=TOOLS, stream=True))
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []))
    assert json.loads(args) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # A follow-up with the tool result goes through translated too.
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}]
    r2 = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, tools=TOOLS)
    assert r2.choices[0].message.content == "Hello from anthropic."
    sent = json.loads(mocks["anthropic"].requests()[-1]["body"])
    assert sent["messages"][-1]["content"][0]["type"] == "tool_result"


def test_untranslatable_request_gets_a_400_naming_the_field(gateway, mocks):
    gw = gateway({"providers": [anthropic_provider()]}, endpoints=[{"provider": "anthropic", "port": mocks["anthropic"].port}])
    r = chat(gw.port, extra={"n": 3})
    assert r.status == 400, r
    assert "n" in r.json()["error"]["message"]
    assert mocks["anthropic"].requests() == []


def test_anthropic_client_served_by_an_openai_provider(gateway, mocks):
    import anthropic

    gw = gateway({"providers": [openai_provider(models={"claude-haiku-4-5": "gpt-4o-mini"})], "status": STATUS})
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw.port}", api_key="x", max_retries=0)
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=64, system="Be brief.",
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "Hello from openai." and msg.stop_reason == "end_turn"
    sent = mocks["openai"].requests()[-1]
    assert sent["path"] == "/v1/chat/completions"
    body = json.loads(sent["body"])
    assert body["model"] == "gpt-4o-mini" and body["messages"][0] == {"role": "system", "content": "Be brief."}
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == "Hello from openai."
        assert s.get_final_message().usage.output_tokens == 3
    u = status(gw)["consumers"]["anonymous"]["usage"]
    assert u["requests"] == 2 and u["output_tokens"] == 6 and u["estimated_requests"] == 0


def test_per_try_timeouts_count_against_the_provider(gateway, mocks):
    gw = gateway(two_providers(circuit_failures=2, circuit_open_s=30), per_try_timeout="0.5s")
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"delay_ms": 1500})
    for _ in range(2):
        r = chat(gw.port)
        assert r.status == 200 and r.headers["x-tollgate-provider"] == "anthropic", r
    assert status(gw)["providers"]["openai"]["circuit"] == "open"
    seen = len(a.requests())
    r = chat(gw.port)
    assert r.headers["x-tollgate-provider"] == "anthropic"
    time.sleep(1.2)  # the slow answers the mock was still writing have finished
    assert len(a.requests()) == seen, "no attempt on the provider while its circuit is open"


def test_clients_that_give_up_do_not_open_the_providers_circuit(gateway, mocks):
    """Clients that disconnect while their attempt is in flight are not the provider's failures."""
    import socket

    gw = gateway(two_providers(circuit_failures=2, circuit_open_s=30))
    mocks["openai"].script({"delay_ms": 800, "times": 4})
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(body)}\r\n\r\n{body}".encode())
        time.sleep(0.2)
        s.close()
    time.sleep(1.0)
    assert status(gw)["providers"]["openai"]["circuit"] == "closed"
    assert chat(gw.port).headers["x-tollgate-provider"] == "openai"


def test_each_attempt_starts_from_the_clients_request(gateway, mocks):
    """Envoy hands every attempt the header map the previous attempt rewrote: an OpenAI request that
    goes openai (503) -> anthropic (503) -> openai must still be answered in OpenAI's shape, and an
    Anthropic request that fails over from openai to anthropic in Anthropic's. (Keys do not rest after
    a 5xx here: the second request must reach anthropic's only key right after its 503.)"""
    gw = gateway(two_providers(circuit_failures=50, server_error_cooldown_s=0))
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 503, "times": 1})
    b.script({"status": 503, "times": 1})
    r = chat(gw.port)
    assert r.status == 200 and r.json()["object"] == "chat.completion", r
    assert [x["path"] for x in a.requests()] == ["/v1/chat/completions"] * 2
    assert [x["path"] for x in b.requests()] == ["/v1/messages"]
    assert "x-api-key" not in a.requests()[1]["headers"] and "authorization" not in b.requests()[0]["headers"]
    a.script({"status": 429, "headers": {"retry-after": "1"}, "times": 1})
    msg = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    r = request(gw.port, "POST", "/v1/messages", msg, {"x-api-key": "x"})
    assert r.status == 200 and r.json()["type"] == "message", r
    assert b.requests()[-1]["path"] == "/v1/messages"


# ---------------------------------------------------------------- defects found by trying it as a new user

@pytest.mark.parametrize("source", ["env", "sds"])
def test_provider_never_sees_client_tollgate_headers_nor_the_trusted_consumer_header(gateway, mocks, tmp_path, source):
    """`x-tollgate-*` headers are the gateway's own and the trusted consumer header is an internal
    identity: whatever a client sends under those names reaches no provider, on the first attempt nor
    on the retry (here after a failover to the other provider). With keys whose secret Envoy keeps
    (`sds`), tollgate's own `x-tollgate-credential` selects the secret and is removed by Envoy before
    the attempt leaves; a client's copy chooses nothing."""
    p = {"consumers": {"trusted_header": "x-team", "list": [{"name": "team-a"}, {"name": "team-b"}]},
         "providers": [openai_provider(), anthropic_provider()]}
    kw = {}
    if source == "sds":
        p = sds_from_env(p, KEYS, tmp_path / "sds")
        kw["secrets_dir"] = tmp_path / "sds"
    gw = gateway(p, **kw)
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 429, "headers": {"retry-after": "30"}, "times": 1})  # the retry goes to anthropic
    spoofed = {"x-team": "team-a", "x-tollgate-consumer": "team-b", "x-tollgate-route": "openai",
               "x-tollgate-provider": "openai", "x-tollgate-key-id": "oa-1", "x-tollgate-rid": "1",
               "x-tollgate-credential": "openai-key-2", "x-tollgate-anything": "yes"}
    r = chat(gw.port, key=None, headers=spoofed)
    assert r.status == 200, r
    seen = a.requests() + b.requests()
    assert len(a.requests()) == 1 and len(b.requests()) == 1, [(q["path"], q["key"]) for q in seen]
    assert a.requests()[0]["key"] in {KEYS[f"OPENAI_KEY_{i}"] for i in (1, 2, 3)}
    assert b.requests()[0]["key"] == KEYS["ANTHROPIC_KEY_1"]
    for i, q in enumerate(seen):
        leaked = {k: v for k, v in q["headers"].items() if k.startswith("x-tollgate-") or k == "x-team"}
        assert leaked == {}, f"attempt {i + 1} ({q['path']}) received {leaked}"
    line = gw.access_log()[-1]
    assert "consumer=team-a" in line, line


def two_providers_by_model():
    return {"providers": [openai_provider(models={"gpt-4o-mini": "gpt-4o-mini"}),
                          anthropic_provider(models={"claude-haiku-4-5": "claude-haiku-4-5"})]}


def test_model_only_the_second_provider_lists_is_served_by_it(gateway, mocks):
    """The provider is chosen by the model before the first attempt: a model only the second provider
    lists is served by it, and the first provider is never asked."""
    gw = gateway(two_providers_by_model())
    r = chat(gw.port, model="claude-haiku-4-5")
    assert r.status == 200, r
    assert r.headers["x-tollgate-provider"] == "anthropic"
    assert r.json()["choices"][0]["message"]["content"] == "Hello from anthropic."
    assert mocks["openai"].requests() == []
    assert json.loads(mocks["anthropic"].requests()[0]["body"])["model"] == "claude-haiku-4-5"
    assert chat(gw.port, model="gpt-4o-mini").headers["x-tollgate-provider"] == "openai"


def test_model_whose_providers_all_cool_down_gets_429_with_retry_after(gateway, mocks):
    """When every provider listing the model is cooling down, the client is told to come back later
    (429 with Retry-After), not that the request is invalid; other models are still served."""
    gw = gateway(two_providers_by_model())
    mocks["anthropic"].script({"status": 429, "headers": {"retry-after": "30"}, "times": 1})
    first = chat(gw.port, model="claude-haiku-4-5")
    assert first.status == 429, first
    r = chat(gw.port, model="claude-haiku-4-5")
    assert r.status == 429, r
    assert 1 <= int(r.headers["retry-after"]) <= 45, r.headers  # 30 s, spread by up to half again
    assert isinstance(r.json()["error"]["message"], str), r
    assert len(mocks["anthropic"].requests()) == 1, "no call while the only key for the model cools down"
    assert mocks["openai"].requests() == []
    assert chat(gw.port, model="gpt-4o-mini").status == 200


def test_model_no_provider_lists_gets_400_naming_the_model(gateway, mocks):
    """A model no provider lists is refused at the gateway with 400 naming the model; no provider is
    called."""
    gw = gateway(two_providers_by_model())
    r = chat(gw.port, model="gpt-9-ultra")
    assert r.status == 400, r
    err = r.json()["error"]
    assert "gpt-9-ultra" in err["message"], err
    assert mocks["openai"].requests() == [] and mocks["anthropic"].requests() == []


# ---------------------------------------------------------------- one key's failures, the provider's circuit

MIX_ROUNDS, MIX_REQUESTS, MIX_CLIENTS = 5, 120, 32


def test_a_healthy_key_serves_the_whole_mix_while_its_neighbours_fail(gateway, mocks):
    """Three keys of one provider: oa-2 answers 429 with `retry-after-ms: 300` (40 times), oa-3 answers
    503 (10 times), oa-1 is fine. 120 requests, JSON and streams, from 32 threads through the official
    SDK: every one is served (by oa-1 when the others fail), round after round, and afterwards the
    status endpoint shows oa-1 healthy and the circuit closed. A provider's circuit must not shut out a
    key that answers because its neighbours failed while it was answering. Completions take 50 ms, as
    a provider's do, while its errors come back at once: many attempts are in flight together, and
    their failures report before the successes that began beside them."""
    from concurrent.futures import ThreadPoolExecutor

    gw = gateway({"providers": [openai_provider()], "status": STATUS},
                 endpoints=[{"provider": "openai", "port": mocks["openai"].port}])
    mock = mocks["openai"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Say hello"}]

    def one(i: int):
        try:
            if i % 2:
                chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = client.chat.completions.create(model="gpt-4o-mini", messages=msgs).choices[0].message.content
            return 200 if text == "Hello from openai." else f"200 with {text!r}"
        except openai.APIStatusError as e:
            return (e.status_code, e.response.headers.get("retry-after"), e.response.text[:200])

    for rnd in range(MIX_ROUNDS):
        mock.reset()
        mock.script({"key": KEYS["OPENAI_KEY_2"], "status": 429, "headers": {"retry-after-ms": "300"}, "times": 40},
                    {"key": KEYS["OPENAI_KEY_3"], "status": 503, "times": 10},
                    {"delay_ms": 50})
        with ThreadPoolExecutor(MIX_CLIENTS) as pool:
            got = list(pool.map(one, range(MIX_REQUESTS)))
        refused = [g for g in got if g != 200]
        assert not refused, f"round {rnd + 1}: {len(refused)} of {MIX_REQUESTS} not served: {refused[:5]}"
        served = [r for r in mock.requests() if r["status"] == 200]
        assert len(served) == MIX_REQUESTS, f"round {rnd + 1}"
        st = status(gw)["providers"]["openai"]
        assert st["circuit"] == "closed" and st["keys"][0]["state"] == "healthy", st


# ---------------------------------------------------------------- a retry onto a provider that lacks the model

def not_serving_gpt_4o():
    """openai (2 keys, any model), then anthropic, which serves gpt-4o-mini only."""
    return {"providers": [openai_provider(n=2), anthropic_provider(models={"gpt-4o-mini": "claude-haiku-4-5"})],
            "status": STATUS}


def test_a_throttled_model_is_answered_429_and_the_provider_without_it_never_called(gateway, mocks):
    """Both OpenAI keys answer 429 (retry-after 30). A gpt-4o request is moved by Envoy's retry to
    anthropic, which does not serve gpt-4o: anthropic is not called, and the client gets what the
    last real attempt meant, a 429 with Retry-After when a provider that serves the model can take it
    again (at once the first time: the other OpenAI key; then 30 s)."""
    gw = gateway(not_serving_gpt_4o())
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 429, "headers": {"retry-after": "30"}})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    waits = []
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=msgs)
        err = e.value.body if isinstance(e.value.body, dict) else {}
        assert err.get("type") == "requests" and err.get("code") == "provider_keys_exhausted", e.value.body
        waits.append(int(e.value.response.headers["retry-after"]))
    assert waits[0] == 1, waits  # oa-2 had not been tried: it can take the request at once
    # Back within 30 s; the gateway's own refusals spread Retry-After over the 15 s after.
    assert all(28 <= w <= 45 for w in waits[1:]), waits
    assert b.requests() == [], "the provider that does not serve gpt-4o is never called"
    assert sorted(r["key"] for r in a.requests()) == [KEYS["OPENAI_KEY_1"], KEYS["OPENAI_KEY_2"]]
    # A model anthropic serves still fails over to it.
    r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert r.choices[0].message.content == "Hello from anthropic."
    assert [json.loads(x["body"])["model"] for x in b.requests()] == ["claude-haiku-4-5"]


def test_a_failing_model_is_answered_in_its_5xx_class_and_the_provider_without_it_never_called(gateway, mocks):
    """The same failover after a 503, in both dialects: a 503 in the client's own error shape, with
    Retry-After, and anthropic never called."""
    gw = gateway(not_serving_gpt_4o())
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"status": 503, "times": 2})
    r = chat(gw.port, model="gpt-4o")
    assert r.status == 503, r
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "provider_unavailable", r
    assert int(r.headers["retry-after"]) >= 1
    msg = {"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    r = request(gw.port, "POST", "/v1/messages", msg, {"x-api-key": "x"})
    assert r.status == 503 and r.json()["error"]["type"] == "overloaded_error", r
    assert b.requests() == [] and len(a.requests()) == 2


def test_a_provider_without_the_model_between_two_that_serve_it_ends_the_attempts(gateway, mocks):
    """openai-a and openai-c serve gpt-4o, anthropic (between them) does not. Envoy does not retry an
    upstream filter's local answer, so openai-a's 429 ends the request at anthropic: openai-c is not
    tried in it. The answer's Retry-After says openai-c can take the request now, and the client's
    retry starts there."""
    plugin = {"providers": [openai_provider("openai-a", n=1),
                            anthropic_provider(models={"gpt-4o-mini": "claude-haiku-4-5"}),
                            {"name": "openai-c", "type": "openai", "keys": [{"id": "oc-1", "env": "OPENAI_KEY_3"}]}]}
    gw = gateway(plugin)
    a, b = mocks["openai"], mocks["anthropic"]
    a.script({"key": KEYS["OPENAI_KEY_1"], "status": 429, "headers": {"retry-after": "30"}})
    msgs = [{"role": "user", "content": "hi"}]
    once = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        once.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.response.headers["retry-after"] == "1"
    assert [r["key"] for r in a.requests()] == [KEYS["OPENAI_KEY_1"]] and b.requests() == []
    r = once.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs)
    assert r.headers["x-tollgate-provider"] == "openai-c", r.headers
    assert [r["key"] for r in a.requests()] == [KEYS["OPENAI_KEY_1"], KEYS["OPENAI_KEY_3"]]
    assert b.requests() == []
