"""Secrets: no provider key and no consumer key shows up anywhere a client or an operator looks.

One gateway at log level debug, with consumers (key_env) and two providers, serves traffic that
produces successes (JSON, SSE, Anthropic Messages), 401, 400, 413, 429 (quota), an upstream 429 with
failover, and a 5xx. Then every value of conftest.KEYS is searched for in what that produced; each
place is its own test, so a leak names where it is. The only place a provider key may appear is the
request the mock provider received (checked, so the search is known to be able to find one).

Every test runs twice: with the provider keys in environment variables (`env`), and as secrets
Envoy keeps and injects itself (`sds`, the same values in key files that SDS resources name).
"""
from __future__ import annotations

import json
import re
import time

import pytest

from conftest import KEYS, STATUS, STATUS_PATH, anthropic_provider, openai_provider
from harness import ROOT, Envoy, chat, free_port, gateway_config, request, sds_from_env

TEAM_A, TEAM_B = KEYS["TEAM_A_KEY"], KEYS["TEAM_B_KEY"]
# What clients present: consumer keys and the status endpoint's admin key.
CONSUMER_KEYS = {k: v for k, v in KEYS.items() if k.startswith("TEAM_") or k == "STATUS_ADMIN_KEY"}
# An extra access log that prints the credential headers Envoy still holds for the request when it
# logs: tollgate removes them, so these must print "-".
HEADER_LOG_FORMAT = "auth=%REQ(AUTHORIZATION)% xkey=%REQ(X-API-KEY)% apikey=%REQ(API-KEY)% status=%RESPONSE_CODE%\n"


def leaks(text: str, secrets: dict[str, str] = KEYS) -> list[str]:
    """`NAME at offset: ...excerpt...` for every secret value found in `text`."""
    out = []
    for name, value in secrets.items():
        i = text.find(value)
        while i >= 0:
            out.append(f"{name} at {i}: ...{text[max(0, i - 160):i + len(value) + 40]!r}...")
            i = text.find(value, i + 1)
    return out


def plugin() -> dict:
    return {
        "consumers": {"list": [
            {"name": "team-a", "key_env": "TEAM_A_KEY"},
            {"name": "team-b", "key_env": "TEAM_B_KEY", "limits": [{"metric": "requests", "amount": 1, "window": "1h"}]},
        ]},
        "providers": [openai_provider(), anthropic_provider(n=2)],
        "status": STATUS,
        "max_request_bytes": 4096,
    }


def traffic(port: int, mocks) -> list[tuple[str, object]]:
    a, b = mocks["openai"], mocks["anthropic"]
    msgs = {"model": "claude-haiku-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    out = [
        ("ok_json", chat(port, key=TEAM_A)),
        ("ok_sse", chat(port, key=TEAM_A, stream=True)),
        ("ok_messages", request(port, "POST", "/v1/messages", msgs, {"x-api-key": TEAM_A})),
        ("401_unknown", chat(port, key="tg-not-a-consumer")),
        # A client presenting a real provider key as its consumer key: refused, and not echoed.
        ("401_provider_key", chat(port, key=KEYS["OPENAI_KEY_2"])),
        ("401_basic", request(port, "POST", "/v1/chat/completions", {"model": "m", "messages": []},
                              {"authorization": f"Basic {TEAM_A}"})),
        ("401_messages", request(port, "POST", "/v1/messages", msgs, {"x-api-key": KEYS["ANTHROPIC_KEY_1"]})),
        ("400_json", request(port, "POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": [',
                             {"authorization": f"Bearer {TEAM_A}"})),
        ("413", chat(port, key=TEAM_A, content="x" * 5000)),
        ("ok_quota", chat(port, key=TEAM_B)),
        ("429_quota", chat(port, key=TEAM_B)),
    ]
    a.script({"status": 429, "headers": {"retry-after": "30"}, "times": 2})
    out += [
        ("failover_json", chat(port, key=TEAM_A)),
        ("failover_sse", chat(port, key=TEAM_A, stream=True)),
        ("status", request(port, "GET", STATUS_PATH, headers={"authorization": f"Bearer {KEYS['STATUS_ADMIN_KEY']}"})),
    ]
    a.script({"status": 500, "times": 4})
    b.script({"status": 500, "times": 4})
    out.append(("5xx", chat(port, key=TEAM_A)))
    return out


EXPECTED = {"ok_json": 200, "ok_sse": 200, "ok_messages": 200, "401_unknown": 401, "401_provider_key": 401,
            "401_basic": 401, "401_messages": 401, "400_json": 400, "413": 413, "ok_quota": 200, "429_quota": 429,
            "failover_json": 200, "failover_sse": 200, "status": 200,
            # Each key that answered 500 rests (health.server_error_cooldown_s): the last attempt finds
            # no key left and gets the gateway's 503 with Retry-After, not a provider's 500.
            "5xx": 503}


@pytest.fixture(scope="module", params=["env", "sds"])
def run(request, mocks, tmp_path_factory):
    for m in mocks.values():
        m.reset()
    tmp = tmp_path_factory.mktemp("secrets")
    endpoints = [{"provider": "openai", "port": mocks["openai"].port, "priority": 0},
                 {"provider": "anthropic", "port": mocks["anthropic"].port, "priority": 1}]
    sds = request.param == "sds"
    p = sds_from_env(plugin(), KEYS, tmp / "sds") if sds else plugin()
    cfg = gateway_config(p, endpoints, listener_port=free_port(), admin_port=free_port(),
                         access_log=str(tmp / "access.log"), env_keys=sorted(KEYS),
                         secrets_dir=tmp / "sds" if sds else None)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"].append({
        "name": "envoy.access_loggers.file",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                         "path": str(tmp / "headers.log"),
                         "log_format": {"text_format_source": {"inline_string": HEADER_LOG_FORMAT}}},
    })
    gw = Envoy(cfg, env=KEYS, log_level="debug")
    gw.access_log_path = tmp / "access.log"
    gw.start()
    try:
        responses = traffic(gw.port, mocks)
        if sds:
            # What tollgate shows of an sds key: its source and the secret's name.
            keys = json.loads(dict(responses)["status"].body)["providers"]["openai"]["keys"]
            assert [(k["source"], k["secret_name"]) for k in keys] == [("sds", f"openai-key-{i}") for i in (1, 2, 3)]
        art = {"responses": responses, "mock": {n: m.requests() for n, m in mocks.items()}}
        art["access_log"] = "\n".join(gw.access_log(at_least=len(responses)))
        time.sleep(0.3)
        for path in ("/stats", "/stats/prometheus", "/config_dump", "/config_dump?include_eds", "/clusters"):
            art[path] = gw.admin(path)
    finally:
        gw.stop()
    art["log"] = gw.log()
    art["header_log"] = (tmp / "headers.log").read_text() if (tmp / "headers.log").exists() else ""
    for m in mocks.values():
        m.reset()
    return art


def test_the_traffic_produced_every_kind_of_answer(run):
    got = {label: r.status for label, r in run["responses"]}
    assert got == EXPECTED, got
    r = dict(run["responses"])
    assert r["failover_json"].headers["x-tollgate-provider"] == "anthropic"
    assert r["failover_sse"].headers["x-tollgate-provider"] == "anthropic"
    assert r["429_quota"].json()["error"]["code"] == "rate_limit_exceeded"
    assert r["401_messages"].json()["error"]["type"] == "authentication_error"


def test_provider_keys_reach_the_provider_and_consumer_keys_do_not(run):
    sent = json.dumps(run["mock"])
    for name in ("OPENAI_KEY_1", "OPENAI_KEY_2", "OPENAI_KEY_3", "ANTHROPIC_KEY_1", "ANTHROPIC_KEY_2"):
        assert KEYS[name] in sent, f"{name} never reached the provider: the search could not find a leak"
    assert leaks(sent, CONSUMER_KEYS) == [], "a client's own credential reached the provider"


def test_no_secret_in_response_headers_or_bodies(run):
    found = []
    for label, r in run["responses"]:
        found += [f"{label} headers: {x}" for x in leaks(json.dumps(r.headers))]
        found += [f"{label} body: {x}" for x in leaks(r.body.decode(errors="replace"))]
    assert found == [], "\n".join(found)


def test_no_secret_in_tollgate_log_lines(run):
    lines = [l for l in run["log"].splitlines() if "wasm log" in l]
    assert any("tollgate: charged consumer=team-a" in l for l in lines), "debug lines of tollgate are there"
    found = leaks("\n".join(lines))
    assert found == [], "\n".join(found[:10])


def log_records(log: str) -> list[str]:
    return re.split(r"\n(?=\[\d{4}-\d\d-\d\d )", log)


# Envoy's http connection manager dumps, at debug level, the request headers exactly as the client
# sent them, before any filter runs: whatever credential the client presented is in that record.
CLIENT_HEADER_DUMP = "request headers complete"


def test_no_secret_in_envoy_debug_log_beyond_what_clients_sent(run):
    """Every record but Envoy's dump of the client's own request headers: the pool keys tollgate
    injects, and any credential after tollgate handled it, never appear."""
    records = [r for r in log_records(run["log"]) if CLIENT_HEADER_DUMP not in r]
    assert len(records) > 500 and any("[debug]" in r for r in records)
    found = leaks("\n".join(records))
    assert found == [], "\n".join(found[:10])


@pytest.mark.parametrize("path", ["/stats", "/stats/prometheus", "/clusters"])
def test_no_secret_in_admin_stats(run, path):
    text = run[path]
    assert "tollgate" in text or path == "/clusters"
    found = leaks(text)
    assert found == [], "\n".join(found[:10])


@pytest.mark.parametrize("path", ["/config_dump", "/config_dump?include_eds"])
def test_config_dump_shows_env_names_not_values(run, path):
    text = run[path]
    for name in KEYS:
        assert name in text, f"{name} (the env var name) is not in {path}"
    found = leaks(text)
    assert found == [], "\n".join(found[:10])


def test_no_secret_in_the_access_log(run):
    lines = run["access_log"].splitlines()
    assert len(lines) >= len(run["responses"]) and "consumer=team-a" in run["access_log"]
    found = leaks(run["access_log"])
    assert found == [], "\n".join(found[:10])


def header_log_lines(run, rejected_auth: bool) -> list[str]:
    lines = run["header_log"].splitlines()
    assert len(lines) >= len(run["responses"]), lines
    return [l for l in lines if l.endswith("status=401") == rejected_auth]


def test_pool_keys_in_access_logs_only_where_an_operator_asks_for_credential_headers(run):
    """The key is written into the request headers Envoy keeps for the stream (as Envoy's own
    credential_injector does), and Envoy gives a Wasm filter no way to take it out once the attempt
    has left. So an access log that prints `%REQ(AUTHORIZATION)%` shows it (README, Secrets), and
    no shipped config prints credential headers."""
    lines = header_log_lines(run, rejected_auth=False)
    assert any(leaks(l) for l in lines), "expected: the documented limitation holds (else update the README)"
    for f in (ROOT / "envoy").glob("**/*.yaml"):
        text = f.read_text().upper()
        for h in ("%REQ(AUTHORIZATION)", "%REQ(X-API-KEY)", "%REQ(API-KEY)", "%REQUEST_HEADERS"):
            assert h not in text, f"{f.name} logs {h}"


def test_refused_client_credentials_are_not_readable_by_an_access_log(run):
    """A request refused with 401 keeps the credential the client sent in the header map the access
    log reads (the accepted ones have it removed)."""
    lines = header_log_lines(run, rejected_auth=True)
    assert len(lines) == 4, lines
    found = leaks("\n".join(lines))
    assert found == [], "\n".join(found[:10])


OPENAI_ECHO = "Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys."


@pytest.mark.parametrize("source,key,message,shown", [
    ("env", KEYS["OPENAI_KEY_1"], OPENAI_ECHO, "[key oa-1]"),
    # The VM never holds an sds key: it is recognised by its shape (src/pool/credentials.rs).
    ("sds", KEYS["OPENAI_KEY_1"], OPENAI_ECHO, "[redacted]"),
    ("sds", "9f2c4e7a1b3d5f60718293a4b5c6d7e8", "The api-key {key} is not valid for this resource.", "[redacted]"),
], ids=["env", "sds-prefixed", "sds-after-key-word"])
def test_provider_error_echoing_the_key_is_not_passed_to_the_client(gateway, mocks, tmp_path, source, key, message, shown):
    """Some providers quote the key they were sent in a 401 body. Without retries that body is the
    client's answer: it must not carry the pool key."""
    p = {"providers": [openai_provider(n=1)]}
    kw = {}
    if source == "sds":
        p = sds_from_env(p, {"OPENAI_KEY_1": key}, tmp_path / "sds")
        kw["secrets_dir"] = tmp_path / "sds"
    gw = gateway(p, num_retries=0, **kw)
    mocks["openai"].script({"status": 401, "body": json.dumps({"error": {
        "message": message.format(key=key),
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})})
    r = chat(gw.port)
    assert r.status == 401, r
    assert mocks["openai"].requests()[0]["key"] == key
    found = leaks(json.dumps(r.headers), {"key": key}) + leaks(r.body.decode(errors="replace"), {"key": key})
    assert found == [], "\n".join(found)
    assert r.json()["error"]["message"] == message.format(key=shown), r.json()


def test_an_sds_resource_holding_the_key_itself_shows_it_in_envoys_debug_log(gateway, mocks, tmp_path):
    """Why the shipped arrangement keeps each key in a file of its own that the SDS resource names:
    at debug level Envoy logs every resource a file subscription loads ("Filesystem config update
    accepted for <path>: <resource>"), and a `generic_secret` written inline in it is printed whole.
    That record is the only place it shows: the injected header itself is never logged."""
    p = sds_from_env({"providers": [openai_provider(n=1)]}, KEYS, tmp_path / "sds")
    key = KEYS["OPENAI_KEY_1"]
    sds_file = tmp_path / "sds" / "openai-key-1.json"
    resource = json.loads(sds_file.read_text())
    resource["resources"][0]["generic_secret"]["secret"] = {"inline_string": key}
    sds_file.write_text(json.dumps(resource))
    gw = gateway(p, secrets_dir=tmp_path / "sds", log_level="debug")
    assert chat(gw.port).status == 200
    assert mocks["openai"].requests()[0]["key"] == key
    records = log_records(gw.wait_log("tollgate: charged"))
    shown = [r for r in records if key in r]
    assert shown and all("Filesystem config update accepted for " + str(sds_file) in r for r in shown), shown
