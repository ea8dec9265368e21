"""Limits on requests in flight (`max_in_flight`) in a real Envoy with 2 workers.

The mock provider is the independent witness: it counts the requests it is answering at once, per
key (from arrival until its answer starts to go out, it resets the connection, or the gateway hangs
up), and keeps the highest counts."""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from conftest import KEYS, STATUS, openai_provider, status
from harness import FileConfigGateway, free_port, gateway_config, request, set_plugin

CONSUMER_LIMIT = 5
KEY_LIMIT = 2
TEAM_A = {"authorization": f"Bearer {KEYS['TEAM_A_KEY']}"}


def plugin(consumer_limit: int | None = CONSUMER_LIMIT, key_limit: int | None = KEY_LIMIT, keys: int = 3) -> dict:
    team_a = {"name": "team-a", "key_env": "TEAM_A_KEY"}
    if consumer_limit is not None:
        team_a["max_in_flight"] = consumer_limit
    provider = openai_provider(n=keys)
    if key_limit is not None:
        for k in provider["keys"]:
            k["max_in_flight"] = key_limit
    # The resets and timeouts the tests make must neither rest the keys nor open the circuit.
    return {"consumers": {"list": [team_a, {"name": "team-b", "key_env": "TEAM_B_KEY"}]},
            "providers": [provider], "status": STATUS,
            "health": {"circuit_failures": 100000, "server_error_cooldown_s": 0}}


def body(content: str = "hello", stream: bool = False) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
            **({"stream": True} if stream else {})}


def gauge(gw, name: str) -> int | None:
    return gw.stats().get(f"wasmcustom.tollgate.{name}.in_flight")


def in_flight_everywhere(gw) -> dict:
    """Requests in flight as the status endpoint and the gauges show them."""
    st = status(gw)
    keys = st["providers"]["openai"]["keys"]
    return {"status": [st["consumers"]["team-a"].get("in_flight")] + [k.get("in_flight") for k in keys],
            "gauges": [gauge(gw, "consumer.team-a")] + [gauge(gw, f"provider.openai.key.{k['id']}") for k in keys]}


def hang_up(port: int, payload: dict, after: float) -> None:
    """A client that sends its request and goes away before the answer."""
    data = json.dumps(payload).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: {TEAM_A['authorization']}\r\ncontent-length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + data)
        time.sleep(after)


def test_64_clients_never_exceed_the_limits_and_every_place_comes_back(mocks, tmp_path):
    """64 clients on 2 workers, through answers, streams, upstream resets, per-try and route
    timeouts, clients that hang up and two configuration changes (one that replaces the VMs): the
    mock never answers more than the consumer's limit at once, nor more than a key's limit on any
    key, and once the traffic stops every count is back to 0."""
    mock = mocks["openai"]
    mock.script({"body_contains": "please-reset", "delay_ms": 100, "reset": True},
                {"body_contains": "take-your-time", "delay_ms": 4000},
                {"delay_ms": 150, "chunk_delay_ms": 20})
    cfg = gateway_config(plugin(), [{"provider": "openai", "port": mock.port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(), access_log=str(tmp_path / "access.log"),
                         env_keys=sorted(KEYS), per_try_timeout="1s", num_retries=2)
    for route in cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"]["virtual_hosts"][0]["routes"]:
        route["route"]["timeout"] = "2.5s"
    gw = FileConfigGateway(cfg, env=KEYS)
    gw.access_log_path = tmp_path / "access.log"
    gw.start()
    try:
        port = gw.port
        outcomes: list[tuple[str, int, str | None]] = []
        lock = threading.Lock()
        kinds = ["answer"] * 5 + ["stream", "reset", "slow", "hang_up", "hang_up"]
        stop_at = time.time() + 6

        def client(i: int) -> None:
            rng = random.Random(i)
            while time.time() < stop_at:
                kind = rng.choice(kinds)
                content = {"reset": "please-reset", "slow": "take-your-time"}.get(kind, "hello")
                payload = body(content, stream=kind == "stream")
                if kind == "hang_up":
                    hang_up(port, payload, after=rng.uniform(0.01, 0.12))
                    got = (kind, 0, None)
                else:
                    r = request(port, "POST", "/v1/chat/completions", payload, TEAM_A, timeout=15)
                    code = r.json()["error"].get("code") if r.status >= 400 and r.body.startswith(b"{") else None
                    got = (kind, r.status, code)
                with lock:
                    outcomes.append(got)
                if got[1] == 429:
                    time.sleep(rng.uniform(0.02, 0.08))

        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(client, i) for i in range(64)]
            time.sleep(1.5)
            # A new plugin configuration for both roles (same VMs), then one that replaces the VMs.
            changed = plugin()
            changed["consumers"]["list"].append({"name": "team-c", "key_env": "TEAM_B_KEY"})
            set_plugin(cfg, changed)
            gw.write()
            gw.applied()
            vms = gw.stat("wasm.envoy.wasm.runtime.v8.created")
            time.sleep(0.5)
            for flt in wasm_filters(cfg):
                flt["typed_config"]["config"]["vm_config"]["configuration"] = {
                    "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "generation 2"}
            gw.write()
            gw.applied()
            assert gw.stat("wasm.envoy.wasm.runtime.v8.created") > vms, "new VMs"
            for f in futures:
                f.result()

        seen = mock.concurrency()
        assert seen["max_total"] <= CONSUMER_LIMIT, seen
        assert seen["max_total"] == CONSUMER_LIMIT, f"the limit was reached: {seen}"
        keys = {KEYS[f"OPENAI_KEY_{i}"] for i in (1, 2, 3)}
        assert set(seen["max_in_flight"]) <= keys and all(n <= KEY_LIMIT for n in seen["max_in_flight"].values()), seen

        by = {}
        for kind, code, err in outcomes:
            by.setdefault(kind, []).append((code, err))
        refused = [c for c in sum(by.values(), []) if c == (429, "concurrency_limit_exceeded")]
        assert len(refused) > 500, f"the consumer's limit refused requests: {len(refused)}"
        assert (200, None) in by["answer"] and (200, None) in by["stream"]
        assert {c for c, _ in by["reset"]} <= {503, 429}, by["reset"]
        assert 504 in {c for c, _ in by["slow"]}, by["slow"]
        assert len(by["hang_up"]) > 20

        deadline = time.time() + 8
        while (now := in_flight_everywhere(gw)) != {"status": [0, 0, 0, 0], "gauges": [0, 0, 0, 0]} \
                and time.time() < deadline:
            time.sleep(0.3)
        assert now == {"status": [0, 0, 0, 0], "gauges": [0, 0, 0, 0]}, now
        assert mock.concurrency()["total"] == 0
        # Nothing is left held: the full limit is there again.
        with ThreadPoolExecutor(CONSUMER_LIMIT) as pool:
            statuses = list(pool.map(lambda _: request(port, "POST", "/v1/chat/completions", body(), TEAM_A),
                                     range(CONSUMER_LIMIT)))
        assert [r.status for r in statuses] == [200] * CONSUMER_LIMIT, (statuses, in_flight_everywhere(gw))
        log = gw.log()
        assert "panicked" not in log and "Wasm VM failed" not in log
    finally:
        gw.stop()


def test_a_request_running_across_a_reload_that_replaces_the_vms_keeps_its_place_until_it_ends(mocks, tmp_path):
    """The VM a reload replaces keeps serving its requests, and keeps ticking: its lease outlives
    the 5 s a vanished VM's would, so the request keeps its place until it ends, then gives it back."""
    mock = mocks["openai"]
    mock.script({"body_contains": "hold-me", "delay_ms": 8000})
    cfg = gateway_config(plugin(consumer_limit=1, key_limit=None), [{"provider": "openai", "port": mock.port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(), access_log=str(tmp_path / "access.log"),
                         env_keys=sorted(KEYS))
    gw = FileConfigGateway(cfg, env=KEYS)
    gw.start()
    try:
        pool = ThreadPoolExecutor(1)
        started = time.time()
        held = pool.submit(request, gw.port, "POST", "/v1/chat/completions", body("hold-me"), TEAM_A)
        time.sleep(0.5)
        vms = gw.stat("wasm.envoy.wasm.runtime.v8.created")
        for flt in wasm_filters(cfg):
            flt["typed_config"]["config"]["vm_config"]["configuration"] = {
                "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "generation 2"}
        gw.write()
        gw.applied()
        assert gw.stat("wasm.envoy.wasm.runtime.v8.created") > vms, "new VMs"
        time.sleep(max(0.0, started + 6 - time.time()))
        # Past the lease of a VM that would have stopped ticking: still counted, still full.
        assert status(gw)["consumers"]["team-a"]["in_flight"] == 1
        assert request(gw.port, "POST", "/v1/chat/completions", body(), TEAM_A).status == 429
        assert held.result().status == 200
        pool.shutdown()
        time.sleep(0.3)
        assert status(gw)["consumers"]["team-a"]["in_flight"] == 0
        assert request(gw.port, "POST", "/v1/chat/completions", body(), TEAM_A).status == 200
    finally:
        gw.stop()


def wasm_filters(cfg: dict) -> list[dict]:
    out = []
    for listener in cfg["static_resources"]["listeners"]:
        out += [f for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
                if f["name"] == "tollgate"]
    for cluster in cfg["static_resources"]["clusters"]:
        opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        out += [f for f in opts["http_filters"] if f["name"] == "tollgate.upstream"]
    return out


@pytest.fixture(scope="module")
def held_gateway(module_gateway):
    """Two keys of one request each; team-a may have 1 request in flight."""
    return module_gateway(plugin(consumer_limit=1, key_limit=1, keys=2), num_retries=2)


def slow(gw, n: int, hold: float = 1.5) -> list:
    """`n` requests that the mock holds for `hold` seconds, started now, each in its own thread."""
    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(request, gw.port, "POST", "/v1/chat/completions", body("hold-me"),
                           {"authorization": f"Bearer {KEYS['TEAM_B_KEY']}"}) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


def test_a_key_at_its_limit_is_skipped_and_a_full_pool_answers_429(mocks, held_gateway):
    gw, mock = held_gateway, mocks["openai"]
    mock.script({"body_contains": "hold-me", "delay_ms": 1500})
    held = slow(gw, 1)
    time.sleep(0.3)
    (busy,) = [r["key"] for r in mock.requests()]
    # The busy key is skipped: every request meanwhile goes to the other one, in a rotation that
    # would otherwise alternate.
    team_b = {"authorization": f"Bearer {KEYS['TEAM_B_KEY']}"}
    for _ in range(6):
        assert request(gw.port, "POST", "/v1/chat/completions", body(), team_b).status == 200
    served = [r["key"] for r in mock.requests()[1:]]
    assert len(served) == 6 and busy not in served, served
    assert gauge(gw, f"provider.openai.key.{'oa-1' if busy == KEYS['OPENAI_KEY_1'] else 'oa-2'}") == 1

    # Both keys busy: the listener sees it (one read) and answers before any attempt.
    held += slow(gw, 1)
    time.sleep(0.3)
    before = len(mock.requests())
    r = request(gw.port, "POST", "/v1/chat/completions", body(), team_b)
    # A place frees within a second; Retry-After is spread over the next (limit::spread).
    assert r.status == 429 and r.headers.get("retry-after") in ("1", "2"), r
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("requests", "provider_keys_at_limit"), r
    assert "limit of requests in flight" in err["message"]
    assert len(mock.requests()) == before, "no provider was called"
    assert gw.stat("wasmcustom.tollgate.outcome.keys_at_limit.requests") == 1
    assert [f.result().status for f in held] == [200, 200]
    held_by = [r["key"] for r in mock.requests() if "hold-me" in r["body"]]
    assert sorted(held_by) == [KEYS["OPENAI_KEY_1"], KEYS["OPENAI_KEY_2"]], "one on each key"
    served_after = [request(gw.port, "POST", "/v1/chat/completions", body(), team_b).status for _ in range(4)]
    assert served_after == [200] * 4


def test_a_consumer_over_its_limit_gets_429_in_both_sdks_and_the_provider_is_not_called(mocks, held_gateway):
    gw, mock = held_gateway, mocks["openai"]
    mock.script({"body_contains": "hold-me", "delay_ms": 3000})
    pool = ThreadPoolExecutor(1)
    held = [pool.submit(request, gw.port, "POST", "/v1/chat/completions", body("hold-me"), TEAM_A)]
    time.sleep(0.4)
    before = len(mock.requests())
    oa = openai.OpenAI(api_key=KEYS["TEAM_A_KEY"], base_url=f"{gw.base_url}/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["retry-after"] in ("1", "2")
    assert (e.value.code, e.value.type) == ("concurrency_limit_exceeded", "requests")
    assert "team-a" in e.value.message and "in flight (1 of 1)" in e.value.message
    an = anthropic.Anthropic(api_key=KEYS["TEAM_A_KEY"], base_url=gw.base_url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as e:
        an.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["retry-after"] in ("1", "2")
    assert e.value.body["error"]["type"] == "rate_limit_error"
    assert len(mock.requests()) == before, "no provider was called"
    assert gauge(gw, "consumer.team-a") == 1
    assert status(gw)["consumers"]["team-a"]["in_flight"] == 1
    assert [f.result().status for f in held] == [200]
    pool.shutdown()
    # The place is back: the next request goes through, and the counts show 0.
    assert oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).choices
    time.sleep(0.3)
    assert status(gw)["consumers"]["team-a"]["in_flight"] == 0
    assert gauge(gw, "consumer.team-a") == 0
