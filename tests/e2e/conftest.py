"""Fixtures: the Rust mock providers (one per test session) and real Envoy gateways per test."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import (ENVOY, MOCK_BIN, TICK_WAIT, WASM, Envoy, free_port, gateway_config, request,  # noqa: E402
                     set_plugin, shipped_config)
from mock_client import start_mock  # noqa: E402

# Known secret values: the secrets test searches everything a client or operator sees for them.
KEYS = {
    "OPENAI_KEY_1": "sk-oa1-SECRET-7f3a9c",
    "OPENAI_KEY_2": "sk-oa2-SECRET-1b8e4d",
    "OPENAI_KEY_3": "sk-oa3-SECRET-9c2f6a",
    "ANTHROPIC_KEY_1": "sk-ant1-SECRET-4d7b1e",
    "ANTHROPIC_KEY_2": "sk-ant2-SECRET-8a5c3f",
    "TEAM_A_KEY": "tg-team-a-SECRET-0e6d2b",
    "TEAM_B_KEY": "tg-team-b-SECRET-5f1a7c",
    "STATUS_ADMIN_KEY": "tg-admin-SECRET-3c9e1d",
    # The shipped demo configs read their status admin key from this variable.
    "TOLLGATE_ADMIN_KEY": "tg-demo-admin-SECRET-6b2d8e",
}

STATUS_PATH = "/tollgate/status"
# The plugin config's `status` section: the admin key (env) sees everything, a consumer its own standing.
STATUS = {"path": STATUS_PATH, "admin_key_env": "STATUS_ADMIN_KEY"}


def status_as(gw, key: str | None):
    """GET the status endpoint presenting `key` as a Bearer token (None: no credential). Usage
    totals reach shared data on each worker's tick: wait for it first."""
    time.sleep(TICK_WAIT)
    return request(gw.port, "GET", STATUS_PATH, headers={"authorization": f"Bearer {key}"} if key else None)


def status(gw) -> dict:
    """The status endpoint as the operator sees it (admin key)."""
    r = status_as(gw, KEYS["STATUS_ADMIN_KEY"])
    assert r.status == 200, r
    return r.json()


def openai_provider(name="openai", n=3, **extra):
    return {"name": name, "type": "openai",
            "keys": [{"id": f"oa-{i}", "env": f"OPENAI_KEY_{i}"} for i in range(1, n + 1)], **extra}


def anthropic_provider(name="anthropic", n=1, models=None, **extra):
    return {"name": name, "type": "anthropic",
            "keys": [{"id": f"an-{i}", "env": f"ANTHROPIC_KEY_{i}"} for i in range(1, n + 1)],
            "models": models if models is not None else {"gpt-4o-mini": "claude-haiku-4-5", "gpt-4o": "claude-sonnet-4-5"},
            **extra}


@pytest.fixture(scope="session", autouse=True)
def built():
    missing = [str(p) for p in (WASM, MOCK_BIN, ENVOY) if not p.exists()]
    if missing:
        pytest.exit(f"run the e2e tests through `make test` (missing: {', '.join(missing)})", returncode=2)


@pytest.fixture(scope="session")
def mocks():
    procs, clients = [], {}
    for name in ("openai", "anthropic"):
        proc, client = start_mock(str(MOCK_BIN), free_port(), name)
        procs.append(proc)
        clients[name] = client
    yield clients
    for p in procs:
        p.terminate()
        p.wait(5)


@pytest.fixture(autouse=True)
def _fresh_mocks(mocks):
    for m in mocks.values():
        m.reset()


class Gateways:
    """Starts real Envoy gateways in front of the mocks, and stops them all at the end."""

    def __init__(self, mocks, tmp: Path):
        self.mocks, self.tmp, self.started = mocks, tmp, []

    def start(self, plugin: dict, endpoints: list[dict] | None = None, env: dict | None = None,
              concurrency: int = 2, log_level: str = "info", **kw) -> Envoy:
        if endpoints is None:
            endpoints = [{"provider": p["name"], "port": self.mocks["openai" if p["type"] != "anthropic" else "anthropic"].port,
                          "priority": i} for i, p in enumerate(plugin["providers"])]
        access_log = self.tmp / f"access{len(self.started)}.log"
        for attempt in range(3):
            cfg = gateway_config(plugin, endpoints, listener_port=free_port(), admin_port=free_port(),
                                 access_log=str(access_log), env_keys=sorted(KEYS), **kw)
            e = Envoy(cfg, env={**KEYS, **(env or {})}, concurrency=concurrency, log_level=log_level)
            e.access_log_path = access_log
            self.started.append(e)
            try:
                return e.start()
            except RuntimeError as err:
                # free_port() cannot reserve a port: another process may take it before Envoy
                # binds it. Only that is retried, with new ports.
                if "Address already in use" not in str(err) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for e in self.started:
            e.stop()


@pytest.fixture
def gateway(mocks, tmp_path):
    g = Gateways(mocks, tmp_path)
    yield g.start
    g.stop()


@pytest.fixture(scope="module")
def module_gateway(mocks, tmp_path_factory):
    """Like `gateway`, for gateways a whole test module shares (cases that leave no state behind)."""
    g = Gateways(mocks, tmp_path_factory.mktemp("gateways"))
    yield g.start
    g.stop()



def start_shipped_demo(mocks, edit=None) -> Envoy:
    """envoy/demo.yaml (what `make run` starts) as shipped, on free ports, in front of the mocks;
    `edit(plugin)`, if given, changes tollgate's configuration (both roles) first."""
    ports = {10000: free_port(), 9901: free_port(), 18001: mocks["openai"].port, 18002: mocks["anthropic"].port}
    cfg = shipped_config("envoy/demo.yaml", ports)
    if edit:
        (listener,) = cfg["static_resources"]["listeners"]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (tollgate,) = [f for f in hcm["http_filters"] if f["name"] == "tollgate"]
        plugin = json.loads(tollgate["typed_config"]["config"]["configuration"]["value"])
        edit(plugin)
        set_plugin(cfg, plugin)
    return Envoy(cfg, env=KEYS).start()
