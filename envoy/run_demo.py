"""`make run`: the demo gateway on localhost:10000, in the foreground until Ctrl-C.

Starts the two mock providers (OpenAI-shaped on 127.0.0.1:18001, Anthropic-shaped on :18002) and a
real Envoy (from .venv) with envoy/demo.yaml and demo keys, then prints what to try.
`make run-rotation` (this script with envoy/rotation/envoy.yaml) starts the gateway whose keys,
listener and clusters come from files, changed without a restart.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
MOCK = ROOT / "target" / "release" / "mock-provider"

# Demo secrets: the mocks accept any key; real deployments put real keys in these variables.
DEMO_ENV = {
    "OPENAI_KEY_1": "sk-demo-openai-1",
    "OPENAI_KEY_2": "sk-demo-openai-2",
    "OPENAI_KEY_3": "sk-demo-openai-3",
    "ANTHROPIC_KEY_1": "sk-ant-demo-1",
    "TEAM_B_KEY": "tg-demo-team-b",
    "TOLLGATE_ADMIN_KEY": "tg-demo-admin",
}

TRY = """
tollgate demo gateway: http://localhost:10000   (Envoy admin: http://localhost:9901)

Try it (consumer key of team-a: tg-demo-team-a):

  curl -s localhost:10000/v1/chat/completions \\
    -H 'Authorization: Bearer tg-demo-team-a' -H 'content-type: application/json' \\
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'

  -> {"id":"chatcmpl-mock-1","object":"chat.completion",...,"content":"Hello from openai.",...}
     with headers x-tollgate-provider: openai, x-tollgate-key-id: oa-1, x-ratelimit-remaining-requests: 59

Each SDK reaches its own provider: GPT models are OpenAI's, Claude models Anthropic's.

  from openai import OpenAI
  client = OpenAI(base_url="http://localhost:10000/v1", api_key="tg-demo-team-a")
  print(client.chat.completions.create(model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}]).choices[0].message.content)
  -> Hello from openai.

  from anthropic import Anthropic
  client = Anthropic(base_url="http://localhost:10000", api_key="tg-demo-team-a")
  print(client.messages.create(model="claude-haiku-4-5", max_tokens=100,
        messages=[{"role": "user", "content": "Say hello"}]).content[0].text)
  -> Hello from anthropic.

Failover: the OpenAI mock refuses its next request (429), and gpt-4o-mini is answered by Anthropic
(as claude-haiku-4-5) in OpenAI's shape, with x-tollgate-provider: anthropic; the refused key cools down 30 s.

  curl -s localhost:18001/_mock/script -d '{"rules":[{"status":429,"headers":{"retry-after":"30"},"times":1}]}'
  then the curl above again -> "content":"Hello from anthropic."

Usage totals and key health: curl -s localhost:10000/tollgate/status -H 'Authorization: Bearer tg-demo-admin'
Prometheus metrics:          curl -s localhost:9901/stats/prometheus | grep tollgate
Ctrl-C stops everything.
"""

ROTATION = "envoy/rotation/envoy.yaml"

TRY_ROTATION = """
tollgate gateway with keys that change without a restart: http://localhost:10000   (Envoy admin: :9901)
Its listener, clusters and keys are files in envoy/rotation/ (README, "Rotating keys without a restart").

  curl -s -D- -o /dev/null localhost:10000/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}' | grep x-tollgate-key

Replace key oa-1's secret (the mock records the key each request carried):

  printf %s sk-demo-rotation-openai-1-v2 > envoy/rotation/keys/.new && mv envoy/rotation/keys/.new envoy/rotation/keys/openai-1
  curl -s localhost:18001/_mock/requests | python3 -c 'import json,sys; print([r["key"] for r in json.load(sys.stdin)["requests"]][-4:])'

Key health (each key's source and secret name): curl -s localhost:10000/tollgate/status -H 'Authorization: Bearer tg-demo-admin'
Ctrl-C stops everything.
"""


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {url}")


def main() -> int:
    procs: list[subprocess.Popen] = []

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for port, name in ((18001, "openai"), (18002, "anthropic")):
        procs.append(subprocess.Popen([str(MOCK), "--port", str(port), "--name", name], stdout=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{port}/_mock/health")
    config = sys.argv[1] if len(sys.argv) > 1 else "envoy/demo.yaml"
    procs.append(subprocess.Popen(
        [str(ENVOY), "-c", config, "--concurrency", "2", "--disable-hot-restart", "-l", "warning"],
        cwd=ROOT, env={**os.environ, **DEMO_ENV}))
    wait_http("http://127.0.0.1:9901/ready")
    print(TRY_ROTATION if config == ROTATION else TRY, flush=True)
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)
    print("a demo process exited; stopping", file=sys.stderr)
    stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
