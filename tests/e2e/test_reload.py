"""Configuration changes while traffic flows: what survives a new listener config (same vm_id), and a
new VM."""
from __future__ import annotations

import json
import os
from pathlib import Path
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from conftest import KEYS, STATUS, openai_provider, status
from harness import Envoy, chat, free_port, gateway_config



def lds_envoy(plugin: dict, mocks, tmp_path) -> tuple[Envoy, dict, "Path"]:
    cfg = gateway_config(plugin, [{"provider": "openai", "port": mocks["openai"].port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp_path / "access.log"), env_keys=sorted(KEYS))
    listener = cfg["static_resources"].pop("listeners")[0]
    lds = tmp_path / "lds.json"
    write_lds(lds, listener)
    cfg["dynamic_resources"] = {"lds_config": {"path_config_source": {"path": str(lds)}, "resource_api_version": "V3"}}
    cfg["node"] = {"id": "tollgate-test", "cluster": "tollgate-test"}
    e = Envoy(cfg, env=KEYS)
    e.port = listener["address"]["socket_address"]["port_value"]
    e.access_log_path = tmp_path / "access.log"
    return e, listener, lds


def write_lds(path, listener: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}]}))
    os.replace(tmp, path)  # Envoy watches for a move onto the path


def set_plugin(listener: dict, plugin: dict) -> None:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin)


def test_counts_quota_and_cooldowns_survive_a_listener_config_change_under_traffic(mocks, tmp_path):
    plugin = {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY",
                                      "limits": [{"metric": "requests", "amount": 100000, "window": "1h"}]}]},
              "providers": [openai_provider()], "status": STATUS}
    gw, listener, lds = lds_envoy(plugin, mocks, tmp_path)
    gw.start()
    try:
        mocks["openai"].script({"key": KEYS["OPENAI_KEY_3"], "status": 429, "headers": {"retry-after": "600"}, "times": 1})
        for _ in range(30):
            assert chat(gw.port, key=KEYS["TEAM_A_KEY"]).status == 200
        before = status(gw)
        assert before["consumers"]["team-a"]["usage"]["requests"] == 30
        assert before["providers"]["openai"]["keys"][2]["state"] == "rate_limited"

        # A new plugin configuration (one more consumer) while requests keep flowing.
        plugin2 = json.loads(json.dumps(plugin))
        plugin2["consumers"]["list"].append({"name": "team-b", "key_env": "TEAM_B_KEY"})
        set_plugin(listener, plugin2)
        statuses: list[int] = []

        def traffic():
            deadline = time.time() + 4
            while time.time() < deadline:
                statuses.append(chat(gw.port, key=KEYS["TEAM_A_KEY"]).status)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(traffic) for _ in range(2)]
            time.sleep(0.5)
            write_lds(lds, listener)
            for f in futures:
                f.result()
        deadline = time.time() + 10
        while gw.stat("listener_manager.lds.update_success") < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert gw.stat("listener_manager.lds.update_success") >= 2, "the new listener config was not applied"
        assert chat(gw.port, key=KEYS["TEAM_B_KEY"]).status == 200, "the new config is in force"
        assert statuses and set(statuses) == {200}, f"requests failed during the change: {set(statuses)}"

        after = status(gw)
        # Same vm_id: totals, the quota window and the key's cooldown carried over.
        assert after["consumers"]["team-a"]["usage"]["requests"] == 30 + len(statuses)
        # (the bucket refills ~28 requests a second meanwhile; a reset window would show ~100000)
        assert after["consumers"]["team-a"]["limits"][0]["remaining"] <= 100000 - 30 - len(statuses) + 300
        assert after["providers"]["openai"]["keys"][2]["state"] == "rate_limited"
        assert sum(1 for r in mocks["openai"].requests() if r["key"] == KEYS["OPENAI_KEY_3"]) == 1
        assert "panicked" not in gw.log()
    finally:
        gw.stop()


def test_a_key_disabled_and_enabled_in_the_files_changes_the_rotation_without_a_restart(mocks, tmp_path):
    from harness import FileConfigGateway, set_plugin
    plugin = {"providers": [openai_provider(n=2)], "status": STATUS}
    cfg = gateway_config(plugin, [{"provider": "openai", "port": mocks["openai"].port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp_path / "access.log"), env_keys=sorted(KEYS))
    gw = FileConfigGateway(cfg, env=KEYS)
    gw.start()
    try:
        def served_by(n: int) -> set[str]:
            before = len(mocks["openai"].requests())
            for _ in range(n):
                assert chat(gw.port).status == 200
            return {r["key"] for r in mocks["openai"].requests()[before:]}

        assert served_by(8) == {KEYS["OPENAI_KEY_1"], KEYS["OPENAI_KEY_2"]}
        mocks["openai"].script({"key": KEYS["OPENAI_KEY_2"], "status": 429, "headers": {"retry-after": "600"}, "times": 1})
        served_by(4)
        plugin["providers"][0]["keys"][0]["disabled"] = True
        set_plugin(cfg, plugin)
        gw.write()
        gw.applied()
        # oa-1 disabled, oa-2 cooling: nothing is left, and the answer says when to come back.
        r = chat(gw.port)
        assert r.status == 429 and int(r.headers["retry-after"]) > 60, r
        st = status(gw)["providers"]["openai"]["keys"]
        assert [k["state"] for k in st] == ["disabled_in_config", "rate_limited"], st

        plugin["providers"][0]["keys"][0]["disabled"] = False
        plugin["providers"][0]["keys"].append({"id": "oa-3", "env": "OPENAI_KEY_3"})
        set_plugin(cfg, plugin)
        gw.write()
        gw.applied()
        # oa-2 keeps its cooldown across the change; oa-1 is back and the new oa-3 takes traffic.
        assert served_by(8) == {KEYS["OPENAI_KEY_1"], KEYS["OPENAI_KEY_3"]}
        assert status(gw)["providers"]["openai"]["keys"][1]["state"] == "rate_limited"
        assert "panicked" not in gw.log()
    finally:
        gw.stop()


def ecds_envoy(plugin: dict, mocks, tmp_path) -> tuple[Envoy, Callable[[int], None]]:
    """A gateway whose listener role comes from a file by ECDS (as Istio's WasmPlugin delivers a
    module), and a function that writes generation `n` of it: its `vm_config` differs from every
    other generation's, so each new one starts a new VM, and the VM of the one before ends when the
    last stream that began on it ends (ECDS swaps the filter without draining the listener)."""
    cfg = gateway_config(plugin, [{"provider": "openai", "port": mocks["openai"].port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp_path / "access.log"), env_keys=sorted(KEYS))
    cfg["node"] = {"id": "tollgate-test", "cluster": "tollgate-test"}
    filters = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    listener_role = filters[0]["typed_config"]
    path = tmp_path / "ecds.json"

    def write(generation: int) -> None:
        role = json.loads(json.dumps(listener_role))
        role["config"]["vm_config"]["configuration"] = {
            "@type": "type.googleapis.com/google.protobuf.StringValue", "value": f"generation {generation}"}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", "name": "tollgate", "typed_config": role}]}))
        os.replace(tmp, path)

    write(0)
    filters[0] = {"name": "tollgate", "config_discovery": {
        "config_source": {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"},
        "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]}}
    e = Envoy(cfg, env=KEYS)
    e.access_log_path = tmp_path / "access.log"
    return e, write


def test_totals_stay_exact_through_reloads_that_replace_the_vm_under_traffic(mocks, tmp_path):
    """Each worker tallies usage for a tick before writing it to shared data. A VM that ends with
    its plugin (a new module or vm_config) must write what it tallied as it ends: the charges of
    the last requests it served, in flight when the reload came or finished just before."""
    plugin = {"consumers": {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY"}, {"name": "team-b", "key_env": "TEAM_B_KEY"}]},
              "providers": [openai_provider()], "status": STATUS}
    gw, write = ecds_envoy(plugin, mocks, tmp_path)
    gw.start()
    try:
        vms_before = gw.stat("wasm.envoy.wasm.runtime.v8.created")
        stop = threading.Event()
        failures: list[str] = []
        served: list[int] = []

        def client(n: int) -> None:
            i = n
            while not stop.is_set():
                key = KEYS["TEAM_A_KEY"] if i % 3 else KEYS["TEAM_B_KEY"]
                # Streams (some asking for usage, some not) and JSON, prompts of several lengths.
                extra = {"stream_options": {"include_usage": True}} if i % 4 == 0 else {}
                r = chat(gw.port, key=key, stream=i % 2 == 0, content="word " * (i % 9 + 1), extra=extra)
                if r.status != 200:
                    failures.append(f"{r.status} {r.body[:200]!r}")
                served.append(r.status)
                i += 4

        reloads = 4
        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, n) for n in range(4)]
            for generation in range(1, reloads + 1):
                time.sleep(0.7)
                write(generation)
                deadline = time.time() + 10
                while gw.stat("extension_config_discovery.http_filter.tollgate.config_reload") <= generation:
                    assert time.time() < deadline, "the new filter configuration was not applied"
                    time.sleep(0.05)
            time.sleep(0.7)
            stop.set()
            for c in clients:
                c.result()
        assert not failures, failures[:5]
        # Every reload started new VMs (one per worker), and the old ones ended.
        assert gw.stat("wasm.envoy.wasm.runtime.v8.created") >= vms_before + reloads * 2

        truth = {"requests": 0, "input": 0, "output": 0}
        for r in mocks["openai"].requests():
            assert r["usage"], r
            truth["requests"] += 1
            truth["input"] += r["usage"]["input"]
            truth["output"] += r["usage"]["output"]
        assert truth["requests"] == len(served) > 100
        st = status(gw)
        a, b = st["consumers"]["team-a"]["usage"], st["consumers"]["team-b"]["usage"]
        assert (a["requests"] + b["requests"], a["input_tokens"] + b["input_tokens"], a["output_tokens"] + b["output_tokens"]) == \
            (truth["requests"], truth["input"], truth["output"])
        assert a["estimated_requests"] + b["estimated_requests"] == 0
        keys = st["providers"]["openai"]["keys"]
        assert sum(k["usage"]["requests"] for k in keys) == truth["requests"]
        assert sum(k["usage"]["output_tokens"] for k in keys) == truth["output"]
        assert "panicked" not in gw.log()
    finally:
        gw.stop()
