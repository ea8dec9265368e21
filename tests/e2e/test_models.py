"""Model aliases, per-consumer model allow-lists, the gateway's own model list, and the paths tollgate
does not count: through a real Envoy, with the official OpenAI and Anthropic SDKs as clients."""
from __future__ import annotations

import hashlib
import json
import re

import anthropic
import openai
import pytest

from conftest import KEYS, anthropic_provider, openai_provider
from harness import request

TEAM_C_KEY = "tg-team-c-SECRET-2a9f4b"

PROVIDERS = [
    # Each family goes to the provider that serves it: OpenAI's serves only what its map lists.
    openai_provider(models={"gpt-4o": "gpt-4o", "gpt-4o-mini": "gpt-4o-mini"}),
    anthropic_provider(models={"gpt-4o-mini": "claude-haiku-4-5", "claude-haiku-4-5": "claude-haiku-4-5",
                               "claude-sonnet-4-5": "claude-sonnet-4-5"}),
    {"name": "azure", "type": "azure_openai", "api_version": "2024-10-21", "keys": [{"id": "az-1", "env": "OPENAI_KEY_3"}]},
    {"name": "compat", "type": "openai_compatible", "base_path": "/compat", "keys": [{"id": "gq-1", "env": "OPENAI_KEY_2"}]},
]

ALIASES = {
    "fast": "gpt-4o-mini",
    "smart": {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5"},
    "claude": {"anthropic": "claude-haiku-4-5"},
    "azure-4o": {"azure": "prod-gpt4o"},
    "llama": {"compat": "llama-3.1-8b"},
}

CONSUMERS = {"list": [
    {"name": "team-a", "key_env": "TEAM_A_KEY"},
    {"name": "team-b", "key_env": "TEAM_B_KEY", "models": ["fast", "claude-*"]},
    {"name": "team-c", "key_sha256": hashlib.sha256(TEAM_C_KEY.encode()).hexdigest(),
     "models": ["smart", "gpt-4o", "azure-4o"]},
]}

PLUGIN = {"consumers": CONSUMERS, "providers": PROVIDERS, "aliases": ALIASES,
          "passthrough_paths": ["/v1/messages/count_tokens"]}

# What each consumer may use, as the gateway lists it: the models the configuration names (sorted),
# then the aliases (sorted).
EVERYTHING = ["claude-haiku-4-5", "claude-sonnet-4-5", "gpt-4o", "gpt-4o-mini",
              "azure-4o", "claude", "fast", "llama", "smart"]
LISTS = {
    KEYS["TEAM_A_KEY"]: EVERYTHING,
    KEYS["TEAM_B_KEY"]: ["claude-haiku-4-5", "claude-sonnet-4-5", "fast"],
    TEAM_C_KEY: ["gpt-4o", "azure-4o", "smart"],
}

HI = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(PLUGIN)


def oa(gw, key=KEYS["TEAM_A_KEY"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)


def an(gw, key=KEYS["TEAM_A_KEY"]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0)


def only_request(mock) -> dict:
    (r,) = mock.requests()
    return {**r, "json": json.loads(r["body"]) if r["body"].startswith("{") else None}


def no_provider_called(mocks):
    assert mocks["openai"].requests() == [] and mocks["anthropic"].requests() == []


def prom(gw, metric: str, **labels) -> int:
    """A sample of /stats/prometheus whose labels are exactly `labels` (0 when absent)."""
    for line in gw.admin("/stats/prometheus").splitlines():
        m = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == metric and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == labels:
            return int(float(m.group(3)))
    return 0


# ---------------------------------------------------------------------------------------- model list

@pytest.mark.parametrize("key", list(LISTS), ids=["team-a (no list)", "team-b", "team-c"])
def test_both_sdks_list_exactly_the_models_and_aliases_the_consumer_may_use(gw, mocks, key):
    listed = [m.id for m in oa(gw, key).models.list()]
    assert listed == LISTS[key]
    # The Anthropic SDK pages through it (two at a time here) and gets its own shape.
    pages = an(gw, key).models.list(limit=2)
    assert [m.id for m in pages] == LISTS[key]
    first = an(gw, key).models.list(limit=2)
    assert first.has_more == (len(LISTS[key]) > 2) and first.first_id == LISTS[key][0]
    assert all(m.type == "model" and m.display_name == m.id for m in first.data)
    no_provider_called(mocks)


def test_one_model_is_retrieved_in_each_dialect_and_one_not_allowed_is_not_found(gw, mocks):
    m = oa(gw, KEYS["TEAM_B_KEY"]).models.retrieve("fast")
    assert (m.id, m.object, m.owned_by) == ("fast", "model", "openai")
    m = an(gw, KEYS["TEAM_B_KEY"]).models.retrieve("claude-haiku-4-5")
    assert (m.id, m.type) == ("claude-haiku-4-5", "model")
    with pytest.raises(openai.NotFoundError) as e:
        oa(gw, KEYS["TEAM_B_KEY"]).models.retrieve("smart")
    assert e.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as e:
        an(gw, TEAM_C_KEY).models.retrieve("fast")
    assert e.value.body["error"]["type"] == "not_found_error"
    # Authenticated as any request.
    with pytest.raises(openai.AuthenticationError):
        oa(gw, "not-a-consumer-key").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        list(an(gw, "not-a-consumer-key").models.list())
    no_provider_called(mocks)


# ---------------------------------------------------------------------------------------- allow-lists

def test_a_model_off_the_list_is_refused_403_in_both_dialects_and_no_provider_is_called(gw, mocks):
    with pytest.raises(openai.PermissionDeniedError) as e:
        oa(gw, KEYS["TEAM_B_KEY"]).chat.completions.create(model="gpt-4o", messages=HI)
    assert e.value.status_code == 403 and e.value.code == "model_not_found"
    assert e.value.body["message"] == \
        "Consumer 'team-b' does not have access to model 'gpt-4o'. Allowed models: fast, claude-*."
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        an(gw, TEAM_C_KEY).messages.create(model="claude", max_tokens=20, messages=HI)
    assert e.value.status_code == 403
    assert e.value.body["error"] == {
        "type": "permission_error",
        "message": "Consumer 'team-c' does not have access to model 'claude'. Allowed models: smart, gpt-4o, azure-4o."}
    # Allowing an alias allows the alias, not the model it stands for.
    with pytest.raises(openai.PermissionDeniedError):
        oa(gw, KEYS["TEAM_B_KEY"]).chat.completions.create(model="gpt-4o-mini", messages=HI)
    # A request that names no model cannot be checked: refused to a consumer with a list.
    r = request(gw.port, "POST", "/v1/chat/completions", {"messages": HI},
                {"authorization": f"Bearer {KEYS['TEAM_B_KEY']}"})
    assert r.status == 403 and "names none" in r.json()["error"]["message"], r
    no_provider_called(mocks)
    # Envoy writes the access log in periodic flushes: wait for this refusal's own line.
    line = 'consumer=team-b model=gpt-4o served=- provider=-'
    assert gw.access_log(line, at_least=1), gw.access_log("consumer=team-b")


def test_a_model_on_the_list_by_prefix_is_served(gw, mocks):
    r = oa(gw, KEYS["TEAM_B_KEY"]).chat.completions.create(model="claude-haiku-4-5", messages=HI)
    assert r.choices[0].message.content == "Hello from anthropic."
    assert only_request(mocks["anthropic"])["json"]["model"] == "claude-haiku-4-5"


# ---------------------------------------------------------------------------------------- aliases

def test_an_alias_is_served_by_each_provider_type_with_that_providers_model(gw, mocks):
    # openai: the string form, through a provider without a `models` map.
    r = oa(gw).chat.completions.with_raw_response.create(model="fast", messages=HI)
    assert r.headers["x-tollgate-provider"] == "openai"
    sent = only_request(mocks["openai"])
    assert (sent["path"], sent["json"]["model"]) == ("/v1/chat/completions", "gpt-4o-mini")
    mocks["openai"].reset()

    # anthropic, from both SDKs: the OpenAI client's request translated, the Anthropic one renamed.
    c = oa(gw).chat.completions.create(model="claude", messages=HI)
    assert (c.model, c.choices[0].message.content) == ("claude", "Hello from anthropic.")
    assert only_request(mocks["anthropic"])["json"]["model"] == "claude-haiku-4-5"
    mocks["anthropic"].reset()
    with an(gw).messages.stream(model="claude", max_tokens=50, messages=HI) as s:
        text = "".join(s.text_stream)
    assert text == "Hello from anthropic."
    assert only_request(mocks["anthropic"])["json"]["model"] == "claude-haiku-4-5"
    mocks["anthropic"].reset()

    # azure_openai: the alias names the deployment.
    c = oa(gw, TEAM_C_KEY).chat.completions.create(model="azure-4o", messages=HI)
    assert c.choices[0].message.content
    sent = only_request(mocks["openai"])
    assert sent["path"] == "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21"
    assert sent["headers"]["api-key"] == KEYS["OPENAI_KEY_3"]
    mocks["openai"].reset()

    # openai_compatible, under its base path.
    oa(gw).chat.completions.create(model="llama", messages=HI)
    sent = only_request(mocks["openai"])
    assert (sent["path"], sent["json"]["model"]) == ("/compat/v1/chat/completions", "llama-3.1-8b")
    mocks["openai"].reset()

    # The object form from the Anthropic SDK: the first provider it names is OpenAI.
    msg = an(gw, TEAM_C_KEY).messages.create(model="smart", max_tokens=50, messages=HI)
    assert msg.model == "smart" and msg.content[0].text
    sent = only_request(mocks["openai"])
    assert (sent["path"], sent["json"]["model"]) == ("/v1/chat/completions", "gpt-4o")

    lines = gw.access_log(" served=llama-3.1-8b ", at_least=1)
    assert lines and "model=llama served=llama-3.1-8b provider=compat key=gq-1" in lines[0], lines
    assert prom(gw, "tollgate_provider_model_served_requests",
                provider="azure", model="azure-4o", served_model="prod-gpt4o") == 1
    assert prom(gw, "tollgate_provider_model_served_requests",
                provider="anthropic", model="claude", served_model="claude-haiku-4-5") == 2
    assert prom(gw, "tollgate_consumer_model_requests", consumer="team-c", model="smart") == 1


def test_an_alias_fails_over_to_the_next_provider_with_that_providers_model(gateway, mocks):
    consumers = {"list": [{k: v for k, v in c.items() if k != "models"} for c in CONSUMERS["list"]]}
    gw = gateway({"consumers": consumers, "providers": PROVIDERS[:2],
                  "aliases": {"fast": "gpt-4o-mini", "smart": ALIASES["smart"]}})
    mocks["openai"].script({"status": 429, "headers": {"retry-after": "30"}})
    c = oa(gw).chat.completions.with_raw_response.create(model="fast", messages=HI)
    assert c.headers["x-tollgate-provider"] == "anthropic"
    assert c.parse().model == "fast" and c.parse().choices[0].message.content == "Hello from anthropic."
    (tried,) = mocks["openai"].requests()
    assert json.loads(tried["body"])["model"] == "gpt-4o-mini" and tried["status"] == 429
    assert only_request(mocks["anthropic"])["json"]["model"] == "claude-haiku-4-5"
    mocks["anthropic"].reset()

    # The object form, streamed from the Anthropic SDK: each provider is asked for its own model.
    with an(gw, TEAM_C_KEY).messages.stream(model="smart", max_tokens=50, messages=HI) as s:
        assert "".join(s.text_stream) == "Hello from anthropic."
    first, second = mocks["openai"].requests()
    assert first["key"] != second["key"], "not the cooling key"
    assert json.loads(second["body"])["model"] == "gpt-4o" and second["status"] == 429
    assert only_request(mocks["anthropic"])["json"]["model"] == "claude-sonnet-4-5"

    line = gw.access_log("model=fast", at_least=1)[0]
    assert "model=fast served=claude-haiku-4-5 provider=anthropic key=an-1" in line, line
    assert "attempts=2" in line
    assert prom(gw, "tollgate_provider_model_served_requests",
                provider="anthropic", model="fast", served_model="claude-haiku-4-5") == 1
    assert prom(gw, "tollgate_provider_model_served_requests",
                provider="anthropic", model="smart", served_model="claude-sonnet-4-5") == 1
    assert prom(gw, "tollgate_consumer_model_requests", consumer="team-a", model="fast") == 1


# ---------------------------------------------------------------------------------------- paths

def test_paths_tollgate_does_not_count_are_refused_404_in_the_clients_shape(gw, mocks):
    client = oa(gw)
    calls = [
        lambda: client.images.generate(model="gpt-image-1", prompt="a cat"),
        lambda: client.moderations.create(model="omni-moderation-latest", input="hi"),
        lambda: client.files.list(),
        lambda: client.batches.list(),
        lambda: client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["message"].startswith("Invalid URL ("), e.value.body
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        an(gw).messages.batches.list()
    assert e.value.body["error"]["type"] == "not_found_error"
    assert e.value.body["error"]["message"].startswith("Invalid URL (GET /v1/messages/batches)")
    no_provider_called(mocks)
    assert prom(gw, "tollgate_outcome_requests", outcome="rejected_path") >= 6


def test_a_path_the_operator_passes_through_reaches_a_provider_of_its_api_counted_as_one_request(gw, mocks):
    counted = an(gw).messages.count_tokens(model="claude-haiku-4-5", messages=HI)
    assert counted.input_tokens > 0
    sent = only_request(mocks["anthropic"])
    assert sent["path"] == "/v1/messages/count_tokens"
    assert sent["headers"]["x-api-key"] == KEYS["ANTHROPIC_KEY_1"]
    assert sent["json"] == {"model": "claude-haiku-4-5", "messages": HI}, "passed as it is"
    assert mocks["openai"].requests() == []
    line = gw.access_log("served=claude-haiku-4-5 provider=anthropic key=an-1 in=0 out=0", at_least=1)
    assert line, gw.access_log("consumer=")
    # A consumer with a model list may pass it only for a model on its list.
    with pytest.raises(anthropic.PermissionDeniedError):
        an(gw, TEAM_C_KEY).messages.count_tokens(model="claude-haiku-4-5", messages=HI)
    assert len(mocks["anthropic"].requests()) == 1
