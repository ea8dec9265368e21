"""Keys change under steady traffic, by changing files only, with secrets Envoy keeps.

One real Envoy whose listeners and clusters come from files (FileConfigGateway) and whose provider
keys are `sds` keys: Envoy injects each key's secret (composite + credential_injector per secret,
the key in a file of its own, see harness.write_secret). While four client threads send requests
without pause:
- key A's secret is replaced (an atomic rename of its key file);
- key B is added (its secret file and the clusters' credential entry first, then the plugin config);
- key C is removed (the plugin config first, its credential entry afterwards);
- key D is disabled (`"disabled": true` in the plugin config);
- key E, which a scripted 429 put on a ten-minute cooldown before the changes, is not touched.
Then every request must have been answered 200, the provider must have seen each change in time,
the status endpoint's totals must be exact, and E must still be cooling.
"""
from __future__ import annotations

import threading
import time

from conftest import KEYS, STATUS, status
from harness import (Envoy, FileConfigGateway, chat, free_port, gateway_config, sds_keys, set_credentials, set_plugin,
                     write_secret)

A_OLD, A_NEW = "sk-rot-a-OLD-51c7e0", "sk-rot-a-NEW-9d24b8"
SECRET = {"b": "sk-rot-b-3f8a61", "c": "sk-rot-c-7be215", "d": "sk-rot-d-c40d9f", "e": "sk-rot-e-28e6b3"}
# A change must reach the provider within this many seconds.
WITHIN_S = 5
# An attempt that had already chosen a key when a change was applied still reaches the provider: the
# mock answers at once, so such attempts end well within this.
IN_FLIGHT_S = 1.0


def key(kid: str) -> dict:
    return {"id": kid, "sds": f"openai-{kid}"}


class Traffic:
    """Client threads sending chat requests back to back until stopped; every outcome is kept."""

    def __init__(self, port: int, threads: int = 4):
        self.port, self.stopping = port, threading.Event()
        self.sent = [0] * threads
        self.results: list[list[tuple[int, str]]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def run(self, i: int) -> None:
        while not self.stopping.is_set():
            self.sent[i] += 1
            try:
                r = chat(self.port)
                self.results[i].append((r.status, "" if r.status == 200 else repr(r)))
            except Exception as e:  # a reset or a timeout is a failed request, not a crash of the test
                self.results[i].append((0, repr(e)))

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)

    def outcomes(self) -> list[tuple[int, str]]:
        return [r for rs in self.results for r in rs]


def first_ms(requests: list[dict], secret: str) -> int | None:
    return next((r["time_ms"] for r in requests if r["key"] == secret), None)


def last_ms(requests: list[dict], secret: str) -> int:
    return max((r["time_ms"] for r in requests if r["key"] == secret), default=0)


def test_keys_replaced_added_removed_and_disabled_under_traffic_by_changing_files(mocks, tmp_path):
    mock = mocks["openai"]
    secrets_dir = tmp_path / "secrets"
    for kid, value in {"a": A_OLD, **{k: SECRET[k] for k in "cde"}}.items():
        write_secret(secrets_dir, f"openai-{kid}", value)
    plugin = {"providers": [{"name": "openai", "type": "openai", "keys": [key(k) for k in "acde"]}], "status": STATUS}
    cfg = gateway_config(plugin, [{"provider": "openai", "port": mock.port, "priority": 0}],
                         listener_port=free_port(), admin_port=free_port(), access_log=str(tmp_path / "access.log"),
                         env_keys=sorted(KEYS), secrets_dir=secrets_dir)
    gw = FileConfigGateway(cfg, env=KEYS)
    gw.start()
    try:
        gw.applied()

        def change_plugin(edit) -> float:
            """Applies `edit` to the plugin config in both roles; returns when Envoy has it."""
            edit(plugin["providers"][0]["keys"])
            set_plugin(cfg, plugin)
            gw.write()
            gw.applied()
            return time.time()

        def change_credentials(secrets: dict[str, str]) -> None:
            set_credentials(cfg, secrets, secrets_dir)
            gw.write()
            gw.applied()

        # E answers 429 once, with a reset ten minutes away: it cools down before anything changes.
        mock.script({"key": SECRET["e"], "status": 429, "headers": {"retry-after": "600"}, "times": 1})
        before = 0
        while not any(r["key"] == SECRET["e"] for r in mock.requests()):
            assert chat(gw.port).status == 200
            before += 1
            assert before < 20, "the rotation never reached key E"
        keys = {k["id"]: k for k in status(gw)["providers"]["openai"]["keys"]}
        assert keys["e"]["state"] == "rate_limited", keys
        assert {k["source"] for k in keys.values()} == {"sds"}

        with Traffic(gw.port) as traffic:
            time.sleep(1.5)
            # A: the key file replaced, nothing else.
            t_a = time.time()
            write_secret(secrets_dir, "openai-a", A_NEW)
            time.sleep(2)
            # B: the secret and the clusters' credential entry, then the plugin config.
            write_secret(secrets_dir, "openai-b", SECRET["b"])
            change_credentials(sds_keys(plugin) | {"openai-b": "openai"})
            t_b = time.time()
            change_plugin(lambda ks: ks.append(key("b")))
            time.sleep(2)
            # C: out of the plugin config, then its credential entry.
            t_c = change_plugin(lambda ks: ks.remove(next(k for k in ks if k["id"] == "c")))
            time.sleep(1)
            change_credentials(sds_keys(plugin))
            time.sleep(1)
            # D: disabled in the plugin config.
            t_d = change_plugin(lambda ks: next(k for k in ks if k["id"] == "d").update(disabled=True))
            time.sleep(2)
        outcomes = traffic.outcomes()
        seen = mock.requests()

        # Zero failed or lost requests: every request a client thread sent was answered 200.
        failed = [o for o in outcomes if o[0] != 200]
        assert failed == [], f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
        assert len(outcomes) == sum(traffic.sent) > 200, (len(outcomes), traffic.sent)

        ms = lambda t: int(t * 1000)  # noqa: E731
        # A: the new secret within 5 s of the file's replacement, the old one not after it but for
        # attempts in flight (each worker gets the new secret from the main thread: one worker's
        # first new-secret attempt was seen 1 ms before the other's last old-secret one).
        a_new = first_ms(seen, A_NEW)
        assert a_new is not None and a_new - ms(t_a) <= WITHIN_S * 1000, (a_new, ms(t_a))
        assert last_ms(seen, A_OLD) <= a_new + IN_FLIGHT_S * 1000, "the replaced secret was still sent"
        # B: within 5 s of the plugin config naming it.
        b_first = first_ms(seen, SECRET["b"])
        assert b_first is not None and b_first - ms(t_b) <= WITHIN_S * 1000, (b_first, ms(t_b))
        # C: only attempts already in flight when the change was applied.
        assert 0 < last_ms(seen, SECRET["c"]) <= ms(t_c + IN_FLIGHT_S), (last_ms(seen, SECRET["c"]), ms(t_c))
        # D: likewise.
        assert 0 < last_ms(seen, SECRET["d"]) <= ms(t_d + IN_FLIGHT_S), (last_ms(seen, SECRET["d"]), ms(t_d))
        # E: the one scripted 429, nothing since; and it is still cooling down.
        assert [r["status"] for r in seen if r["key"] == SECRET["e"]] == [429]
        # Every attempt carried a secret Envoy injected, and none of tollgate's internal headers.
        known = {A_OLD, A_NEW, *SECRET.values()}
        assert {r["key"] for r in seen} <= known, {r["key"] for r in seen} - known
        leaked = [r["headers"] for r in seen if any(h.startswith("x-tollgate-") for h in r["headers"])]
        assert leaked == [], leaked[:3]

        st = status(gw)
        keys = {k["id"]: k for k in st["providers"]["openai"]["keys"]}
        assert sorted(keys) == ["a", "b", "d", "e"]
        assert keys["e"]["state"] == "rate_limited" and keys["d"]["state"] == "disabled_in_config", keys
        # Totals exact: every request counted once, and the tokens the provider reported.
        usage = st["consumers"]["anonymous"]["usage"]
        answered = [r for r in seen if r["status"] == 200]
        assert usage["requests"] == before + len(outcomes) == len(answered)
        assert usage["input_tokens"] == sum(r["usage"]["input"] for r in answered)
        assert usage["output_tokens"] == sum(r["usage"]["output"] for r in answered)
        assert "panicked" not in gw.log()
    finally:
        gw.stop()


def sds_gateway(plugin: dict, endpoints: list[dict], tmp_path, values: dict[str, str], entries=None) -> Envoy:
    """A gateway whose sds keys' secrets are `values` (secret name -> key); Envoy's credential entries
    are those of `entries` (default: every sds key of the plugin)."""
    secrets_dir = tmp_path / "secrets"
    for name, value in values.items():
        write_secret(secrets_dir, name, value)
    cfg = gateway_config(plugin, endpoints, listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp_path / "access.log"), env_keys=sorted(KEYS), secrets_dir=secrets_dir)
    if entries is not None:
        set_credentials(cfg, {n: t for n, t in sds_keys(plugin).items() if n in entries}, secrets_dir)
    gw = Envoy(cfg, env=KEYS)
    gw.access_log_path = tmp_path / "access.log"
    return gw.start()


def test_a_refused_sds_key_is_retried_on_the_next_one(mocks, tmp_path):
    """A 429 on one sds key is retried on the next; a key whose secret Envoy has no entry for goes out
    without a credential, is refused, retried on another key and named in a warning. (No credential
    is left in the shared header map after such an attempt: the retry is told by the attempt count.)"""
    oa = mocks["openai"]
    values = {"openai-o1": "sk-typ-o1-0a7c2e", "openai-o2": "sk-typ-o2-5d1b9f"}
    plugin = {"providers": [{"name": "openai", "type": "openai", "keys": [
        {"id": "o1", "sds": "openai-o1"}, {"id": "o2", "sds": "openai-o2"}, {"id": "o3", "sds": "openai-o3"}]}],
        "status": STATUS}
    gw = sds_gateway(plugin, [{"provider": "openai", "port": oa.port, "priority": 0}], tmp_path, values,
                     entries={"openai-o1", "openai-o2"})
    try:
        oa.script({"key": values["openai-o1"], "status": 429, "headers": {"retry-after": "600"}, "times": 1})
        for _ in range(30):
            r = chat(gw.port)
            assert r.status == 200, r
            sent = [q["key"] for q in oa.requests()]
            if values["openai-o1"] in sent and None in sent:
                break
        by_request: dict[str, list[tuple]] = {}
        for q in oa.requests():
            by_request.setdefault(q["headers"]["x-request-id"], []).append((q["key"], q["status"]))
        # The 429 on o1 and the refusal of o3 happened once each, and were retried (never on a key
        # the request had tried) until a key served it.
        flat = [a for attempts in by_request.values() for a in attempts]
        assert flat.count((values["openai-o1"], 429)) == 1 and flat.count((None, 401)) == 1, by_request
        for attempts in by_request.values():
            assert attempts[-1][1] == 200 and len(set(attempts)) == len(attempts), attempts
        assert sum(len(a) > 1 for a in by_request.values()) >= 1
        assert gw.stat("wasmcustom.tollgate.provider.openai.retried_attempts") >= 2
        log = gw.wait_log("SDS secret 'openai-o3'")
        assert "key openai/o3 takes its secret from Envoy's SDS secret 'openai-o3'" in log, log[-2000:]
        keys = {k["id"]: k["state"] for k in status(gw)["providers"]["openai"]["keys"]}
        assert keys == {"o1": "rate_limited", "o2": "healthy", "o3": "disabled"}, keys
        assert "panicked" not in gw.log()
    finally:
        gw.stop()


def test_envoy_writes_each_provider_types_header_and_a_failover_takes_the_last_ones_away(mocks, tmp_path):
    """Anthropic (x-api-key, with tollgate's anthropic-version) answers 429; the retry goes to Azure
    (api-key), which must not receive Anthropic's key that Envoy injected into the shared map."""
    an, oa = mocks["anthropic"], mocks["openai"]
    values = {"anthropic-1": "sk-ant-typ-an1-e3f6", "azure-1": "typ0az1d8b4c7f2e9a6"}
    plugin = {"providers": [
        {"name": "anthropic", "type": "anthropic", "models": {"gpt-4o-mini": "claude-haiku-4-5"},
         "keys": [{"id": "an-1", "sds": "anthropic-1"}]},
        {"name": "az", "type": "azure_openai", "api_version": "2024-10-21", "models": {"gpt-4o-mini": "my-deployment"},
         "keys": [{"id": "az-1", "sds": "azure-1"}]}]}
    gw = sds_gateway(plugin, [{"provider": "anthropic", "port": an.port, "priority": 0},
                              {"provider": "az", "port": oa.port, "priority": 1}], tmp_path, values)
    try:
        r = chat(gw.port)
        assert r.status == 200 and r.headers["x-tollgate-key-id"] == "an-1", r
        h = an.requests()[-1]["headers"]
        assert (h["x-api-key"], h["anthropic-version"]) == (values["anthropic-1"], "2023-06-01"), h
        assert "authorization" not in h and not any(k.startswith("x-tollgate-") for k in h), h

        an.script({"status": 429, "headers": {"retry-after": "600"}, "times": 1})
        r = chat(gw.port)
        assert r.status == 200 and r.headers["x-tollgate-key-id"] == "az-1", r
        q = oa.requests()[-1]
        assert q["path"].startswith("/openai/deployments/my-deployment/"), q["path"]
        assert q["headers"]["api-key"] == values["azure-1"], q["headers"]
        assert not {"x-api-key", "authorization"} & set(q["headers"]), q["headers"]
        assert not any(k.startswith("x-tollgate-") for k in q["headers"]), q["headers"]
    finally:
        gw.stop()
