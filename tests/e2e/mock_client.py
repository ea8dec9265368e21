"""Client for the mock provider's control API (tests/mock-provider). Stdlib only.

    proc, mock = start_mock("target/release/mock-provider", 18001, "openai-a")
    mock.script({"key": "sk-a1", "status": 429, "headers": {"retry-after": "30"}, "times": 1})
    ...
    assert [r["key"] for r in mock.requests()] == ["sk-a1", "sk-a2"]
"""
from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

from harness import stop_process

_LISTENING = re.compile(r"^mock-provider (\S+) listening on (\S+):(\d+)\s*$")


class MockProvider:
    def __init__(self, port: int, name: str):
        self.port = port
        self.name = name
        self.base_url = f"http://127.0.0.1:{port}"

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"mock {self.name}: {method} {path} -> {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(raw) if raw.startswith(b"{") else raw.decode()

    def script(self, *rules: dict) -> None:
        """Appends rules (checked in order; the first that matches and has uses left applies)."""
        self._call("POST", "/_mock/script", {"rules": list(rules)})

    def reset(self) -> None:
        """Clears the rules and the request log (seq restarts at 1)."""
        self._call("POST", "/_mock/reset")

    def requests(self) -> list[dict]:
        """Every provider request received since the last reset, in arrival order."""
        return self._call("GET", "/_mock/requests")["requests"]

    def concurrency(self) -> dict:
        """Requests being answered at once, by key: {"in_flight": {key: n}, "max_in_flight": {key: n},
        "total": n, "max_total": n}. A request counts from its arrival until its answer starts to go
        out, it is reset, or the gateway hangs up; the highest counts restart at each reset()."""
        return self._call("GET", "/_mock/concurrency")

    def limit(self, **config) -> None:
        """Enforces rate limits per key until the next reset(): `requests_per_minute`,
        `tokens_per_minute`, and `announce` (default true: answers say what the key has left in
        the provider's own headers)."""
        self._call("POST", "/_mock/limits", config)

    def limit_counts(self) -> dict:
        """{"admitted": n, "refused": n, ...}: requests the limits let through, and 429s they made."""
        return self._call("GET", "/_mock/limits")

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("GET", "/_mock/health", timeout=1) == "ok":
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mock {self.name} on port {self.port} not ready after {timeout}s")
            time.sleep(0.05)


def start_mock(binary: str, port: int, name: str, timeout: float = 10) -> tuple[subprocess.Popen, MockProvider]:
    """Starts the mock and waits for its "listening" line. Port 0 picks a free port (read back from
    that line). stderr is inherited so bind errors show up in the test output."""
    proc = subprocess.Popen([str(binary), "--port", str(port), "--name", name],
                            stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # gives readline() a timeout, and keeps draining stdout afterwards
        for out in proc.stdout:
            lines.put(out)
        lines.put("")  # EOF: the process died

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    m = _LISTENING.match(line)
    if not m:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mock-provider {name} on port {port} did not start "
                           f"(exit code {proc.returncode}, first line {line!r})")
    mock = MockProvider(int(m.group(3)), name)
    mock.wait_ready(timeout)
    return proc, mock


def stop_mock(proc: subprocess.Popen) -> None:
    stop_process(proc)
