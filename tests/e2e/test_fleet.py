"""Fleet-wide token budgets: two Envoy replicas running the shipped envoy/fleet.yaml, one rate limit
service (tests/rls-server: Limitador's engine) and one Redis, all on loopback.

Each replica checks the consumer's budget before a request (`hits_addend: 0`) and charges the
request's real tokens when it ends (`apply_on_stream_done` + `hits_addend` from tollgate's filter
state). The budget is cut off across both replicas together, a refused request looks like
tollgate's own 429, and the spending survives restarting every Envoy and the RLS.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import KEYS
from harness import ROOT, WASM, Envoy, Response, chat, free_port, redis_command, request

RLS_DIR = ROOT / "tests" / "rls-server"
RLS_BIN = Path(os.environ.get("TOLLGATE_RLS_BIN", RLS_DIR / "target" / "release" / "rls-server"))
BUDGET = 1000  # tokens per consumer per 60 s, fleet-wide
PER_REQUEST = 100  # what the mock reports for every request below: 40 in + 60 out
TEAM_A, TEAM_B = KEYS["TEAM_A_KEY"], KEYS["TEAM_B_KEY"]


def _redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    # `make fleet-deps` installs it; a bare `pytest` run tries the same once.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run("apt-get update -qq && apt-get install -y -qq redis-server", shell=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return shutil.which("redis-server")


class Redis:
    def __init__(self, binary: str, tmp: Path):
        self.port = free_port()
        self.log = tmp / "redis.log"
        # No persistence: the test needs the counters to outlive Envoy and RLS restarts, not Redis's.
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp), "--logfile", str(self.log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("redis-server did not start:\n" + (self.log.read_text() if self.log.exists() else ""))
            time.sleep(0.05)

    def command(self, *args: str):
        return redis_command(self.port, *args)

    def spent(self, consumer: str) -> int:
        """The fleet-wide counter of `consumer` (Limitador's key names the descriptor values)."""
        keys = [k for k in self.command("KEYS", "*") if "counter:" in k and f'"{consumer}"' in k]
        return sum(int(self.command("GET", k) or 0) for k in keys)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Rls:
    def __init__(self, redis_port: int, limits: Path, tmp: Path):
        self.port = free_port()
        self.log = tmp / f"rls-{self.port}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [str(RLS_BIN), "--listen", f"127.0.0.1:{self.port}", "--redis", f"redis://127.0.0.1:{redis_port}",
                 "--limits", str(limits), "-v"], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 15
        while "listening on" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("rls-server did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def rls_binary():
    if not RLS_BIN.exists():
        # `make fleet-deps` builds it; without it, build it here (a few minutes cold).
        subprocess.run(["cargo", "build", "--release"], cwd=RLS_DIR, check=True, timeout=1800)
    return RLS_BIN


@pytest.fixture(scope="module")
def redis(rls_binary, tmp_path_factory):
    binary = _redis_server()
    if binary is None:
        pytest.skip("redis-server is not installed and could not be installed (run `make fleet-deps` as root)")
    r = Redis(binary, tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


class Fleet:
    """One RLS and any number of Envoy replicas of envoy/fleet.yaml, restartable."""

    def __init__(self, redis: Redis, mocks, tmp: Path):
        self.redis, self.mocks, self.tmp = redis, mocks, tmp
        self.limits = tmp / "limits.json"
        self.limits.write_text(json.dumps([{"namespace": "tollgate", "max_value": BUDGET, "seconds": 60,
                                            "conditions": [], "variables": ["descriptors[0].consumer"]}]))
        self.rls: Rls | None = None
        self.envoys: list[Envoy] = []

    def start_rls(self) -> Rls:
        self.rls = Rls(self.redis.port, self.limits, self.tmp)
        return self.rls

    def start_envoy(self) -> Envoy:
        port, admin = free_port(), free_port()
        text = ((ROOT / "envoy" / "fleet.yaml").read_text()
                .replace("/etc/envoy/tollgate.wasm", str(WASM))
                .replace("port_value: 10000", f"port_value: {port}").replace("port_value: 9901", f"port_value: {admin}")
                .replace("port_value: 18001", f"port_value: {self.mocks['openai'].port}")
                .replace("port_value: 18002", f"port_value: {self.mocks['anthropic'].port}")
                .replace("port_value: 8081", f"port_value: {self.rls.port}"))
        e = Envoy(text, env={**KEYS}, concurrency=2)
        e.admin_port, e.port = admin, port
        self.envoys.append(e)
        return e.start()

    def stop_all(self):
        for e in self.envoys:
            e.stop()
        self.envoys.clear()
        if self.rls:
            self.rls.stop()
            self.rls = None

    def diagnostics(self) -> str:
        rls = "\n".join(self.rls.lines()[-30:]) if self.rls else ""
        envoy = "\n".join(e.log()[-1500:] for e in self.envoys)
        return f"--- rls ---\n{rls}\n--- envoy ---\n{envoy}"


@pytest.fixture
def fleet(redis, mocks, tmp_path):
    redis.command("FLUSHALL")  # each test starts with nothing spent
    f = Fleet(redis, mocks, tmp_path)
    yield f
    f.stop_all()


def _usage_rule(mocks):
    for m in mocks.values():
        m.script({"usage": {"input": 40, "output": 60}})


def _messages(port: int, key: str) -> Response:
    body = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    return request(port, "POST", "/v1/messages", body, {"x-api-key": key, "anthropic-version": "2023-06-01"})


def _is_global_429(r) -> bool:
    return r.status == 429 and "x-envoy-ratelimited" in r.headers


def test_budget_is_shared_by_two_replicas_and_survives_their_restart(fleet, redis, mocks):
    _usage_rule(mocks)
    fleet.start_rls()
    a, b = fleet.start_envoy(), fleet.start_envoy()
    served = {a.port: 0, b.port: 0}
    refused = None
    for i in range(3 * BUDGET // PER_REQUEST):
        replica = (a, b)[i % 2]
        r = chat(replica.port, key=TEAM_A, stream=(i % 4 >= 2))  # JSON and SSE on both replicas
        if r.status == 200:
            served[replica.port] += 1
            continue
        refused = r
        break
    assert refused is not None and _is_global_429(refused), f"{refused}\n{fleet.diagnostics()}"
    n = sum(served.values())
    # Both replicas served part of the budget, and together they stopped once it was spent: a request
    # is admitted while the charged total is below the budget, so at most the request in flight and
    # one charge still on its way to the RLS pass beyond it.
    assert served[a.port] >= 2 and served[b.port] >= 2, served
    assert BUDGET <= n * PER_REQUEST < BUDGET + 2 * PER_REQUEST, (served, fleet.diagnostics())
    print(f"\nfleet budget {BUDGET} tokens: served {served} x {PER_REQUEST} = {n * PER_REQUEST} "
          f"(overshoot {n * PER_REQUEST - BUDGET}), then 429")
    time.sleep(0.5)  # the last charge is fire-and-forget
    assert redis.spent("team-a") == n * PER_REQUEST, "every response charged exactly once, SSE included"
    assert len(mocks["openai"].requests()) == n, "a refused request never reaches a provider"
    # The other replica refuses too, and another consumer is not affected.
    other = (a, b)[(n + 1) % 2]
    assert _is_global_429(chat(other.port, key=TEAM_A))
    assert chat(a.port, key=TEAM_B).status == 200
    charges = [l for l in fleet.rls.lines() if "consumer=team-a" in l and "hits=check" not in l]
    assert any(f"hits={PER_REQUEST} " in l for l in charges), charges[-5:]

    # Every Envoy and the RLS restart; the counters are in Redis, so the budget stays spent.
    retry_before = int(refused.headers["retry-after"])
    fleet.stop_all()
    fleet.start_rls()
    c, d = fleet.start_envoy(), fleet.start_envoy()
    for replica in (c, d):
        r = chat(replica.port, key=TEAM_A)
        assert _is_global_429(r), f"{r}\n{fleet.diagnostics()}"
        assert 1 <= int(r.headers["retry-after"]) <= retry_before
    assert chat(d.port, key=TEAM_B).status == 200
    assert redis.spent("team-a") == n * PER_REQUEST
    assert len(mocks["openai"].requests()) == n + 2


def test_concurrent_clients_on_both_replicas_overshoot_at_most_their_requests_in_flight(fleet, redis, mocks):
    clients = 4
    for m in mocks.values():  # slow enough that every client has a request in flight at the cut-off
        m.script({"usage": {"input": 40, "output": 60}, "delay_ms": 50})
    fleet.start_rls()
    replicas = [fleet.start_envoy(), fleet.start_envoy()]
    served = [0] * clients
    statuses: list[int] = []

    def client(i: int) -> None:
        for j in range(3 * BUDGET // PER_REQUEST):
            r = chat(replicas[(i + j) % 2].port, key=TEAM_A)
            statuses.append(r.status)
            if r.status != 200:
                return
            served[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    spent = sum(served) * PER_REQUEST
    assert set(statuses) == {200, 429} and statuses.count(429) == clients, statuses
    # Each client has at most one request in flight and one charge on its way when the budget runs out.
    assert BUDGET <= spent < BUDGET + 2 * clients * PER_REQUEST, (served, fleet.diagnostics())
    time.sleep(0.5)
    assert redis.spent("team-a") == spent
    print(f"\n{clients} concurrent clients on 2 replicas, budget {BUDGET}: served {served} x {PER_REQUEST} "
          f"= {spent} (overshoot {spent - BUDGET})")


def test_fleet_429_looks_like_tollgates_own(fleet, redis, mocks):
    for m in mocks.values():  # one request spends more than the whole budget
        m.script({"usage": {"input": 700, "output": 600}})
    fleet.start_rls()
    e = fleet.start_envoy()
    first = chat(e.port, key=TEAM_B)
    assert first.status == 200, first
    # Successful responses carry the fleet-wide standing too (Envoy's draft-03 headers).
    assert first.headers["x-ratelimit-limit"].startswith(f"{BUDGET}, {BUDGET};w=60"), first.headers
    time.sleep(0.3)
    assert redis.spent("team-b") == 1300

    r = chat(e.port, key=TEAM_B)
    assert r.status == 429 and r.headers["content-type"] == "application/json", r
    assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers
    assert r.headers["retry-after"] == r.headers["x-ratelimit-reset"]
    assert r.headers["x-ratelimit-remaining"] == "0" and r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert r.headers["x-ratelimit-reset-tokens"] == r.headers["x-ratelimit-reset"] + "s"
    body = r.json()
    assert set(body) == {"error"} and body["error"]["type"] == "tokens", body
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["param"] is None
    assert body["error"]["message"] == (f"Rate limit reached for consumer 'team-b' on the fleet-wide total_tokens "
                                        f"budget. Please try again in {r.headers['x-ratelimit-reset']}s.")

    m = _messages(e.port, TEAM_B)
    assert m.status == 429 and m.headers["content-type"] == "application/json", m
    assert int(m.headers["retry-after"]) >= 1 and m.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert m.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": (
        f"Rate limit reached for consumer 'team-b' on the fleet-wide total_tokens budget. "
        f"Please try again in {m.headers['x-ratelimit-reset']}s.")}}
    assert len(mocks["openai"].requests()) == 1

    # tollgate's own local replies keep their bodies: the mappers only touch rate-limited ones.
    bad = chat(e.port, key="nope")
    assert bad.status == 401 and bad.json()["error"]["code"] == "invalid_api_key"
