"""Hostile input: a fuzzer on the admin API, broken and oversized requests,
header injection, path tricks, markup and SQL in every stored text, formulas
in CSV exports, and the guessing of keys and admin tokens."""

import csv
import dataclasses
import hashlib
import http.client
import io
import socket
import statistics
import time

import hypothesis
import pytest
import requests
import schemathesis

import llimit
from tests.browser import http_sign_in
from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, Clock, LlimitServer
from tests.fake_upstream import FakeUpstream
from tests.process import LlimitProcess

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


def assert_openai_error(resp, status):
    """The response is llimit's own error, in OpenAI's shape, with this status."""
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "code" in error
    return error


def still_serving(server, raw_key):
    """llimit still answers its health check and proxies a call."""
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
    resp = requests.post(server.url + "/v1/chat/completions", json=CHAT, timeout=30,
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 200, resp.text


def raw_request(url, request_bytes, timeout=30):
    """Send bytes as they are (no client normalises them); the status line and the rest."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(request_bytes)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One llimit (and fake upstream) for the whole fuzzing run."""
    upstream = FakeUpstream()
    config = dataclasses.replace(
        llimit.Config(), db_path=str(tmp_path_factory.mktemp("fuzz") / "llimit.db"),
        admin_token=ADMIN_TOKEN, upstream_url=upstream.url + "/v1",
        upstream_key=UPSTREAM_KEY, threads=8, clock=Clock())
    server = LlimitServer(config)
    yield server
    server.stop()
    upstream.close()


@pytest.fixture(scope="module")
def admin_schema(live):
    schema = schemathesis.openapi.from_url(live.url + "/admin/openapi.json")
    # Unknown query parameters are ignored, as web APIs do; that is no bug to report.
    schema.config.generation.update(allow_extra_parameters=False)
    return schema


fuzzed = schemathesis.pytest.from_fixture("admin_schema")


# Rules OpenAPI 3.0 cannot state, so a 400 for them is no refusal of valid data:
# start may not be after end; an azure or anthropic project (as stored) needs its
# upstream_url. Every other check runs on these operations as well.
STATEFUL_RULES = {("GET", "/admin/usage"), ("GET", "/admin/usage.csv"),
                  ("PATCH", "/admin/projects/{id}")}


@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@fuzzed.parametrize()
def test_the_admin_api_answers_fuzzed_requests_as_its_spec_says(case, live):
    # The fuzzer sends wrong tokens on purpose (to see them refused with 401); the
    # minute that passes between cases keeps the bad-secret throttle out of it.
    live.config.clock.advance(61)
    excluded = ([schemathesis.checks.positive_data_acceptance]
                if (case.method.upper(), case.operation.path) in STATEFUL_RULES else [])
    case.call_and_validate(base_url=live.url, excluded_checks=excluded,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


# --- broken, mistyped and oversized requests ------------------------------------------

ADMIN_MISTAKES = [
    ("POST", "/admin/keys", b"{"),
    ("POST", "/admin/keys", b"\xff\xfe{"),
    ("POST", "/admin/keys", b"[]"),
    ("POST", "/admin/keys", b'"user"'),
    ("POST", "/admin/keys", b'{"user": 5}'),
    ("POST", "/admin/keys", b'{"user": "a", "project": ["default"]}'),
    ("POST", "/admin/keys", b'{"user": "a", "models": "gpt-4o"}'),
    ("POST", "/admin/keys", b'{"user": "a", "expires_at": "tomorrow"}'),
    ("POST", "/admin/keys", b'{"user": "a", "expires_at": 5}'),
    ("POST", "/admin/keys", b'{"user": "a", "colour": "red"}'),
    ("POST", "/admin/projects", b"{}"),
    ("POST", "/admin/projects", b'{"id": ["p"]}'),
    ("POST", "/admin/projects", b'{"id": "p", "name": {}}'),
    ("POST", "/admin/projects", b'{"id": "p", "allow_user_keys": "yes"}'),
    ("POST", "/admin/projects", b'{"id": "p", "budget": "x"}'),
    ("POST", "/admin/projects", b'{"id": "p", "budget": {}}'),
    ("POST", "/admin/projects", b'{"id": "p", "budget": {"usd": "x"}}'),
    ("POST", "/admin/projects", b'{"id": "p", "model_map": "x"}'),
    ("POST", "/admin/projects", b'{"id": "p", "upstream_kind": "azure"}'),
    ("POST", "/admin/projects", b'{"id": "p", "upstream_url": "http://[x"}'),
    ("POST", "/admin/limits", b'{"scope": "global"}'),
    ("POST", "/admin/limits", b'{"scope": "global", "metric": "usd", "window": "day",'
                              b' "amount": "x"}'),
    ("POST", "/admin/limits", b'{"scope": "global", "metric": "usd", "window": "day",'
                              b' "amount": 1, "alert_at": "x"}'),
    ("POST", "/admin/limits", b'{"scope": "global", "metric": "usd", "window": "day",'
                              b' "amount": 1e400}'),
    ("POST", "/admin/limits", b'{"scope": "user", "target": {}, "metric": "usd",'
                              b' "window": "day", "amount": 1}'),
    ("PUT", "/admin/pricing/m", b'{"input": "x", "output": 1}'),
    ("PUT", "/admin/pricing/m", b'{"input": NaN, "output": Infinity}'),
    ("PUT", "/admin/pricing/m", b'{"input": 1e300, "output": 1}'),
    ("GET", "/admin/usage?start=nope", b""),
    ("GET", "/admin/usage?group_by=colour", b""),
    ("GET", "/admin/usage?end=0001-01-01", b""),
    ("GET", "/admin/usage.csv?end=9999-12-31", b""),
    ("GET", "/admin/keys?active=maybe", b""),
]


@pytest.mark.parametrize("method, path, body", ADMIN_MISTAKES)
def test_a_broken_or_mistyped_admin_request_is_a_400_in_openai_shape(gateway, method, path,
                                                                     body):
    resp = gateway.admin.request(method, gateway.url + path, data=body,
                                 headers={"Content-Type": "application/json"})
    assert_openai_error(resp, 400)
    projects = gateway.admin.get(gateway.url + "/admin/projects").json()["data"]
    assert [project["id"] for project in projects] == ["default"]  # nothing half-made


def test_an_admin_patch_with_wrong_types_changes_nothing(gateway):
    _, key_id = gateway.create_key(user="alice", note="laptop")
    limit = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "alice", "metric": "usd", "window": "day", "amount": 1,
        "alert_at": [50]}).json()
    for path, body in ((f"/admin/keys/{key_id}", {"note": {"a": 1}}),
                       (f"/admin/keys/{key_id}", {"models": [1]}),
                       (f"/admin/keys/{key_id}", {"project": "default"}),
                       (f"/admin/limits/{limit['id']}", {"amount": [1]}),
                       (f"/admin/limits/{limit['id']}", {"alert_at": "50"}),
                       (f"/admin/limits/{limit['id']}", {"scope": "planet"}),
                       ("/admin/projects/default", {"allow_user_keys": 1}),
                       ("/admin/projects/default", {"model_map": "{}"})):
        assert_openai_error(gateway.admin.patch(gateway.url + path, json=body), 400)
    assert gateway.admin.get(gateway.url + f"/admin/keys/{key_id}").json()["note"] == "laptop"
    assert gateway.admin.get(gateway.url + f"/admin/limits/{limit['id']}").json() == limit


PROXY_BODIES = [
    b'{"model": "gpt-4o", "messages": [',
    b"\xff\xfe{",
    b'{"model": "gpt-4o", "messages": [], "stream": tru}',
]


@pytest.mark.parametrize("body", PROXY_BODIES)
def test_broken_json_to_the_proxy_is_a_400_and_never_goes_upstream(gateway, fake, body):
    raw_key, _ = gateway.create_key()
    resp = requests.post(gateway.url + "/v1/chat/completions", data=body,
                         headers={"Authorization": f"Bearer {raw_key}",
                                  "Content-Type": "application/json"})
    assert assert_openai_error(resp, 400)["code"] == "invalid_json"
    assert fake.requests == []
    still_serving(gateway, raw_key)


@pytest.mark.parametrize("payload", [
    [1, 2],
    "a string",
    {"model": 5, "messages": "x", "user": 5, "stream": "yes", "max_tokens": "x", "n": "x",
     "stream_options": 5},
    {**CHAT, "user": ["alice"], "n": -3, "max_tokens": -1},
    {**CHAT, "stream": True, "stream_options": "x"},
    {**CHAT, "max_tokens": 10 ** 30, "n": 10 ** 30},
])
def test_wrong_types_in_a_proxied_body_are_no_500_and_leave_limits_whole(gateway, payload):
    gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "global", "metric": "tokens", "window": "day", "amount": 10 ** 6})
    gateway.admin.put(gateway.url + "/admin/pricing/gpt-4o", json={"input": 1, "output": 1})
    raw_key, _ = gateway.create_key(user=None)
    resp = requests.post(gateway.url + "/v1/chat/completions", json=payload,
                         headers={"Authorization": f"Bearer {raw_key}"})
    # The fake upstream answers what it can read, as OpenAI would; a 429 is llimit
    # refusing an absurd worst case (10**30 tokens) against the token limit.
    assert resp.status_code in (200, 400, 429), resp.text
    if resp.status_code == 429:
        assert_openai_error(resp, 429)
    still_serving(gateway, raw_key)
    limit = gateway.admin.get(gateway.url + "/admin/limits").json()["data"][0]
    assert limit["used"] <= 2 * 18  # what the fake upstream reported, no more


def test_a_body_over_the_limit_is_a_413_on_the_proxy_and_the_admin_api(make_llimit, fake):
    server = make_llimit(max_body_bytes=10_000)
    raw_key, _ = server.create_key()
    resp = requests.post(server.url + "/v1/chat/completions", data=b"{" + b" " * 20_000 + b"}",
                         headers={"Authorization": f"Bearer {raw_key}",
                                  "Content-Type": "application/json"})
    assert assert_openai_error(resp, 413)["code"] == "request_too_large"
    resp = server.admin.post(server.url + "/admin/keys", data=b" " * (2 * 1024 * 1024),
                             headers={"Content-Type": "application/json"})
    assert assert_openai_error(resp, 413)["code"] == "request_too_large"
    assert fake.requests == []
    still_serving(server, raw_key)


def test_huge_headers_and_bodies_are_refused_by_the_real_server_which_keeps_serving(
        tmp_path, fake):
    proc = LlimitProcess(tmp_path, fake.url + "/v1", LLIMIT_MAX_BODY_BYTES="10000")
    try:
        raw_key, _ = proc.create_key()
        auth = {"Authorization": f"Bearer {raw_key}"}
        for path in ("/v1/chat/completions", "/admin/keys"):
            resp = requests.post(proc.url + path, json=CHAT, timeout=30,
                                 headers={**auth, "X-Padding": "a" * 100_000})
            assert resp.status_code == 431  # waitress's own answer, plain text
        # Up to twice the limit llimit reads the length and answers in JSON; beyond
        # that waitress stops reading and answers 413 itself.
        resp = requests.post(proc.url + "/v1/chat/completions", timeout=30,
                             data=b"{" + b" " * 15_000 + b"}", headers=auth)
        assert assert_openai_error(resp, 413)["code"] == "request_too_large"
        resp = requests.post(proc.url + "/v1/chat/completions", timeout=30,
                             data=b"{" + b" " * 100_000 + b"}", headers=auth)
        assert resp.status_code == 413
        head, _ = raw_request(proc.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: abc\r\n\r\n")
        assert head.startswith("HTTP/1.1 400")
        assert fake.requests == []
        still_serving(proc, raw_key)
        assert "Traceback" not in proc.log()
    finally:
        proc.close()
