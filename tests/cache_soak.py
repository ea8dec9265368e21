"""The response cache under a long run: answers are always their own, and memory stays bounded.

One Envoy (2 workers) with tollgate and a cache of `--capacity` slots of at most `--max-entry-bytes`,
one mock provider in echo mode (an answer says which question it answers), 64 client threads on
keep-alive connections. The mix: questions repeated from a pool larger than the cache (so entries
keep evicting each other) and fresh ones; JSON and streamed; two consumers; question sizes from a
few words to a few KiB. Every answer is checked against its question. Envoy's RSS is sampled from
/proc every 5% of the run: after the warm-up (10%) it must not grow by more than the cache's
worst case (capacity x max entry) plus 5% of the warm RSS.

    .venv/bin/python tests/cache_soak.py                     # 100,000 requests
    .venv/bin/python tests/cache_soak.py --requests 10000    # a short run

Needs `make build mock`. Writes CACHE-SOAK.md (the latest run's figures). Exit code 1 on any failure.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import platform
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from harness import Envoy, MOCK_BIN, free_port, gateway_config  # noqa: E402
from mock_client import start_mock, stop_mock  # noqa: E402

OUT = ROOT / "CACHE-SOAK.md"
ENV = {"CS_OPENAI_KEY_1": "sk-cs-oa1", "CS_OPENAI_KEY_2": "sk-cs-oa2", "CS_TEAM_A": "tg-cs-a", "CS_TEAM_B": "tg-cs-b"}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def question(rng: random.Random, tag: str) -> str:
    n = rng.choice([5, 20, 80, 300, 600])
    return tag + " " + " ".join(rng.choice(WORDS) for _ in range(n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--max-entry-bytes", type=int, default=8192)
    ap.add_argument("--pool", type=int, default=1000, help="repeated questions (more than the slots)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    plugin = {
        "consumers": {"list": [{"name": "team-a", "key_env": "CS_TEAM_A"}, {"name": "team-b", "key_env": "CS_TEAM_B"}]},
        "providers": [{"name": "openai", "type": "openai",
                       "keys": [{"id": f"oa-{i}", "env": f"CS_OPENAI_KEY_{i}"} for i in (1, 2)]}],
        "cache": {"ttl": "1h", "capacity": args.capacity, "max_entry_bytes": args.max_entry_bytes},
    }
    rng = random.Random(args.seed)
    pool = [question(rng, f"q{i}") for i in range(args.pool)]
    proc, mock = start_mock(str(MOCK_BIN), 0, "openai")
    mock.script({"echo": True})
    cfg = gateway_config(plugin, [{"provider": "openai", "port": mock.port}], listener_port=free_port(),
                         admin_port=free_port(), access_log="/dev/null", env_keys=sorted(ENV))
    envoy = Envoy(cfg, env=ENV, concurrency=2).start()
    pid = envoy.proc.pid
    lock = threading.Lock()
    done = 0
    failures: list[str] = []
    outcomes: dict[str, int] = {}
    samples: list[tuple[int, int]] = [(0, rss_kb(pid))]
    next_sample = args.requests // 20
    started = time.time()

    def worker(w: int) -> None:
        nonlocal done, next_sample
        r = random.Random(args.seed * 1000 + w)
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
        while True:
            with lock:
                if done >= args.requests:
                    return
                done += 1
                i = done
            text = r.choice(pool) if r.random() < 0.6 else question(r, f"fresh-{w}-{i}")
            stream = r.random() < 0.4
            key = ENV["CS_TEAM_A"] if r.random() < 0.5 else ENV["CS_TEAM_B"]
            body = json.dumps({"model": "gpt-4o-mini", "temperature": 0, "stream": stream,
                               "messages": [{"role": "user", "content": text}]})
            try:
                conn.request("POST", "/v1/chat/completions", body=body,
                             headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
                resp = conn.getresponse()
                raw = resp.read()
                outcome = resp.getheader("x-tollgate-cache") or "none"
                if resp.status != 200:
                    raise AssertionError(f"status {resp.status}: {raw[:200]!r}")
                if stream:
                    content = ""
                    for line in raw.decode().split("\n"):
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:]).get("choices", []):
                                content += c.get("delta", {}).get("content") or ""
                else:
                    content = json.loads(raw)["choices"][0]["message"]["content"]
                if content != "Echo: " + " ".join(text.split()):
                    raise AssertionError(f"answer of another question ({outcome}): {content[:80]!r} for {text[:80]!r}")
            except (OSError, http.client.HTTPException, AssertionError, ValueError) as e:
                with lock:
                    failures.append(str(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
                continue
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if i >= next_sample:
                    samples.append((i, rss_kb(pid)))
                    next_sample += args.requests // 20
                    if len(samples) % 4 == 1:
                        el = time.time() - started
                        print(f"  {el:6.0f}s {i:7d} done  rss {samples[-1][1] / 1024:.1f} MiB  {outcomes}", flush=True)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    samples.append((args.requests, rss_kb(pid)))
    time.sleep(0.5)
    stats = envoy.stats()
    envoy.stop()
    stop_mock(proc)

    cache = {k.removeprefix("wasmcustom.tollgate.cache."): v for k, v in stats.items()
             if k.startswith("wasmcustom.tollgate.cache.")}
    warm = next(kb for n, kb in samples if n >= args.requests // 10)
    peak_after = max(kb for n, kb in samples if n >= args.requests // 10)
    bound_kb = args.capacity * args.max_entry_bytes // 1024
    allowed_kb = bound_kb + warm // 20
    grew_kb = peak_after - warm
    checks = {
        "every answer was its own question's": not failures,
        "entries were overwritten (stores > capacity, evictions > 0)":
            cache.get("stores", 0) > args.capacity and cache.get("evictions", 0) > 0,
        f"RSS growth after warm-up {grew_kb / 1024:.1f} MiB <= cache bound {bound_kb / 1024:.1f} MiB + 5%":
            grew_kb <= allowed_kb,
    }
    ok = all(checks.values())
    md = [
        "# Response cache soak (`tests/cache_soak.py`)", "",
        f"Latest run: {datetime.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, "
        f"`tests/cache_soak.py --requests {args.requests} --threads {args.threads} --capacity {args.capacity} "
        f"--max-entry-bytes {args.max_entry_bytes} --pool {args.pool} --seed {args.seed}`. One Envoy "
        "(`--concurrency 2`), one mock provider in echo mode, all on this machine. The script replaces this "
        "file on each run.", "",
        f"**Verdict: {'PASS' if ok else 'FAIL'}**", "",
        f"- Requests: {args.requests} in {elapsed:.0f} s ({args.requests / elapsed:.0f} req/s); "
        f"outcomes (x-tollgate-cache): {dict(sorted(outcomes.items()))}; failures: {len(failures)}",
        f"- Cache counters: {dict(sorted(cache.items()))}",
        f"- Cache worst case: {args.capacity} slots x {args.max_entry_bytes} B = {bound_kb / 1024:.1f} MiB",
        "- Envoy RSS (MiB) by requests done: " + ", ".join(f"{n}: {kb / 1024:.1f}" for n, kb in samples),
        f"- After the warm-up ({args.requests // 10} requests, {warm / 1024:.1f} MiB): peak "
        f"{peak_after / 1024:.1f} MiB, +{grew_kb / 1024:.1f} MiB", "",
        "| check | result |", "|---|---|",
        *[f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in checks.items()],
        *([f"", f"First failures: {failures[:5]}"] if failures else []), "",
    ]
    OUT.write_text("\n".join(md))
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
