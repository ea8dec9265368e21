"""Context windows: a request that cannot fit the model's window is refused before any attempt, in the
client's API shape; with `trim_oldest` the oldest turns go instead, and the mock provider (which checks
conversations as the real APIs do) accepts what is left, across a failover too; with `lower_max_tokens`
an output reservation that overflows is lowered."""
from __future__ import annotations

import json
import urllib.request

import anthropic
import openai
import pytest

from conftest import KEYS, anthropic_provider, openai_provider

TEAM_A, TEAM_B = KEYS["TEAM_A_KEY"], KEYS["TEAM_B_KEY"]
WINDOW = 2000
MODELS = {"gpt-small": {"context_window": WINDOW}, "gpt-trim": {"context_window": WINDOW, "trim_oldest": True},
          "claude-small": {"context_window": WINDOW}, "claude-trim": {"context_window": WINDOW, "trim_oldest": True}}
CONSUMERS = {"list": [{"name": "team-a", "key_env": "TEAM_A_KEY"},
                      {"name": "team-b", "key_env": "TEAM_B_KEY", "trim_oldest": True}]}


def words(n: int) -> str:
    """Text the gateway estimates at `n` tokens (one per word)."""
    return "word " * n


def plugin(**extra) -> dict:
    return {"consumers": CONSUMERS, "models": MODELS,
            "providers": [openai_provider(models={"gpt-small": "gpt-4o-mini", "gpt-trim": "gpt-4o-mini"}),
                          anthropic_provider(models={"claude-small": "claude-haiku-4-5", "claude-trim": "claude-haiku-4-5"})],
            **extra}


@pytest.fixture(scope="module")
def gw(module_gateway):
    return module_gateway(plugin())


def oa(gw, key=TEAM_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)


def an(gw, key=TEAM_A) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0)


def sent(mock, n=-1) -> dict:
    return json.loads(mock.requests()[n]["body"])


def chat_history(turns: int) -> list[dict]:
    """A system message, then `turns` old turns each with a tool call and its result, then a last question
    answered by a tool call whose result is in."""
    out = [{"role": "system", "content": "You are a terse weather assistant."}]
    for i in range(turns):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        out += [{"role": "user", "content": f"question {i}: {words(60)}"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": f"result {i}: {words(30)}"},
                {"role": "assistant", "content": f"answer {i}: {words(40)}"}]
    last_call = {"id": "call_last", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lyon"}'}}
    out += [{"role": "user", "content": "And the weather in Lyon?"},
            {"role": "assistant", "content": None, "tool_calls": [last_call]},
            {"role": "tool", "tool_call_id": "call_last", "content": "12C and rain"}]
    return out


def anthropic_history(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out += [{"role": "user", "content": f"question {i}: {words(60)}"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                  {"type": "tool_use", "id": f"toolu_{i}", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"result {i}: {words(30)}"},
                                             {"type": "text", "text": f"thanks {i}: {words(20)}"}]},
                {"role": "assistant", "content": f"answer {i}: {words(40)}"}]
    out.append({"role": "user", "content": "And the weather in Lyon?"})
    return out


def assert_chat_kept(client_messages: list[dict], received: list[dict]) -> int:
    """What the provider received is the system message and a suffix of the client's conversation starting
    at a user turn, every tool result with its call; returns how many messages went."""
    assert received[0] == client_messages[0], "the system message is kept"
    rest = received[1:]
    assert rest == client_messages[len(client_messages) - len(rest):], "a suffix, each message as sent"
    assert rest[0]["role"] == "user"
    calls = {c["id"] for m in rest if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    results = {m["tool_call_id"] for m in rest if m["role"] == "tool"}
    assert calls == results, (calls, results)
    return len(client_messages) - len(received)


def test_openai_client_refused_with_context_length_exceeded_and_no_provider_called(gw, mocks):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": words(3000)}]
    with pytest.raises(openai.BadRequestError) as exc:
        oa(gw).chat.completions.create(model="gpt-small", messages=msgs, max_tokens=100)
    e = exc.value
    assert e.status_code == 400 and e.code == "context_length_exceeded"
    err = e.response.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "messages", "context_length_exceeded")
    prompt = 3000 + 3 + 4 + 4  # the estimate: words, the system text, two messages' framing
    assert err["message"] == (
        f"This model's maximum context length is {WINDOW} tokens. However, you requested {prompt + 100} tokens "
        f"({prompt} in the messages, 100 in the completion), {prompt + 100 - WINDOW} tokens over the limit. "
        "Please reduce the length of the messages or completion. (Token counts are the gateway's estimate.)")
    assert mocks["openai"].requests() == [] and mocks["anthropic"].requests() == []
    assert gw.stat("wasmcustom.tollgate.outcome.rejected_context.requests") >= 1


def test_anthropic_client_refused_with_prompt_too_long_and_no_provider_called(gw, mocks):
    with pytest.raises(anthropic.BadRequestError) as exc:
        an(gw).messages.create(model="claude-small", max_tokens=100, system="Be brief.",
                               messages=[{"role": "user", "content": words(3000)}])
    body = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    prompt = 3000 + 3 + 4
    assert body["error"]["message"] == (
        f"prompt is too long: {prompt} tokens > {WINDOW} maximum; with max_tokens 100 the request is "
        f"{prompt + 100 - WINDOW} tokens over. (Token counts are the gateway's estimate.)")
    # The prompt fits, max_tokens does not: Anthropic's other wording.
    with pytest.raises(anthropic.BadRequestError) as exc:
        an(gw).messages.create(model="claude-small", max_tokens=1500, messages=[{"role": "user", "content": words(1000)}])
    assert exc.value.body["error"]["message"].startswith(
        "input length and `max_tokens` exceed context limit: 1004 + 1500 > 2000, decrease input length or `max_tokens` and try again (504 tokens over)")
    assert mocks["openai"].requests() == [] and mocks["anthropic"].requests() == []


def test_a_borderline_request_goes_to_the_provider_untouched(gw, mocks):
    # 1800 estimated + 100 may be over (the real count could be 20% more) or not (20% less): the provider
    # counts exactly, so the gateway lets it decide.
    r = oa(gw).chat.completions.with_raw_response.create(
        model="gpt-small", messages=[{"role": "user", "content": words(1796)}], max_tokens=100)
    assert r.http_response.status_code == 200
    assert "x-tollgate-trimmed-messages" not in r.headers
    assert sent(mocks["openai"])["max_tokens"] == 100


def test_openai_conversation_trimmed_with_system_last_turn_and_tool_pairs_intact(gw, mocks):
    msgs = chat_history(12)
    r = oa(gw).chat.completions.with_raw_response.create(model="gpt-trim", messages=msgs, max_tokens=100)
    assert r.http_response.status_code == 200
    assert r.parse().choices[0].message.content == "Hello from openai."
    received = sent(mocks["openai"])["messages"]
    dropped = assert_chat_kept(msgs, received)
    assert dropped > 0 and dropped % 4 == 0, dropped
    assert r.headers["x-tollgate-trimmed-messages"] == str(dropped)
    assert received[-3:] == msgs[-3:], "the last user turn and its tool call and result"


def test_trimming_per_consumer(gw, mocks):
    msgs = chat_history(20)
    with pytest.raises(openai.BadRequestError):
        oa(gw, TEAM_A).chat.completions.create(model="gpt-small", messages=msgs, max_tokens=100)
    assert mocks["openai"].requests() == []
    r = oa(gw, TEAM_B).chat.completions.with_raw_response.create(model="gpt-small", messages=msgs, max_tokens=100)
    assert r.http_response.status_code == 200
    dropped = assert_chat_kept(msgs, sent(mocks["openai"])["messages"])
    assert r.headers["x-tollgate-trimmed-messages"] == str(dropped)


def test_anthropic_conversation_trimmed_in_its_own_dialect(gw, mocks):
    msgs = anthropic_history(12)
    r = an(gw).messages.with_raw_response.create(model="claude-trim", max_tokens=100, system="You are terse.",
                                                 messages=msgs)
    assert r.http_response.status_code == 200
    assert r.parse().content[0].text == "Hello from anthropic."
    body = sent(mocks["anthropic"])
    received = body["messages"]
    assert body["system"] == "You are terse." and body["max_tokens"] == 100
    assert received == msgs[len(msgs) - len(received):]
    assert received[0]["role"] == "user" and isinstance(received[0]["content"], str), "a user's own turn first"
    dropped = len(msgs) - len(received)
    assert dropped > 0 and dropped % 4 == 0
    assert r.headers["x-tollgate-trimmed-messages"] == str(dropped)


def test_what_cannot_be_trimmed_enough_is_refused(gw, mocks):
    msgs = [{"role": "system", "content": words(2500)}] + chat_history(2)[1:]
    with pytest.raises(openai.BadRequestError) as exc:
        oa(gw).chat.completions.create(model="gpt-trim", messages=msgs, max_tokens=100)
    assert exc.value.code == "context_length_exceeded"
    assert "Without the oldest turns it may drop, the conversation still needs" in exc.value.message
    assert mocks["openai"].requests() == []


def test_a_trimmed_conversation_fails_over_whole_to_anthropic(gateway, mocks):
    p = {"consumers": CONSUMERS, "models": MODELS,
         "providers": [openai_provider(n=1, models={"gpt-trim": "gpt-4o-mini"}),
                       anthropic_provider(models={"gpt-trim": "claude-haiku-4-5"})]}
    g = gateway(p)
    mocks["openai"].script({"key": KEYS["OPENAI_KEY_1"], "status": 429, "headers": {"retry-after": "30"}})
    msgs = chat_history(12)
    r = oa(g).chat.completions.with_raw_response.create(model="gpt-trim", messages=msgs, max_tokens=100)
    assert r.http_response.status_code == 200
    assert r.headers["x-tollgate-provider"] == "anthropic"
    assert r.parse().choices[0].message.content == "Hello from anthropic."
    # The first attempt carried the trimmed conversation; the second translated the same one.
    dropped = assert_chat_kept(msgs, sent(mocks["openai"])["messages"])
    assert r.headers["x-tollgate-trimmed-messages"] == str(dropped)
    body = sent(mocks["anthropic"])
    assert body["system"] == msgs[0]["content"]
    turns = body["messages"]
    assert turns[0]["role"] == "user" and turns[0]["content"][0]["text"].startswith("question ")
    uses = [b["id"] for t in turns if t["role"] == "assistant" for b in t["content"] if b["type"] == "tool_use"]
    results = [b["tool_use_id"] for t in turns if t["role"] == "user" for b in t["content"] if b["type"] == "tool_result"]
    assert uses == results and uses[-1] == "call_last"
    assert turns[-1]["content"][0]["content"] == "12C and rain"


def test_lower_max_tokens_lowers_an_output_that_overflows(gateway, mocks):
    g = gateway(plugin(lower_max_tokens=True))
    r = oa(g).chat.completions.with_raw_response.create(
        model="gpt-small", messages=[{"role": "user", "content": words(996)}], max_tokens=1500)
    assert r.http_response.status_code == 200
    # 1000 estimated may be 1200: 800 left for the answer.
    assert sent(mocks["openai"])["max_tokens"] == 800
    assert "x-tollgate-trimmed-messages" not in r.headers
    m = an(g).messages.create(model="claude-small", max_tokens=1500, messages=[{"role": "user", "content": words(996)}])
    assert m.content[0].text == "Hello from anthropic."
    assert sent(mocks["anthropic"])["max_tokens"] == 800


def test_the_mock_refuses_orphaned_tool_results_as_the_providers_do(mocks):
    def post(mock, path, body, header):
        req = urllib.request.Request(f"{mock.base_url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", header: "Bearer sk-x" if header == "authorization" else "sk-x"})
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        raise AssertionError("accepted")

    status, body = post(mocks["openai"], "/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "u"}, {"role": "tool", "tool_call_id": "call_1", "content": "r"}]}, "authorization")
    assert status == 400 and "must be a response to a preceeding message with 'tool_calls'" in body["error"]["message"]
    status, body = post(mocks["anthropic"], "/v1/messages", {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}]}, "x-api-key")
    assert status == 400 and "unexpected `tool_use_id` found in `tool_result` blocks" in body["error"]["message"]
    status, body = post(mocks["anthropic"], "/v1/messages", {"model": "m", "max_tokens": 5, "messages": [
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}, "x-api-key")
    assert status == 400 and body["error"]["message"] == 'messages: first message must use the "user" role'
