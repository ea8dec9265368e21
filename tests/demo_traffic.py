#!/usr/bin/env python3
"""Sends a bounded mix of traffic to a running tollgate demo gateway so that every panel of the Grafana
dashboard (deploy/grafana/dashboards/tollgate.json) moves, then stops.

    make run            # or: make build && docker compose up --build
    make demo-traffic   # = .venv/bin/python tests/demo_traffic.py --gateway http://localhost:10000

Phases (the demo configuration's consumers: team-a with 60 requests/min and 20000 tokens/min, team-b
with $0.05/h):
  1. warm-up       both consumers, gpt-4o-mini and gpt-4o, streamed and not      -> tokens per consumer/model
  2. team-a burst  more requests than its 60/min                                 -> local 429 rejected_quota, quota use
  3. team-b burst  concurrent slow gpt-4o requests reserving more than $0.05     -> rejected_quota for team-b
  4. failover      the OpenAI mock answers 429 to three attempts (every key)     -> key cooldowns, retried attempts,
                                                                                    requests steered to anthropic
  5. exhausted     the Anthropic mock answers one 429 too                        -> local 429 exhausted
  6. a wrong consumer key                                                        -> 401 rejected_auth
The mocks are scripted through their control API (POST /_mock/script) and reset at the start and the end.
Standard library only.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import sys
import time
import urllib.parse

DEMO_KEYS = {"team-a": "tg-demo-team-a", "team-b": "tg-demo-team-b"}


def _call(base: str, method: str, path: str, body: dict | None = None, headers: dict | None = None,
          timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def reset(mock: str) -> None:
    _call(mock, "POST", "/_mock/reset")


def script(mock: str, *rules: dict) -> None:
    """Replaces the mock's rules (a rule left over from an earlier phase would apply first)."""
    reset(mock)
    status, _, body = _call(mock, "POST", "/_mock/script", {"rules": list(rules)})
    if status != 200:
        raise RuntimeError(f"{mock}/_mock/script answered {status}: {body[:200]!r}")


class Traffic:
    """Sends chat completions and tallies what came back, per phase: (status, provider) -> count."""

    def __init__(self, gateway: str, log=print):
        self.gateway = gateway
        self.log = log
        self.phases: dict[str, collections.Counter] = {}
        self.phase = ""

    def start(self, phase: str) -> None:
        self.phase = phase
        self.phases[phase] = collections.Counter()

    def chat(self, key: str, model: str = "gpt-4o-mini", stream: bool = False, max_tokens: int | None = None,
             content: str = "Say hello") -> int:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        if stream:
            body["stream"] = True
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        status, headers, _ = _call(self.gateway, "POST", "/v1/chat/completions", body,
                                   {"authorization": f"Bearer {key}"}, timeout=60)
        self.phases[self.phase][(status, headers.get("x-tollgate-provider", "-"))] += 1
        return status

    def report(self) -> None:
        for phase, counts in self.phases.items():
            parts = ", ".join(f"{n} x {status} ({provider})" for (status, provider), n in sorted(counts.items()))
            self.log(f"  {phase:<13} {parts}")


def run(gateway: str, openai_mock: str, anthropic_mock: str, team_a_key: str, team_b_key: str,
        cooldown_s: int = 45, log=print) -> Traffic:
    t = Traffic(gateway, log)
    for m in (openai_mock, anthropic_mock):
        reset(m)
    try:
        t.start("warm-up")
        for i in range(16):
            t.chat(team_a_key if i % 2 == 0 else team_b_key, model="gpt-4o" if i % 4 >= 2 else "gpt-4o-mini",
                   stream=i % 3 == 0, content=f"Tell me about the number {i}.")

        t.start("team-a burst")  # one request more than the minute allows ends in a local 429
        for _ in range(70):
            if t.chat(team_a_key, max_tokens=16) == 429:
                break

        t.start("team-b burst")  # slow answers keep six $0.02 reservations open at once: over $0.05
        script(openai_mock, {"delay_ms": 1500, "times": 6})
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: t.chat(team_b_key, model="gpt-4o", max_tokens=2000), range(6)))

        # Every OpenAI key refused once: each refused attempt is retried on Anthropic (the next priority)
        # and its key cools down; once all three are cooling, requests are steered to Anthropic directly.
        t.start("failover")
        script(openai_mock, {"status": 429, "headers": {"retry-after": str(cooldown_s)}, "times": 3})
        for i in range(6):
            t.chat(team_b_key, stream=i % 2 == 1)

        t.start("exhausted")  # and Anthropic's only key too: tollgate answers 429 itself
        script(anthropic_mock, {"status": 429, "headers": {"retry-after": str(cooldown_s)}, "times": 1})
        for _ in range(3):
            t.chat(team_b_key)

        t.start("wrong key")
        t.chat("tg-not-a-consumer")
    finally:
        for m in (openai_mock, anthropic_mock):
            reset(m)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default="http://localhost:10000", help="tollgate gateway (default %(default)s)")
    ap.add_argument("--openai-mock", default="http://localhost:18001", help="OpenAI-shaped mock (default %(default)s)")
    ap.add_argument("--anthropic-mock", default="http://localhost:18002", help="Anthropic-shaped mock (default %(default)s)")
    ap.add_argument("--team-a-key", default=DEMO_KEYS["team-a"])
    ap.add_argument("--team-b-key", default=DEMO_KEYS["team-b"])
    ap.add_argument("--cooldown", type=int, default=45,
                    help="Retry-After of the last round's scripted 429s, seconds (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the whole mix (default %(default)s); see below")
    ap.add_argument("--pause", type=float, default=5, help="seconds between rounds (default %(default)s)")
    args = ap.parse_args(argv)
    # tollgate defines a metric when it first counts it, and Prometheus draws no rate from a counter's
    # first sample: the first round creates the series, the next ones move them. Earlier rounds use short
    # cooldowns so that the providers serve again in the next round.
    rounds = max(1, args.rounds)
    for i in range(rounds):
        if i:
            time.sleep(args.pause)
        cooldown = args.cooldown if i == rounds - 1 else max(1, int(args.pause) - 2)
        print(f"round {i + 1}/{rounds}: sending traffic to {args.gateway}")
        try:
            t = run(args.gateway, args.openai_mock, args.anthropic_mock, args.team_a_key, args.team_b_key, cooldown)
        except OSError as e:
            print(f"cannot reach the gateway or a mock ({e}); start them with `make run` or `docker compose up`",
                  file=sys.stderr)
            return 1
        t.report()
    print("Dashboard: http://localhost:3000 (docker compose) · metrics: http://localhost:9901/stats/prometheus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
