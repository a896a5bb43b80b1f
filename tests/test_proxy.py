"""The proxy with real clients: the official openai package and plain HTTP."""

import json
import socket
import time

import pytest
import requests

from tests.conftest import UPSTREAM_KEY, LazyModule, sqlite_only

openai = LazyModule("openai")

ENGINES = ("sqlite", "postgres")


def client(gateway, raw_key, **kwargs):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0,
                         **kwargs)


def test_chat_completion_with_the_openai_package(gateway, fake):
    raw_key, key_id = gateway.create_key(user="alice")
    reply = client(gateway, raw_key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens == 11
    sent = fake.requests[-1]
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert raw_key not in json.dumps(dict(sent.headers))
    (event,) = gateway.events()
    assert (event["key_id"], event["user_name"], event["endpoint"]) == \
        (key_id, "alice", "chat/completions")
    assert event["pricing"] == "priced" and event["cost_nusd"] > 0


@pytest.mark.parametrize("call", ["completions", "embeddings", "responses", "models"])
def test_every_openai_endpoint_passes(gateway, fake, call):
    raw_key, _ = gateway.create_key()
    api = client(gateway, raw_key)
    if call == "completions":
        result = api.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
        assert result.usage.completion_tokens == 7
    elif call == "embeddings":
        result = api.embeddings.create(model="text-embedding-3-small", input="hello")
        assert result.data[0].embedding
    elif call == "responses":
        result = api.responses.create(model="gpt-4o", input="Hi")
        assert result.usage.input_tokens == 11
    else:
        assert [m.id for m in api.models.list()]
    (event,) = gateway.events()
    assert event["status_code"] == 200


@sqlite_only  # what goes upstream: no storage
def test_query_string_and_headers_pass_both_ways(gateway, fake):
    raw_key, _ = gateway.create_key()
    upstream_wait_ms = 500
    fake.behaviour["delay_first"] = upstream_wait_ms / 1000
    started = time.perf_counter()
    resp = requests.post(gateway.url + "/v1/chat/completions?trace=1&x=a%20b",
                         headers={"Authorization": f"Bearer {raw_key}",
                                  "OpenAI-Organization": "org-1",
                                  "Connection": "keep-alive, X-Hop-Secret",
                                  "X-Hop-Secret": "for-the-next-hop-only",
                                  "X-Custom": "dropped", "OpenAI-Beta": "assistants=v2"},
                         json={"model": "gpt-4o", "messages": []})
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert resp.status_code == 200
    sent = fake.requests[-1]
    assert sent.query == {"trace": "1", "x": "a b"}
    # Only an allowlist of headers goes upstream (tests/test_security.py has the rest).
    assert sent.headers.get("OpenAI-Beta") == "assistants=v2"
    assert "X-Custom" not in sent.headers and "OpenAI-Organization" not in sent.headers
    # Hop-by-hop (RFC 9110, 7.6.1): neither Connection nor a header it names goes on.
    assert "Connection" not in sent.headers
    assert "X-Hop-Secret" not in sent.headers
    assert "x-request-id" in {name.lower() for name in resp.headers}
    # llimit's own time: something, and none of the upstream's wait, which the client's
    # elapsed time holds along with it.
    overhead_ms = float(resp.headers["X-LLimit-Overhead-Ms"])
    assert 0 < overhead_ms <= elapsed_ms - upstream_wait_ms


@sqlite_only  # what goes upstream: no storage
def test_upstream_api_version_is_added_when_missing(make_llimit, fake):
    gateway = make_llimit(upstream_api_version="2024-10-21")
    raw_key, _ = gateway.create_key()
    requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                  headers={"Authorization": f"Bearer {raw_key}"})
    assert fake.requests[-1].query["api-version"] == "2024-10-21"
    requests.post(gateway.url + "/v1/chat/completions?api-version=1", json={"model": "gpt-4o"},
                  headers={"Authorization": f"Bearer {raw_key}"})
    assert fake.requests[-1].query["api-version"] == "1"


def assert_openai_error(resp, status, error_type=None, code=None):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"]
    if error_type:
        assert error["type"] == error_type
    if code:
        assert error["code"] == code
    return error


@sqlite_only  # input checks: no storage
def test_missing_and_wrong_keys_get_401(gateway, fake):
    url = gateway.url + "/v1/chat/completions"
    assert_openai_error(requests.post(url, json={}), 401, code="missing_api_key")
    error = assert_openai_error(requests.post(
        url, json={}, headers={"Authorization": "Bearer llimit-" + "x" * 43}), 401,
        code="invalid_api_key")
    assert "x" * 20 not in error["message"]
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-not-ours").chat.completions.create(model="gpt-4o", messages=[])
    assert fake.requests == []


def test_revoked_and_expired_keys_get_403(gateway, fake):
    raw_key, key_id = gateway.create_key()
    api = client(gateway, raw_key)
    api.chat.completions.create(model="gpt-4o", messages=[])
    assert gateway.admin.post(f"{gateway.url}/admin/keys/{key_id}/revoke").status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.body["code"] == "key_revoked"
    expired, _ = gateway.create_key(expires_at="2001-01-01")
    resp = requests.post(gateway.url + "/v1/chat/completions", json={},
                         headers={"Authorization": f"Bearer {expired}"})
    assert_openai_error(resp, 403, code="key_expired")


def test_key_headers_of_azure_and_anthropic_clients_work(gateway, fake):
    raw_key, _ = gateway.create_key()
    for header in ("api-key", "x-api-key"):
        resp = requests.post(gateway.url + "/v1/chat/completions", headers={header: raw_key},
                             json={"model": "gpt-4o", "messages": []})
        assert resp.status_code == 200
        assert raw_key not in json.dumps(dict(fake.requests[-1].headers))


def test_model_allow_list(gateway, fake):
    raw_key, _ = gateway.create_key(models=["gpt-4o-mini"])
    api = client(gateway, raw_key)
    api.chat.completions.create(model="gpt-4o-mini", messages=[])
    api.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=[])
    with pytest.raises(openai.PermissionDeniedError):
        api.chat.completions.create(model="gpt-4o", messages=[])


@sqlite_only  # input checks: no storage
def test_malformed_json_is_a_400_and_nothing_goes_upstream(gateway, fake):
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions", data=b'{"model": "gpt-4o",',
                         headers={"Authorization": f"Bearer {raw_key}",
                                  "Content-Type": "application/json"})
    assert_openai_error(resp, 400, "invalid_request_error", "invalid_json")
    assert fake.requests == []


@sqlite_only  # input checks: no storage
def test_oversized_body_is_a_413(make_llimit, fake):
    gateway = make_llimit(max_body_bytes=1000)
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions",
                         json={"model": "gpt-4o", "messages": [{"content": "x" * 2000}]},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert_openai_error(resp, 413)
    assert fake.requests == []


def test_upstream_refusing_connections_is_a_502(make_llimit):
    # Bound and never listening, the port refuses connections; held, no one else takes it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        gateway = make_llimit(upstream_url=f"http://127.0.0.1:{port}/v1")
        raw_key, _ = gateway.create_key()
        resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                             headers={"Authorization": f"Bearer {raw_key}"})
    assert_openai_error(resp, 502, code="upstream_unreachable")
    (event,) = gateway.events()
    assert event["status_code"] == 502 and event["cost_nusd"] == 0 and event["pricing"] == "free"


def test_upstream_timeout_is_a_504(make_llimit, fake):
    gateway = make_llimit(upstream_timeout=0.3)
    fake.behaviour["delay_first"] = 1.0
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert_openai_error(resp, 504, code="upstream_timeout")


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])  # 401/403: test_security.py
def test_upstream_errors_pass_through_unchanged(gateway, fake, status):
    from tests.fake_upstream import openai_error
    body = openai_error(status, "upstream says no", "server_error", "upstream_code")
    fake.behaviour.update(status=status, error_body=body)
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == status
    assert resp.json() == body
    (event,) = gateway.events()
    assert event["status_code"] == status and event["pricing"] == "free" and event["cost_nusd"] == 0


def test_garbage_from_upstream_passes_and_is_metered_unpriced(gateway, fake):
    fake.behaviour["garbage"] = True
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 200
    (event,) = gateway.events()
    assert event["pricing"] == "unpriced" and event["prompt_tokens"] == 0


@sqlite_only  # input checks: no storage
def test_unknown_urls_get_openai_shaped_404(gateway):
    assert_openai_error(requests.get(gateway.url + "/admin/nothing-here"), 404)
