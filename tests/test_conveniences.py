"""What users of the predecessors expect beside Gemini: CORS for browser apps
(LLIMIT_CORS_ORIGINS), the user named to the provider (LLIMIT_UPSTREAM_USER),
and settings read from a .env file. Real servers, real clients, a real
headless Chromium for the browser's side of CORS."""

import hashlib
import hmac
import shutil
import subprocess
import sys

import pytest
import requests

from tests.conftest import ADMIN_TOKEN, LazyModule
from tests.process import ROOT, LlimitProcess

anthropic = LazyModule("anthropic")
openai = LazyModule("openai")

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
APP = "https://app.example"


# --- CORS ---------------------------------------------------------------------------------

def preflight(url, origin=APP, method="POST", headers="authorization, content-type"):
    return requests.options(url, headers={"Origin": origin,
                                          "Access-Control-Request-Method": method,
                                          "Access-Control-Request-Headers": headers})


def test_cors_preflights_on_proxy_routes_need_no_key_for_allowed_origins(make_llimit, fake):
    gateway = make_llimit(cors_origins=(APP,))
    for path in ("/v1/chat/completions", "/v1beta/models/gemini-2.5-flash:generateContent",
                 "/openai/deployments/gpt-4o/chat/completions"):
        resp = preflight(gateway.url + path, headers="authorization, x-stainless-os, "
                                                     "x-goog-api-key, anthropic-version")
        assert resp.status_code == 204, (path, resp.text)
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        allowed = {name.strip() for name in
                   resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-api-key", "api-key", "x-goog-api-key",
                "anthropic-version", "openai-beta", "x-stainless-os", "x-llimit-user",
                "x-llimit-plan"} <= allowed
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert int(resp.headers["Access-Control-Max-Age"]) > 0
        assert resp.headers["Vary"] == "Origin"
    # A browser app may ask what its key has left: /llimit/me is open to it too.
    me = preflight(gateway.url + "/llimit/me", headers="authorization")
    assert me.status_code == 204 and me.headers["Access-Control-Allow-Origin"] == APP
    raw_key, _ = gateway.create_key()
    answer = requests.get(gateway.url + "/llimit/me", headers={
        "Authorization": f"Bearer {raw_key}", "Origin": APP})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == APP
    assert fake.requests == []  # a preflight never goes upstream
    other = preflight(gateway.url + "/v1/chat/completions", origin="https://evil.example")
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers


def test_cors_answers_carry_the_origin_and_expose_llimits_headers(make_llimit, fake):
    gateway = make_llimit(cors_origins=(APP,))
    raw_key, _ = gateway.create_key()
    headers = {"Authorization": f"Bearer {raw_key}", "Origin": APP}
    ok = requests.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    exposed = ok.headers["Access-Control-Expose-Headers"].lower()
    assert "x-llimit-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
    assert "x-llimit-warning" in exposed
    # llimit's own refusals are readable by the app too.
    refused = requests.post(gateway.url + "/v1/chat/completions", json=CHAT,
                            headers={"Origin": APP})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == APP
    stream = requests.post(gateway.url + "/v1/chat/completions",
                           json={**CHAT, "stream": True}, headers=headers)
    assert stream.headers["Access-Control-Allow-Origin"] == APP
    stranger = requests.post(gateway.url + "/v1/chat/completions", json=CHAT,
                             headers={**headers, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in stranger.headers


def test_cors_opens_nothing_on_pages_and_admin_or_by_default(make_llimit, fake):
    gateway = make_llimit(cors_origins=(APP,))
    for path in ("/admin/keys", "/admin", "/keys", "/reports/data", "/login"):
        resp = preflight(gateway.url + path)
        assert resp.status_code >= 400, path
        assert "Access-Control-Allow-Origin" not in resp.headers, path
        page = requests.get(gateway.url + path, headers={
            "Origin": APP, "Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert "Access-Control-Allow-Origin" not in page.headers, path
    plain = make_llimit()  # LLIMIT_CORS_ORIGINS unset: no CORS anywhere
    for path in ("/v1/chat/completions", "/llimit/me"):
        resp = preflight(plain.url + path)
        assert resp.status_code >= 400 and "Access-Control-Allow-Origin" not in resp.headers


def test_a_browser_app_on_another_origin_calls_llimit_with_fetch(make_llimit, fake, browser):
    # The fake upstream's own origin plays the app's page; llimit is another origin.
    gateway = make_llimit(cors_origins=(fake.url,))
    raw_key, _ = gateway.create_key()
    script = """
        const [url, key, done] = arguments;
        fetch(url + "/v1/chat/completions", {method: "POST", headers: {
            "Authorization": "Bearer " + key, "Content-Type": "application/json",
            "x-stainless-os": "browser"},
            body: JSON.stringify({model: "gpt-4o-mini",
                                  messages: [{role: "user", content: "Hi"}]})})
          .then(async r => done({status: r.status, text: (await r.json()).choices[0].message.content,
                                 requestId: r.headers.get("X-LLimit-Request-Id")}))
          .catch(e => done({error: String(e)}));"""
    browser.get(fake.url + "/page")
    result = browser.execute_async_script(script, gateway.url, raw_key)
    assert result["status"] == 200 and result["text"] == "Hello world!", result
    assert result["requestId"]  # an exposed header the app can read
    blocked = make_llimit(cors_origins=("https://other.example",))
    browser.get(fake.url + "/page")
    result = browser.execute_async_script(script, blocked.url, raw_key)
    assert "error" in result  # the browser refused: no CORS for this origin


# --- the user named to the provider ---------------------------------------------------------

def stored_secret(gateway):
    return gateway.db().execute(
        "select value from settings where name = 'upstream_user_secret'").fetchone()[0]


def expected_hash(secret, name):
    return hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()


def test_upstream_user_hash_names_the_user_to_openai_and_anthropic(make_llimit, fake, tmp_path):
    gateway = make_llimit(upstream_user="hash")
    raw_key, _ = gateway.create_key(user="alice")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    # The client tries to pass as bob: replaced by alice's own identifier.
    client.chat.completions.create(**CHAT, safety_identifier="bob", user="bob")
    secret = stored_secret(gateway)
    alice = expected_hash(secret, "alice")
    sent = fake.requests[-1].json
    assert sent["safety_identifier"] == alice and sent["user"] == alice
    assert "alice" not in fake.requests[-1].body.decode()  # no name leaves llimit
    client.responses.create(model="gpt-4o-mini", input="Hi")
    assert fake.requests[-1].json["safety_identifier"] == alice
    client.embeddings.create(model="text-embedding-3-small", input="x")  # no such field there
    assert "safety_identifier" not in fake.requests[-1].json
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "claude", "upstream_kind": "anthropic", "upstream_url": fake.url + "/v1",
        "upstream_key": "sk-ant-x"})
    assert resp.status_code == 201
    claude_key, _ = gateway.create_key(user="bob", project="claude")
    anthropic.Anthropic(base_url=gateway.url, api_key=claude_key, max_retries=0).messages.create(
        model="claude-sonnet-5", max_tokens=10, messages=[{"role": "user", "content": "Hi"}],
        metadata={"user_id": "alice"})
    assert fake.requests[-1].json["metadata"] == {"user_id": expected_hash(secret, "bob")}
    # Stable for the install: a restart on the same database names alice alike.
    again = make_llimit(upstream_user="hash", db_path=gateway.config.db_path)
    requests.post(again.url + "/v1/chat/completions", json=CHAT,
                  headers={"Authorization": f"Bearer {raw_key}"})
    assert fake.requests[-1].json["safety_identifier"] == alice


def test_upstream_user_name_and_unset(make_llimit, fake):
    named = make_llimit(upstream_user="name")
    app_key, app_id = named.create_key(user=None)
    requests.post(named.url + "/v1/chat/completions", json={**CHAT, "user": "mallory"},
                  headers={"Authorization": f"Bearer {app_key}", "X-LLimit-User": "carol"})
    assert fake.requests[-1].json["safety_identifier"] == "carol"
    requests.post(named.url + "/v1/chat/completions", json=CHAT,
                  headers={"Authorization": f"Bearer {app_key}"})
    assert fake.requests[-1].json["safety_identifier"] == "key:" + app_id
    plain = make_llimit()
    raw_key, _ = plain.create_key(user="alice")
    requests.post(plain.url + "/v1/chat/completions", json=CHAT,
                  headers={"Authorization": f"Bearer {raw_key}"})
    assert "safety_identifier" not in fake.requests[-1].json


# --- .env -----------------------------------------------------------------------------------

def test_serve_reads_a_dotenv_file_and_the_real_environment_wins(tmp_path, fake):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text(
        "# llimit settings\n"
        "export LLIMIT_CORS_ORIGINS='https://from-dotenv.example'\n"
        'LLIMIT_UPSTREAM_USER="name"\n'
        "LLIMIT_DEFAULT_MAX_TOKENS=100 # a comment\n"
        "LLIMIT_UPSTREAM_KEY_DOTENV=sk-from-dotenv\n"
        "LLIMIT_ADMIN_TOKEN=from-dotenv-loses\n"
        "not a setting line\n")
    proc = LlimitProcess(tmp_path, fake.url + "/v1", cwd=str(work))
    try:
        resp = proc.admin.post(proc.url + "/admin/projects", json={
            "id": "p", "upstream_url": fake.url + "/v1", "upstream_key": "env:LLIMIT_UPSTREAM_KEY_DOTENV"})
        assert resp.status_code == 201, resp.text  # the real ADMIN_TOKEN won over .env's
        raw_key = proc.admin.post(proc.url + "/admin/keys", json={
            "user": "alice", "project": "p"}).json()["key"]
        resp = requests.post(proc.url + "/v1/chat/completions", json=CHAT, headers={
            "Authorization": f"Bearer {raw_key}", "Origin": "https://from-dotenv.example"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["Access-Control-Allow-Origin"] == "https://from-dotenv.example"
        sent = fake.requests[-1]
        assert sent.headers["Authorization"] == "Bearer sk-from-dotenv"
        assert sent.json["safety_identifier"] == "alice"
        assert "line 7 is not KEY=VALUE" in proc.log() and "not a setting" not in proc.log()
        assert "sk-from-dotenv" not in proc.log()
    finally:
        proc.close()


def test_a_dotenv_beside_llimit_py_is_read_from_any_directory(tmp_path, fake):
    beside = tmp_path / "install"
    beside.mkdir()
    for name in ("llimit.py", "pricing.json"):
        shutil.copy(f"{ROOT}/{name}", beside / name)
    (beside / ".env").write_text("LLIMIT_UPSTREAM_USER=bogus\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, str(beside / "llimit.py"), "serve"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "LLIMIT_PORT": "0",
                              "LLIMIT_DB": str(tmp_path / "x.db")})
    # The value came from the .env beside llimit.py: refused at start, by name.
    assert run.returncode != 0
    assert "LLIMIT_UPSTREAM_USER must be hash or name" in run.stderr


@pytest.mark.parametrize("setting", ["LLIMIT_UPSTREAM_USER=both", "LLIMIT_CORS_ORIGINS=*"])
def test_bad_new_settings_fail_at_start(setting):
    name, value = setting.split("=")
    with pytest.raises(SystemExit):
        __import__("llimit").load_config([], {name: value})

