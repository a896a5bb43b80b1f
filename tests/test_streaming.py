"""Streams pass through event by event, and are metered however they end."""

import json
import time

import requests
import sseclient

from tests.conftest import LazyModule

openai = LazyModule("openai")


def stream_request(gateway, raw_key, body, path="/v1/chat/completions"):
    return requests.post(gateway.url + path, json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {raw_key}"})


def test_first_chunk_arrives_while_the_upstream_still_waits(gateway, fake):
    stall = 3.0
    fake.behaviour["stall_after_first"] = stall
    raw_key, _ = gateway.create_key()
    started = time.monotonic()
    resp = stream_request(gateway, raw_key, {"model": "gpt-4o", "stream": True,
                                             "messages": [{"role": "user", "content": "Hi"}]})
    events = sseclient.SSEClient(resp.iter_content(chunk_size=None)).events()
    first = json.loads(next(events).data)
    first_at = time.monotonic() - started
    assert first["object"] == "chat.completion.chunk"
    rest = [event.data for event in events]
    done_at = time.monotonic() - started
    # The first chunk came long before the upstream's stall ended; the rest after it.
    assert first_at < stall / 2 < stall <= done_at
    assert rest[-1] == "[DONE]"


def test_include_usage_is_injected_and_the_usage_chunk_hidden(gateway, fake):
    raw_key, _ = gateway.create_key()
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    chunks = list(api.chat.completions.create(model="gpt-4o", stream=True,
                                              messages=[{"role": "user", "content": "Hi"}]))
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks), "the usage-only chunk must stay hidden"
    (event,) = gateway.events()
    assert (event["prompt_tokens"], event["completion_tokens"], event["stream"]) == (11, 7, 1)
    assert event["pricing"] == "priced"


def test_a_client_that_asked_for_usage_gets_it(gateway, fake):
    raw_key, _ = gateway.create_key()
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    chunks = list(api.chat.completions.create(
        model="gpt-4o", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hi"}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert len(gateway.events()) == 1


def test_responses_api_stream_is_metered(gateway, fake):
    raw_key, _ = gateway.create_key()
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    events = list(api.responses.create(model="gpt-4o", input="Hi", stream=True))
    assert events[-1].type == "response.completed"
    (event,) = gateway.events()
    assert (event["prompt_tokens"], event["completion_tokens"]) == (11, 7)
    assert event["endpoint"] == "responses" and event["pricing"] == "priced"


def test_upstream_cut_midway_is_metered_as_estimated(gateway, fake):
    fake.behaviour["cut_after"] = 2
    raw_key, _ = gateway.create_key()
    resp = stream_request(gateway, raw_key, {"model": "gpt-4o", "stream": True,
                                             "messages": [{"role": "user", "content": "Hi"}]})
    data = [event.data for event in sseclient.SSEClient(resp.iter_content(None)).events()]
    assert "error" in json.loads(data[-1]), "the client is told the stream broke off"
    (event,) = gateway.events()
    assert event["pricing"] == "estimated" and event["completion_tokens"] >= 1
    assert event["prompt_tokens"] > 0


def leave_after_the_first_event(gateway, raw_key, body):
    """Read one event of a stream, leave, and return the call's usage row once written."""
    resp = stream_request(gateway, raw_key, body)
    next(sseclient.SSEClient(resp.iter_content(None)).events())
    resp.close()
    deadline = time.monotonic() + 10
    while not gateway.events() and time.monotonic() < deadline:
        time.sleep(0.1)
    (event,) = gateway.events()
    return event


def test_client_leaving_midway_is_metered_at_its_worst_case(gateway, fake):
    # A reasoning model bills thousands of tokens while the client sees a few
    # chunks; a cut stream without exact usage is settled at its reservation.
    fake.behaviour.update(chunks=50, chunk_delay=0.05, reasoning_tokens=2900,
                          completion_tokens=3000)
    raw_key, _ = gateway.create_key()
    body = {"model": "o3-mini", "stream": True, "max_completion_tokens": 3000,
            "messages": [{"role": "user", "content": "Hi"}]}
    event = leave_after_the_first_event(gateway, raw_key, body)
    # What llimit sent upstream: the body with include_usage added, 3 bytes a token.
    sent = json.dumps({**body, "stream_options": {"include_usage": True}})
    assert fake.requests[-1].body == sent.encode()
    prompt = len(sent) // 3
    assert event["pricing"] == "estimated"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (prompt, 3000)
    # o3-mini: $1.10 in, $4.40 out per 1M tokens
    assert event["cost_nusd"] == round((prompt * 1.10 + 3000 * 4.40) * 1000)
    # llimit closed its upstream call: the upstream's next writes failed, long before
    # its 50 events (and [DONE]) were all sent.
    reply = fake.requests[-1].reply
    assert reply.wait() == "client left"
    assert reply.events_sent < 51


def test_drain_seconds_reads_the_exact_usage_after_the_client_left(make_llimit, fake):
    gateway = make_llimit(drain_seconds=10.0)
    fake.behaviour.update(chunks=20, chunk_delay=0.02)
    raw_key, _ = gateway.create_key()
    event = leave_after_the_first_event(gateway, raw_key, {
        "model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert (event["pricing"], event["completion_tokens"]) == ("priced", 7)
    assert fake.requests[-1].reply.wait() == "complete"  # read to its end


def test_stream_without_usage_is_estimated(gateway, fake):
    fake.behaviour["ignore_stream_options"] = True
    raw_key, _ = gateway.create_key()
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    list(api.chat.completions.create(model="gpt-4o", stream=True, messages=[]))
    (event,) = gateway.events()
    # No usage at all: the worst case, gpt-4o's max_output_tokens (pricing.json), not 3 chunks.
    assert event["pricing"] == "estimated" and event["completion_tokens"] == 16384
