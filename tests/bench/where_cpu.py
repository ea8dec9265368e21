"""`make bench`: where tollgate's Envoy CPU goes, beyond what the instruction counts can say.

The instruction counts (`make instructions`) map the module's own work, natively. Two things they
cannot show are measured here, on Envoy itself:

1. **Perf samples by where the code lives** (`perf record -e cpu-clock` on the proxy's Envoy during a
   wrk run; `perf report --sort dso`): the module's code in V8 (`[JIT]`: the Wasm code and the call
   wrappers V8 generates for it), Envoy's own code (HTTP, the host-call implementations, V8's runtime,
   which is linked into Envoy), the kernel (sockets) and the rest (libc). Each share times the run's
   CPU per request gives microseconds per request. The empty module runs the same way, so the
   difference is tollgate's.
2. **What each kind of host call costs Envoy** (the empty module built with its `probes` feature,
   tests/bench/empty-filter/src/probes.rs): the floor plus one kind of call made N times per request,
   against the floor in the same rounds; the difference over N is one call's price, the crossing and
   the copying included.

Both need nothing but the bench's own proxies and upstream; perf is optional (apt `linux-perf`):
without it, or where the kernel refuses it, the section says why.
"""
from __future__ import annotations

import copy
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# probe -> calls per request (see probes.rs). `hold` makes no call: its price is that of holding the
# request headers and buffering both bodies whole, once per request.
PROBES = {"time": 20, "header": 20, "map": 10, "replace": 20, "write-map": 10, "shared-get": 20, "shared-set": 20,
          "state": 4, "hold": 1, "replay": 1}
PROBE_TITLES = {
    "time": "a call that returns no bytes (`proxy_get_current_time_nanoseconds`)",
    "header": "one header's value (`proxy_get_header_map_value`): bytes back, so an allocation call into the module",
    "map": "the whole request header map (`proxy_get_header_map_pairs`, the benchmark's request)",
    "replace": "a request header written (`proxy_replace_header_map_value`)",
    "write-map": "the request header map written whole (`proxy_set_header_map_pairs`)",
    "shared-get": "a 64-byte shared-data entry read (`proxy_get_shared_data`)",
    "shared-set": "a 64-byte shared-data entry written (`proxy_set_shared_data`)",
    "state": "a filter-state value written (`proxy_set_property`, 33 bytes)",
    "hold": "request headers held until the body is in, both bodies buffered whole (no call; once per request)",
    "replay": "tollgate's host calls of a non-streamed request replayed in both filters, the request held, none "
              "of its logic (19 calls; once per request)",
    "tollgate": "tollgate itself, in the same rounds (once per request)",
}
# Measured in the price rounds beside the probes, for the replay to be read against: not a probe.
COMPARED = "tollgate"
# How the profile's host calls are priced in the estimate below: by the probe closest in kind.
PRICED_AS = {
    "proxy_get_header_map_pairs": "map",
    "proxy_get_buffer_bytes": "header",
    "proxy_get_property": "header",
    "proxy_get_header_map_value": "header",
    "proxy_get_shared_data": "shared-get",
    "proxy_set_shared_data": "shared-set",
    "proxy_replace_header_map_value": "replace",
    "proxy_add_header_map_value": "replace",
    "proxy_remove_header_map_value": "replace",
    "proxy_set_header_map_pairs": "write-map",
    "proxy_set_buffer_bytes": "replace",
    "proxy_set_property": "state",
}
PERF_SECONDS = 4
PRICE_ROUNDS = 5
PRICE_SECONDS = 2  # wrk takes whole seconds


def build_probes(empty_dir: Path, build_dir: Path) -> tuple[Path | None, str]:
    """The empty module with its `probes` feature: (path, '') or (None, why not)."""
    out = build_dir / "empty-filter-probes"
    try:
        b = subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--offline",
                            "--features", "probes", "--manifest-path", str(empty_dir / "Cargo.toml"),
                            "--target-dir", str(out)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cargo build failed: {e}"
    wasm = out / "wasm32-wasip1" / "release" / "empty_filter.wasm"
    if b.returncode != 0 or not wasm.exists():
        return None, f"cargo build failed: {b.stderr.strip()[-500:]}"
    return wasm, ""


def probe_config(empty_cfg: dict, wasm: Path, probe: str, fresh_ports, wasm_filter_lists) -> dict:
    """The empty proxy's configuration with the probes module, told `probe:count`."""
    cfg = fresh_ports(copy.deepcopy(empty_cfg))
    for filters in wasm_filter_lists(cfg):
        for f in filters:
            if f["name"].startswith("tollgate"):
                c = f["typed_config"]["config"]
                c["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
                c["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                      "value": f"{probe}:{PROBES.get(probe, 1)}"}
    return cfg


def prices(empty, probed: dict, run_wrk) -> dict:
    """CPU per request of the empty proxy and each probe's, interleaved rounds at 16 connections
    (non-streaming); each probe's price per call: the median of its per-round differences over N."""
    runs = {"empty": empty, **probed}
    for p in runs.values():
        run_wrk(p, 16, 1, False)  # warm-up
    cpu = {n: [] for n in runs}
    for rnd in range(PRICE_ROUNDS):
        names = list(runs)
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            r = run_wrk(runs[n], 16, PRICE_SECONDS, False)
            if r["errors"]:
                raise RuntimeError(f"probe {n}: {r['errors']} errors")
            cpu[n].append(r["cpu_us"])
            time.sleep(0.2)
    out = {"empty_cpu_us": cpu["empty"], "probes": {}}
    for n in probed:
        diffs = [(p - e) / PROBES.get(n, 1) for p, e in zip(cpu[n], cpu["empty"])]
        # More than one round in five against the median's sign: the probe's cost is below what this
        # machine resolves (one outlier round does not make a clear price noise).
        mid = statistics.median(diffs)
        agree = sum(1 for d in diffs if (d > 0) == (mid > 0) and d != 0)
        out["probes"][n] = {"per_call_us": mid, "rounds": diffs, "cpu_us": cpu[n],
                            "noise": mid == 0 or agree < 0.8 * len(diffs)}
    return out


def perf_available() -> str:
    """'' when `perf record` works on this machine, or why not."""
    if not shutil.which("perf"):
        return "perf is not installed (apt-get install linux-perf)"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o", f"{d}/p.data", "--", "true"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"perf record failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return ""


def dso_shares(data: str) -> dict[str, float]:
    """perf report by DSO -> share of samples (0..1) per kind: module, envoy, kernel, other."""
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso", "--no-children", "-g", "none"],
                       capture_output=True, text=True)
    out = {"module": 0.0, "envoy": 0.0, "kernel": 0.0, "other": 0.0}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        share, dso = float(m.group(1)) / 100, m.group(2)
        kind = ("module" if dso.startswith("[JIT]") else "envoy" if dso == "envoy"
                else "kernel" if dso.startswith("[kernel") else "other")
        out[kind] += share
    return out


def perf_split(proxies: dict, cells: list, run_wrk) -> dict:
    """For each proxy and cell: CPU per request and its split by DSO kind (µs per request)."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for cell in cells:
            for name, p in proxies.items():
                run_wrk(p, cell.conns, 1, cell.stream)
                data = f"{d}/{name}.data"
                rec = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-e", "cpu-clock", "-p", str(p.pid),
                                        "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
                r = run_wrk(p, cell.conns, PERF_SECONDS, cell.stream)
                rec.send_signal(signal.SIGINT)
                rec.wait(timeout=60)
                shares = dso_shares(data)
                out[(cell, name)] = {"cpu_us": r["cpu_us"], **{k: v * r["cpu_us"] for k, v in shares.items()}}
    return out


def estimate(profile_rows: dict[str, tuple[float, float]], probe_prices: dict) -> tuple[float, float]:
    """tollgate's host calls per non-streamed request (the profile's counts) priced by the probes,
    with holding the request and buffering the answer once: (calls, µs). A call of a kind no probe
    matches is priced as `time` (no bytes back)."""
    calls = us = 0.0
    for row, (n, _) in profile_rows.items():
        if not row.startswith("host "):
            continue
        probe = PRICED_AS.get(row.removeprefix("host "), "time")
        p = probe_prices.get(probe, {})
        price = 0.0 if p.get("noise") else p.get("per_call_us")
        if price is None:
            continue
        calls += n
        us += n * max(price, 0.0)
    # The listener holds every request's headers while it reads the body, and buffers the answer.
    hold = probe_prices.get("hold", {})
    us += 0.0 if hold.get("noise") else max(hold.get("per_call_us", 0.0), 0.0)
    return calls, us


def section(where: dict | None, title_of) -> list[str]:
    out = ["## Where the CPU goes: perf samples and host-call prices", "",
           "`tests/bench/where_cpu.py`, after the rounds, on the same proxies. The instruction counts "
           "(*Instructions per callback*) map the module's own work; this is Envoy's side of it.", ""]
    if not where:
        return out + ["Not measured in this run.", ""]
    split, skipped = where.get("split"), where.get("perf_skipped")
    if split:
        out += ["**Perf samples by where the code runs** (`perf record -e cpu-clock -F 1999` on the proxy's "
                f"Envoy for {PERF_SECONDS} s of wrk; shares of the samples times that run's CPU per request). "
                "*Module*: `[JIT]`, the Wasm code V8 compiled and its call wrappers. *Envoy*: Envoy's own code, "
                "including the host calls' implementations and V8's runtime (linked into Envoy). *Kernel*: "
                "mostly sockets. *Other*: libc (memcpy) and the rest.", "",
                "| cell | proxy | CPU/req | module (JIT) | Envoy | kernel | other |", "|---|---|---|---|---|---|---|"]
        for (cell, name), f in split.items():
            out.append(f"| {title_of(cell)} | {name} | {f['cpu_us']:.0f} µs | {f['module']:.0f} µs | "
                       f"{f['envoy']:.0f} µs | {f['kernel']:.0f} µs | {f['other']:.0f} µs |")
        cells = sorted({c for c, _ in split}, key=lambda c: (c.stream, c.conns))
        out.append("")
        for cell in cells:
            t, e = split.get((cell, "tollgate")), split.get((cell, "empty"))
            if t and e:
                out.append(f"- {title_of(cell)}: tollgate above the empty module {t['cpu_us'] - e['cpu_us']:+.0f} µs per "
                           f"request: module {t['module'] - e['module']:+.0f}, Envoy {t['envoy'] - e['envoy']:+.0f}, "
                           f"kernel {t['kernel'] - e['kernel']:+.0f}, other {t['other'] - e['other']:+.0f} µs.")
        out.append("")
    else:
        out += [f"Perf samples not taken: {skipped}.", ""]
    pr = where.get("prices")
    if pr:
        out += ["**What one host call costs Envoy** (the empty module with one kind of host call made N times per "
                "request in the listener's filter, `tests/bench/empty-filter/src/probes.rs`, against the empty "
                f"module in the same rounds: {PRICE_ROUNDS} x {PRICE_SECONDS:g} s at 16 connections, non-streaming; "
                "CPU per request difference over N, median of the rounds).", "",
                "| probe | N | price per call | per round |", "|---|---|---|---|"]
        for n, f in pr["probes"].items():
            price = "within the noise" if f.get("noise") else f"{f['per_call_us']:.2f} µs"
            out.append(f"| {PROBE_TITLES[n]} | {PROBES.get(n, 1)} | {price} | "
                       + ", ".join(f"{x:.2f}" for x in f["rounds"]) + " |")
        out += ["", "*Within the noise*: more than one round in five disagrees with the median on the sign, so the "
                "price is below what these rounds resolve (about ±3 µs per request on this machine, divided by N); "
                "the estimate counts it as 0."]
        replay, whole = pr["probes"].get("replay"), pr["probes"].get(COMPARED)
        if replay and whole:
            share = replay["per_call_us"] / whole["per_call_us"] if whole["per_call_us"] > 0 else float("nan")
            out += ["", f"**tollgate's calls without tollgate**: replayed in the same order and about the same sizes, "
                    f"holding the request as tollgate does, they cost Envoy "
                    f"{replay['per_call_us']:+.0f} µs per request above the floor; tollgate itself "
                    f"{whole['per_call_us']:+.0f} µs in the same rounds, so its calls are about {share:.0%} of its cost "
                    "and the rest is its own work in the module (and what that work costs around it)."]
        out.append("")
        est = where.get("estimate")
        if est:
            calls, us = est
            out += [f"Priced so (each call as the probe of its kind; a body or a property read as `header`, a "
                    f"header removal or a body write as `replace`, every other call as `time`), tollgate's "
                    f"{calls:.1f} host calls per non-streamed request (*Host calls*), with holding the request and buffering the answer, "
                    f"come to about {us:.0f} µs of Envoy CPU: a rough estimate, as a real header map or body is larger than the probes'.", ""]
    elif where.get("prices_skipped"):
        out += [f"Host-call prices not measured: {where['prices_skipped']}.", ""]
    return out
