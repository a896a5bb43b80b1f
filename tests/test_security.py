"""Issue 14: what an outside attacker, a curious colleague and a careless admin
could do, each tried against a real llimit (in-process, or `python llimit.py
serve` for what needs a process: ports, idle sockets, kill -9)."""

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import llimit
from tests.browser import csrf_token, http_sign_in
from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, sqlite_only
from tests.process import LLIMIT, ROOT, chat, wait_until

ENGINES = ("sqlite", "postgres")


def call(server, raw_key, model="gpt-4o", stream=False, **headers):
    return requests.post(server.url + "/v1/chat/completions", timeout=60, stream=stream,
                         headers={"Authorization": f"Bearer {raw_key}", **headers},
                         json={"model": model, "stream": stream,
                               "messages": [{"role": "user", "content": "Hi"}]})


def error_code(resp):
    return resp.json()["error"]["code"]


# --- 1, 6: one throttle for every secret; a correct one always passes -----------------

def test_admin_token_guessing_on_the_login_page_is_throttled_and_the_token_still_passes(
        gateway, clock):
    session = requests.Session()
    token = csrf_token(session.get(gateway.url + "/login").text)

    def sign_in(admin_token):
        return session.post(gateway.url + "/login", allow_redirects=False, data={
            "csrf_token": token, "admin_token": admin_token, "next": "/admin"})

    for attempt in range(20):
        assert sign_in(f"guess-{attempt}").status_code == 401
    throttled = sign_in("guess-again")
    assert throttled.status_code == 429 and 0 < int(throttled.headers["Retry-After"]) <= 60
    # The same address is throttled on the admin API and for keys (one throttle)...
    assert requests.get(gateway.url + "/admin/keys",
                        headers={"Authorization": "Bearer guess"}).status_code == 429
    assert error_code(call(gateway, "llimit-" + "x" * 43)) == "too_many_failed_attempts"
    # ...yet the right token signs in, and a key never used since the start passes.
    right = sign_in(ADMIN_TOKEN)
    assert right.status_code == 303 and right.headers["Location"].endswith("/admin")
    fresh_key, _ = gateway.create_key(user="nobody-yet")
    assert call(gateway, fresh_key).status_code == 200
    clock.advance(61)
    stranger = requests.Session()
    token = csrf_token(stranger.get(gateway.url + "/login").text)
    assert stranger.post(gateway.url + "/login", data={
        "csrf_token": token, "admin_token": "guess-later"}).status_code == 401


def test_metrics_token_guessing_is_throttled_and_the_token_still_passes(make_llimit):
    server = make_llimit(metrics_token="metrics-secret")
    for attempt in range(20):
        assert requests.get(server.url + "/metrics",
                            headers={"Authorization": f"Bearer m-{attempt}"}).status_code == 401
    assert requests.get(server.url + "/metrics",
                        headers={"Authorization": "Bearer m-again"}).status_code == 429
    assert requests.get(server.url + "/metrics",
                        headers={"Authorization": "Bearer metrics-secret"}).status_code == 200


# --- 2, 22: only same-origin paths after sign-in -----------------------------------------

HOSTILE_NEXT = ["/%09/evil.example/phish", "/\n/evil.example", "/\t/evil.example", "//evil.example",
                "/\\evil.example", "/%5Cevil.example", "https://evil.example/", "http:evil.example",
                "/%2F/evil.example", "evil.example", "/ /evil.example", "/%0d%0a/evil",
                "javascript:alert(1)", "/\x00/evil"]


@sqlite_only  # input checks: no storage
@pytest.mark.parametrize("next_path", HOSTILE_NEXT)
def test_sign_in_never_sends_the_browser_to_another_site(gateway, next_path):
    session = requests.Session()
    page = session.get(gateway.url + "/login", params={"next": next_path})
    signed_in = session.post(gateway.url + "/login", allow_redirects=False, data={
        "csrf_token": csrf_token(page.text), "user": "ann", "next": next_path})
    assert signed_in.status_code == 303
    assert urllib.parse.urljoin(gateway.url, signed_in.headers["Location"]) == gateway.url + "/"


@sqlite_only  # input checks: no storage
def test_sign_in_keeps_a_path_of_its_own(gateway):
    session = requests.Session()
    page = session.get(gateway.url + "/login")
    signed_in = session.post(gateway.url + "/login", allow_redirects=False, data={
        "csrf_token": csrf_token(page.text), "user": "ann", "next": "/reports?days=7#x"})
    assert signed_in.headers["Location"] == gateway.url + "/reports?days=7#x"


# --- 4: admin-token sessions end with the token ---------------------------------------------

def test_changing_the_admin_token_ends_the_admin_sessions_made_with_it(make_llimit, tmp_path):
    db_path = str(tmp_path / "shared.db")
    server = make_llimit(db_path=db_path)
    browser = http_sign_in(server.url, admin_token=ADMIN_TOKEN)
    assert browser.get(server.url + "/admin").status_code == 200
    make_llimit(db_path=db_path, admin_token="the-new-admin-token")  # a restart with a new token
    gone = browser.get(server.url + "/admin", allow_redirects=False)
    assert gone.status_code == 303 and "/login?" in gone.headers["Location"]
    again = http_sign_in(server.url, admin_token="the-new-admin-token")
    assert again.get(server.url + "/admin").status_code == 200


# --- 5: no session row for a look at /login ----------------------------------------------

def test_looking_at_the_login_page_stores_no_session(gateway):
    browser = requests.Session()
    for _ in range(300):  # a row for each would be 300 rows; the review saw 10,853 in 10 s
        assert browser.get(gateway.url + "/login").status_code == 200
        browser.cookies.clear()  # as a script would, to make a new row each time
    assert gateway.db().execute("select count(*) from sessions").fetchone()[0] == 0
    # The form still works, with its double-submit cookie, and CSRF still holds.
    page = browser.get(gateway.url + "/login")
    forged = requests.post(gateway.url + "/login", data={
        "csrf_token": csrf_token(page.text), "user": "ann"})  # the token without the cookie
    assert forged.status_code == 403
    assert browser.post(gateway.url + "/login", data={
        "csrf_token": csrf_token(page.text), "user": "ann"}).status_code == 200
    assert gateway.db().execute("select count(*) from sessions").fetchone()[0] == 1


# --- 7: idle connections do not lock others out -----------------------------------------

@pytest.mark.parametrize("settings", [{}, {"LLIMIT_MAX_CONNECTIONS": "100"}],
                         ids=["default", "limit-100"])
def test_300_idle_connections_leave_llimit_serving(processes, settings):
    proc = processes(**settings)
    host, port = "127.0.0.1", int(proc.url.rsplit(":", 1)[1])
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        health = requests.get(proc.url + "/healthz", timeout=30)
        elapsed = time.monotonic() - started
        assert health.status_code == 200
        print(f"\n/healthz with 300 idle connections open ({settings or 'defaults'}):"
              f" {elapsed * 1000:.0f} ms")
    finally:
        for sock in idle:
            sock.close()


# --- 8: concurrency per key and per user; /healthz never waits ------------------------

@sqlite_only  # one process's threads (test_instances has the caps on PostgreSQL)
def test_one_key_cannot_hold_every_worker(make_llimit, fake):
    server = make_llimit(threads=24)
    raw_key, _ = server.create_key(user="hog")
    fake.behaviour["delay_first"] = 4
    with ThreadPoolExecutor(70) as pool:
        calls = [pool.submit(call, server, raw_key) for _ in range(70)]
        time.sleep(1)
        health = requests.get(server.url + "/healthz", timeout=30)
        assert health.status_code == 200
        assert requests.get(server.url + "/login", timeout=30).status_code == 200
        answers = [future.result() for future in calls]
    ok = [resp for resp in answers if resp.status_code == 200]
    refused = [resp for resp in answers if resp.status_code != 200]
    assert 1 <= len(ok) <= 16
    for resp in refused:
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["type"] == "rate_limit_exceeded"
        assert error_code(resp) == "too_many_concurrent_calls"
    assert len(fake.requests) == len(ok)


@sqlite_only  # one process's threads (test_instances has the caps on PostgreSQL)
def test_per_user_cap_and_threads_kept_for_health(make_llimit, fake):
    server = make_llimit(threads=8, max_concurrent_per_user=3)  # proxied calls: 8 - 4
    keys = [server.create_key(user="carl")[0] for _ in range(3)]
    other = [server.create_key(user=f"u{n}")[0] for n in range(4)]
    fake.behaviour["delay_first"] = 4
    with ThreadPoolExecutor(12) as pool:
        carl = [pool.submit(call, server, keys[n % 3]) for n in range(5)]
        time.sleep(1)
        others = [pool.submit(call, server, raw_key) for raw_key in other]
        time.sleep(0.5)
        assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
        carl, others = [f.result() for f in carl], [f.result() for f in others]
    assert sorted(resp.status_code for resp in carl) == [200, 200, 200, 429, 429]
    assert "User carl has 3 calls" in [r for r in carl if r.status_code == 429][0].text
    # 3 of carl's calls run; the other users get the 4th slot left for proxied calls.
    assert sorted(resp.status_code for resp in others) == [200, 429, 429, 429]


# --- 9: client-chosen strings are bounded ---------------------------------------------

@sqlite_only  # metric labels in memory: no storage
def test_huge_and_countless_model_names_stay_bounded(gateway, fake):
    raw_key, _ = gateway.create_key()
    huge = call(gateway, raw_key, model="m" * 1_000_000)
    assert huge.status_code == 400 and error_code(huge) == "model_name_too_long"
    fake.behaviour["model"] = "x" * 5000  # an upstream may report anything too
    assert call(gateway, raw_key).status_code == 200
    del fake.behaviour["model"]
    for n in range(230):
        assert call(gateway, raw_key, model=f"model-{n}").status_code == 200
    models = [row[0] for row in gateway.db().execute("select model from usage_events")]
    assert max(len(model) for model in models) <= 200
    text = requests.get(gateway.url + "/metrics").text
    labels = {line.split('model="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("llimit_requests_total{")}
    assert len(labels) <= 201 and "other" in labels
    assert len(text) < 200_000


# --- 11: env: keys, URL changes, metadata addresses ---------------------------------------

def test_admins_cannot_read_llimits_own_secrets_through_env_keys(gateway, fake, monkeypatch):
    def create(**fields):
        return gateway.admin.post(gateway.url + "/admin/projects", json={
            "upstream_url": fake.url + "/v1", **fields})

    monkeypatch.setenv("LLIMIT_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    monkeypatch.setenv("LLIMIT_UPSTREAM_KEY_TEAM", "sk-team")
    for name in ("LLIMIT_ADMIN_TOKEN", "OPENAI_API_KEY", "LLIMIT_UPSTREAM_KEY", "HOME",
                 "AZURE_AD_CLIENT_SECRET", "LLIMIT_METRICS_TOKEN"):
        refused = create(id=f"p-{name.lower()}", upstream_key=f"env:{name}")
        assert refused.status_code == 400 and "upstream_key" in refused.text, name
    assert create(id="team", upstream_key="env:LLIMIT_UPSTREAM_KEY_TEAM").status_code == 201
    # A project stored before the rule (or by hand) is refused at call time.
    with llimit.transaction(gateway.db()) as db:
        db.execute("update projects set upstream_key = 'env:LLIMIT_ADMIN_TOKEN'"
                   " where id = 'team'")
    raw_key, _ = gateway.create_key(project="team")
    resp = call(gateway, raw_key)
    assert resp.status_code == 502 and ADMIN_TOKEN not in resp.text
    assert all(ADMIN_TOKEN not in str(r.headers.items()) for r in fake.requests)


def test_a_new_upstream_url_needs_the_key_again(gateway, fake):
    created = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "team", "upstream_url": fake.url + "/v1", "upstream_key": "sk-team-secret"})
    assert created.status_code == 201
    moved = gateway.admin.patch(gateway.url + "/admin/projects/team",
                                json={"upstream_url": "http://evil.example/v1"})
    assert moved.status_code == 400 and "upstream_key" in moved.text
    assert gateway.admin.get(gateway.url + "/admin/projects/team").json()["upstream_url"] \
        == fake.url + "/v1"
    renamed = gateway.admin.patch(gateway.url + "/admin/projects/team",
                                  json={"name": "Team", "upstream_url": fake.url + "/v1"})
    assert renamed.status_code == 200  # the same URL needs nothing
    assert gateway.admin.patch(gateway.url + "/admin/projects/team", json={
        "upstream_url": "http://10.1.2.3/v1", "upstream_key": "sk-new"}).status_code == 200


@sqlite_only  # input checks: no storage
@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://[fe80::1]:8080",
                                 "http://metadata.google.internal/v1", "http://[fd00:ec2::254]",
                                 "http://[::ffff:169.254.169.254]/", "http://169.254.1.1"])
def test_upstream_urls_never_name_metadata_or_link_local_addresses(gateway, url):
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "ssrf", "upstream_url": url, "upstream_key": "sk-x"})
    assert resp.status_code == 400 and "upstream_url" in resp.text


@sqlite_only  # input checks: no storage
def test_private_and_named_upstreams_stay_allowed(gateway):
    for n, url in enumerate(("http://10.0.0.5/v1", "http://192.168.1.2:8080",
                             "http://localhost:9000/v1", "https://api.openai.com/v1")):
        assert gateway.admin.post(gateway.url + "/admin/projects", json={
            "id": f"p{n}", "upstream_url": url, "upstream_key": "k"}).status_code == 201


# --- 12: only an allowlist of headers goes upstream --------------------------------------

@sqlite_only  # what goes upstream: no storage
def test_only_allowed_headers_go_upstream(gateway, fake):
    raw_key, _ = gateway.create_key()
    sent = {"Cookie": "llimit_session=abc", "X-Forwarded-Email": "boss@example.com",
            "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Access-Token": "sso-token",
            "OpenAI-Organization": "org-other", "OpenAI-Project": "proj-other",
            "X-LLimit-User": "ann", "X-Custom-Secret": "s", "Proxy-Authorization": "Basic x",
            "OpenAI-Beta": "assistants=v2", "X-Stainless-Lang": "python",
            "Idempotency-Key": "idem-1", "User-Agent": "OpenAI/Python 1.0",
            "Connection": "keep-alive, X-Stainless-Lang"}
    assert call(gateway, raw_key, **sent).status_code == 200
    got = {name.lower() for name, _value in fake.requests[-1].headers.items()}
    for name in ("cookie", "x-forwarded-email", "x-forwarded-for", "x-forwarded-access-token",
                 "openai-organization", "openai-project", "x-llimit-user", "x-custom-secret",
                 "proxy-authorization", "x-stainless-lang"):
        assert name not in got, name
    for name in ("openai-beta", "idempotency-key", "user-agent", "content-type"):
        assert name in got, name
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


# --- 13: upstream auth errors are llimit's own --------------------------------------------

@sqlite_only  # upstream errors: no storage
def test_upstream_auth_errors_show_no_trace_of_the_upstream_key(gateway, fake, caplog):
    raw_key, _ = gateway.create_key()
    masked = UPSTREAM_KEY[:3] + "*" * 10 + UPSTREAM_KEY[-4:]
    for status in (401, 403):
        fake.behaviour.update(status=status, error_body={"error": {
            "message": f"Incorrect API key provided: {masked}. Full: {UPSTREAM_KEY}",
            "type": "invalid_request_error", "code": "invalid_api_key"}})
        with caplog.at_level(logging.WARNING, logger="llimit"):
            resp = call(gateway, raw_key)
        assert resp.status_code == status
        assert error_code(resp) == "upstream_auth_failed"
        assert UPSTREAM_KEY[-4:] not in resp.text and "sk-" not in resp.text
        assert masked in caplog.text and UPSTREAM_KEY not in caplog.text
    assert len(gateway.events()) == 2  # still metered


# --- 14: a second server never rewrites the running one's token ----------------------------

def test_a_second_serve_on_the_same_database_leaves_the_token_alone(processes, tmp_path):
    first = processes(LLIMIT_ADMIN_TOKEN="")  # generated
    generated = first.log().split("kept):\n", 1)[1].split()[0]
    assert requests.get(first.url + "/admin/keys",
                        headers={"Authorization": f"Bearer {generated}"}).status_code == 200
    port = first.url.rsplit(":", 1)[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLIMIT_")}
    for token in ("", "a-token-of-the-second"):
        second = subprocess.run(
            [sys.executable, LLIMIT, "serve"], cwd=ROOT, capture_output=True, text=True,
            timeout=60, env={**env, "LLIMIT_DB": first.db_path, "LLIMIT_PORT": port,
                             "LLIMIT_ADMIN_TOKEN": token, "LLIMIT_HOST": "127.0.0.1"})
        assert second.returncode != 0
        output = (second.stdout + second.stderr).strip().splitlines()
        assert "Traceback" not in second.stderr and "cannot listen" in output[-1]
        assert "generated an admin token" not in second.stderr
        assert requests.get(first.url + "/admin/keys", headers={
            "Authorization": f"Bearer {generated}"}).status_code == 200


# --- 15: the base URL is llimit's, never the Host header's ------------------------------

def test_pages_never_take_their_base_url_from_the_host_header(gateway):
    browser = http_sign_in(gateway.url, user_name="ann")
    page = browser.get(gateway.url + "/keys")
    evil = {"Host": "evil.example",  # requests sends no cookie for another Host: given here
            "Cookie": f"{llimit.SESSION_COOKIE}={browser.cookies[llimit.SESSION_COOKIE]}"}
    created = requests.post(gateway.url + "/keys", headers=evil, allow_redirects=False,
                            data={"csrf_token": csrf_token(page.text), "project": "default"})
    assert created.status_code == 303
    assert created.headers["Location"].startswith(gateway.url + "/keys")
    shown = requests.get(created.headers["Location"], headers=evil)
    assert shown.status_code == 200 and "llimit-" in shown.text
    assert "evil.example" not in shown.text and gateway.url + "/v1" in shown.text
    home = requests.get(gateway.url + "/", headers={"Host": "evil.example"})
    assert "evil.example" not in home.text


# --- 16: no answer without a durable row ---------------------------------------------------

def test_every_answered_call_survives_kill_9_during_a_database_lock(processes):
    proc = processes(LLIMIT_COMMIT_WAIT_SECONDS="2")
    raw_key, _ = proc.create_key(user="no-limits")  # no limit applies to this key
    first = chat(proc, raw_key)
    assert first[0] == 200
    lock = sqlite3.connect(proc.db_path, timeout=30, isolation_level=None)
    lock.execute("begin exclusive")
    try:
        whole = chat(proc, raw_key)
        assert whole[0] == 503 and whole[2]["error"]["code"] == "ledger_unavailable"
        streamed = chat(proc, raw_key, stream=True)
        assert streamed[0] == 200 and "[DONE]" not in streamed[2]
        assert "ledger_unavailable" in streamed[2][-1]
    finally:
        lock.execute("commit")
    # Five calls answered while the database is locked for less than the wait...
    lock.execute("begin exclusive")
    with ThreadPoolExecutor(5) as pool:
        calls = [pool.submit(chat, proc, raw_key) for _ in range(5)]
        time.sleep(1)
        lock.execute("commit")
        answered = [future.result() for future in calls]
    assert all(status == 200 for status, _id, _body in answered)
    proc.kill()  # ...then kill -9: every answered call has its row
    proc.wait()
    # 1 + 5 answered, and the 2 withheld answers' usage is still counted.
    assert len(proc.events()) == 1 + 2 + 5


# --- 17-21: rules the suite did not guard ----------------------------------------------------

def test_admin_dashboard_forms_need_the_csrf_token(gateway):
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    form = {"action": "create_project", "id": "sneaky", "name": "Sneaky"}
    assert admin.post(gateway.url + "/admin", data=form).status_code == 403
    assert admin.post(gateway.url + "/admin", data={**form, "csrf_token": "forged"}
                      ).status_code == 403
    assert gateway.admin.get(gateway.url + "/admin/projects/sneaky").status_code == 404
    page = admin.get(gateway.url + "/admin")
    assert admin.post(gateway.url + "/admin", data={**form, "csrf_token": csrf_token(page.text)}
                      ).status_code == 200
    assert gateway.admin.get(gateway.url + "/admin/projects/sneaky").status_code == 200


@sqlite_only  # input checks: no storage
def test_the_next_field_of_the_login_page_is_escaped(gateway):
    hostile = '/x"><script>alert(1)</script>'
    page = requests.get(gateway.url + "/login", params={"next": hostile})
    assert "<script>alert(1)" not in page.text
    assert 'value="/x&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page.text


def test_page_sessions_end_at_their_expiry(gateway, clock):
    browser = http_sign_in(gateway.url, user_name="ann")
    assert browser.get(gateway.url + "/keys", allow_redirects=False).status_code == 200
    clock.advance(llimit.SESSION_SECONDS - 60)
    assert browser.get(gateway.url + "/keys", allow_redirects=False).status_code == 200
    clock.advance(120)
    expired = browser.get(gateway.url + "/keys", allow_redirects=False)
    assert expired.status_code == 303 and "/login?" in expired.headers["Location"]


@sqlite_only  # the upstream connection: no storage
def test_a_client_leaving_mid_stream_closes_the_upstream_at_once(gateway, fake):
    raw_key, _ = gateway.create_key()
    fake.behaviour.update(chunks=100, chunk_delay=0.1)  # 10 s of stream
    resp = call(gateway, raw_key, stream=True)
    lines = resp.iter_lines()
    assert next(line for line in lines if line.startswith(b"data:"))
    resp.close()  # the client leaves after the first event
    left_at = time.monotonic()
    wait_until(lambda: fake.left, timeout=8, what="the upstream connection to close")
    assert time.monotonic() - left_at < 8  # long before the stream's 10 s
    event, = gateway.events()
    assert event["pricing"] == "estimated"


def test_personal_keys_only_where_the_project_allows_them(gateway):
    assert gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "closed", "allow_user_keys": False}).status_code == 201
    browser = http_sign_in(gateway.url, user_name="ann")
    page = browser.get(gateway.url + "/keys")
    assert 'value="closed"' not in page.text  # not offered
    refused = browser.post(gateway.url + "/keys", data={
        "csrf_token": csrf_token(page.text), "project": "closed"})
    assert refused.status_code == 403
    assert gateway.db().execute("select count(*) from api_keys").fetchone()[0] == 0
    # Opened through the admin API, the same form works; closed again, it does not.
    gateway.admin.patch(gateway.url + "/admin/projects/closed", json={"allow_user_keys": True})
    assert browser.post(gateway.url + "/keys", data={
        "csrf_token": csrf_token(page.text), "project": "closed"}).status_code == 200
    gateway.admin.patch(gateway.url + "/admin/projects/closed", json={"allow_user_keys": False})
    assert browser.post(gateway.url + "/keys", data={
        "csrf_token": csrf_token(page.text), "project": "closed"}).status_code == 403
    assert gateway.db().execute("select count(*) from api_keys").fetchone()[0] == 1


# --- 10: the key before the body; a large body without several copies -----------------

def test_a_wrong_key_is_refused_before_its_body_is_read(processes):
    proc = processes()
    raw_key, _ = proc.create_key()
    host, port = "127.0.0.1", int(proc.url.rsplit(":", 1)[1])
    for key, status in (("llimit-" + "w" * 43, 401), ("", 401)):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 31457280\r\n"
                     + (f"Authorization: Bearer {key}\r\n".encode() if key else b"") + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # not one byte of the 30 MB body was sent
            if not chunk:
                break
            answer += chunk
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head
        assert json.loads(body)["error"]["code"] in ("invalid_api_key", "missing_api_key")
    # A good key's large body is read and goes upstream as ever.
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * 2_000_000}]}
    assert requests.post(proc.url + "/v1/chat/completions", json=big, timeout=60,
                         headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200


def test_peak_memory_of_a_32_mb_body(processes):
    proc = processes()
    raw_key, _ = proc.create_key()
    before = proc.peak_rss_kb()
    body = json.dumps({"model": "gpt-4o", "stream": True, "messages": [
        {"role": "user", "content": "a" * (32 * 1024 * 1024 - 200)}]}).encode()
    resp = requests.post(proc.url + "/v1/chat/completions", data=body, timeout=120,
                         headers={"Authorization": f"Bearer {raw_key}",
                                  "Content-Type": "application/json"})
    assert resp.status_code == 200
    grown_mb = (proc.peak_rss_kb() - before) / 1024
    print(f"\npeak RSS growth for one {len(body) / 2**20:.0f} MB JSON body (stream,"
          f" include_usage injected): {grown_mb:.0f} MB")
    assert grown_mb < 4 * 32 + 16


@sqlite_only  # upstream errors: no storage
def test_anthropic_upstream_auth_errors_are_llimits_own_in_anthropics_shape(gateway, fake):
    ant_key = "sk-ant-api03-secret-upstream-key"
    assert gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "claude", "upstream_kind": "anthropic", "upstream_url": fake.url + "/v1",
        "upstream_key": ant_key}).status_code == 201
    raw_key, _ = gateway.create_key(project="claude")
    fake.behaviour.update(status=401, error_body={"type": "error", "error": {
        "type": "authentication_error", "message": f"invalid x-api-key {ant_key[:12]}..."}})
    resp = requests.post(gateway.url + "/v1/messages", headers={"x-api-key": raw_key},
                         json={"model": "claude-3-5-haiku-latest", "max_tokens": 10,
                               "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert resp.status_code == 401 and ant_key[:12] not in resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "refused llimit's credentials" in body["error"]["message"]
