"""Issue: an over-quota request gets 429 and Retry-After from Envoy, and never reaches the provider."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import KEYS, STATUS, anthropic_provider, openai_provider, status
from harness import chat, request

TEAM_A = KEYS["TEAM_A_KEY"]


def plugin(limits, **extra):
    return {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY", "limits": limits}]},
            "providers": [openai_provider()], **extra}


def test_token_budget_spent_then_429_with_retry_after_then_admitted_again(gateway, mocks):
    gw = gateway(plugin([{"metric": "total_tokens", "amount": 1000, "window": "1m"},
                         {"metric": "requests", "amount": 100, "window": "1m"}]))
    mocks["openai"].script({"usage": {"input": 100, "output": 100}})
    admitted, remaining_requests, remaining_tokens = 0, [], []
    while True:
        r = chat(gw.port, key=TEAM_A, extra={"max_tokens": 20})
        if r.status != 200:
            break
        admitted += 1
        remaining_requests.append(int(r.headers["x-ratelimit-remaining-requests"]))
        remaining_tokens.append(int(r.headers["x-ratelimit-remaining-tokens"]))
        assert admitted < 20, "the budget was never enforced"
    # 200 tokens each against 1000: five fit (each reserves ~30 at admission and settles at 200).
    assert admitted == 5 or admitted == 6, admitted
    assert remaining_requests == [99 - i for i in range(admitted)]
    assert remaining_tokens == sorted(remaining_tokens, reverse=True) and remaining_tokens[0] > remaining_tokens[-1]
    assert r.status == 429
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "team-a" in err["message"] and "total_tokens" in err["message"]
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 15, retry_after
    assert r.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 30
    # The provider never saw the refused request.
    assert len(mocks["openai"].requests()) == admitted
    assert chat(gw.port, key=TEAM_A, extra={"max_tokens": 20}).status == 429
    time.sleep(retry_after)
    r = chat(gw.port, key=TEAM_A, extra={"max_tokens": 20})
    assert r.status == 200, f"still refused after waiting Retry-After={retry_after}s: {r}"
    # The use gauge is there for alerting at 80%.
    prom = gw.admin("/stats/prometheus")
    line = next(l for l in prom.splitlines() if l.startswith("tollgate_consumer_limit_used_permille{")
                and 'limit="total_tokens_60s"' in l)
    assert int(float(line.rsplit(" ", 1)[1])) >= 800, line


def test_twenty_concurrent_requests_against_a_budget_of_one(gateway, mocks):
    gw = gateway(plugin([{"metric": "requests", "amount": 1, "window": "1h"}]), concurrency=2)
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: chat(gw.port, key=TEAM_A).status, range(20)))
    assert sorted(statuses) == [200] + [429] * 19
    assert len(mocks["openai"].requests()) == 1


def test_concurrent_token_reservations_do_not_overshoot(gateway, mocks):
    gw = gateway(plugin([{"metric": "total_tokens", "amount": 1000, "window": "1h"}]), concurrency=2)
    mocks["openai"].script({"usage": {"input": 10, "output": 240}})
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: chat(gw.port, key=TEAM_A, extra={"max_tokens": 240}).status, range(20)))
    # Each reserves its prompt estimate + max_tokens (~245): at most 4 fit in 1000, whatever the interleaving.
    assert statuses.count(200) == 4, statuses
    spent = sum(r["usage"]["input"] + r["usage"]["output"] for r in mocks["openai"].requests())
    assert spent <= 1000


def test_cost_budget(gateway, mocks):
    p = plugin([{"metric": "cost_usd", "amount": 0.01, "window": "1h"}],
               prices={"gpt-4o-mini": {"input": 10.0, "output": 30.0}})
    gw = gateway(p)
    mocks["openai"].script({"usage": {"input": 100, "output": 100}})  # $0.001 + $0.003 per request
    statuses = [chat(gw.port, key=TEAM_A, extra={"max_tokens": 10}).status for _ in range(5)]
    assert statuses[:2] == [200, 200] and 429 in statuses, statuses
    r = chat(gw.port, key=TEAM_A, extra={"max_tokens": 10})
    assert r.status == 429 and "cost_usd" in r.json()["error"]["message"]


def test_anthropic_clients_get_their_own_error_shape_and_headers(gateway, mocks):
    p = {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY",
                                 "limits": [{"metric": "requests", "amount": 2, "window": "1m"},
                                            {"metric": "input_tokens", "amount": 10000, "window": "1m"}]}]},
         "providers": [anthropic_provider(models={})]}
    gw = gateway(p, endpoints=[{"provider": "anthropic", "port": mocks["anthropic"].port}])
    body = {"model": "claude-haiku-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    r = request(gw.port, "POST", "/v1/messages", body, {"x-api-key": TEAM_A})
    assert r.status == 200
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert r.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert r.headers["anthropic-ratelimit-input-tokens-limit"] == "10000"
    assert "T" in r.headers["anthropic-ratelimit-requests-reset"]
    request(gw.port, "POST", "/v1/messages", body, {"x-api-key": TEAM_A})
    r = request(gw.port, "POST", "/v1/messages", body, {"x-api-key": TEAM_A})
    assert r.status == 429
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1


def test_openai_sdk_raises_rate_limit_error_and_its_retry_waits_retry_after(gateway, mocks):
    gw = gateway(plugin([{"metric": "requests", "amount": 20, "window": "1m"}]))  # one request every 3 s
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=TEAM_A, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    for _ in range(20):
        client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert "Rate limit reached for consumer 'team-a'" in str(exc.value)
    retry_after = int(exc.value.response.headers["retry-after"])
    # Back within 3 s, spread over the 1.5 s after (limit::spread).
    assert 1 <= retry_after <= 5
    retrying = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=TEAM_A, max_retries=2)
    t0 = time.monotonic()
    r = retrying.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    gap = time.monotonic() - t0
    assert r.choices[0].message.content == "Hello from openai."
    # The SDK slept what tollgate asked (it honours retry-after-ms / Retry-After up to 60 s), not its
    # own backoff: at least until the budget had room again (each refusal draws its own spread).
    # The message names the recovery, in whole seconds rounded up; the headers spread it.
    recovery_s = int(re.search(r"try again in (\d+)s", str(exc.value)).group(1))
    assert gap >= recovery_s - 1.0, (gap, recovery_s)
    assert int(exc.value.response.headers["retry-after-ms"]) > (recovery_s - 1) * 1000
    print(f"SDK retry gap {gap:.2f}s for Retry-After {retry_after}s")


def test_exhausted_pool_is_answered_at_the_gateway(gateway, mocks):
    gw = gateway({"providers": [openai_provider()], "status": STATUS})
    mocks["openai"].script({"status": 429, "headers": {"retry-after": "30"}})
    r = chat(gw.port)
    assert r.status == 429
    assert len(mocks["openai"].requests()) == 3, "each key tried once, none twice"
    r = chat(gw.port)
    assert r.status == 429
    # The keys are back within 30 s; Retry-After is spread over the 15 s after (limit::spread).
    assert 28 <= int(r.headers["retry-after"]) <= 45
    assert r.json()["error"]["code"] == "provider_keys_exhausted"
    assert len(mocks["openai"].requests()) == 3, "no call while every key cools down"
    keys = status(gw)["providers"]["openai"]["keys"]
    assert [k["state"] for k in keys] == ["rate_limited"] * 3


def test_lower_max_tokens_instead_of_refusing(gateway, mocks):
    gw = gateway(plugin([{"metric": "output_tokens", "amount": 500, "window": "1h"}], lower_max_tokens=True))
    r = chat(gw.port, key=TEAM_A, extra={"max_tokens": 2000})
    assert r.status == 200, r
    sent = json.loads(mocks["openai"].requests()[-1]["body"])
    assert 1 <= sent["max_tokens"] <= 500, sent


def test_model_limit_is_narrower_than_the_consumer_limit(gateway, mocks):
    p = {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY",
                                 "limits": [{"metric": "requests", "amount": 100, "window": "1h"}],
                                 "model_limits": {"gpt-4o": [{"metric": "requests", "amount": 1, "window": "1h"}]}}]},
         "providers": [openai_provider()]}
    gw = gateway(p)
    assert chat(gw.port, key=TEAM_A, model="gpt-4o").status == 200
    r = chat(gw.port, key=TEAM_A, model="gpt-4o")
    assert r.status == 429 and r.headers["x-ratelimit-limit-requests"] == "1"
    assert chat(gw.port, key=TEAM_A, model="gpt-4o-mini").status == 200


# ---------------------------------------------------------------- defects found by trying it as a new user

COST_LIMIT = [{"metric": "cost_usd", "amount": 0.01, "window": "1h"}]
PRICED = {"gpt-4o-mini": {"input": 10.0, "output": 30.0}}


def test_unpriced_model_on_a_cost_budget_is_charged_the_default_price(gateway, mocks):
    """A consumer with a cost budget asking for a model that has no price of its own is charged at
    `default_price`: the budget runs out as it would for a priced model, never for free."""
    gw = gateway(plugin(COST_LIMIT, prices=PRICED, default_price={"input": 10.0, "output": 30.0}))
    mocks["openai"].script({"usage": {"input": 100, "output": 100}})  # $0.004 per request at the default price
    statuses = [chat(gw.port, key=TEAM_A, model="gpt-4o", extra={"max_tokens": 10}).status for _ in range(5)]
    assert statuses[:2] == [200, 200] and 429 in statuses, statuses
    r = chat(gw.port, key=TEAM_A, model="gpt-4o", extra={"max_tokens": 10})
    assert r.status == 429 and "cost_usd" in r.json()["error"]["message"], r
    assert len(mocks["openai"].requests()) == statuses.count(200)


def test_unpriced_model_on_a_cost_budget_without_default_price_is_refused(gateway, mocks):
    """Without `default_price`, a model without a price cannot be charged against a cost budget, so the
    request is refused before any provider is called: 400 in OpenAI's shape, naming the model and
    saying it has no price. Priced models still go through."""
    gw = gateway(plugin(COST_LIMIT, prices=PRICED))
    r = chat(gw.port, key=TEAM_A, model="gpt-4o")
    assert r.status == 400, r
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err) and err["type"] == "invalid_request_error", err
    assert "gpt-4o" in err["message"] and "price" in err["message"], err
    assert mocks["openai"].requests() == []
    assert chat(gw.port, key=TEAM_A, model="gpt-4o-mini").status == 200


def test_token_limit_429_has_type_tokens_and_request_limit_429_type_requests(gateway, mocks):
    """OpenAI's 429 error `type` says which budget ran out, and clients back off by it: "tokens" when a
    token limit refused the request, "requests" when a request-count limit did."""
    p = {"consumers": {"list": [
        {"name": "team-a", "key_env": "TEAM_A_KEY", "limits": [{"metric": "total_tokens", "amount": 150, "window": "1h"}]},
        {"name": "team-b", "key_env": "TEAM_B_KEY", "limits": [{"metric": "requests", "amount": 1, "window": "1h"}]}]},
         "providers": [openai_provider()]}
    gw = gateway(p)
    mocks["openai"].script({"usage": {"input": 100, "output": 100}})
    assert chat(gw.port, key=TEAM_A, extra={"max_tokens": 10}).status == 200
    r = chat(gw.port, key=TEAM_A, extra={"max_tokens": 10})
    assert r.status == 429, r
    assert r.json()["error"]["type"] == "tokens", r.json()
    assert chat(gw.port, key=KEYS["TEAM_B_KEY"]).status == 200
    r = chat(gw.port, key=KEYS["TEAM_B_KEY"])
    assert r.status == 429, r
    assert r.json()["error"]["type"] == "requests", r.json()
