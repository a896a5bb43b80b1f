"""What the official clients make of llimit's own refusals: which they retry, which
they show at once, in which error shape, and what a base URL without /v1 gets."""

import logging
import re

import pytest
import requests

from tests.conftest import LazyModule
from tests.test_providers import anthropic_project  # noqa: F401 (a fixture)

anthropic = LazyModule("anthropic")
openai = LazyModule("openai")

MINUTE_START = 1_795_000_020.0   # a whole minute (divisible by 60)


def rejections(server, error_code):
    """How many calls llimit refused with this code, from its /metrics."""
    text = requests.get(server.url + "/metrics").text
    found = re.search(r'llimit_rejections_total\{type="%s"\} (\d+)' % error_code, text)
    return int(found.group(1)) if found else 0


def add_limit(server, **fields):
    resp = server.admin.post(server.url + "/admin/limits", json=fields)
    assert resp.status_code == 201, resp.text
    return resp.json()


def chat(raw_key, server, **client_args):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=raw_key, **client_args)
    return client.chat.completions.create(model="gpt-4o-mini",
                                          messages=[{"role": "user", "content": "Hi"}])


def test_openai_sdk_does_not_retry_a_spent_budget(gateway, fake, clock):
    clock.now = MINUTE_START + 30
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="day", amount=1)
    chat(raw_key, gateway)
    upstream_calls = len(fake.requests)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(raw_key, gateway)  # the SDK's default: max_retries=2
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "Your daily allowance of 1 request is used up" in caught.value.message
    assert rejections(gateway, "budget_exceeded") == 1   # asked once, not three times
    assert len(fake.requests) == upstream_calls


def test_openai_sdk_retries_a_minute_limit_after_retry_after(gateway, fake, clock):
    clock.now = MINUTE_START + 59  # the window resets in 1 s: Retry-After: 1
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="minute",
              amount=1)
    chat(raw_key, gateway)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(raw_key, gateway, max_retries=2)  # the clock stands still: refused each time
    headers = caught.value.response.headers
    assert headers["Retry-After"] == "1" and "x-should-retry" not in headers
    assert "Try again in 1 second." in caught.value.message
    assert rejections(gateway, "rate_limit_exceeded") == 3   # the first try and 2 retries


def test_anthropic_sdk_gets_anthropic_errors_and_does_not_retry_them(
        gateway, fake, clock, anthropic_project):  # noqa: F811
    clock.now = MINUTE_START + 30
    add_limit(gateway, scope="user", target="bea", metric="requests", window="day", amount=1)
    api = anthropic.Anthropic(base_url=gateway.url, api_key=anthropic_project)  # retries: 2
    api.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                        messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.RateLimitError) as caught:
        api.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                            messages=[{"role": "user", "content": "Hi"}])
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "Your daily allowance of 1 request is used up" in body["error"]["message"]
    assert "Your daily allowance" in str(caught.value)
    assert caught.value.status_code == 429
    assert rejections(gateway, "budget_exceeded") == 1

    # A wrong key: Anthropic's authentication_error, at once, llimit's message.
    wrong = anthropic.Anthropic(base_url=gateway.url, api_key="llimit-" + "x" * 40)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.count_tokens(model="claude-sonnet-4-5",
                                    messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert rejections(gateway, "invalid_api_key") == 1


def test_llimit_errors_keep_openai_shape_on_openai_routes(gateway):
    resp = requests.post(gateway.url + "/v1/chat/completions", json={},
                         headers={"Authorization": "Bearer llimit-nope"})
    assert resp.status_code == 401 and resp.headers["x-should-retry"] == "false"
    assert set(resp.json()) == {"error"} and resp.json()["error"]["code"] == "invalid_api_key"


def test_a_base_url_without_v1_gets_a_json_404_that_names_the_fix(gateway, caplog):
    raw_key, _ = gateway.create_key()
    client = openai.OpenAI(base_url=gateway.url, api_key=raw_key)
    with caplog.at_level(logging.WARNING, logger="llimit"), \
            pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert f"use base_url {gateway.url}/v1" in caught.value.message
    assert caught.value.response.headers["Content-Type"] == "application/json"
    assert any("POST /chat/completions" in record.getMessage() and "/v1" in
               record.getMessage() for record in caplog.records)
    for path in ("/messages", "/responses"):
        resp = requests.post(gateway.url + path, json={})
        assert resp.status_code == 404 and "/v1" in resp.json()["error"]["message"]
    # Anything else stays the plain page.
    assert requests.get(gateway.url + "/nothing-here").headers["Content-Type"].startswith(
        "text/html")


def test_one_source_of_rate_limit_headers_per_response(gateway, fake, clock):
    clock.now = MINUTE_START + 10
    raw_key, key_id = gateway.create_key()
    # No minute limit of llimit's: the upstream's x-ratelimit-* pass untouched.
    plain = requests.post(gateway.url + "/v1/chat/completions",
                          json={"model": "gpt-4o-mini", "messages": []},
                          headers={"Authorization": f"Bearer {raw_key}"})
    assert plain.headers["x-ratelimit-limit-tokens"] == "30000000"
    assert plain.headers["x-ratelimit-remaining-requests"] == "9999"
    # A minute limit of llimit's: its own replace all of the upstream's.
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="minute",
              amount=5)
    own = requests.post(gateway.url + "/v1/chat/completions",
                        json={"model": "gpt-4o-mini", "messages": []},
                        headers={"Authorization": f"Bearer {raw_key}"})
    ratelimit = {name.lower(): value for name, value in own.headers.items()
                 if name.lower().startswith("x-ratelimit-")}
    assert set(ratelimit) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                              "x-ratelimit-reset-requests"}
    assert ratelimit["x-ratelimit-limit-requests"] == "5"
