"""Long prompts: a body up to tollgate's max_request_bytes (4 MiB by default) is served on the shipped
configurations' Envoy limits, and replayed whole to the next key or provider after a 429; a body over a
limit is refused with 413 in the client API's own error shape, whichever limit it meets first:

- content-length over max_request_bytes: tollgate, from the request headers, before any body is read;
- no content-length (chunked), over max_request_bytes: tollgate, as soon as the body it holds grows past
  the limit, which comes before Envoy's larger buffer limit (8 MiB) however long the body;
- Envoy's buffer limit below max_request_bytes (Envoy's 1 MiB default, as in a configuration that does
  not set it): Envoy itself refuses the body while tollgate holds it, with a plain-text 413 that tollgate
  reshapes.
"""
from __future__ import annotations

import json

import anthropic
import openai
import pytest

from conftest import KEYS, openai_provider, start_shipped_demo
from harness import chunked_request

MB = 1_000_000
MAX_REQUEST = 4 << 20  # tollgate's default max_request_bytes
PROMPT = "All work and no play makes Jack a dull boy. " * (3 * MB // 44)  # ~3 MB
TOO_LARGE = f"Request body is larger than the gateway's limit of {MAX_REQUEST} bytes."
OVER_ENVOYS_BUFFER = "Request body is larger than the gateway's buffer limit."


def clients(gw) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    return (openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="anything", max_retries=0),
            anthropic.Anthropic(base_url=gw.base_url, api_key="anything", max_retries=0))


def assert_each_sdk_gets_413(gw, prompt: str, message: str) -> None:
    """Both SDKs raise their 413 error, with the gateway's message in their API's shape."""
    oa, an = clients(gw)
    with pytest.raises(openai.APIStatusError) as e:  # openai has no class of its own for a 413
        oa.chat.completions.create(model="gpt-4o-mini", messages=user(prompt))
    assert e.value.status_code == 413
    assert e.value.body == {"message": message, "type": "invalid_request_error", "param": None,
                            "code": "request_too_large"}
    with pytest.raises(anthropic.ContentTooLargeError) as e:
        an.messages.create(model="gpt-4o-mini", max_tokens=50, messages=user(prompt))
    assert e.value.body == {"type": "error", "error": {"type": "request_too_large", "message": message}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_of(logged: dict) -> str:
    """The user prompt a provider received: a string, or Anthropic's text blocks joined."""
    (message,) = json.loads(logged["body"])["messages"]
    content = message["content"]
    return content if isinstance(content, str) else "".join(b["text"] for b in content if b["type"] == "text")


@pytest.fixture(scope="module")
def two_keys(module_gateway):
    """The harness' configuration (Envoy limits as shipped), one OpenAI provider with two keys."""
    return module_gateway({"providers": [openai_provider(n=2)]})


@pytest.fixture(scope="module")
def envoy_defaults(module_gateway):
    """The same, with Envoy's buffers left at their 1 MiB default: below tollgate's max_request_bytes."""
    return module_gateway({"providers": [openai_provider(n=2)]}, buffer_limit=None)


@pytest.fixture(scope="module")
def shipped_demo(mocks):
    """envoy/demo.yaml, its Envoy limits as shipped; team-a's token budget (20,000 a minute, for the
    demo's 429s) lifted: a 3 MB prompt is ~750,000 tokens."""
    def lift(plugin):
        (team_a,) = [c for c in plugin["consumers"]["list"] if c["name"] == "team-a"]
        team_a["limits"] = [lim for lim in team_a["limits"] if lim["metric"] != "total_tokens"]
    gw = start_shipped_demo(mocks, lift)
    yield gw
    gw.stop()


def test_3mb_prompt_is_served_and_moved_whole_to_the_second_key_by_a_429(two_keys, mocks):
    mocks["openai"].script({"key": KEYS["OPENAI_KEY_1"], "status": 429, "headers": {"retry-after": "1"}, "times": 1})
    oa, _ = clients(two_keys)
    raw = oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=user(PROMPT))
    assert raw.headers["x-tollgate-key-id"] == "oa-2"
    assert raw.parse().choices[0].message.content == "Hello from openai."
    sent = mocks["openai"].requests()
    assert [(r["key"], r["status"]) for r in sent] == [(KEYS["OPENAI_KEY_1"], 429), (KEYS["OPENAI_KEY_2"], 200)]
    assert all(prompt_of(r) == PROMPT for r in sent)


def test_3mb_prompts_on_the_demo_config_reach_each_provider_and_fail_over_whole(shipped_demo, mocks):
    """envoy/demo.yaml as shipped: a 3 MB prompt from each SDK; OpenAI's 429 moves the GPT one to
    Anthropic, translated, the whole prompt in it."""
    oa, an = clients(shipped_demo)
    oa = oa.with_options(api_key="tg-demo-team-a")
    an = an.with_options(api_key="tg-demo-team-a")
    raw = an.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=50, messages=user(PROMPT))
    assert raw.headers["x-tollgate-provider"] == "anthropic" and raw.parse().content[0].text == "Hello from anthropic."
    assert [prompt_of(r) == PROMPT for r in mocks["anthropic"].requests()] == [True]

    mocks["openai"].script({"status": 429, "headers": {"retry-after": "1"}, "times": 1})
    raw = oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=user(PROMPT))
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    (refused,) = mocks["openai"].requests()
    assert refused["status"] == 429 and prompt_of(refused) == PROMPT
    moved = mocks["anthropic"].requests()[-1]
    assert json.loads(moved["body"])["model"] == "claude-haiku-4-5" and prompt_of(moved) == PROMPT


def test_content_length_over_max_request_bytes_gets_tollgates_413_in_each_sdk(two_keys, mocks):
    """Refused from the headers: the SDK, still sending the body, reads the answer."""
    assert_each_sdk_gets_413(two_keys, "x" * (MAX_REQUEST + 1), TOO_LARGE)
    assert mocks["openai"].requests() == []


@pytest.mark.parametrize("size", [MAX_REQUEST + MB, 9 * MB], ids=["under-envoys-buffer", "over-envoys-buffer"])
def test_chunked_body_over_max_request_bytes_gets_tollgates_413_before_envoys(two_keys, mocks, size):
    """No content-length: tollgate refuses once the body it holds passes max_request_bytes, before
    Envoy's 8 MiB. A body longer than Envoy's buffer may come in one read larger than the space left
    under it (a loaded machine reads more per event): Envoy's own 413 may then come first, and the
    client still gets a 413 in its API's shape."""
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": user("x" * size)}).encode()
    messages = {TOO_LARGE} if size < 8 * MB else {TOO_LARGE, OVER_ENVOYS_BUFFER}
    r = chunked_request(two_keys.port, "/v1/chat/completions", body)
    assert r.status == 413 and r.json()["error"]["code"] == "request_too_large", r
    assert r.json()["error"]["message"] in messages, r
    r = chunked_request(two_keys.port, "/v1/messages", body)
    assert r.status == 413 and r.json()["type"] == "error", r
    assert r.json()["error"]["type"] == "request_too_large" and r.json()["error"]["message"] in messages, r
    assert mocks["openai"].requests() == []
    if size < 8 * MB:
        assert two_keys.stat("http.gw.downstream_rq_too_large") == 0


def test_envoys_own_413_reaches_each_sdk_in_its_shape(envoy_defaults, mocks):
    """Envoy's buffer (1 MiB) below max_request_bytes: a 3 MB body, within tollgate's limit, is refused by
    Envoy while tollgate holds it; the client still gets its API's 413, and Envoy's log says once per
    worker which limits to raise."""
    before = envoy_defaults.stats()
    assert_each_sdk_gets_413(envoy_defaults, PROMPT, OVER_ENVOYS_BUFFER)
    body = json.dumps({"model": "gpt-4o-mini", "messages": user(PROMPT)}).encode()
    r = chunked_request(envoy_defaults.port, "/v1/messages", body)
    assert (r.status, r.json()["error"]["type"]) == (413, "request_too_large"), r
    after = envoy_defaults.stats()
    for counter in ("http.gw.downstream_rq_too_large", "wasmcustom.tollgate.outcome.rejected_invalid.requests"):
        assert after.get(counter, 0) - before.get(counter, 0) == 3, counter
    assert mocks["openai"].requests() == []
    log = envoy_defaults.wait_log("Envoy refused a request body over its buffer limit")
    assert 1 <= log.count("Envoy refused a request body over its buffer limit") <= 2  # once per worker's VM
    # A prompt within Envoy's buffer is served as before.
    oa, _ = clients(envoy_defaults)
    assert oa.chat.completions.create(model="gpt-4o-mini", messages=user("x" * 500_000)).choices
