"""Pacing keys before the provider refuses, and the spread of refused clients' Retry-After.

The mock provider is the witness: it enforces its limits per key (`/_mock/limits`) and counts the
429s it answered, and its request log says when each key's window began."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import KEYS, STATUS, openai_provider, status
from harness import chat

WINDOW_S = 60


def go_duration_ms(v: str) -> float:
    """OpenAI's reset durations ("59.5s", "1m0s", "20ms")."""
    units = {"h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", v)
    assert parts and "".join(n + u for n, u in parts) == v, v
    return sum(float(n) * units[u] for n, u in parts)


def window_ends_ms(mock) -> dict[str, int]:
    """When each key's window at the mock ends (its first request's arrival + 60 s)."""
    first: dict[str, int] = {}
    for r in mock.requests():
        first.setdefault(r["key"], r["time_ms"])
    return {k: t + WINDOW_S * 1000 for k, t in first.items()}


def burst(port: int, n: int, threads: int = 50):
    def one(_):
        r = chat(port, key=None)
        return r, time.time()
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def test_announced_limits_are_paced_a_burst_draws_no_provider_429_and_totals_stay_exact(gateway, mocks):
    mock = mocks["openai"]
    mock.limit(requests_per_minute=60)
    gw = gateway({"providers": [openai_provider(n=2)], "status": STATUS})
    # Until a key has answered, nothing says what it has left: one answer from each key first.
    primes = 0
    while len({r["key"] for r in mock.requests()}) < 2:
        assert chat(gw.port, key=None).status == 200
        primes += 1
        assert primes < 10, "the rotation never reached the second key"

    got = burst(gw.port, 150)

    limits = mock.limit_counts()
    assert limits["refused"] == 0, f"the provider answered 429s: {limits}"
    print(f"burst of 150 after {primes} primes: {sum(r.status == 200 for r, _ in got)} served, "
          f"{sum(r.status == 429 for r, _ in got)} refused by tollgate, {limits['refused']} provider 429s")
    ok = [r for r, _ in got if r.status == 200]
    refused = [(r, t) for r, t in got if r.status != 200]
    assert primes + len(ok) <= 120 and len(ok) >= 100 - primes, (primes, len(ok))
    assert limits["admitted"] == primes + len(ok)
    ends = window_ends_ms(mock)
    for r, t in refused:
        err = r.json()["error"]
        assert (r.status, err["code"], err["type"]) == (429, "provider_keys_paced", "requests"), r
        retry_after = int(r.headers["retry-after"])
        # Truthful: not before the first key's window ends at the provider (t is taken after the
        # answer came), and spread by at most half of the wait again.
        assert t * 1000 + retry_after * 1000 >= min(ends.values()), (retry_after, t, ends)
        assert retry_after <= WINDOW_S * 1.5 + 2
        if "retry-after-ms" in r.headers:
            assert int(r.headers["retry-after-ms"]) <= retry_after * 1000
    # Refused at admission, or (when another worker spent the last of the keys between the
    # listener's reading and the attempt) by the attempt before it leaves.
    stats = gw.stats()
    assert (stats.get("wasmcustom.tollgate.outcome.keys_paced.requests", 0)
            + stats.get("wasmcustom.tollgate.provider.openai.paced_attempts", 0)) == len(refused)
    # No attempt was spent on a refusal: every request the provider saw, it answered 200.
    seen = mock.requests()
    assert len(seen) == primes + len(ok) and all(r["status"] == 200 for r in seen)
    usage = status(gw)["consumers"]["anonymous"]["usage"]
    # An attempt's own refusal is counted as a request, as every answer that reached the
    # listener from an attempt is; admission's refusals are not.
    assert usage["requests"] == primes + len(ok) + stats.get("wasmcustom.tollgate.provider.openai.paced_attempts", 0)
    assert usage["input_tokens"] == sum(r["usage"]["input"] for r in seen)
    assert usage["output_tokens"] == sum(r["usage"]["output"] for r in seen)

    # The OpenAI SDK sees a RateLimitError whose Retry-After it can honour.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="anything", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "provider_keys_paced"
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert mock.limit_counts()["refused"] == 0


def test_configured_limits_pace_keys_that_announce_nothing(gateway, mocks):
    mock = mocks["openai"]
    mock.limit(requests_per_minute=5, announce=False)
    provider = openai_provider(n=2)
    for k in provider["keys"]:
        k["requests_per_minute"] = 5
    gw = gateway({"providers": [provider], "status": STATUS})
    statuses = [chat(gw.port, key=None) for _ in range(14)]
    assert [r.status for r in statuses] == [200] * 10 + [429] * 4
    assert mock.limit_counts() == {**mock.limit_counts(), "admitted": 10, "refused": 0}
    r = statuses[-1]
    assert r.json()["error"]["code"] == "provider_keys_paced"
    assert "x-ratelimit-remaining-requests" not in r.headers
    assert WINDOW_S - 5 <= int(r.headers["retry-after"]) <= WINDOW_S * 1.5 + 1
    # The status endpoint says each key is paced, for lack of what, and until when.
    keys = status(gw)["providers"]["openai"]["keys"]
    assert [k["paced_by"] for k in keys] == ["requests", "requests"]
    assert all(k["paced_until_ms"] > time.time() * 1000 + (WINDOW_S - 5) * 1000 for k in keys), keys


def test_clients_refused_together_come_back_spread_over_the_window_never_early(gateway, mocks):
    gw = gateway({"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY",
                                          "limits": [{"metric": "requests", "amount": 1, "window": "1m"}]}]},
                  "providers": [openai_provider()]})
    assert chat(gw.port, key=KEYS["TEAM_A_KEY"]).status == 200

    def one(_):
        return chat(gw.port, key=KEYS["TEAM_A_KEY"])
    with ThreadPoolExecutor(50) as pool:
        got = list(pool.map(one, range(200)))
    assert all(r.status == 429 for r in got)
    values = []
    for r in got:
        recovery_ms = go_duration_ms(r.headers["x-ratelimit-reset-requests"])
        retry_after, retry_after_ms = int(r.headers["retry-after"]), int(r.headers["retry-after-ms"])
        assert retry_after * 1000 >= retry_after_ms >= recovery_ms, (retry_after, retry_after_ms, recovery_ms)
        assert retry_after_ms < recovery_ms * 1.5 + 1000
        values.append(retry_after)
    # About 60 s to recovery, spread over the next 30 s: the 200 clients do not come back together.
    assert len(set(values)) >= 20, sorted(set(values))
    assert max(values) - min(values) >= 20, (min(values), max(values))
    assert max(values.count(v) for v in set(values)) <= 30
    assert len(mocks["openai"].requests()) == 1


def test_anthropic_announcements_pace_an_anthropic_key(gateway, mocks):
    """Anthropic's `anthropic-ratelimit-requests-remaining` / `-reset` (an RFC 3339 time), through
    the Anthropic SDK."""
    import anthropic
    from conftest import anthropic_provider
    mock = mocks["anthropic"]
    mock.limit(requests_per_minute=4)
    gw = gateway({"providers": [anthropic_provider(n=1)]})
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw.port}", api_key="anything", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=msgs)  # the key announces
    # One after another: each answer says exactly what is left (the burst test covers requests in
    # flight, where a request the provider counted before it answered is counted twice, cautiously).
    got = [chat(gw.port, key=None) for _ in range(6)]
    assert [r.status for r in got] == [200] * 3 + [429] * 3
    assert mock.limit_counts()["refused"] == 0
    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=msgs)
    assert e.value.body["error"]["type"] == "rate_limit_error"
    assert int(e.value.response.headers["retry-after"]) >= WINDOW_S - 5
    assert mock.limit_counts() == {**mock.limit_counts(), "admitted": 4, "refused": 0}


def test_announced_tokens_pace_a_key_by_each_requests_estimate(gateway, mocks):
    """A key that announces its tokens left takes a request only while they cover its estimate
    (prompt plus max_tokens): the gateway's 429 says `tokens`, and the provider never refuses."""
    mock = mocks["openai"]
    mock.limit(tokens_per_minute=500)
    gw = gateway({"providers": [openai_provider(n=1)]})
    statuses = []
    for _ in range(80):
        r = chat(gw.port, key=None, extra={"max_tokens": 100})
        statuses.append(r.status)
        if r.status != 200:
            break
    assert statuses[-1] == 429 and statuses.count(200) >= 20, statuses
    err = r.json()["error"]
    assert (err["code"], err["type"]) == ("provider_keys_paced", "tokens"), err
    counts = mock.limit_counts()
    assert counts["refused"] == 0, counts
    spent = sum(r["usage"]["input"] + r["usage"]["output"] for r in mock.requests())
    assert 500 - spent < 120, f"stopped with {500 - spent} tokens left, more than one request's estimate"
