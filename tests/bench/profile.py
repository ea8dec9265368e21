"""`make profile`: where tollgate's time goes inside one request, host call by host call.

Builds the module with the `profile` feature (src/host/prof.rs; cargo profile `profiling`, so the
module under test is left alone), runs it in the benchmark's gateway in front of the benchmark's
upstream, sends non-streaming requests (the small body, then the 16 KiB one) and streams through it
(the benchmark's, sent at once, and the mock provider's, one event per millisecond), and prints the module's own account: per request, how many times each host call and callback ran and
the microseconds spent in it (wall time measured inside the VM, so host calls include the crossing
into Envoy and back). Each kind runs twice: with both roles in one VM (as deployed) and with the
upstream role in a VM of its own, which gives the listener's host calls alone; the summary splits the
count by role. `make bench` runs the same machinery (bench.profile_all) and puts the counts in
BENCHMARKS.md.

    .venv/bin/python tests/bench/profile.py [--requests N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests" / "e2e"))
import bench  # noqa: E402
import harness  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4500, help="per kind (the module reports every 4,000)")
    a = ap.parse_args()
    why = bench.build_profiled()
    if why:
        print(f"profile: {why}", file=sys.stderr)
        return 1
    up_port, up_admin = harness.free_port(), harness.free_port()
    up = bench.Proxy("upstream", bench.upstream_config(up_port, up_admin)).start()
    try:
        bench.check_upstream(up)
        profile = bench.profile_all(up_port, a.requests)
    finally:
        bench.stop_all()
    for kind, report in profile["reports"].items():
        cell = bench.PROFILE_KINDS[kind]
        what = (f"mock provider streaming {profile['events'][kind]} events {bench.EVENT_DELAY_MS} ms apart"
                if kind in bench.EVENT_WORDS else f"streaming ({bench.N_CHUNKS} chunks at once)" if cell.stream
                else f"non-streaming, {len(cell.body):,}-byte body")
        print(f"== {what}, {cell.conns} connection(s), {a.requests:,} requests, both roles in one VM")
        print(report["both"])
        print()
    fig = bench.profile_figures(profile)
    print("Host calls per request (the listener counted alone, with the upstream role in a VM of its own):")
    print(f"  {'':10s} " + " ".join(f"{k:>13s}" for k in fig))
    for role in bench.ROLES:
        print(f"  {role:10s} " + " ".join(f"{fig[k][role]:13.2f}" for k in fig))
    if "event" in fig:
        print(f"  ('event': the spaced streams' ({profile['events']['events-short']} and "
              f"{profile['events']['events-long']} events) difference in calls over their difference in "
              "response-body callbacks, about one per event)")
    else:
        print(f"  (per event not counted: {profile['skipped']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
