"""`make instructions`: the instructions tollgate's two roles execute per callback, counted by
Valgrind's Callgrind (tests/instructions, through gungraun), and checked against the committed
baseline.

1. Writes the benchmark's inputs to target/instructions/inputs: the requests, answers and
   configurations of `make bench` (tests/bench/bench.py), so that both benchmarks measure the same
   shapes.
2. Runs `cargo bench` in tests/instructions under gungraun-runner (one Callgrind run per case and
   callback; ~3 minutes on 2 cores, 14 cases).
3. Prints the per-callback table, and with `--write` puts it in BENCHMARKS.md's "Instructions per
   callback" section (the rest of the file is left as it is).
4. Compares every case's total with tests/bench/instructions-baseline.json: a case more than
   THRESHOLD_PERCENT above its baseline fails the run (exit 3). `--save-baseline` writes the
   baseline from this run instead (after a change that is meant to cost more, or a new toolchain:
   the counts are exact for one compiler and its flags, and move when either does).

    python3 tests/bench/instructions.py                  # run, print, check
    python3 tests/bench/instructions.py --write          # ... and update BENCHMARKS.md
    python3 tests/bench/instructions.py --save-baseline  # run and write the baseline
    python3 tests/bench/instructions.py --summaries-only # no run: table and check from the last one
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (stdlib only: the shapes of `make bench`)

CRATE = ROOT / "tests" / "instructions"
TARGET = ROOT / "target" / "instructions"
INPUTS = TARGET / "inputs"
BASELINE = HERE / "instructions-baseline.json"
OUT = ROOT / "BENCHMARKS.md"
# Counts are exact: a case that grows by more than this is a real change of the code, not noise.
THRESHOLD_PERCENT = 2.0
# A case with many consumers must cost what the case with one costs (issue: per-request cost must
# not grow with the configuration): this close.
SAME_PERCENT = 1.0

CASES = {
    "json": "non-streamed answer",
    "stream": "200-event stream",
    "prompt_16k": "16 KiB prompt",
    "translated": "translated answer (OpenAI client, Anthropic provider)",
    "json_10k_consumers": "non-streamed answer, 10,000 consumers in the configuration",
    # One row per capability of the admission and cache round, each on (the rows above have none
    # configured: what they cost there is what a feature that is off costs). Each against `json`.
    "stream_null_usage": "200-event stream, each chunk with OpenAI's `\"usage\":null` (forced usage)",
    "context": "non-streamed, context-window guard on (fits)",
    "trim": "non-streamed, context window with trim_oldest on (fits)",
    "trim_16k": "16 KiB prompt, trim_oldest on, oldest turns dropped to fit",
    "in_flight": "non-streamed, limits on requests in flight (consumer and every key)",
    "allow": "non-streamed, the consumer's model allow-list",
    "alias": "non-streamed, the model asked for by an alias",
    "cache_miss": "non-streamed, response cache on: a miss (answer stored)",
    "cache_hit": "non-streamed, response cache on: a hit (no attempt)",
    # The waiting and pacing round: each on, each against `json`.
    "waiting": "non-streamed, the consumer may wait for capacity (admitted at once)",
    "paced": "non-streamed, every key paced by a configured requests_per_minute",
}
# The benchmark's steps, in the order of STEPS in tests/instructions/benches/instructions.rs: the
# benchmark `<case>_<i>` is the case's STEPS[i].
STEPS = (
    ("listener request headers", "L req hdrs"),
    ("listener request body", "L req body"),
    ("upstream request headers", "U req hdrs"),
    ("upstream request body", "U req body"),
    ("upstream response headers", "U resp hdrs"),
    ("upstream response body", "U resp body"),
    ("listener response headers", "L resp hdrs"),
    ("listener response body", "L resp body"),
    ("charge (end of response, on_log)", "charge"),
)
MANY_CONSUMERS = bench.MANY_CONSUMERS
# The case each other case differs from by one thing (the table's last column).
BASE_OF = {"json_10k_consumers": "json", "stream_null_usage": "stream", "trim_16k": "prompt_16k",
           **{c: "json" for c in ("context", "trim", "in_flight", "allow", "alias", "cache_miss", "cache_hit",
                            "waiting", "paced")}}


def anthropic_answer() -> str:
    """The non-streamed answer of `make bench` as Anthropic's Messages API gives it."""
    text = " ".join(bench.WORDS)
    return bench.compact({
        "id": "msg_01XFDUDYJgAACzvnbench7xZ0", "type": "message", "role": "assistant",
        "model": "claude-haiku-4-5-20251001", "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 31, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 198, "service_tier": "standard"}})


def translated_plugin(plugin: dict) -> dict:
    cfg = json.loads(json.dumps(plugin))
    cfg["providers"] = [{
        "name": "anthropic", "type": "anthropic", "host": "api.anthropic.com",
        "keys": [{"id": f"an-{i}", "env": f"BENCH_OPENAI_KEY_{i}"} for i in (1, 2, 3)],
        "models": {"gpt-4o-mini": "claude-haiku-4-5"},
    }]
    return cfg


def with_null_usage(sse: str) -> str:
    """The stream as OpenAI sends it when usage is asked for: `"usage":null` as every chunk's last
    member but the usage chunk's."""
    def event(line: str) -> str:
        if line.startswith("data: {") and '"choices":[]' not in line:
            return line[:-1] + ',"usage":null}'
        return line
    return "\n".join(event(line) for line in sse.split("\n"))


def feature_plugins() -> dict[str, dict]:
    """The configurations of the feature rows: `make bench`'s, with one capability on."""
    def plugin(edit) -> dict:
        cfg = json.loads(json.dumps(bench.PLUGIN))
        edit(cfg)
        return cfg

    def consumer(**kv):
        return lambda cfg: cfg["consumers"]["list"][0].update(kv)

    def in_flight(cfg):
        cfg["consumers"]["list"][0]["max_in_flight"] = 1000
        for k in cfg["providers"][0]["keys"]:
            k["max_in_flight"] = 1000

    def paced(cfg):
        # Far above what the benchmark sends in a minute: every request is taken, none refused.
        for k in cfg["providers"][0]["keys"]:
            k["requests_per_minute"] = 1_000_000_000

    def window(trim: bool, tokens: int = 128_000):
        return lambda cfg: cfg.update(models={"gpt-4o-mini": {"context_window": tokens, "trim_oldest": trim}})

    return {
        "config-context.json": plugin(window(False)),
        "config-trim.json": plugin(window(True)),
        # The 16 KiB conversation is ~4,000 tokens by the estimate: the oldest turns go.
        "config-trim-small.json": plugin(window(True, 2_500)),
        "config-in-flight.json": plugin(in_flight),
        "config-allow.json": plugin(consumer(models=["gpt-4o-*", "claude-*"])),
        "config-alias.json": plugin(lambda cfg: cfg.update(aliases={"fast": "gpt-4o-mini"})),
        "config-cache.json": bench.cache_plugin(),
        "config-waiting.json": plugin(consumer(waiting={"max_wait": "10s"})),
        "config-paced.json": plugin(paced),
    }


def write_inputs() -> None:
    INPUTS.mkdir(parents=True, exist_ok=True)
    files = {
        "env.json": json.dumps(bench.ENV),
        "config.json": json.dumps(bench.PLUGIN),
        "config-10k.json": json.dumps(bench.many_consumers(bench.PLUGIN, MANY_CONSUMERS)),
        "config-translated.json": json.dumps(translated_plugin(bench.PLUGIN)),
        "chat.json": bench.BODY,
        "chat-stream.json": bench.STREAM_BODY,
        "chat-16k.json": bench.BIG_BODY,
        "answer.json": bench.json_answer(),
        "answer.sse": bench.sse_answer(),
        "answer-anthropic.json": anthropic_answer(),
        "answer-null-usage.sse": with_null_usage(bench.sse_answer()),
        "chat-alias.json": bench.compact({**bench.CHAT, "model": "fast"}),
        # `__N__`: a new number for every request of a miss case, "hit" for a hit case.
        "chat-cache.json": bench.CACHE_BODY,
        **{name: json.dumps(cfg) for name, cfg in feature_plugins().items()},
    }
    common = {"consumer_key": bench.CONSUMER_KEY, "content_type": "application/json",
              "config": "config.json", "body": "chat.json", "answer": "answer.json"}
    cases = {
        "json": common,
        "stream": {**common, "body": "chat-stream.json", "answer": "answer.sse",
                   "content_type": "text/event-stream", "event_per_chunk": True},
        "prompt_16k": {**common, "body": "chat-16k.json"},
        "translated": {**common, "config": "config-translated.json", "answer": "answer-anthropic.json"},
        "json_10k_consumers": {**common, "config": "config-10k.json"},
        "stream_null_usage": {**common, "body": "chat-stream.json", "answer": "answer-null-usage.sse",
                              "content_type": "text/event-stream", "event_per_chunk": True},
        "context": {**common, "config": "config-context.json"},
        "trim": {**common, "config": "config-trim.json"},
        "trim_16k": {**common, "config": "config-trim-small.json", "body": "chat-16k.json"},
        "in_flight": {**common, "config": "config-in-flight.json"},
        "allow": {**common, "config": "config-allow.json"},
        "alias": {**common, "config": "config-alias.json", "body": "chat-alias.json"},
        "cache_miss": {**common, "config": "config-cache.json", "body": "chat-cache.json", "unique": True},
        "cache_hit": {**common, "config": "config-cache.json", "body": "chat-cache.json", "served_from_cache": True},
        "waiting": {**common, "config": "config-waiting.json"},
        "paced": {**common, "config": "config-paced.json"},
    }
    files["cases.json"] = json.dumps(cases, indent=1)
    for name, text in files.items():
        path = INPUTS / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def run_bench(env_extra: dict[str, str]) -> None:
    env = {**os.environ, "CARGO_TARGET_DIR": str(TARGET), **env_extra}
    cmd = ["cargo", "bench", "--locked", "--manifest-path", str(CRATE / "Cargo.toml"), "--bench", "instructions",
           "--", "--save-summary=json", "--nocapture=false"]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env)
    # Exit 3 is gungraun's for a regression of its own limits: none are set, so anything else failed.
    if done.returncode != 0:
        sys.exit(f"cargo bench failed (exit {done.returncode})")


def read_summaries() -> dict[str, list[int]]:
    """Instructions per case and step, from gungraun's summary.json files."""
    out: dict[str, list[int | None]] = {c: [None] * len(STEPS) for c in CASES}
    root = TARGET / "gungraun"
    for path in root.rglob("summary.json"):
        s = json.loads(path.read_text())
        m = re.fullmatch(r"(.+)_(\d+)", s.get("id") or "")
        if s.get("function_name") != "step" or not m or m.group(1) not in out:
            continue
        out[m.group(1)][int(m.group(2))] = instructions_of(s)
    missing = [f"{c} {STEPS[i][0]}" for c, row in out.items() for i, v in enumerate(row) if v is None]
    if missing:
        sys.exit(f"no summary for: {', '.join(missing)} (under {root})")
    return out  # type: ignore[return-value]


def instructions_of(summary: dict) -> int:
    """The Ir (instructions executed) of a summary, whatever nesting gungraun's schema gives it."""
    found: list[int] = []

    def walk(o):
        if isinstance(o, dict):
            if "Ir" in o:
                found.append(metric(o["Ir"]))
                return
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(summary.get("profiles", summary))
    if not found:
        raise SystemExit(f"no Ir in a summary of {summary.get('function_name')}")
    return found[0]


def metric(v) -> int:
    """A gungraun metric (schema v6: {"values": {"new": n, "old": m}}), whatever its nesting."""
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, dict):
        for key in ("values", "new", "metrics", "Left", "Both", "Int", "Float"):
            if key in v:
                inner = v[key]
                return metric(inner[0] if isinstance(inner, list) else inner)
    if isinstance(v, list) and v:
        return metric(v[0])
    raise SystemExit(f"unreadable metric {v!r}")


def table(counts: dict[str, list[int]]) -> list[str]:
    head = "| case | " + " | ".join(short for _, short in STEPS) + " | total | against its base |"
    rows = [head, "|" + "---|" * (len(STEPS) + 3)]
    for case, row in counts.items():
        base = BASE_OF.get(case)
        against = f"{sum(row) - sum(counts[base]):+,} ({base})" if base in counts else "-"
        rows.append(f"| {CASES[case]} | " + " | ".join(f"{v:,}" for v in row) + f" | {sum(row):,} | {against} |")
    return rows


def check(counts: dict[str, list[int]], baseline: dict) -> list[str]:
    """Failures: a case above its baseline by more than THRESHOLD_PERCENT, or the many-consumer
    case apart from the one-consumer case by more than SAME_PERCENT."""
    failures = []
    for case, row in counts.items():
        base = baseline.get("cases", {}).get(case)
        if base is None:
            failures.append(f"{case}: no baseline (run with --save-baseline)")
            continue
        total, was = sum(row), sum(base)
        grew = (total - was) / was * 100
        if grew > THRESHOLD_PERCENT:
            worst = max(range(len(STEPS)), key=lambda i: row[i] - base[i])
            failures.append(f"{case}: {total:,} instructions, {grew:+.2f}% against the baseline's {was:,} "
                            f"(limit +{THRESHOLD_PERCENT}%); most in {STEPS[worst][0]}: "
                            f"{base[worst]:,} -> {row[worst]:,}")
    one, many = sum(counts["json"]), sum(counts["json_10k_consumers"])
    apart = abs(many - one) / one * 100
    if apart > SAME_PERCENT:
        failures.append(f"{MANY_CONSUMERS:,} consumers cost {many:,} instructions against {one:,} with one "
                        f"({apart:.2f}% apart, limit {SAME_PERCENT}%): per-request cost grows with the configuration")
    return failures


def section(counts: dict[str, list[int]], baseline: dict) -> list[str]:
    one, many = sum(counts["json"]), sum(counts["json_10k_consumers"])
    lines = [
        "## Instructions per callback",
        "",
        "`make instructions` (tests/bench/instructions.py, tests/instructions): instructions executed per callback, "
        "counted by Valgrind's Callgrind through gungraun, with both roles driven natively through whole requests "
        "on the fake host, the requests and answers of the cells above. The same count on every run whatever "
        "else the machine does: the map of the module's own work, and its regression test (each case's total "
        f"against tests/bench/instructions-baseline.json, at most +{THRESHOLD_PERCENT}%). Native x86-64 "
        "instructions of the module's release build, not Wasm instructions, and without Envoy's side of each "
        "host call (the wall-clock cells measure those). The stream: one event per body callback. The rows "
        "from the forced-usage stream on turn one capability of the admission and cache round on, each against "
        "the case without it (last column): the first rows configure none of them, so what they cost there is "
        "what each costs when off. A step a case never reaches (a cache hit makes no attempt) shows the "
        "harness's own ~380 instructions.",
        "",
        f"Commit {bench.commit_of()}, {tool_versions()}.",
        "",
        *table(counts),
        "",
        f"{MANY_CONSUMERS:,} consumers in the configuration: {many:,} instructions per request against {one:,} "
        f"with one ({(many - one) / one * 100:+.2f}%).",
    ]
    if baseline.get("cases"):
        deltas = ", ".join(f"{c} {(sum(r) - sum(baseline['cases'][c])) / sum(baseline['cases'][c]) * 100:+.2f}%"
                           for c, r in counts.items() if c in baseline["cases"])
        lines += ["", f"Against the baseline ({baseline.get('note', 'committed')}): {deltas}."]
    return lines


def tool_versions() -> str:
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")[0].strip()
        except OSError:
            return "?"
    return f"{first(['rustc', '--version'])}, {first(['valgrind', '--version'])}"


def put_section(lines: list[str]) -> None:
    """Replaces (or appends) the section in BENCHMARKS.md, leaving the rest as it is."""
    text = OUT.read_text() if OUT.exists() else ""
    block = "\n".join(lines) + "\n"
    start = text.find("## Instructions per callback")
    if start < 0:
        OUT.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    nxt = text.find("\n## ", start + 1)
    OUT.write_text(text[:start] + block + (text[nxt + 1:] if nxt >= 0 else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="put the table in BENCHMARKS.md")
    ap.add_argument("--save-baseline", action="store_true", help="write the baseline from this run")
    ap.add_argument("--summaries-only", action="store_true", help="no run: read the last run's summaries")
    ap.add_argument("--note", default="", help="with --save-baseline: why the baseline moved")
    args = ap.parse_args()
    write_inputs()
    if not args.summaries_only:
        run_bench({})
    counts = read_summaries()
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    print("\n".join(table(counts)))
    if args.save_baseline:
        note = args.note or f"commit {bench.commit_of()}, {tool_versions()}"
        cases = ",\n".join(f'  "{c}": {json.dumps(row)}' for c, row in counts.items())
        BASELINE.write_text(f'{{\n "note": {json.dumps(note)},\n "steps": {json.dumps([n for n, _ in STEPS])},\n'
                            f' "cases": {{\n{cases}\n }}\n}}\n')
        print(f"baseline written: {BASELINE.relative_to(ROOT)}")
        baseline = json.loads(BASELINE.read_text())
    if args.write:
        put_section(section(counts, baseline))
        print(f"written: {OUT.relative_to(ROOT)} (Instructions per callback)")
    failures = check(counts, baseline)
    for f in failures:
        print(f"REGRESSION: {f}", file=sys.stderr)
    if failures:
        return 3
    print(f"instruction counts within +{THRESHOLD_PERCENT}% of the baseline; {MANY_CONSUMERS:,} consumers "
          f"within {SAME_PERCENT}% of one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
