"""Google Gemini through llimit: projects of upstream_kind gemini, called with
the official google-genai SDK (and plain HTTP where a client's choice is the
point), in front of the fake upstream's Gemini wire format. Expected costs are
hand arithmetic on pricing.json's published prices:
gemini-2.5-flash $0.30 in, $0.03 cached, $2.50 out per 1M tokens;
gemini-embedding-001 $0.15 in."""

import logging
import urllib.parse

import pytest
import requests

from tests.conftest import LazyModule
from tests.fake_upstream import EXPECTED

genai = LazyModule("google.genai")
openai = LazyModule("openai")

GEMINI_UPSTREAM_KEY = "AIza-upstream-secret-gemini"
P, C = EXPECTED["prompt_tokens"], EXPECTED["completion_tokens"]  # 11 and 7


def gemini_key(gateway, fake, user="alice", project="gem", **key_fields):
    """A key of a project whose upstream is Gemini (the fake's API root): (raw key, id)."""
    if gateway.admin.get(f"{gateway.url}/admin/projects/{project}").status_code == 404:
        resp = gateway.admin.post(gateway.url + "/admin/projects", json={
            "id": project, "upstream_kind": "gemini", "upstream_url": fake.url,
            "upstream_key": GEMINI_UPSTREAM_KEY})
        assert resp.status_code == 201, resp.text
    return gateway.create_key(user=user, project=project, **key_fields)


def sdk(gateway, raw_key, api_version=None):
    options = genai.types.HttpOptions(base_url=gateway.url, api_version=api_version,
                                retry_options=genai.types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=raw_key, http_options=options)


def usd(event):
    return None if event["cost_nusd"] is None else event["cost_nusd"] / 1e9


def assert_one_priced_stream(gateway, prompt_tokens, completion_tokens, cost_usd):
    """The gateway metered one call, a stream priced from its usage, at cost_usd."""
    [event] = gateway.events()
    assert (event["stream"], event["pricing"], event["prompt_tokens"],
            event["completion_tokens"]) == (1, "priced", prompt_tokens, completion_tokens)
    assert usd(event) == pytest.approx(cost_usd)


def test_generate_content_with_the_sdk_is_metered_from_usage_metadata(gateway, fake):
    raw_key, key_id = gemini_key(gateway, fake)
    fake.behaviour.update(prompt_tokens=1000, cached_tokens=400, completion_tokens=300,
                          reasoning_tokens=120)
    client = sdk(gateway, raw_key)  # held: a Client closes its connections when collected
    answer = client.models.generate_content(
        model="gemini-2.5-flash", contents="Say hello")
    assert answer.text == EXPECTED["text"]
    assert answer.usage_metadata.thoughts_token_count == 120
    sent = fake.requests[-1]
    # What the current SDK sends, under its default version prefix, with the project's key.
    assert sent.path == "/v1/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == GEMINI_UPSTREAM_KEY
    assert raw_key not in str(sent.headers) and "key" not in sent.query
    [event] = gateway.events()
    assert (event["model"], event["key_id"], event["pricing"]) == \
        ("gemini-2.5-flash", key_id, "priced")
    assert (event["prompt_tokens"], event["cached_tokens"], event["completion_tokens"]) == \
        (1000, 400, 300)  # completion = candidates 180 + thoughts 120
    # 600 uncached x 0.30 + 400 cached x 0.03 + 300 out x 2.50, per 1M tokens
    assert usd(event) == pytest.approx((600 * 0.30 + 400 * 0.03 + 300 * 2.50) / 1e6)


def test_streaming_with_the_sdk_passes_each_chunk_and_meters_the_last_usage(gateway, fake):
    raw_key, _ = gemini_key(gateway, fake)
    fake.behaviour.update(chunks=4, prompt_tokens=50, completion_tokens=20)
    client = sdk(gateway, raw_key, "v1beta")
    pieces = [chunk.text for chunk in client.models.generate_content_stream(
        model="gemini-2.5-flash", contents="Hi")]
    assert pieces == EXPECTED["pieces"][:1] + [" world"] * 2 + ["!"]
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert sent.query == {"alt": "sse"}
    assert_one_priced_stream(gateway, 50, 20, cost_usd=(50 * 0.30 + 20 * 2.50) / 1e6)


def test_a_stream_without_alt_sse_is_one_json_array_metered_from_its_last_chunk(gateway, fake):
    raw_key, _ = gemini_key(gateway, fake)
    fake.behaviour.update(prompt_tokens=40, completion_tokens=9)
    resp = requests.post(gateway.url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                         headers={"x-goog-api-key": raw_key},
                         json={"contents": [{"parts": [{"text": "Hi"}]}]})
    assert resp.status_code == 200, resp.text
    assert isinstance(resp.json(), list) and len(resp.json()) == 3
    [event] = gateway.events()
    assert (event["prompt_tokens"], event["completion_tokens"], event["pricing"]) == \
        (40, 9, "priced")


def test_a_stream_cut_short_is_metered_as_estimated(gateway, fake):
    raw_key, _ = gemini_key(gateway, fake)
    fake.behaviour.update(chunks=5, cut_after=2, prompt_tokens=30)
    resp = requests.post(gateway.url + "/v1/models/gemini-2.5-flash:streamGenerateContent"
                         "?alt=sse", headers={"x-goog-api-key": raw_key},
                         json={"contents": [{"parts": [{"text": "Hi"}]}],
                               "generationConfig": {"maxOutputTokens": 50}}, stream=True)
    body = resp.raw.read()
    assert b'"UNAVAILABLE"' in body  # the error event in Gemini's own shape
    [event] = gateway.events()
    # The prompt as the upstream counted it, and the output the call was bounded at
    # (generationConfig.maxOutputTokens): the upstream bills what it generated.
    assert (event["pricing"], event["prompt_tokens"], event["completion_tokens"]) == \
        ("estimated", 30, 50)


def test_count_tokens_and_model_lists_are_free_lookups(make_llimit, fake):
    gateway = make_llimit()
    raw_key, _ = gemini_key(gateway, fake)
    resp = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "alice", "metric": "requests", "window": "day",
        "amount": 1, "action": "block"})
    assert resp.status_code == 201, resp.text
    client = sdk(gateway, raw_key)
    for _ in range(3):  # past the one-request limit: look-ups are never counted or refused
        assert client.models.count_tokens(model="gemini-2.5-flash",
                                          contents="Hi").total_tokens == P
    assert [m.name for m in client.models.list()][:1] == ["models/gemini-2.5-flash"]
    assert client.models.get(model="gemini-2.5-pro").name == "models/gemini-2.5-pro"
    assert {e["pricing"] for e in gateway.events()} == {"free"}
    assert all(usd(e) in (None, 0) for e in gateway.events())
    client.models.generate_content(model="gemini-2.5-flash", contents="Hi")  # the one
    with pytest.raises(genai.errors.ClientError) as refused:
        client.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert refused.value.code == 429 and refused.value.status == "RESOURCE_EXHAUSTED"


def test_embeddings_are_generation_and_priced(gateway, fake):
    raw_key, _ = gemini_key(gateway, fake)
    fake.behaviour.update(prompt_tokens=2000)
    client = sdk(gateway, raw_key)
    result = client.models.embed_content(
        model="gemini-embedding-001", contents=["one", "two"])
    assert len(result.embeddings) == 2
    [event] = gateway.events()
    assert fake.requests[-1].path.endswith(":batchEmbedContents")
    assert (event["model"], event["prompt_tokens"], event["pricing"]) == \
        ("gemini-embedding-001", 2000, "priced")
    assert usd(event) == pytest.approx(2000 * 0.15 / 1e6)


def test_a_key_in_the_query_works_never_goes_upstream_and_is_never_logged(
        gateway, fake, caplog):
    raw_key, key_id = gemini_key(gateway, fake)
    url = gateway.url + "/v1beta/models/gemini-2.5-flash:generateContent"
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    # llimit's own log at every level (the test's own HTTP client logs its URLs itself).
    with caplog.at_level(logging.DEBUG, logger="llimit"):
        ok = requests.post(url + "?key=" + raw_key, json=body)
        # The name percent-encoded is the same parameter: still taken out.
        encoded = requests.post(url + "?alt=json&ke%79=" + urllib.parse.quote(raw_key),
                                json=body)
        wrong = requests.post(url + "?key=llimit-wrong-" + "x" * 30, json=body)
    assert ok.status_code == 200 and encoded.status_code == 200, (ok.text, encoded.text)
    assert fake.requests[0].query == {} and fake.requests[1].query == {"alt": "json"}
    assert all(r.headers["x-goog-api-key"] == GEMINI_UPSTREAM_KEY for r in fake.requests)
    assert wrong.status_code == 401 and len(fake.requests) == 2
    assert wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert key_id in logged  # the calls were logged...
    assert raw_key not in logged and "llimit-wrong" not in logged  # ...without the keys
    assert {e["key_id"] for e in gateway.events()} == {key_id}


def test_llimit_errors_on_gemini_routes_speak_gemini(gateway, fake):
    raw_key, _ = gemini_key(gateway, fake, models=["gemini-2.5-flash"])
    client = sdk(gateway, raw_key)
    with pytest.raises(genai.errors.ClientError) as denied:
        client.models.generate_content(model="gemini-2.5-pro", contents="Hi")
    assert (denied.value.code, denied.value.status) == (403, "PERMISSION_DENIED")
    assert "gemini-2.5-flash" in denied.value.message
    with pytest.raises(genai.errors.ClientError) as unknown:
        stranger = sdk(gateway, "llimit-" + "n" * 40)
        stranger.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert (unknown.value.code, unknown.value.status) == (401, "UNAUTHENTICATED")
    missing = requests.post(gateway.url + "/v1/models/gemini-2.5-flash:generateContent",
                            json={})
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"code", "message", "status"}
    # A batchEmbedContents request may name its model again, per request: checked too.
    resp = requests.post(gateway.url + "/v1/models/gemini-2.5-flash:batchEmbedContents",
                         headers={"x-goog-api-key": raw_key},
                         json={"requests": [{"model": "models/gemini-2.5-pro",
                                             "content": {"parts": [{"text": "x"}]}}]})
    assert resp.status_code == 403 and resp.json()["error"]["status"] == "PERMISSION_DENIED"
    assert fake.requests == []


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent"),
    ("POST", "/v1beta/cachedContents"),
    ("POST", "/v1beta/files"),
    ("POST", "/v1beta/models/veo-3:predictLongRunning"),
    ("POST", "/v1beta/tunedModels/mine:generateContent"),
    ("POST", "/v1/chat/completions"),  # an OpenAI route on a Gemini project
])
def test_routes_without_a_class_are_refused_before_the_upstream(gateway, fake, method, path):
    raw_key, _ = gemini_key(gateway, fake)
    resp = requests.request(method, gateway.url + path, headers={"x-goog-api-key": raw_key},
                            json={"model": "gemini-2.5-flash"})
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "is not allowed through llimit" in resp.json()["error"]["message"]
    assert fake.requests == []


def test_gemini_routes_on_other_projects_are_refused(gateway, fake):
    raw_key, _ = gateway.create_key()  # the default project: OpenAI
    for path in ("/v1beta/models/gemini-2.5-flash:generateContent",
                 "/v1/models/gemini-2.5-flash:generateContent"):
        resp = requests.post(gateway.url + path, headers={"Authorization": f"Bearer {raw_key}"},
                             json={"contents": []})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "route_not_allowed"
    assert fake.requests == []


def test_gemini_openai_compatible_endpoint_as_an_openai_project(gateway, fake):
    # Google's OpenAI-compatible endpoint is an ordinary openai-kind upstream.
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "gem-openai", "upstream_kind": "openai",
        "upstream_url": fake.url + "/v1beta/openai", "upstream_key": GEMINI_UPSTREAM_KEY})
    assert resp.status_code == 201, resp.text
    raw_key, _ = gateway.create_key(project="gem-openai")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    fake.behaviour.update(prompt_tokens=100, completion_tokens=40)
    chunks = list(client.chat.completions.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": "Hi"}], stream=True))
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/openai/chat/completions"
    assert sent.headers["authorization"] == "Bearer " + GEMINI_UPSTREAM_KEY
    assert sent.json["stream_options"] == {"include_usage": True}  # injected
    assert all(chunk.choices for chunk in chunks)  # the usage-only chunk hidden again
    assert_one_priced_stream(gateway, 100, 40, cost_usd=(100 * 0.30 + 40 * 2.50) / 1e6)


def test_the_upstream_refusing_llimits_gemini_key_reads_as_llimits_own_error(gateway, fake):
    raw_key, _ = gemini_key(gateway, fake)
    # What Google answers a wrong API key: 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
    fake.behaviour.update(status=400, error_body={"error": {
        "code": 400, "message": f"API key not valid: {GEMINI_UPSTREAM_KEY}. Please pass a"
                                " valid API key.", "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}})
    client = sdk(gateway, raw_key)
    with pytest.raises(genai.errors.ClientError) as refused:
        client.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert refused.value.code == 400 and refused.value.status == "INVALID_ARGUMENT"
    assert "refused llimit's credentials" in refused.value.message
    assert GEMINI_UPSTREAM_KEY not in str(refused.value.details)
