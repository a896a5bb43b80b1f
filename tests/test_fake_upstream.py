"""The fake upstream itself, checked with the official clients and raw HTTP."""

import base64
import concurrent.futures
import json
import socket
import struct
import time

import pytest
import requests

from tests.conftest import LazyModule
from tests.fake_upstream import (EXPECTED, FakeUpstream, anthropic_error, content_pieces,
                                 openai_error)

anthropic = LazyModule("anthropic")
openai = LazyModule("openai")


@pytest.fixture
def fake():
    with FakeUpstream() as upstream:
        yield upstream


def oai(fake):
    return openai.OpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0)


def azure(fake):
    return openai.AzureOpenAI(azure_endpoint=fake.url, api_key="x", api_version="2024-10-21",
                              max_retries=0)


def claude(fake):
    return anthropic.Anthropic(base_url=fake.url, api_key="x", max_retries=0)


HI = [{"role": "user", "content": "Hi"}]


def sse_data(resp):
    """The data: payloads of a raw SSE response, parsed unless [DONE]."""
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            data = line[6:].decode()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def post(fake, path, body, **headers):
    headers.setdefault("Authorization", "Bearer x")
    return requests.post(fake.url + path, json=body, headers=headers, stream=True, timeout=10)


# --- OpenAI ------------------------------------------------------------------------

def test_chat_completion_whole(fake):
    raw = oai(fake).chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.model == "gpt-4o"
    assert reply.choices[0].message.content == EXPECTED["text"] == "Hello world!"
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details.reasoning_tokens == 0
    for header in ("x-request-id", "openai-processing-ms", "x-ratelimit-remaining-requests"):
        assert raw.headers[header]
    assert raw.headers["content-type"] == "application/json"
    assert int(raw.headers["content-length"]) == len(raw.content)


def test_cached_and_reasoning_tokens_follow_openai_semantics(fake):
    fake.behaviour.update(prompt_tokens=1000, cached_tokens=800, completion_tokens=100,
                          reasoning_tokens=40, model="o3-mini-2025-01-31")
    reply = oai(fake).chat.completions.create(model="o3-mini", messages=HI)
    assert reply.model == "o3-mini-2025-01-31"
    assert (reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens) == \
        (1000, 800)
    assert (reply.usage.completion_tokens,
            reply.usage.completion_tokens_details.reasoning_tokens) == (100, 40)
    assert reply.usage.total_tokens == 1100


def test_chat_stream_without_include_usage_has_no_usage(fake):
    chunks = list(oai(fake).chat.completions.create(model="gpt-4o", messages=HI,
                                                    stream=True))
    assert len(chunks) == EXPECTED["chunks"] == 3
    assert [c.choices[0].delta.content for c in chunks] == ["Hello", " world", "!"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "stop"]
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1
    raw = sse_data(post(fake, "/v1/chat/completions", {"model": "m", "stream": True}))
    assert raw[-1] == "[DONE]" and all("usage" not in c for c in raw[:-1])


def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(fake):
    chunks = list(oai(fake).chat.completions.create(
        model="gpt-4o", messages=HI, stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens,
                                   last.usage.total_tokens) == (11, 7, 18)
    assert "".join(c.choices[0].delta.content for c in content) == "Hello world!"
    raw = sse_data(post(fake, "/v1/chat/completions",
                        {"model": "m", "stream": True,
                         "stream_options": {"include_usage": True}}))
    assert all(c["usage"] is None for c in raw[:-2]), "earlier chunks carry usage: null"
    assert raw[-2]["choices"] == [] and raw[-2]["usage"]["completion_tokens"] == 7


def test_separate_role_and_finish_chunks_like_openai(fake):
    fake.behaviour["separate_role_and_finish"] = True
    raw = sse_data(post(fake, "/v1/chat/completions", {"model": "m", "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in raw[:-1]]
    assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}
    assert deltas[1:-1] == [{"content": p} for p in ("Hello", " world", "!")]
    assert deltas[-1] == {} and raw[-2]["choices"][0]["finish_reason"] == "stop"


def test_legacy_completions_whole_and_streamed(fake):
    api = oai(fake)
    reply = api.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert reply.object == "text_completion" and reply.choices[0].text == "Hello world!"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (11, 7)
    chunks = list(api.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi",
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world!"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18


def test_embeddings_as_floats_and_base64(fake):
    api = oai(fake)
    reply = api.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.index for d in reply.data] == [0, 1] and len(reply.data[0].embedding) == 1536
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (11, 11)
    vector = [-0.5, -0.375, -0.25, -0.125, 0.0, 0.125, 0.25, 0.375]
    small = api.embeddings.create(model="text-embedding-3-small", input="a", dimensions=8)
    assert small.data[0].embedding == vector
    packed = api.embeddings.create(model="text-embedding-3-small", input="a", dimensions=8,
                                   encoding_format="base64").data[0].embedding
    assert list(struct.unpack("<8f", base64.b64decode(packed))) == vector


def test_models_list_and_retrieve(fake):
    api = oai(fake)
    assert "gpt-4o" in [m.id for m in api.models.list()]
    assert api.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


def test_responses_whole_and_streamed(fake):
    fake.behaviour.update(cached_tokens=3, reasoning_tokens=2)
    api = oai(fake)
    reply = api.responses.create(model="gpt-4o", input="Hi")
    assert reply.output_text == "Hello world!" and reply.status == "completed"
    usage = reply.usage
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens, usage.output_tokens,
            usage.output_tokens_details.reasoning_tokens, usage.total_tokens) == \
        (11, 3, 7, 2, 18)
    events = list(api.responses.create(model="gpt-4o", input="Hi", stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 3,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.usage is None
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        "Hello world!"
    final = events[-1].response
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 7)
    raw = post(fake, "/v1/responses", {"model": "m", "input": "Hi", "stream": True})
    assert raw.text.startswith("event: response.created\ndata: {")
    assert "[DONE]" not in raw.text


def test_paths_with_and_without_v1(fake):
    for path in ("/v1/chat/completions", "/chat/completions"):
        assert post(fake, path, {"model": "m"}).json()["usage"]["prompt_tokens"] == 11
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/chat/completions"]


def test_openai_protocol_errors(fake):
    resp = requests.post(fake.url + "/v1/chat/completions", json={"model": "m"})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = requests.post(fake.url + "/v1/chat/completions", data=b'{"model":',
                         headers={"Authorization": "Bearer x"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] is None
    resp = requests.get(fake.url + "/v1/nothing", headers={"Authorization": "Bearer x"})
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"


# --- Azure ------------------------------------------------------------------------

def test_azure_chat_whole_has_filter_results_and_a_dated_model(fake):
    reply = azure(fake).chat.completions.create(model="my-deploy", messages=HI)
    assert reply.model == EXPECTED["azure_model"] == "gpt-4o-2024-08-06"
    assert reply.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    assert reply.choices[0].model_extra["content_filter_results"]["hate"]["filtered"] is False
    assert reply.usage.total_tokens == 18
    sent = fake.requests[-1]
    assert sent.path == "/openai/deployments/my-deploy/chat/completions"
    assert sent.query == {"api-version": "2024-10-21"} and sent.headers["api-key"] == "x"
    raw = post(fake, sent.path + "?api-version=1", {"messages": HI}, **{"api-key": "k"})
    assert list(raw.json()) == sorted(raw.json()), "Azure sorts its keys"


def test_azure_stream_starts_with_prompt_filter_results(fake):
    chunks = list(azure(fake).chat.completions.create(
        model="my-deploy", messages=HI, stream=True, stream_options={"include_usage": True}))
    first, *content, last = chunks
    assert first.choices == [] and first.model == "" and first.id == ""
    assert first.model_extra["prompt_filter_results"]
    assert "".join(c.choices[0].delta.content for c in content) == "Hello world!"
    assert all(c.model == "gpt-4o-2024-08-06" for c in content)
    assert content[0].choices[0].model_extra["content_filter_results"]
    assert last.choices == [] and last.usage.completion_tokens == 7


def test_azure_embeddings_and_errors(fake):
    reply = azure(fake).embeddings.create(model="embed-deploy", input="hello")
    assert reply.data[0].embedding and reply.model == "text-embedding-3-small"
    path = "/openai/deployments/d/chat/completions"
    resp = post(fake, path, {"messages": HI}, **{"api-key": "k"})
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "404", "message": "Resource not found"}}
    resp = requests.post(fake.url + path + "?api-version=1", json={})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "401"


def test_reported_model_can_be_set_empty(fake):
    fake.behaviour["model"] = ""
    assert azure(fake).chat.completions.create(model="d", messages=HI).model == ""


# --- Anthropic --------------------------------------------------------------------

def test_anthropic_message_whole(fake):
    fake.behaviour.update(cached_tokens=200, cache_write_tokens=100)
    raw = claude(fake).messages.with_raw_response.create(model="claude-sonnet-4-6",
                                                         max_tokens=100, messages=HI)
    message = raw.parse()
    assert message.content[0].text == "Hello world!" and message.stop_reason == "end_turn"
    assert message.model == "claude-sonnet-4-6"
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens, usage.output_tokens) == (11, 200, 100, 7)
    assert raw.headers["request-id"]
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages" and sent.headers["anthropic-version"]
    # anthropic 2.x sends the API key as a bearer token; older clients use x-api-key
    assert sent.headers.get("x-api-key", sent.headers.get("Authorization")) in ("x", "Bearer x")


def test_anthropic_stream_and_final_usage(fake):
    fake.behaviour.update(cached_tokens=5, cache_write_tokens=4)
    with claude(fake).messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                      messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == "Hello world!"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens,
            final.usage.cache_creation_input_tokens, final.usage.output_tokens) == (11, 5, 4, 7)
    raw = post(fake, "/v1/messages", {"model": "claude", "stream": True, "max_tokens": 9},
               **{"x-api-key": "k", "anthropic-version": "2023-06-01"})
    names = [line[7:] for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping",
                     *["content_block_delta"] * 3, "content_block_stop", "message_delta",
                     "message_stop"]
    data = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: ")]
    assert data[0]["message"]["usage"]["output_tokens"] == 1
    assert data[-2]["usage"]["output_tokens"] == 7 and data[-2]["delta"]["stop_reason"]


def test_anthropic_count_tokens_and_protocol_errors(fake):
    assert claude(fake).messages.count_tokens(model="c", messages=HI).input_tokens == 11
    resp = post(fake, "/v1/messages", {"model": "c"}, **{"x-api-key": "k"})
    assert resp.status_code == 400
    assert resp.json()["error"] == {"type": "invalid_request_error",
                                    "message": "anthropic-version: header is required"}
    resp = requests.post(fake.url + "/v1/messages", json={},
                         headers={"anthropic-version": "2023-06-01"})
    assert resp.status_code == 401 and resp.json()["type"] == "error"


# --- faults -----------------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_status_and_error_body(fake, status):
    body = openai_error(status, "upstream says no", "server_error", "upstream_code")
    fake.behaviour.update(status=status, error_body=body)
    with pytest.raises(openai.APIStatusError) as caught:
        oai(fake).chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == status and caught.value.body == body["error"]
    resp = post(fake, "/v1/chat/completions", {"model": "m", "stream": True})
    assert resp.status_code == status and resp.json() == body


def test_anthropic_error_helper_and_default_bodies(fake):
    fake.behaviour.update(status=529, error_body=anthropic_error(529, "overloaded_error",
                                                                 "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude(fake).messages.create(model="c", max_tokens=9, messages=HI)
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"
    fake.behaviour.pop("error_body")
    fake.behaviour["status"] = 429
    resp = post(fake, "/v1/messages", {}, **{"x-api-key": "k"})
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert post(fake, "/v1/chat/completions", {}).json()["error"]["message"] == \
        "Too Many Requests"


def test_garbage(fake):
    fake.behaviour["garbage"] = True
    resp = post(fake, "/v1/chat/completions", {"model": "m"})
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        json.loads(resp.content)


def test_no_usage_anywhere(fake):
    fake.behaviour["no_usage"] = True
    assert oai(fake).chat.completions.create(model="m", messages=HI).usage is None
    raw = sse_data(post(fake, "/v1/chat/completions",
                        {"model": "m", "stream": True,
                         "stream_options": {"include_usage": True}}))
    assert all("usage" not in c for c in raw[:-1]) and len(raw) == 4
    events = list(oai(fake).responses.create(model="m", input="Hi", stream=True))
    assert events[-1].response.usage is None
    assert "usage" not in post(fake, "/v1/messages", {"model": "c"},
                               **{"x-api-key": "k", "anthropic-version": "1"}).json()


def test_ignore_stream_options(fake):
    fake.behaviour["ignore_stream_options"] = True
    chunks = list(oai(fake).chat.completions.create(
        model="m", messages=HI, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) == 3 and all(c.choices and c.usage is None for c in chunks)
    assert oai(fake).chat.completions.create(model="m", messages=HI).usage.total_tokens == 18


def test_chunks_sets_the_number_of_content_events(fake):
    fake.behaviour["chunks"] = 5
    chunks = list(oai(fake).chat.completions.create(model="m", messages=HI, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == content_pieces(5) == \
        ["Hello", " world", " world", " world", "!"]
    assert fake.last_completion_text == "Hello world world world!"


def test_cut_after_closes_mid_stream(fake):
    fake.behaviour["cut_after"] = 2
    resp = post(fake, "/v1/chat/completions", {"model": "m", "stream": True})
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in resp.iter_content(chunk_size=None):
            received.append(chunk)
    events = b"".join(received).split(b"\n\n")
    assert len([e for e in events if e]) == 2 and b"[DONE]" not in b"".join(received)


def test_cut_after_at_the_raw_socket_level(fake):
    fake.behaviour["cut_after"] = 1
    with socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1]))) as sock:
        body = b'{"model":"m","stream":true}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert rest.count(b"data: ") == 1 and not rest.endswith(b"0\r\n\r\n")


def test_first_chunk_arrives_before_the_stall_ends(fake):
    stall = 1.0
    fake.behaviour["stall_after_first"] = stall
    started = time.monotonic()
    resp = post(fake, "/v1/chat/completions", {"model": "m", "stream": True})
    chunks = resp.iter_content(chunk_size=None)
    first = next(chunks)
    first_at = time.monotonic() - started
    assert first.startswith(b"data: {") and first.endswith(b"\n\n")
    rest = b"".join(chunks)
    done_at = time.monotonic() - started
    assert first_at < stall / 2 and done_at >= stall
    assert rest.endswith(b"data: [DONE]\n\n")


def test_chunk_delay_spaces_the_events(fake):
    fake.behaviour.update(chunk_delay=0.1)
    started = time.monotonic()
    assert sse_data(post(fake, "/v1/chat/completions", {"model": "m", "stream": True}))
    assert time.monotonic() - started >= 0.3  # 3 gaps between 4 events


def test_delay_first_and_the_request_is_recorded_before_it(fake):
    fake.behaviour["delay_first"] = 1.0
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(fake.url + "/v1/chat/completions", json={"model": "m"},
                      headers={"Authorization": "Bearer x"}, timeout=0.3)
    assert fake.requests and fake.requests[-1].json == {"model": "m"}


# --- recording and lifecycle -------------------------------------------------------

def test_requests_record_method_path_query_headers_and_body(fake):
    requests.post(fake.url + "/v1/chat/completions?trace=1&x=a%20b",
                  data=b'{"model": "gpt-4o", "stream_options": {"include_usage": true}}',
                  headers={"Authorization": "Bearer sk-1", "X-Custom": "kept",
                           "Content-Type": "application/json"})
    sent = fake.requests[-1]
    assert (sent.method, sent.path, sent.query) == ("POST", "/v1/chat/completions",
                                                   {"trace": "1", "x": "a b"})
    assert sent.headers["authorization"] == sent.headers["Authorization"] == "Bearer sk-1"
    assert "x-custom" in sent.headers and sent.headers.get("X-CUSTOM") == "kept"
    assert "X-Custom" in dict(sent.headers) and json.dumps(dict(sent.headers))
    assert sent.body.startswith(b'{"model": "gpt-4o"')
    assert sent.json["stream_options"] == {"include_usage": True}


def test_chunked_request_bodies_are_read(fake):
    resp = requests.post(fake.url + "/v1/chat/completions", headers={"Authorization": "B x"},
                         data=iter([b'{"model":', b'"gpt-4o"}']))
    assert resp.status_code == 200 and fake.requests[-1].json == {"model": "gpt-4o"}


def test_reset_keeps_the_same_list_and_dict(fake):
    seen, behaviour = fake.requests, fake.behaviour
    fake.behaviour["chunks"] = 9
    post(fake, "/v1/chat/completions", {"model": "m"})
    fake.reset()
    assert fake.requests is seen == [] and fake.behaviour is behaviour == {}


def test_many_concurrent_calls_on_keep_alive_connections(fake):
    fake.behaviour["delay_first"] = 0.05
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=64)
    session.mount("http://", adapter)

    def call(i):
        body = {"model": f"m{i}", "stream": i % 2 == 0}
        resp = session.post(fake.url + "/v1/chat/completions", json=body, timeout=10,
                            headers={"Authorization": "Bearer x"})
        return resp.status_code, resp.content

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, range(200)))
    assert all(status == 200 for status, _ in results)
    assert all(body.endswith(b"[DONE]\n\n") for _, body in results[::2])
    assert len(fake.requests) == 200
    assert {r.json["model"] for r in fake.requests} == {f"m{i}" for i in range(200)}


def test_text_sets_the_completion_whole_and_streamed(fake):
    fake.behaviour.update(text="marker-0123456789", chunks=4)
    whole = oai(fake).chat.completions.create(model="gpt-4o", messages=[])
    assert whole.choices[0].message.content == "marker-0123456789"
    pieces = [chunk.choices[0].delta.content for chunk in oai(fake).chat.completions.create(
        model="gpt-4o", messages=[], stream=True) if chunk.choices]
    assert len(pieces) == 4 and "".join(pieces) == "marker-0123456789"
    message = claude(fake).messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text == "marker-0123456789"


def test_each_reply_records_how_it_ended(fake):
    whole = post(fake, "/v1/chat/completions", {"model": "m"})
    assert whole.json()["usage"]
    assert fake.requests[-1].reply.wait() == "complete"
    assert sse_data(post(fake, "/v1/chat/completions", {"model": "m", "stream": True}))
    streamed = fake.requests[-1].reply
    assert (streamed.wait(), streamed.events_sent) == ("complete", 4)  # 3 pieces, [DONE]
    fake.behaviour["cut_after"] = 2
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        post(fake, "/v1/chat/completions", {"model": "m", "stream": True}).content
    cut = fake.requests[-1].reply
    assert (cut.wait(), cut.events_sent) == ("cut", 2)
    # A client that goes after the first event: a later write fails, and says so.
    fake.behaviour.clear()
    fake.behaviour.update(chunks=50, chunk_delay=0.05)
    with socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])),
                                  timeout=10) as sock:
        body = b'{"model":"m","stream":true}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: " not in received:  # the first event, then the client goes
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    left = fake.requests[-1].reply
    assert left.wait() == "client left" and 1 <= left.events_sent < 51
