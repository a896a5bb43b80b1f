"""Hostile input: a fuzzer on the admin API, broken and oversized requests,
header injection, path tricks, markup and SQL in every stored text, formulas
in CSV exports, and the guessing of keys and admin tokens."""

import csv
import dataclasses
import hashlib
import http.client
import http.server
import io
import socket
import threading

import hypothesis
import pytest
import requests
import schemathesis

import llimit
from tests.browser import csrf_token, http_sign_in
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
    server.fuzz_session = requests.Session()
    yield server
    server.fuzz_session.close()
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
# upstream_url; a plan's PATCH may keep only its own limits by id; a user is put
# only on a plan that exists. Every other check runs on these operations as well.
STATEFUL_RULES = {("GET", "/admin/usage"), ("GET", "/admin/usage.csv"),
                  ("PATCH", "/admin/projects/{id}"), ("PATCH", "/admin/plans/{id}"),
                  ("PUT", "/admin/users/{user}")}


AUTH_ENFORCED = set()  # operations whose token check ignored_auth has confirmed

# The same examples on every run, so CI never fails on a draw of luck; random runs
# of 150 examples per operation found nothing beyond what this run covers (README).
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@fuzzed.parametrize()
def test_the_admin_api_answers_fuzzed_requests_as_its_spec_says(case, live):
    # The fuzzer sends wrong tokens on purpose (to see them refused with 401); the
    # minute that passes between cases keeps the bad-secret throttle out of it.
    live.config.clock.advance(61)
    excluded = ([schemathesis.checks.positive_data_acceptance]
                if (case.method.upper(), case.operation.path) in STATEFUL_RULES else [])
    # ignored_auth resends an answered case without the token and with a wrong one.
    # As schemathesis's own runner does, once per operation: enforcement is a
    # property of the operation, and the resending was a fifth of the run's time.
    if case.operation.label in AUTH_ENFORCED:
        excluded.append(schemathesis.checks.ignored_auth)
    response = case.call_and_validate(base_url=live.url, excluded_checks=excluded,
                                      session=live.fuzz_session,  # connections kept open
                                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    if 200 <= response.status_code < 300:  # so ignored_auth probed it, and it held
        AUTH_ENFORCED.add(case.operation.label)


# --- broken, mistyped and oversized requests ------------------------------------------

ADMIN_MISTAKES = [
    ("POST", "/admin/keys", b"{"),
    ("POST", "/admin/keys", b"\xff\xfe{"),
    ("POST", "/admin/keys", b"[]"),
    ("POST", "/admin/keys", b" "),
    ("POST", "/admin/keys", b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/admin/limits", b'{"note": ' * 100_000 + b"1" + b"}" * 100_000),
    ("POST", "/admin/keys", b'"user"'),
    ("POST", "/admin/keys", b'{"user": 5}'),
    ("POST", "/admin/keys", b'{"user": "a", "project": ["default"]}'),
    ("POST", "/admin/keys", b'{"user": "a", "models": "gpt-4o"}'),
    ("POST", "/admin/keys", b'{"user": "a", "expires_at": "tomorrow"}'),
    ("POST", "/admin/keys", b'{"user": "a", "expires_at": 5}'),
    ("POST", "/admin/keys", b'{"user": "a", "colour": "red"}'),
    ("POST", "/admin/projects", b"{}"),
    ("POST", "/admin/projects", b'{"id": ["p"]}'),
    ("POST", "/admin/projects", b'{"id": "p\\n"}'),
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
    # A lone surrogate reads as JSON but is no text a database can store.
    ("POST", "/admin/keys", b'{"user": "\\ud800"}'),
    ("POST", "/admin/keys", b'{"user": "a", "note": "\\udfff"}'),
    ("POST", "/admin/projects", b'{"id": "p", "max_keys_per_user": 100000000000000000000}'),
    # Only token prices are stored: other fields would be lost (or, alone, failed with 500).
    ("PUT", "/admin/pricing/whisper-x", b'{"per_minute": 0.006}'),
    ("PUT", "/admin/pricing/m", b'{"input": 1, "output": 2, "max_output_tokens": 5}'),
]


def short_id(value):
    """Test ids no longer than a line, for bodies of 200 KB."""
    return repr(value)[:40] if isinstance(value, bytes) else None


@pytest.mark.parametrize("method, path, body", ADMIN_MISTAKES, ids=short_id)
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
    b'{"model": "gpt-4o", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"\xff\xfe{",
    b'{"model": "gpt-4o", "messages": [], "stream": tru}',
]


@pytest.mark.parametrize("body", PROXY_BODIES, ids=short_id)
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
        log_text = proc.log()
        assert "Traceback" not in log_text
        for secret in (raw_key, ADMIN_TOKEN, UPSTREAM_KEY):
            assert secret not in log_text
    finally:
        proc.close()


# --- header injection and path tricks, over raw sockets -----------------------------------

def chat_request(path, raw_key, extra_headers=b"", method=b"POST"):
    body = b'{"model": "gpt-4o", "messages": []}'
    return (method + b" " + path + b" HTTP/1.1\r\nHost: llimit\r\n"
            b"Authorization: Bearer " + raw_key.encode() + b"\r\n" + extra_headers +
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("header", [
    b"X-LLimit-User: a\nX-Evil: 1\r\n",          # a bare LF inside the value
    b"X-LLimit-User: a\rX-Evil: 1\r\n",          # a bare CR
    b"X-LLimit-User: a\x00b\r\n",                # NUL
    b"X-LLimit-User: a\x0bb\x1bc\r\n",           # other control characters
])
def test_control_characters_in_a_header_are_refused_before_llimit(gateway, fake, header):
    raw_key, _ = gateway.create_key(user=None)
    head, _ = raw_request(gateway.url, chat_request(b"/v1/chat/completions", raw_key, header))
    assert head.split("\r\n")[0].split()[1] == "400"
    assert "x-evil" not in head.lower()
    assert fake.requests == [] and gateway.events() == []
    still_serving(gateway, raw_key)


@pytest.mark.parametrize("header, user", [
    # A folded line (obs-fold) is joined into one value: no second header appears.
    (b"X-LLimit-User: a\r\n X-Evil: 1\r\n", "a x-evil: 1"),  # lowercased: Identity
    (b"X-LLimit-User: a%0d%0aX-Evil: 1\r\n", "a%0d%0ax-evil: 1"),
    (b"X-LLimit-User: \xc3\xa9mile\xc2\x85\r\n", "\u00e9mile"),  # UTF-8, with a C1 NEL
])
def test_a_user_header_cannot_add_a_header_upstream_or_in_the_response(gateway, fake,
                                                                        header, user):
    raw_key, _ = gateway.create_key(user=None)
    head, _ = raw_request(gateway.url, chat_request(b"/v1/chat/completions", raw_key, header))
    assert head.startswith("HTTP/1.1 200")
    assert "x-evil" not in head.lower()
    [sent] = fake.requests
    assert "X-Evil" not in sent.headers and "X-LLimit-User" not in sent.headers
    assert all("\r" not in value and "\n" not in value for value in sent.headers.values())
    assert [event["user_name"] for event in gateway.events()] == [user]


def test_user_names_with_control_characters_are_cleaned_everywhere(gateway, fake):
    raw_key, key_id = gateway.create_key(user="bob\r\nX-Evil: 1\x00\x85")
    assert gateway.admin.get(gateway.url + f"/admin/keys/{key_id}").json()["user"] == \
        "bobx-evil: 1"
    project_key, _ = gateway.create_key(user=None)
    resp = requests.post(gateway.url + "/v1/chat/completions",
                         json={**CHAT, "user": "carol\r\nX-Evil: 1\t"},
                         headers={"Authorization": f"Bearer {project_key}"})
    assert resp.status_code == 200 and "X-Evil" not in resp.headers
    assert "X-Evil" not in fake.requests[-1].headers
    assert [event["user_name"] for event in gateway.events()] == ["carolx-evil: 1"]
    page = http_sign_in(gateway.url, "dave\r\n\x1b[31m").get(gateway.url + "/keys")
    assert "Keys of dave" in page.text and "\x1b" not in page.text


PATH_TRICKS = [
    b"/v1/../admin/keys",
    b"/v1/%2e%2e/admin/keys",
    b"/v1/.%2E/admin/keys",
    b"/v1/..%2Fadmin",
    b"/v1/..%2Fadmin%2Fkeys",
    b"/v1/chat/../../admin/keys",
    b"/v1/chat/completions/../../../x",
    b"/v1/%2e%2e%2f%2e%2e%2fx/chat/completions",
    b"/v1/..\\admin\\keys",
    b"/v1/..%5Cadmin%5Ckeys",
    b"/v1/chat\\..\\..\\x",
    b"/v1/./chat/completions",
    b"/openai/deployments/..%2F..%2Fx/chat/completions?api-version=1",
    b"/openai/deployments/gpt-4o/..%2F..%2F..%2Fx?api-version=1",
    b"/openai/deployments/..%5C..%5Cx/chat/completions?api-version=1",
    b"/openai/deployments/..\\..\\x/chat/completions?api-version=1",
    b"/openai/deployments/%2e%2e/chat/completions?api-version=1",
]


@pytest.fixture
def azure_key(gateway, fake):
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "az", "upstream_kind": "azure", "upstream_url": fake.url,
        "upstream_key": "az-secret", "api_version": "2024-10-21"})
    assert resp.status_code == 201, resp.text
    return gateway.create_key(user="alice", project="az")[0]


@pytest.mark.parametrize("who", ["key", "azure key", "admin token"])
def test_a_path_trick_is_a_clean_4xx_and_never_climbs_out_of_the_upstream_base(
        gateway, fake, azure_key, who):
    raw_key = {"key": gateway.create_key()[0], "azure key": azure_key,
               "admin token": ADMIN_TOKEN}[who]
    for path in PATH_TRICKS:
        for method in (b"POST", b"GET"):
            head, body = raw_request(gateway.url, chat_request(path, raw_key, method=method))
            status = int(head.split()[1])
            assert 400 <= status < 500, (path, head)
            if status != 404:  # a route did answer: in OpenAI's shape
                assert body.startswith(b'{"error": {'), (path, body)
            assert b'"data"' not in body and b"llimit-" not in body  # no admin listing
    # Whatever reached the upstream stayed under its base, with no dot segments left.
    for sent in fake.requests:
        assert sent.path.startswith(("/v1/", "/openai/deployments/", "/openai/"))
        assert ".." not in sent.path.replace("\\", "/").split("/")
    keys = gateway.admin.get(gateway.url + "/admin/keys").json()["data"]
    assert [key["user"] for key in keys].count("alice") == 2  # no key made by a trick
    assert all(key["active"] for key in keys)                  # nor revoked
    assert all(event["status_code"] >= 400 for event in gateway.events())


def test_an_encoded_slash_stays_a_path_under_the_upstream_base(gateway, fake):
    raw_key, _ = gateway.create_key()
    conn = http.client.HTTPConnection(gateway.url.split("//")[1], timeout=30)
    conn.request("POST", "/v1/chat%2Fcompletions", body=b'{"model": "gpt-4o", "messages": []}',
                 headers={"Authorization": f"Bearer {raw_key}",
                          "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    conn.close()
    assert [sent.path for sent in fake.requests] == ["/v1/chat/completions"]


def test_a_path_with_any_unicode_is_a_clean_answer_and_travels_encoded(gateway, fake):
    # bottle hands over the path decoded as UTF-8: "€" is no latin-1 character.
    raw_key, _ = gateway.create_key()
    headers = {"Authorization": f"Bearer {raw_key}"}
    resp = requests.post(gateway.url + "/v1/chat/compl%E2%82%ACtions",
                         json={"model": "gpt-4o", "messages": []}, headers=headers)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "route_not_allowed"
    assert "/v1/chat/compl%E2%82%ACtions" in resp.json()["error"]["message"]
    resp = requests.get(gateway.url + "/v1/models/caf%C3%A9", headers=headers)
    assert resp.status_code == 200, resp.text  # a look-up route: forwarded
    assert [sent.path for sent in fake.requests] == ["/v1/models/caf%C3%A9"]
    assert [event["endpoint"] for event in gateway.events()] == ["models/caf\u00e9"]


@pytest.mark.parametrize("model", ["..", "../../x", "..\\x", "."])
def test_a_model_that_becomes_an_azure_deployment_cannot_climb_either(gateway, fake,
                                                                       azure_key, model):
    resp = requests.post(gateway.url + "/v1/chat/completions",
                         json={"model": model, "messages": []},
                         headers={"Authorization": f"Bearer {azure_key}"})
    if resp.status_code == 400:
        assert assert_openai_error(resp, 400)["code"] == "invalid_path"
    for sent in fake.requests:  # "../../x" travels as one encoded segment
        assert sent.path.startswith("/openai/deployments/")
        assert ".." not in sent.path.replace("\\", "/").split("/")
    assert resp.status_code == 400 or fake.requests


# --- SQL and markup in every stored text -------------------------------------------------

SQL = ["'; drop table api_keys; --", "'; drop table keys; --", '" or 1=1 --']
MARKUP = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
HOSTILE = SQL + MARKUP


def escaped(text):
    """The text as bottle's templates escape it."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#039;"))


def tables(server):
    return sorted(row[0] for row in server.db().execute(
        "select name from sqlite_master where type = 'table'"))


def test_sql_and_markup_in_every_stored_text_are_kept_verbatim_and_shown_as_text(
        make_llimit, fake):
    server = make_llimit()
    admin, url = server.admin, server.url
    tables_before = tables(server)
    assert_openai_error(admin.post(url + "/admin/projects", json={"id": SQL[0]}), 400)
    project = admin.post(url + "/admin/projects", json={
        "id": "team", "name": MARKUP[0], "limit_message": MARKUP[1]})
    assert project.status_code == 201, project.text
    users = {}
    for index, text in enumerate(HOSTILE):
        raw_key, key_id = server.create_key(user=text, project="team", note=text,
                                            models=None)
        users[text] = raw_key
        limit = admin.post(url + "/admin/limits", json={
            "scope": "user", "target": text, "metric": "requests", "window": "day",
            "amount": 100, "action": "warn", "note": text})
        assert limit.status_code == 201, limit.text
        fake.behaviour["model"] = text  # the upstream reports a hostile model name
        resp = requests.post(url + "/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {raw_key}"})
        assert resp.status_code == 200, resp.text
        price = admin.put(url + "/admin/pricing/" + requests.utils.quote(f"{text}-{index}",
                                                                       safe=""),
                          json={"input": 1, "output": 2})
        assert price.status_code == 200 and price.json()["model"] == f"{text}-{index}"

    # The JSON API gives every text back as it was sent.
    keys = admin.get(url + "/admin/keys", params={"project": "team"}).json()["data"]
    assert sorted((key["user"], key["note"]) for key in keys) == sorted(
        (text, text) for text in HOSTILE)
    for text in HOSTILE:
        [key] = admin.get(url + "/admin/keys", params={"user": text}).json()["data"]
        assert key["user"] == text and key["requests"] == 1
    team = admin.get(url + "/admin/projects/team").json()
    assert (team["name"], team["limit_message"]) == tuple(MARKUP)
    limits = admin.get(url + "/admin/limits").json()["data"]
    assert sorted((limit["target"], limit["note"], limit["used"]) for limit in limits) == \
        sorted((text, text, 1) for text in HOSTILE)
    by_user = admin.get(url + "/admin/usage", params={"group_by": "user"}).json()["rows"]
    assert sorted(row["user"] for row in by_user) == sorted(HOSTILE)
    by_model = admin.get(url + "/admin/usage", params={"group_by": "model"}).json()["rows"]
    assert sorted(row["model"] for row in by_model) == sorted(HOSTILE)
    pricing = admin.get(url + "/admin/pricing").json()
    assert {f"{text}-{index}" for index, text in enumerate(HOSTILE)} <= set(pricing["models"])
    assert sorted(pricing["missing"]) == sorted(HOSTILE)
    me = requests.get(url + "/llimit/me",
                      headers={"Authorization": f"Bearer {users[MARKUP[0]]}"}).json()
    assert me["user"] == MARKUP[0]
    # The limit message reaches the refused caller verbatim, inside JSON.
    admin.post(url + "/admin/limits", json={"scope": "project", "target": "team",
                                            "metric": "requests", "window": "day",
                                            "amount": 0})
    refused = requests.post(url + "/v1/chat/completions", json=CHAT,
                            headers={"Authorization": f"Bearer {users[SQL[2]]}"})
    assert MARKUP[1] in assert_openai_error(refused, 429)["message"]

    # Tables intact, every row still there.
    assert tables(server) == tables_before
    db = server.db()
    assert db.execute("select count(*) from api_keys where project_id = 'team'").fetchone()[0] \
        == len(HOSTILE)
    assert db.execute("select count(*) from usage_events").fetchone()[0] == len(HOSTILE)

    # Every page that shows them shows text, never markup.
    admin_pages = http_sign_in(url, admin_token=ADMIN_TOKEN)
    pages = {path: admin_pages.get(url + path) for path in ("/admin", "/reports")}
    for text in HOSTILE:
        user_session = http_sign_in(url, text)
        for path in ("/keys", "/usage"):
            pages[f"{path} of {text}"] = user_session.get(url + path)
        page = pages[f"/keys of {text}"].text
        assert escaped(text) in page  # the user name and the key's note
        assert escaped(text) in pages[f"/usage of {text}"].text  # the model and the limit
    for name, resp in pages.items():
        assert resp.status_code == 200, (name, resp.text)
        for text in MARKUP:
            assert text not in resp.text, name
            assert "<img" not in resp.text and "<script>alert" not in resp.text, name
    admin_page = pages["/admin"].text
    for text in HOSTILE:  # as user, key note, limit target, unpriced model and price
        assert admin_page.count(escaped(text)) >= 5, text
    assert escaped(MARKUP[0]) in admin_page and escaped(MARKUP[1]) in admin_page  # project
    for text in HOSTILE:  # in the report tables, and the charts' data attributes
        assert escaped(text) in pages["/reports"].text, text


FORMULAS = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2+3", "@SUM(1,1)", "\t=1+1",
            "=cmd|' /C calc'!A0"]


def test_csv_exports_never_start_a_cell_with_a_formula(make_llimit, fake):
    server = make_llimit()
    for index, text in enumerate(FORMULAS):
        raw_key, _ = server.create_key(user=text)
        fake.behaviour["model"] = FORMULAS[-1 - index]
        resp = requests.post(server.url + "/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {raw_key}"})
        assert resp.status_code == 200, resp.text
    # A path of the client's choosing is refused (route policy), so never stored.
    resp = requests.post(server.url + "/v1/=1+1", json=CHAT,
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "route_not_allowed"
    admin_csv = server.admin.get(server.url + "/admin/usage.csv")
    admin_session = http_sign_in(server.url, admin_token=ADMIN_TOKEN)
    report_csv = admin_session.get(server.url + "/reports/data.csv")
    for resp in (admin_csv, report_csv):
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(resp.text)))
        for row in rows:
            for cell in row.values():
                assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), (cell, row)
        # A tab is no part of a user name (cleaned away, and the name lowercased by the
        # Identity rule); the model keeps it.
        assert {"'" + text.lstrip("\t").lower() for text in FORMULAS} <= \
            {row["user"] for row in rows}
        assert {"'" + text for text in FORMULAS} <= {row["model"] for row in rows}
    endpoints = [row["endpoint"] for row in csv.DictReader(io.StringIO(admin_csv.text))]
    assert set(endpoints) == {"chat/completions"}


# --- guessing keys and admin tokens ----------------------------------------------------------

def flip(char):
    return "B" if char == "A" else "A"


def call_with(server, raw_key):
    return requests.post(server.url + "/v1/chat/completions", json=CHAT, timeout=30,
                         headers={"Authorization": f"Bearer {raw_key}"})


def test_keys_are_looked_up_by_hash_so_where_a_wrong_key_differs_does_not_matter(gateway):
    raw_key, key_id = gateway.create_key()
    near_end = raw_key[:-1] + flip(raw_key[-1])
    near_start = raw_key[:7] + flip(raw_key[7]) + raw_key[8:]
    errors = [assert_openai_error(call_with(gateway, wrong), 401)
              for wrong in (near_end, near_start, "llimit-" + "A" * 43)]
    assert {(error["type"], error["code"]) for error in errors} == {
        ("invalid_request_error", "invalid_api_key")}
    for error, wrong in zip(errors, (near_end, near_start)):
        assert wrong not in error["message"] and raw_key not in error["message"]
    # Only the SHA-256 is stored: the secret is nowhere in the database file.
    gateway.wait_idle()
    row = gateway.db().execute("select * from api_keys where id = ?", (key_id,)).fetchone()
    assert row["key_hash"] == hashlib.sha256(raw_key.encode()).hexdigest()
    with open(gateway.config.db_path, "rb") as handle:
        assert raw_key[7:].encode() not in handle.read()
    assert call_with(gateway, raw_key).status_code == 200


def test_after_20_wrong_keys_an_address_waits_a_minute_but_good_keys_still_pass(
        gateway, clock):
    good_key, _ = gateway.create_key(user="alice")
    assert call_with(gateway, good_key).status_code == 200   # known good from now on
    for attempt in range(20):
        assert_openai_error(call_with(gateway, f"llimit-guess{attempt:040d}"), 401)
    throttled = call_with(gateway, "llimit-guess" + "x" * 40)
    assert assert_openai_error(throttled, 429)["code"] == "too_many_failed_attempts"
    assert 0 < int(throttled.headers["Retry-After"]) <= 60
    # A correct key always passes, even one never used since the start (issue 14, item 6),
    # as does one that has worked before, and the admin API with its token.
    fresh_key, _ = gateway.create_key(user="bob")
    assert call_with(gateway, fresh_key).status_code == 200
    assert call_with(gateway, good_key).status_code == 200
    assert gateway.admin.get(gateway.url + "/admin/keys").status_code == 200
    me = requests.get(gateway.url + "/llimit/me",
                      headers={"Authorization": "Bearer llimit-guess" + "y" * 40})
    assert_openai_error(me, 429)
    clock.advance(61)
    assert_openai_error(call_with(gateway, "llimit-guess" + "z" * 40), 401)
    assert call_with(gateway, fresh_key).status_code == 200


def test_after_20_wrong_admin_tokens_an_address_waits_a_minute_but_the_token_passes(
        gateway, clock):
    def projects(token):
        return requests.get(gateway.url + "/admin/projects",
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)

    assert projects(ADMIN_TOKEN).status_code == 200
    for attempt in range(20):
        assert_openai_error(projects(f"guess-{attempt}"), 401)
    throttled = projects("guess-again")
    assert assert_openai_error(throttled, 429)["code"] == "too_many_failed_attempts"
    assert 0 < int(throttled.headers["Retry-After"]) <= 60
    assert projects(ADMIN_TOKEN).status_code == 200
    # Wrong keys and wrong tokens count together: this address is throttled for keys too,
    # though a correct key passes.
    raw_key, _ = gateway.create_key()
    assert_openai_error(call_with(gateway, "llimit-guess" + "k" * 40), 429)
    assert call_with(gateway, raw_key).status_code == 200
    clock.advance(61)
    assert_openai_error(projects("guess-after"), 401)
    assert call_with(gateway, raw_key).status_code == 200


class _NestedJsonUpstream(http.server.BaseHTTPRequestHandler):
    """An upstream whose answers are JSON nested 100,000 deep (whole, or as a stream)."""
    protocol_version = "HTTP/1.1"
    NESTED = b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def do_POST(self):
        stream = b'"stream": true' in self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (b"data: " + self.NESTED + b"\n\ndata: [DONE]\n\n") if stream else self.NESTED
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_upstream_answering_json_nested_too_deep_is_relayed_and_metered(gateway):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NestedJsonUpstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        resp = gateway.admin.post(gateway.url + "/admin/projects", json={
            "id": "deep", "upstream_url": f"http://127.0.0.1:{upstream.server_port}/v1",
            "upstream_key": "sk-deep"})
        assert resp.status_code == 201, resp.text
        raw_key, _ = gateway.create_key(project="deep")
        for payload in (CHAT, {**CHAT, "stream": True}):
            resp = requests.post(gateway.url + "/v1/chat/completions", json=payload, timeout=30,
                                 headers={"Authorization": f"Bearer {raw_key}"})
            assert resp.status_code == 200
            assert _NestedJsonUpstream.NESTED in resp.content  # passed on as it came
        events = gateway.events()
        assert [(event["endpoint"], event["status_code"]) for event in events] == [
            ("chat/completions", 200), ("chat/completions", 200)]
    finally:
        upstream.shutdown()
        upstream.server_close()


@pytest.mark.parametrize("secret", [b"llimit-\xc3\xa9\xe6\x97\xa5", b"\xff\xfe\xfd",
                                    b"llimit-" + b"x" * 60_000,
                                    b"llimit-'; drop table api_keys"],
                         ids=short_id)
def test_odd_keys_and_tokens_are_a_401_in_openai_shape(gateway, secret):
    for header in (b"Authorization", b"api-key", b"x-api-key"):
        value = b"Bearer " + secret if header == b"Authorization" else secret
        resp = requests.post(gateway.url + "/v1/chat/completions", json=CHAT,
                             headers={header: value})
        assert_openai_error(resp, 401)
    resp = requests.get(gateway.url + "/admin/keys",
                        headers={"Authorization": b"Bearer " + secret})
    assert_openai_error(resp, 401)
    assert "api_keys" in tables(gateway)


def test_page_forms_that_are_not_utf8_or_not_ascii_digits_are_a_400_not_a_500(gateway):
    # No sign-in or token needed to reach the form decoder: it once answered 500.
    login = requests.post(gateway.url + "/login", data=b"user=%ff",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert login.status_code == 400
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    page = admin.get(gateway.url + "/admin").text
    token = csrf_token(page)
    superscript = admin.post(gateway.url + "/admin", data={
        "csrf_token": token, "action": "update_project", "id": "default",
        "name": "Default", "max_keys_per_user": "\u00b2"})  # a digit to str.isdigit()
    assert superscript.status_code == 400 and "max_keys_per_user" in superscript.text
