"""Page sign-in behind an SSO proxy (LLIMIT_AUTH=header) and with a real
OpenID Connect provider run locally (LLIMIT_AUTH=oidc, oidc-provider-mock)."""

import base64
import json
import os
import re
import time
import urllib.parse

import pytest
import requests
from selenium.webdriver.common.by import By

import llimit
from tests.browser import click_and_wait, csrf_token, fresh
from tests.conftest import LazyModule, sqlite_only

oidc_provider_mock = LazyModule("oidc_provider_mock")

ENGINES = ("sqlite", "postgres")

CLIENT_ID = "llimit-test"
CLIENT_SECRET = "s3cret-for-tests"


# --- header ----------------------------------------------------------------------

@sqlite_only  # input checks: no storage
def test_header_sign_in_trusts_only_the_proxy_addresses(make_llimit):
    # trusted by default: 127.0.0.1 and ::1
    server = make_llimit(auth="header", user_domains=("example.com",))
    proxy = requests.Session()
    proxy.headers["X-Forwarded-Email"] = "Carol.Smith@Example.com"
    page = proxy.get(server.url + "/keys")
    assert page.status_code == 200 and "Keys of carol.smith" in page.text
    created = proxy.post(server.url + "/keys", data={"csrf_token": csrf_token(page.text),
                                                     "project": "default"})
    assert created.status_code == 200
    assert server.db().execute("select user_name from api_keys").fetchone()[0] == "carol.smith"

    # The proxy now names someone else in the same browser: a new session for them.
    proxy.headers["X-Forwarded-Email"] = "dave@example.com"
    assert "Keys of dave" in proxy.get(server.url + "/keys").text
    users = [row[0] for row in server.db().execute("select user_name from sessions")]
    assert users == ["dave"]
    del proxy.headers["X-Forwarded-Email"]
    gone = proxy.get(server.url + "/keys", allow_redirects=False)
    assert gone.status_code == 303  # the proxy vouches for no one now
    login = requests.get(server.url + "/login")
    assert "X-Forwarded-Email" in login.text and 'name="user"' not in login.text

    elsewhere = make_llimit(auth="header", trusted_proxies=("10.0.0.0/8", "192.0.2.7"))
    forged = requests.get(elsewhere.url + "/keys", allow_redirects=False,
                          headers={"X-Forwarded-Email": "root@example.com"})
    assert forged.status_code == 303 and "/login" in forged.headers["Location"]
    assert elsewhere.db().execute("select count(*) from sessions").fetchone()[0] == 0
    page = requests.get(elsewhere.url + "/login")
    typed = requests.post(elsewhere.url + "/login", cookies=page.cookies, data={
        "csrf_token": csrf_token(page.text), "user": "root"})
    assert typed.status_code == 400  # no typing a name in header mode


def test_header_sign_in_with_another_header_and_admin_users(make_llimit):
    server = make_llimit(auth="header", auth_header="Remote-User", admin_users=("root",),
                         trusted_proxies=("127.0.0.0/8",))
    frank = requests.get(server.url + "/usage", headers={"Remote-User": "Frank"})
    assert frank.status_code == 200 and "<span>frank</span>" in frank.text
    assert requests.get(server.url + "/admin", headers={"Remote-User": "frank"}
                        ).status_code == 403
    root = requests.get(server.url + "/admin", headers={"Remote-User": "root"})
    assert root.status_code == 200 and "<h1>Admin</h1>" in root.text


# --- OpenID Connect ------------------------------------------------------------------

@pytest.fixture(scope="module")
def provider():
    """A real OpenID Connect provider on this machine; its URL is the issuer."""
    saved = os.environ.get("AUTHLIB_INSECURE_TRANSPORT")
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # the provider's token endpoint is http here
    with oidc_provider_mock.run_server_in_thread() as server:
        yield f"http://localhost:{server.server_port}"
    if saved is None:
        del os.environ["AUTHLIB_INSECURE_TRANSPORT"]
    else:
        os.environ["AUTHLIB_INSECURE_TRANSPORT"] = saved


@pytest.fixture
def oidc_llimit(make_llimit, provider):
    return make_llimit(auth="oidc", oidc_issuer=provider, oidc_client_id=CLIENT_ID,
                       oidc_client_secret=CLIENT_SECRET, oidc_allowed_domains=("example.com",))


def verified_user(issuer, email, verified=True):
    """Register an account at the provider whose ID tokens say email_verified."""
    resp = requests.put(f"{issuer}/users/{email}",
                        json={"email": email, "email_verified": verified})
    assert resp.status_code < 300, resp.text


def provider_sign_in(driver, llimit_url, email, next_path="/usage", issuer=None):
    """Sign in on llimit's page, through the provider's own page, and back."""
    if issuer:
        verified_user(issuer, email)
    fresh(driver, llimit_url, f"/login?next={next_path}")
    click_and_wait(driver, driver.find_element(
        By.XPATH, "//button[normalize-space()='Sign in with single sign-on']"))
    assert "/oauth2/authorize" in driver.current_url  # at the provider now
    driver.find_element(By.NAME, "sub").send_keys(email)
    click_and_wait(driver, driver.find_element(By.XPATH, "//button[normalize-space()='Authorize']"))


def test_oidc_sign_in_in_a_browser(oidc_llimit, browser):
    provider_sign_in(browser, oidc_llimit.url, "Erin@Example.com",
                     issuer=oidc_llimit.config.oidc_issuer)
    assert browser.current_url == oidc_llimit.url + "/usage"
    assert browser.find_element(By.CSS_SELECTOR, "header .who span").text == "erin"
    row, = [dict(r) for r in oidc_llimit.db().execute("select * from sessions")]
    assert row["user_name"] == "erin" and row["pending"] is None

    provider_sign_in(browser, oidc_llimit.url, "mallory@evil.test",
                     issuer=oidc_llimit.config.oidc_issuer)
    assert "Accounts of evil.test may not sign in" in browser.page_source
    assert browser.find_element(By.CSS_SELECTOR, "header .who").text == "Sign in"
    users = [row[0] for row in oidc_llimit.db().execute("select user_name from sessions")]
    assert "mallory" not in users


def test_oidc_callback_wants_the_state_this_browser_started(oidc_llimit):
    verified_user(oidc_llimit.config.oidc_issuer, "gina@example.com")
    session = requests.Session()
    page = session.get(oidc_llimit.url + "/login")
    started = session.post(oidc_llimit.url + "/login", allow_redirects=False, data={
        "csrf_token": csrf_token(page.text), "oidc": "1", "next": "/keys"})
    assert started.status_code == 303
    authorize = started.headers["Location"]
    query = dict(pair.split("=", 1) for pair in authorize.split("?", 1)[1].split("&"))
    assert query["code_challenge_method"] == "S256" and query["nonce"] and query["state"]
    answer = session.post(authorize, data={"sub": "gina@example.com"}, allow_redirects=False)
    callback = answer.headers["Location"]
    assert callback.startswith(oidc_llimit.url + "/login/callback?")

    stranger = requests.get(callback)  # another browser, without the pending state
    assert stranger.status_code == 400 and "not started in this browser" in stranger.text
    forged = session.get(re.sub(r"state=[^&]+", "state=forged", callback))
    assert forged.status_code == 400
    # The forged attempt used up the pending state, as any answer does: start again.
    page = session.get(oidc_llimit.url + "/login")
    started = session.post(oidc_llimit.url + "/login", allow_redirects=False, data={
        "csrf_token": csrf_token(page.text), "oidc": "1", "next": "/keys"})
    answer = session.post(started.headers["Location"], data={"sub": "gina@example.com"},
                          allow_redirects=False)
    signed_in = session.get(answer.headers["Location"])
    assert signed_in.url == oidc_llimit.url + "/keys" and "Keys of gina" in signed_in.text
    assert session.get(answer.headers["Location"]).status_code == 400  # no replay


def _oidc_start(llimit_url, next_path="/keys", **headers):
    session = requests.Session()
    page = session.get(llimit_url + "/login")
    if "Host" in headers:  # requests sends no cookie for another Host: given here
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
    started = session.post(llimit_url + "/login", allow_redirects=False, headers=headers, data={
        "csrf_token": csrf_token(page.text), "oidc": "1", "next": next_path})
    assert started.status_code == 303
    return session, started.headers["Location"]


@sqlite_only  # redirects: no storage
@pytest.mark.parametrize("next_path", ["/%09/evil.example/phish", "//evil.example",
                                       "/\\evil.example", "https://evil.example/"])
def test_oidc_sign_in_never_ends_on_another_site(oidc_llimit, next_path):
    verified_user(oidc_llimit.config.oidc_issuer, "hal@example.com")
    session, authorize = _oidc_start(oidc_llimit.url, next_path)
    answer = session.post(authorize, data={"sub": "hal@example.com"}, allow_redirects=False)
    done = session.get(answer.headers["Location"], allow_redirects=False)
    assert done.status_code == 303
    assert urllib.parse.urljoin(oidc_llimit.url, done.headers["Location"]) == \
        oidc_llimit.url + "/"


@pytest.mark.parametrize("verified", [None, "false", "true", False])
def test_oidc_accepts_only_email_verified_true(oidc_llimit, verified):
    issuer = oidc_llimit.config.oidc_issuer
    claims = {"email": "ivy@example.com"}
    if verified is not None:
        claims["email_verified"] = verified
    assert requests.put(f"{issuer}/users/ivy@example.com", json=claims).status_code < 300
    session, authorize = _oidc_start(oidc_llimit.url)
    answer = session.post(authorize, data={"sub": "ivy@example.com"}, allow_redirects=False)
    refused = session.get(answer.headers["Location"], allow_redirects=False)
    assert refused.status_code == 403 and "no verified e-mail" in refused.text
    assert oidc_llimit.db().execute(
        "select count(*) from sessions where user_name is not null").fetchone()[0] == 0


@sqlite_only  # redirects: no storage
def test_the_oidc_redirect_never_comes_from_the_host_header(oidc_llimit):
    _session, authorize = _oidc_start(oidc_llimit.url, Host="evil.example")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize).query)
    assert query["redirect_uri"] == [oidc_llimit.url + "/login/callback"]
    assert any("LLIMIT_PUBLIC_URL" in warning
               for warning in llimit.sign_in_warnings(oidc_llimit.config))


def _id_token(claims, alg="RS256"):
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def test_id_token_claims_are_checked():
    issuer = "https://idp.example.com"
    client = llimit.OidcClient(llimit.Config(oidc_issuer=issuer, oidc_client_id="app"))
    now = time.time()
    good = {"iss": issuer, "aud": "app", "nonce": "n1", "exp": now + 300, "iat": now,
            "email": "ann@example.com"}
    assert client._checked_claims(_id_token(good), issuer, "n1", now)["email"] == \
        "ann@example.com"
    for change, problem in (({"iss": "https://evil.example"}, "another issuer"),
                            ({"aud": "someone-else"}, "another client"),
                            ({"aud": ["app", "other"], "azp": "other"}, "another party"),
                            ({"nonce": "n2"}, "nonce"),
                            ({"exp": now - 600}, "expired"),
                            ({"exp": None}, "expired"),
                            ({"iat": now + 3600}, "future")):
        with pytest.raises(llimit.LlimitError, match=problem):
            client._checked_claims(_id_token({**good, **change}), issuer, "n1", now)
    with pytest.raises(llimit.LlimitError, match="unsigned"):
        client._checked_claims(_id_token(good, alg="none"), issuer, "n1", now)
    with pytest.raises(llimit.LlimitError, match="malformed"):
        client._checked_claims("not-a-jwt", issuer, "n1", now)


def test_user_names_come_from_verified_emails_in_allowed_domains():
    domains = frozenset(("example.com", "corp.example"))
    assert llimit.user_from_claims({"email": "Ann.Lee@Example.com", "email_verified": True},
                                   ("example.com",), domains) == "ann.lee"
    assert llimit.user_from_claims({"preferred_username": "bo@corp.example"}, (),
                                   domains) == "bo"
    # Every domain may sign in, but only the listed ones name a user by the local part.
    assert llimit.user_from_claims({"email": "Bo@Else.example", "email_verified": True}, (),
                                   domains) == "bo@else.example"
    for claims in ({"email": "ann@example.com", "email_verified": False}, {"sub": "123"},
                   {"email": "ann@example.com"},  # email_verified missing
                   {"email": "ann@example.com", "email_verified": "false"},
                   {"email": "ann@example.com", "email_verified": "true"},
                   {"email": "ann@example.com", "email_verified": 1},
                   {"email": "ann@example.com", "preferred_username": "ann@example.com"},
                   {"email": "eve@evil.example", "email_verified": True}):
        with pytest.raises(llimit.LlimitError):
            llimit.user_from_claims(claims, ("example.com",), domains)


def test_oidc_settings_are_checked_at_start():
    with pytest.raises(SystemExit, match="https"):
        llimit.load_config([], {"LLIMIT_AUTH": "oidc", "LLIMIT_OIDC_ISSUER": "http://idp.example",
                                "LLIMIT_OIDC_CLIENT_ID": "app"})
    with pytest.raises(SystemExit, match="CLIENT_ID"):
        llimit.load_config([], {"LLIMIT_AUTH": "oidc",
                                "LLIMIT_OIDC_ISSUER": "https://idp.example"})
    entra = llimit.load_config([], {"AZURE_AD_TENANT_ID": "contoso.onmicrosoft.com",
                                    "AZURE_AD_CLIENT_ID": "app", "AZURE_AD_CLIENT_SECRET": "s",
                                    "AZURE_AD_CORPORATE_DOMAIN": "contoso.com"})
    assert (entra.auth, entra.oidc_issuer, entra.oidc_allowed_domains) == (
        "oidc", "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0",
        ("contoso.com",))


def test_oidc_group_claim_sets_the_plan_at_each_sign_in(make_llimit, provider):
    server = make_llimit(auth="oidc", oidc_issuer=provider, oidc_client_id=CLIENT_ID,
                         oidc_client_secret=CLIENT_SECRET, oidc_allowed_domains=("example.com",),
                         user_domains=("example.com",), plan_claim="groups",
                         plan_groups=(("research", "research-plan"), ("interns", "intern-plan")))
    for plan in ("research-plan", "intern-plan"):
        assert server.admin.post(server.url + "/admin/plans",
                                 json={"id": plan}).status_code == 201

    def sign_in_with(groups):
        assert requests.put(f"{provider}/users/jan@example.com", json={
            "email": "jan@example.com", "email_verified": True,
            "groups": groups}).status_code < 300
        session, authorize = _oidc_start(server.url)
        answer = session.post(authorize, data={"sub": "jan@example.com"},
                              allow_redirects=False)
        assert session.get(answer.headers["Location"]).status_code == 200
        return server.admin.get(server.url + "/admin/users/jan").json()

    assert sign_in_with(["staff", "interns"])["plan"] == "intern-plan"
    assert sign_in_with(["research", "interns"])["plan"] == "research-plan"
    user = sign_in_with(["staff"])  # no group of the mapping: the sign-in's plan goes
    assert user["plan"] is None and user["plan_source"] is None
    server.admin.put(server.url + "/admin/users/jan", json={"plan": "intern-plan"})
    assert sign_in_with(["staff"])["plan_source"] == "admin"  # an admin's stays
