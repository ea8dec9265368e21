"""`make profile`: where tollgate's time goes inside one request, host call by host call.

Builds the module with the `profile` feature (src/filter/prof.rs; cargo profile `profiling`, so the
module under test is left alone), runs it in the benchmark's gateway in front of the benchmark's
upstream, sends non-streaming then streaming requests through it, and prints the module's own
account: per request, how many times each host call and callback ran and the microseconds spent in
it (wall time measured inside the VM, so host calls include the crossing into Envoy and back).

    .venv/bin/python tests/bench/profile.py [--requests N]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests" / "e2e"))
import bench  # noqa: E402
import harness  # noqa: E402

ROOT = HERE.parents[1]
PROFILED = ROOT / "target" / "wasm32-wasip1" / "profiling" / "tollgate.wasm"
MARK = "tollgate profile over"


def build() -> None:
    subprocess.run(["cargo", "build", "--quiet", "--profile", "profiling", "--features", "profile",
                    "--target", "wasm32-wasip1", "-p", "tollgate"], cwd=ROOT, check=True)


def profile(up_port: int, stream: bool, requests: int) -> str:
    """The last report the module logged (one per 1,000 requests) after `requests` requests."""
    harness.WASM = PROFILED  # gateway_config reads the module path from here
    cfg = bench.proxy_configs(up_port)["tollgate"]
    p = bench.Proxy("tollgate-profiled", cfg, bench.ENV).start()
    try:
        bench.check_proxy(p, True)
        seconds = 2
        while p.rq_total() < requests:
            bench.run_wrk(p, 1, seconds, stream)
    finally:
        p.stop()  # Envoy flushes its log file on exit
    log = p.log()
    at = log.rfind(MARK)
    if at < 0:
        raise RuntimeError(f"no profile in the Envoy log (is the `profile` feature on?):\n{log[-2000:]}")
    return log[at:].split("\n[", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="per kind (the module reports every 1,000)")
    a = ap.parse_args()
    build()
    up_port, up_admin = harness.free_port(), harness.free_port()
    up = bench.Proxy("upstream", bench.upstream_config(up_port, up_admin)).start()
    try:
        bench.check_upstream(up)
        for stream in (False, True):
            kind = f"streaming ({bench.N_CHUNKS} chunks)" if stream else "non-streaming"
            print(f"== {kind}, 1 connection, {a.requests:,} requests")
            print(profile(up_port, stream, a.requests))
            print()
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
