"""Consumers named by a trusted header with no list: bounded by `consumers.max_from_header`, across
workers and configuration reloads; past the bound, names are counted as the one consumer
`_overflow`, logged once per worker; all of them in the status endpoint with their usage."""
from __future__ import annotations

import re

from conftest import KEYS, STATUS, STATUS_PATH, openai_provider, status
from harness import FileConfigGateway, chat, free_port, gateway_config, request, set_plugin

OVERFLOW = "_overflow"
WARNING = "distinct consumer names (consumers.max_from_header)"


def consumers_in_stats(gw) -> dict[str, int]:
    """Consumer name -> how many metric series Envoy has for it."""
    out: dict[str, int] = {}
    for name in gw.stats():
        m = re.match(r"wasmcustom\.tollgate\.consumer\.(.+?)\.(model|limit)\.", name)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def send(gw, names: list[str], times: int = 1) -> None:
    for _ in range(times):
        for n in names:
            r = chat(gw.port, key=None, headers={"x-team": n})
            assert r.status == 200, (n, r)


def test_header_named_consumers_are_bounded_across_workers_and_reloads(mocks, tmp_path):
    plugin = {"consumers": {"trusted_header": "x-team", "max_from_header": 5},
              "default_limits": [{"metric": "requests", "amount": 1000, "window": "1d"}],
              "providers": [openai_provider(n=1)], "status": STATUS}
    cfg = gateway_config(plugin, [{"provider": "openai", "port": mocks["openai"].port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp_path / "access.log"), env_keys=sorted(KEYS))
    gw = FileConfigGateway(cfg, env=KEYS, concurrency=2)
    gw.start()
    try:
        names = [f"team-{i:02d}" for i in range(12)]
        # One connection per request: the two workers share the requests, and the set of names.
        send(gw, names, times=2)
        own = names[:5]
        series = consumers_in_stats(gw)
        assert sorted(series) == sorted(own + [OVERFLOW]), series
        assert len(set(series.values())) == 1, f"as many series for each consumer: {series}"
        per_consumer = series[OVERFLOW]
        st = status(gw)["consumers"]
        assert {c: v["usage"]["requests"] for c, v in st.items()} == {**{n: 2 for n in own}, OVERFLOW: 14}, st
        assert st["team-03"]["limits"][0]["remaining"] == 1000 - 2, "budgets like any consumer's"
        # A name past the bound sees the overflow's standing as its own.
        r = request(gw.port, "GET", STATUS_PATH, headers={"x-team": "team-09"})
        assert r.status == 200 and r.json()["consumer"] == OVERFLOW, r
        assert r.json()["standing"]["usage"]["requests"] == 14, r
        warned = gw.wait_log(WARNING).count(WARNING)
        assert 1 <= warned <= 2, f"logged once per worker at most, not per request: {warned}"
        assert KEYS["OPENAI_KEY_1"] not in gw.log()

        # Reloaded (a new configuration in every worker): the set in shared data holds.
        plugin["default_limits"][0]["amount"] = 2000
        set_plugin(cfg, plugin)
        gw.write()
        gw.applied()
        send(gw, ["team-00", "team-12", "team-13", "team-14"])
        series = consumers_in_stats(gw)
        assert sorted(series) == sorted(own + [OVERFLOW]), series
        assert set(series.values()) == {per_consumer}, series
        st = status(gw)["consumers"]
        assert (st["team-00"]["usage"]["requests"], st[OVERFLOW]["usage"]["requests"]) == (3, 17), st

        # A larger bound: the set grows on from where it was, and only by as much.
        plugin["consumers"]["max_from_header"] = 7
        set_plugin(cfg, plugin)
        gw.write()
        gw.applied()
        send(gw, ["team-15", "team-16", "team-17", "team-01"])
        st = status(gw)["consumers"]
        assert sorted(st) == sorted(own + ["team-15", "team-16", OVERFLOW]), sorted(st)
        assert st[OVERFLOW]["usage"]["requests"] == 18 and st["team-16"]["usage"]["requests"] == 1, st
        assert sorted(consumers_in_stats(gw)) == sorted(st)
        assert gw.log().count(WARNING) <= 2 * 3, "at most once per worker and configuration"
        assert "panicked" not in gw.log()
    finally:
        gw.stop()
