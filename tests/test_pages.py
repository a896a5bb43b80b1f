"""The pages, in a real headless Chromium and over HTTP: sign-in, keys, usage,
reports with drawn charts, the admin dashboard, and the web-app defences
(CSRF, cross-site posts, escaping, own keys only, admins only)."""

import html
import os
import re
import subprocess
import sys

import pytest
import requests
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import llimit
from tests.browser import (VENDOR_CHARTJS, click_and_wait, csrf_token, fresh, http_sign_in,
                           sign_in_admin, sign_in_open)
from tests.conftest import ADMIN_TOKEN, LazyModule, sqlite_only

openai = LazyModule("openai")

ENGINES = ("sqlite", "postgres")

# 11 prompt + 7 completion tokens (the fake upstream's answer) at these prices: $0.025.
PRICE = {"input": 1000.0, "output": 2000.0}
CALL_USD = 0.025


def priced(server, model="gpt-4o-mini"):
    resp = server.admin.put(f"{server.url}/admin/pricing/{model}", json=PRICE)
    assert resp.status_code == 200, resp.text
    return server


def call(server, raw_key, model="gpt-4o-mini"):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=raw_key, max_retries=0)
    return client.chat.completions.create(model=model,
                                          messages=[{"role": "user", "content": "Hi"}])


def test_sign_in_get_a_key_use_it_and_see_the_spend_and_the_charts(make_llimit, browser):
    assert os.path.exists(VENDOR_CHARTJS), "run tests/install.sh for the local Chart.js"
    server = priced(make_llimit(chartjs=VENDOR_CHARTJS))
    driver = browser
    sign_in_open(driver, server.url, "alice", next_path="/keys")
    assert driver.current_url == server.url + "/keys"
    assert "Keys of alice" in driver.page_source

    driver.find_element(By.ID, "note").send_keys("laptop")
    click_and_wait(driver, driver.find_element(By.CSS_SELECTOR, "form[action='/keys'] button"))
    raw_key = driver.find_element(By.ID, "new-key").text
    assert raw_key.startswith("llimit-") and len(raw_key) > 40
    python_snippet = driver.find_element(By.ID, "snippet-python").text
    assert f'base_url="{server.url}/v1"' in python_snippet and raw_key in python_snippet
    assert raw_key in driver.find_element(By.ID, "snippet-curl").text
    copy = driver.find_element(By.CSS_SELECTOR, "button[data-copy=new-key]")
    assert copy.is_displayed()  # the pages' script ran and showed it
    listed = driver.find_element(By.CSS_SELECTOR, "table").text
    assert raw_key[:11] in listed and raw_key not in listed and "laptop" in listed

    assert call(server, raw_key).choices[0].message.content == "Hello world!"
    server.admin.post(server.url + "/admin/limits", json={
        "scope": "user", "target": "alice", "metric": "usd", "window": "day", "amount": 0.1})
    driver.get(server.url + "/usage")
    stats = [element.text for element in driver.find_elements(By.CLASS_NAME, "stat")]
    assert stats[:3] == ["$0.0250", "$0.0250", "1"]
    limits = driver.find_element(By.CSS_SELECTOR, "section table").text
    assert "$0.0250 of $0.10" in limits and "user alice" in limits
    assert "$0.10 a day" in limits and "lim_" not in limits  # in words, no ids
    bar = driver.find_element(By.CSS_SELECTOR, "section table .bar span")
    assert bar.get_attribute("style") == "width: 25%;"
    assert "gpt-4o-mini" in driver.page_source

    driver.get(server.url + "/reports")
    assert "Reports of everyone's spending are for llimit's admins" in driver.page_source
    assert "LLIMIT_" not in driver.find_element(By.TAG_NAME, "main").text  # no internals
    sign_in_admin(driver, server.url, ADMIN_TOKEN, next_path="/reports")
    assert driver.current_url == server.url + "/reports"
    drawn = driver.execute_script("""
        return Array.from(document.querySelectorAll("canvas[data-series]")).map(function (c) {
            var chart = Chart.getChart(c);
            return chart ? [c.id, chart.data.datasets.map(function (d) { return d.data; })]
                         : [c.id, null];
        });""")
    charts = dict(drawn)
    assert set(charts) == {"chart-users", "chart-daily", "chart-daily-users", "chart-models",
                           "chart-projects"}
    assert all(datasets for datasets in charts.values()), charts
    assert charts["chart-users"] == [[CALL_USD]]
    daily_cost, running_total = charts["chart-daily"]
    assert len(daily_cost) == 30 and daily_cost[-1] == CALL_USD and running_total[-1] == CALL_USD
    assert charts["chart-daily-users"][0][-1] == CALL_USD
    assert driver.execute_script(
        "return document.getElementById('chart-daily').getContext('2d')"
        ".getImageData(0, 0, 400, 300).data.some(function (v) { return v !== 0; })")
    tables = driver.find_element(By.TAG_NAME, "main").text
    assert "alice" in tables and "$0.0250" in tables


def test_a_user_name_is_text_never_markup(make_llimit, browser):
    server = make_llimit()
    evil = "<script>alert(1)</script>"
    sign_in_open(browser, server.url, evil, next_path="/keys")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert browser.find_element(By.CSS_SELECTOR, "header .who span").text == evil
    assert "Keys of " + evil in browser.find_element(By.TAG_NAME, "main").text
    page = http_sign_in(server.url, evil).get(server.url + "/keys").text
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_page_error_is_a_page_and_needs_no_script(make_llimit, browser):
    server = make_llimit()
    fresh(browser, server.url, "/no/such/page")
    assert "404" in browser.title and "Unknown URL" in browser.page_source
    assert browser.find_element(By.CSS_SELECTOR, "header a.brand").text == "llimit"
    resp = requests.get(server.url + "/no/such/page")
    assert resp.status_code == 404 and resp.headers["Content-Type"].startswith("text/html")
    assert "script-src 'none'" in resp.headers["Content-Security-Policy"]


def test_users_see_and_revoke_only_their_own_keys(gateway):
    bob_key, bob_id = gateway.create_key(user="bob", note="bob's secret note")
    alice = http_sign_in(gateway.url, "alice")
    page = alice.get(gateway.url + "/keys").text
    token = csrf_token(page)
    created = alice.post(gateway.url + "/keys", data={"csrf_token": token, "project": "default",
                                                      "note": "mine"})
    # POST/redirect/GET: the key is shown on the page the POST redirected to ...
    assert created.status_code == 200 and created.url == gateway.url + "/keys#new"
    assert created.history[0].status_code == 303
    alice_key = re.search(r'id="new-key" class="secret">([^<]+)<', created.text).group(1)
    # ... and a reload makes no second key and shows the secret no more.
    page = alice.get(gateway.url + "/keys").text
    assert bob_id not in page and "bob's secret note" not in page and bob_key[-4:] not in page
    assert alice_key not in page  # shown once, at creation only
    assert gateway.db().execute("select count(*) from api_keys where user_name = 'alice'"
                                ).fetchone()[0] == 1

    refused = alice.post(f"{gateway.url}/keys/{bob_id}/revoke", data={"csrf_token": token})
    assert refused.status_code == 404
    assert call(gateway, bob_key).choices  # still works

    alice_id = gateway.db().execute("select id from api_keys where user_name = 'alice'"
                                    ).fetchone()[0]
    # Without the page script's confirm(), a revoke asks on a page first.
    asked = alice.post(f"{gateway.url}/keys/{alice_id}/revoke", data={"csrf_token": token})
    assert asked.status_code == 200 and "Revoke the key" in asked.text
    assert 'name="confirm" value="1"' in asked.text and alice_key[:11] in asked.text
    assert call(gateway, alice_key).choices  # not revoked yet
    revoked = alice.post(f"{gateway.url}/keys/{alice_id}/revoke",
                         data={"csrf_token": token, "confirm": "1"})
    assert revoked.status_code == 200 and revoked.url == gateway.url + "/keys"
    assert "revoked" in revoked.text
    with pytest.raises(openai.PermissionDeniedError):
        call(gateway, alice_key)
    assert alice.get(f"{gateway.url}/keys/{alice_id}/revoke").status_code == 405


def test_state_changing_posts_need_the_csrf_token_and_our_origin(gateway):
    alice = http_sign_in(gateway.url, "alice")
    token = csrf_token(alice.get(gateway.url + "/keys").text)
    form = {"project": "default", "note": "x"}
    assert alice.post(gateway.url + "/keys", data=form).status_code == 403
    wrong = alice.post(gateway.url + "/keys", data={**form, "csrf_token": "forged"})
    assert wrong.status_code == 403 and "reload the page" in wrong.text
    non_ascii = alice.post(gateway.url + "/keys", data={**form, "csrf_token": "é"})
    assert non_ascii.status_code == 403
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Origin": "null"}):
        refused = alice.post(gateway.url + "/keys", data={**form, "csrf_token": token},
                             headers=headers)
        assert refused.status_code == 403 and "another site" in refused.text, headers
    # Another browser's token is no good either.
    bob_token = csrf_token(http_sign_in(gateway.url, "bob").get(gateway.url + "/keys").text)
    assert alice.post(gateway.url + "/keys",
                      data={**form, "csrf_token": bob_token}).status_code == 403
    assert gateway.db().execute("select count(*) from api_keys").fetchone()[0] == 0
    ok = alice.post(gateway.url + "/keys", data={**form, "csrf_token": token},
                    headers={"Origin": gateway.url, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200
    logout = alice.post(gateway.url + "/logout", data={})
    assert logout.status_code == 403  # even signing out takes the token
    confirm = alice.get(gateway.url + "/logout")  # typed or linked: a button, no sign-out
    assert confirm.status_code == 200 and csrf_token(confirm.text) == token
    assert alice.get(gateway.url + "/keys", allow_redirects=False).status_code == 200
    out = alice.post(gateway.url + "/logout", data={"csrf_token": token}, allow_redirects=False)
    assert out.status_code == 303
    assert alice.get(gateway.url + "/logout", allow_redirects=False).headers["Location"] \
        .endswith("/login")


def database_state(server):
    """Every row of every table, to show that a refused form changed nothing."""
    db = server.db()
    tables = sorted(llimit.list_tables(db))
    return {table: sorted(repr(tuple(row)) for row in db.execute(f"select * from {table}"))
            for table in tables}


def test_every_state_changing_post_needs_the_csrf_token_and_our_origin(gateway, fake):
    """Each page form that changes something, /login included, is refused without its
    session's token, with a forged or another session's token, and from another site,
    changing nothing; the same form with the token and our origin then does its work."""
    alice = http_sign_in(gateway.url, "alice")
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    stranger = requests.Session()  # not signed in yet: the form is /login's own
    tokens = {id(alice): csrf_token(alice.get(gateway.url + "/keys").text),
              id(admin): csrf_token(admin.get(gateway.url + "/admin").text),
              id(stranger): csrf_token(stranger.get(gateway.url + "/login").text)}
    bob_token = csrf_token(http_sign_in(gateway.url, "bob").get(gateway.url + "/keys").text)
    _, alice_key_id = gateway.create_key(user="alice")
    _, zed_key_id = gateway.create_key(user="zed")
    limit_id = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "zed", "metric": "usd", "window": "day", "amount": 1}
    ).json()["id"]
    assert gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "csrf-p", "upstream_kind": "openai"}).status_code == 201
    upstream = fake.url + "/v1"
    # (session, route, URL path, form): every POST route of the pages, every admin action.
    forms = [
        (alice, "/keys", "/keys", {"project": "default", "note": "x"}),
        (alice, "/keys/<key_id>/revoke", f"/keys/{alice_key_id}/revoke", {"confirm": "1"}),
        (admin, "/admin", "/admin", {"action": "create_project", "id": "csrf-new",
                                     "upstream_kind": "openai", "upstream_url": upstream}),
        (admin, "/admin", "/admin", {"action": "update_project", "id": "csrf-p",
                                     "name": "Renamed", "upstream_kind": "openai",
                                     "upstream_url": upstream,
                                     "upstream_key": "env:LLIMIT_UPSTREAM_KEY_P"}),
        (admin, "/admin", "/admin", {"action": "create_key", "user": "dana",
                                     "project": "default"}),
        (admin, "/admin", "/admin", {"action": "revoke_key", "key_id": zed_key_id,
                                     "confirm": "1"}),
        (admin, "/admin", "/admin", {"action": "create_limit", "scope": "user",
                                     "target": "dana", "metric": "requests",
                                     "window": "minute", "amount": "1",
                                     "limit_action": "block"}),
        (admin, "/admin", "/admin", {"action": "reset_limit", "limit_id": limit_id}),
        (admin, "/admin", "/admin", {"action": "delete_limit", "limit_id": limit_id}),
        (admin, "/admin", "/admin", {"action": "create_plan", "id": "csrf-plan",
                                     "limits": "usd:1/day\nrequests:5/24h"}),
        (admin, "/admin", "/admin", {"action": "assign_plan", "user": "dana",
                                     "plan": "csrf-plan"}),
        (admin, "/admin", "/admin", {"action": "delete_plan", "plan_id": "csrf-plan"}),
        (admin, "/admin", "/admin", {"action": "set_price", "model": "acme-7b",
                                     "input": "1", "output": "2"}),
        (stranger, "/login", "/login", {"user": "mallory", "next": "/"}),
        (alice, "/logout", "/logout", {}),  # last of alice's: it ends her session
    ]
    assert {route for _, route, _, _ in forms} == {
        path for method, path, _ in llimit.routes()
        if method == "POST" and not path.startswith("/admin/")}  # /admin/...: the token API
    assert {form["action"] for _, route, _, form in forms if route == "/admin"} == \
        set(llimit.ADMIN_ACTIONS)

    for session, route, path, form in forms:
        token = tokens[id(session)]
        what = f"{path} {form.get('action', '')}"
        before = database_state(gateway)
        for sent, headers, says in (
                (form, {}, "reload the page"),                          # no token
                ({**form, "csrf_token": "forged"}, {}, "reload the page"),
                ({**form, "csrf_token": bob_token}, {}, "reload the page"),  # not hers
                ({**form, "csrf_token": token}, {"Origin": "https://evil.example"},
                 "another site"),
                ({**form, "csrf_token": token}, {"Sec-Fetch-Site": "cross-site"},
                 "another site")):
            refused = session.post(gateway.url + path, data=sent, headers=headers,
                                   allow_redirects=False)
            assert refused.status_code == 403 and says in refused.text, (what, headers)
            assert database_state(gateway) == before, (what, headers)
        done = session.post(gateway.url + path, data={**form, "csrf_token": token},
                            headers={"Origin": gateway.url, "Sec-Fetch-Site": "same-origin"},
                            allow_redirects=False)
        assert done.status_code in (200, 303), (what, done.status_code, done.text)
        assert database_state(gateway) != before, what


def test_sessions_are_server_side_with_safe_cookies(make_llimit):
    server = make_llimit()
    session = requests.Session()
    page = session.get(server.url + "/login")
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Secure" not in cookie
    signed_in = session.post(server.url + "/login", data={"csrf_token": csrf_token(page.text),
                                                          "user": "alice"},
                             allow_redirects=False)
    raw_id = session.cookies["llimit_session"]
    rows = [dict(row) for row in server.db().execute("select * from sessions")]
    assert [row["user_name"] for row in rows] == ["alice"]  # the pre-sign-in row is gone
    assert rows[0]["id_hash"] == llimit.hash_secret(raw_id) and raw_id not in str(rows)
    assert signed_in.status_code == 303
    # A forged cookie signs no one in.
    stranger = requests.get(server.url + "/keys", cookies={"llimit_session": "made-up"},
                            allow_redirects=False)
    assert stranger.status_code == 303 and "/login" in stranger.headers["Location"]
    token = csrf_token(session.get(server.url + "/keys").text)
    out = session.post(server.url + "/logout", data={"csrf_token": token},
                       allow_redirects=False)
    assert out.status_code == 303 and 'llimit_session=""' in out.headers["Set-Cookie"]
    assert server.db().execute("select count(*) from sessions").fetchone()[0] == 0
    replayed = requests.get(server.url + "/keys", cookies={"llimit_session": raw_id},
                            allow_redirects=False)
    assert replayed.status_code == 303

    https = make_llimit(public_url="https://llimit.example.com")
    assert "Secure" in requests.get(https.url + "/login").headers["Set-Cookie"]


def test_open_sign_in_warns_that_anyone_can_act_as_anyone():
    warnings = llimit.sign_in_warnings(llimit.Config(auth="open", admin_users=("root",)))
    assert any("anyone" in warning for warning in warnings)
    assert any("LLIMIT_ADMIN_USERS is ignored" in warning for warning in warnings)
    assert llimit.sign_in_warnings(llimit.Config(auth="header")) == []


def test_admin_pages_refuse_everyone_but_admins(make_llimit):
    server = make_llimit(admin_users=("root",))
    anonymous = requests.get(server.url + "/admin", allow_redirects=False)
    assert anonymous.status_code == 303
    assert anonymous.headers["Location"].endswith("/login?next=%2Fadmin")
    # Open sign-in lets anyone type "root", so LLIMIT_ADMIN_USERS counts for nothing there.
    root = http_sign_in(server.url, "root")
    refused = root.get(server.url + "/admin")
    assert refused.status_code == 403 and "This page is for llimit" in refused.text
    assert "<header>" in refused.text  # the error is a page of the site
    token = csrf_token(refused.text)
    post = root.post(server.url + "/admin", data={"csrf_token": token, "action": "create_key",
                                                  "user": "root"})
    assert post.status_code == 403
    assert server.db().execute("select count(*) from api_keys").fetchone()[0] == 0
    assert root.get(server.url + "/reports").status_code == 403
    data = root.get(server.url + "/reports/data")
    assert data.status_code == 403 and data.json()["error"]["type"] == "permission_denied"
    assert requests.get(server.url + "/reports/data").status_code == 401
    wrong = root.post(server.url + "/login", data={"csrf_token": token, "admin_token": "guess"})
    assert wrong.status_code == 401
    admin = root.post(server.url + "/login", data={"csrf_token": token,
                                                   "admin_token": ADMIN_TOKEN, "next": "/"})
    assert admin.url == server.url + "/admin" and admin.status_code == 200

    public = make_llimit(reports_public=True)
    carol = http_sign_in(public.url, "carol")
    assert carol.get(public.url + "/reports").status_code == 200
    assert carol.get(public.url + "/admin").status_code == 403


def test_admin_dashboard_manages_projects_keys_limits_and_prices(gateway, fake, monkeypatch):
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    page = admin.get(gateway.url + "/admin")
    assert page.status_code == 200
    token = csrf_token(page.text)

    def act(action, **fields):
        return admin.post(gateway.url + "/admin", data={"csrf_token": token, "action": action,
                                                        **fields})

    monkeypatch.setenv("LLIMIT_UPSTREAM_KEY_TEAM_A", "sk-team-a-secret")
    created = act("create_project", id="team-a", name="Team <A>", upstream_kind="openai",
                  upstream_url=fake.url + "/v1", upstream_key="env:LLIMIT_UPSTREAM_KEY_TEAM_A",
                  allow_user_keys="1", budget_usd="5", budget_window="day")
    assert created.status_code == 200 and "Project created." in created.text
    assert "Team &lt;A&gt;" in created.text and "env:LLIMIT_UPSTREAM_KEY_TEAM_A" in created.text
    project = gateway.admin.get(gateway.url + "/admin/projects/team-a").json()
    assert project["upstream_key_source"] == "env:LLIMIT_UPSTREAM_KEY_TEAM_A"
    assert [(l["metric"], l["window"], l["amount"]) for l in project["limits"]] == \
        [("usd", "day", 5.0)]
    bad = act("create_project", id="bad id!", upstream_kind="openai")
    assert bad.status_code == 400 and "id must be" in bad.text

    # A stored key is write-only: saved, used upstream, never shown back.
    saved = act("update_project", id="team-a", name="Team A", upstream_kind="openai",
                upstream_url=fake.url + "/v1", upstream_key="sk-stored-secret-999")
    assert saved.status_code == 200 and "sk-stored-secret-999" not in saved.text
    project = gateway.admin.get(gateway.url + "/admin/projects/team-a").json()
    assert project["upstream_key_source"] == "stored" and project["allow_user_keys"] is False

    issued = act("create_key", user="dana", project="team-a", note="from the dashboard")
    raw_key = re.search(r'id="new-key" class="secret">([^<]+)<', issued.text).group(1)
    assert "Your new key for dana" in issued.text
    fake.reset()
    # Unpriced spend under team-a's USD budget is refused; without a budget it is metered.
    with pytest.raises(openai.PermissionDeniedError, match="No price covers"):
        call(gateway, raw_key, model="acme-7b")
    assert call(gateway, gateway.create_key(user="erin")[0], model="acme-7b").choices
    page = admin.get(gateway.url + "/admin").text
    assert raw_key not in page and "dana" in page
    assert re.search(r'id="missing-prices".*acme-7b', page, re.S)

    priced_page = act("set_price", model="acme-7b", input="1000", output="2000")
    assert "Price set" in priced_page.text and 'id="missing-prices"' not in priced_page.text
    assert call(gateway, raw_key, model="acme-7b").choices
    assert fake.requests[-1].headers["Authorization"] == "Bearer sk-stored-secret-999"
    assert act("set_price", model="acme-7b", input="lots", output="1").status_code == 400
    assert act("set_price", model="acme-7b", input="inf", output="1").status_code == 400

    limited = act("create_limit", scope="user", target="dana", metric="requests",
                  window="minute", amount="1", limit_action="block", alert_at="50, 90")
    assert "Limit added." in limited.text
    limit, = [limit for limit in gateway.admin.get(gateway.url + "/admin/limits").json()["data"]
              if limit["scope"] == "user"]
    assert (limit["scope"], limit["target"], limit["amount"], limit["alert_at"]) == \
        ("user", "dana", 1.0, [50, 90])
    with pytest.raises(openai.RateLimitError):
        call(gateway, raw_key, model="acme-7b")
    assert act("create_limit", scope="user", metric="usd", window="day",
               amount="1").status_code == 400  # no target
    assert "Limit deleted." in act("delete_limit", limit_id=limit["id"]).text

    key_id = gateway.db().execute("select id from api_keys where user_name = 'dana'"
                                  ).fetchone()[0]
    assert "Revoke the key" in act("revoke_key", key_id=key_id).text  # asks first
    assert call(gateway, raw_key, model="acme-7b").choices
    assert "Key revoked." in act("revoke_key", key_id=key_id, confirm="1").text
    with pytest.raises(openai.PermissionDeniedError):
        call(gateway, raw_key, model="acme-7b")
    users = admin.get(gateway.url + "/admin").text
    assert re.search(r'<td data-label="User">dana</td><td data-label="Active keys" class="n">0</td>',
                     users)
    assert act("no_such_action").status_code == 400


def test_reports_data_feed_and_csv(make_llimit, clock):
    server = priced(make_llimit())
    alice_key, _ = server.create_key(user="alice")
    bob_key, _ = server.create_key(user="=bob")
    call(server, alice_key)
    clock.advance(-86400)
    call(server, alice_key)
    call(server, bob_key)
    clock.advance(86400)
    admin = http_sign_in(server.url, admin_token=ADMIN_TOKEN)
    data = admin.get(server.url + "/reports/data").json()
    assert data["totals"]["requests"] == 3
    assert data["totals"]["cost_usd"] == pytest.approx(3 * CALL_USD)
    assert [row["user"] for row in data["by_user"]] == ["alice", "=bob"]
    assert [day["cost_usd"] for day in data["daily"][-2:]] == [2 * CALL_USD, CALL_USD]
    assert data["daily"][-1]["cumulative_usd"] == pytest.approx(3 * CALL_USD)
    assert len(data["daily"]) == 30
    series = {item["user"]: item["cost_usd"][-2:] for item in data["daily_by_user"]["series"]}
    assert series == {"alice": [CALL_USD, CALL_USD], "=bob": [CALL_USD, 0]}
    today = data["end"]
    only_today = admin.get(f"{server.url}/reports/data?start={today}&end={today}").json()
    assert only_today["totals"]["requests"] == 1 and len(only_today["daily"]) == 1
    bad = admin.get(server.url + "/reports/data?start=2026-13-01")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_date"
    too_long = admin.get(server.url + "/reports/data?start=1900-01-01&end=2026-01-01")
    assert too_long.status_code == 400

    csv_text = admin.get(server.url + "/reports/data.csv").text
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("day,user,project,model,requests")
    assert len(lines) == 4 and "'=bob" in csv_text  # no formula for a spreadsheet
    page = admin.get(server.url + "/reports").text
    assert 'data-series="{&quot;type&quot;' in page  # chart data only as an attribute
    assert "<td>alice</td>" in page  # the same numbers as tables, for no-script readers


def test_chartjs_comes_from_llimit_when_configured_else_a_pinned_cdn(make_llimit, monkeypatch):
    local = make_llimit(chartjs=VENDOR_CHARTJS)
    admin = http_sign_in(local.url, admin_token=ADMIN_TOKEN)
    page = admin.get(local.url + "/reports")
    assert '<script src="/static/chart.umd.js" defer>' in page.text
    assert "script-src 'self';" in page.headers["Content-Security-Policy"]
    script = requests.get(local.url + "/static/chart.umd.js")
    assert script.status_code == 200 and script.content == open(VENDOR_CHARTJS, "rb").read()
    assert script.headers["Content-Type"].startswith("text/javascript")

    # No LLIMIT_CHARTJS: vendor/chart.umd.js beside llimit.py when there is one ...
    vendored = make_llimit()
    page = http_sign_in(vendored.url, admin_token=ADMIN_TOKEN).get(vendored.url + "/reports")
    assert '<script src="/static/chart.umd.js" defer>' in page.text
    assert requests.get(vendored.url + "/static/chart.umd.js").content == \
        open(llimit.VENDORED_CHARTJS, "rb").read()

    # ... and the pinned CDN copy only when there is none.
    monkeypatch.setattr(llimit, "VENDORED_CHARTJS", "/nonexistent/vendor/chart.umd.js")
    cdn = make_llimit()
    admin = http_sign_in(cdn.url, admin_token=ADMIN_TOKEN)
    page = admin.get(cdn.url + "/reports")
    assert f'src="{llimit.CHARTJS_CDN_URL}" integrity="sha384-' in page.text
    assert llimit.CHARTJS_CDN_URL in page.headers["Content-Security-Policy"]
    assert requests.get(cdn.url + "/static/chart.umd.js").status_code == 404
    assert "Chart" in requests.get(cdn.url + "/static/llimit.js").text

    with pytest.raises(ValueError):
        make_llimit(chartjs="/nonexistent/chart.umd.js")


def test_home_page_says_what_llimit_is_and_who_is_signed_in(gateway):
    home = requests.get(gateway.url + "/")
    assert home.status_code == 200 and f"{gateway.url}/v1" in home.text
    assert 'href="/login"' in home.text and "Sign out" not in home.text
    signed_in = http_sign_in(gateway.url, "alice").get(gateway.url + "/").text
    assert "Signed in as <b>alice</b>" in signed_in and "Sign out" in signed_in


# --- issue 16: a newcomer's first hour and an employee's first key ----------------

PHONE = (390, 844)
DESKTOP = (1280, 900)


def at_width(driver, size):
    driver.set_window_size(*size)
    WebDriverWait(driver, 5).until(
        lambda d: d.execute_script("return window.innerWidth") <= size[0])


def no_sideways_scroll(driver):
    return driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth;")


def in_view_horizontally(driver, element):
    return driver.execute_script(
        "var r = arguments[0].getBoundingClientRect();"
        " return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth;", element)


@sqlite_only  # what a page shows when Chart.js fails; the numbers' storage is tested apart
def test_offline_reports_say_charts_did_not_load_and_keep_every_number(
        make_llimit, browser, tmp_path, processes):
    broken = tmp_path / "chart.umd.js"
    broken.write_text("throw new Error('not Chart.js');\n")  # as good as a failed download
    server = priced(make_llimit(chartjs=str(broken)))
    call(server, server.create_key(user="alice")[0])
    fresh(browser, server.url, "/")
    sign_in_admin(browser, server.url, ADMIN_TOKEN, next_path="/reports")
    notes = browser.find_elements(By.CSS_SELECTOR, ".chart-note")
    assert len(notes) == 5 and all(note.is_displayed() for note in notes)
    assert "Chart.js did not load" in notes[0].text
    assert not any(box.is_displayed() for box in browser.find_elements(By.CSS_SELECTOR, ".chart"))
    assert "$0.0250" in browser.find_element(By.TAG_NAME, "main").text  # the tables stay

    # Where Chart.js comes from is said at start: the local copy beside llimit.py here.
    assert os.path.exists(llimit.VENDORED_CHARTJS)
    proc = processes()
    assert f"Chart.js for /reports: served by llimit from {llimit.VENDORED_CHARTJS}" in proc.log()
    proc = processes(LLIMIT_CHARTJS=str(broken))
    assert f"Chart.js for /reports: served by llimit from {broken}" in proc.log()


@sqlite_only  # how the charts label their axes
def test_chart_axis_ticks_never_read_alike(make_llimit, browser, clock):
    server = make_llimit(chartjs=VENDOR_CHARTJS)
    priced(server)
    raw_key, _ = server.create_key(user="alice")
    call(server, raw_key)  # $0.025 today: an axis stepping by $0.005
    fresh(browser, server.url, "/")
    sign_in_admin(browser, server.url, ADMIN_TOKEN, next_path="/reports")
    axes = browser.execute_script("""
        var out = [];
        document.querySelectorAll("canvas[data-series]").forEach(function (c) {
            var chart = Chart.getChart(c);
            Object.keys(chart.scales).forEach(function (id) {
                var scale = chart.scales[id];
                if (scale.type === "linear") {
                    out.push([c.id + ":" + id, scale.ticks.map(function (t) { return t.label; })]);
                }
            });
        });
        return out;""")
    assert axes
    for name, labels in axes:
        assert len(labels) == len(set(labels)), (name, labels)
        assert all(label.startswith("$") for label in labels), (name, labels)


def test_new_key_is_made_once_and_revoking_asks_first_in_the_browser(make_llimit, browser):
    server = make_llimit()
    at_width(browser, DESKTOP)
    sign_in_open(browser, server.url, "carol", next_path="/keys")
    click_and_wait(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/keys'] button"))
    raw_key = browser.find_element(By.ID, "new-key").text
    assert raw_key.startswith("llimit-")
    browser.refresh()  # a reload after creating: no second key, no secret again
    assert not browser.find_elements(By.ID, "new-key") and raw_key not in browser.page_source
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.keys tr")) == 2  # heading + 1 key

    revoke = browser.find_element(By.CSS_SELECTOR, "table.keys button.danger")
    revoke.click()
    alert = browser.switch_to.alert
    assert "Revoke the key" in alert.text
    alert.dismiss()  # changed one's mind: nothing happens
    assert requests.post(server.url + "/v1/chat/completions", json={"model": "gpt-4o-mini"},
                         headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200
    revoke.click()
    browser.switch_to.alert.accept()
    WebDriverWait(browser, 10).until(lambda d: "revoked" in d.find_element(
        By.CSS_SELECTOR, "table.keys").text)
    assert requests.post(server.url + "/v1/chat/completions", json={"model": "gpt-4o-mini"},
                         headers={"Authorization": f"Bearer {raw_key}"}).status_code == 403


def run_snippet(command, cwd):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


@sqlite_only  # the snippets' text and what they send; the SDKs cost 7 s of CPU a run
def test_new_key_snippets_speak_the_projects_dialect_and_run(gateway, fake, tmp_path):
    for project, kind, url in (("claude-team", "anthropic", fake.url + "/v1"),
                               ("azure-team", "azure", fake.url),
                               ("gemini-team", "gemini", fake.url)):
        resp = gateway.admin.post(gateway.url + "/admin/projects", json={
            "id": project, "upstream_kind": kind, "upstream_url": url,
            "upstream_key": "sk-upstream", "api_version": "2024-10-21"})
        assert resp.status_code == 201, resp.text
    alice = http_sign_in(gateway.url, "alice")
    token = csrf_token(alice.get(gateway.url + "/keys").text)
    prices = llimit.load_price_file(gateway.config.pricing_path)
    for project, model_prefix, markers in (
            ("default", "gpt-", ("/v1/chat/completions", "Authorization: Bearer",
                                 "from openai import OpenAI")),
            ("claude-team", "claude-", ("/v1/messages", "x-api-key:", "anthropic-version:",
                                        "from anthropic import Anthropic",
                                        f'Anthropic(base_url="{gateway.url}"')),
            ("azure-team", "gpt-", ("/openai/deployments/", "api-key:",
                                    "api-version=2024-10-21", "AzureOpenAI(azure_endpoint=",
                                    'api_version="2024-10-21"')),
            ("gemini-team", "gemini-", (":generateContent", "x-goog-api-key:",
                                        "from google import genai",
                                        f'base_url="{gateway.url}"'))):
        page = alice.post(gateway.url + "/keys", data={"csrf_token": token,
                                                       "project": project}).text
        curl = html.unescape(re.search(r'<pre id="snippet-curl">(.*?)</pre>', page, re.S)[1])
        python = html.unescape(re.search(r'<pre id="snippet-python">(.*?)</pre>', page,
                                         re.S)[1])
        model = re.search(r'model="([^"]+)"', python)[1]
        assert model.startswith(model_prefix) and model in prices, (project, model)
        for marker in markers:
            assert marker in curl + python, (project, marker)
        # Pasted as shown, both work against llimit.
        fake.reset()
        answer = run_snippet(["bash", "-c", curl], tmp_path)
        assert "Hello world!" in answer or "Hello" in answer, answer
        assert run_snippet([sys.executable, "-c", python], tmp_path).strip() == "Hello world!"
        assert len(fake.requests) == 2


def test_employee_text_names_no_internals_and_token_admin_sees_no_dead_links(gateway):
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    home = admin.get(gateway.url + "/").text
    nav = re.search(r"<nav>(.*?)</nav>", home, re.S)[1]
    assert 'href="/keys"' not in nav and 'href="/usage"' not in nav
    assert 'href="/admin"' in nav and 'href="/reports"' in nav
    assert 'href="/keys"' not in home  # nor a card that leads to a 403
    user_nav = re.search(r"<nav>(.*?)</nav>", http_sign_in(gateway.url, "alice").get(
        gateway.url + "/").text, re.S)[1]
    assert 'href="/keys"' in user_nav and 'href="/usage"' in user_nav
    for path in ("/reports", "/admin"):
        page = http_sign_in(gateway.url, "alice").get(gateway.url + path)
        assert page.status_code == 403
        main = re.search(r"<main>(.*?)</main>", page.text, re.S)[1]
        assert "LLIMIT_" not in main and "ask your llimit admin" in main


def test_money_reads_alike_and_json_costs_are_plain_decimals(gateway, fake, clock):
    clock.now = 1_795_000_000.0
    gateway.admin.put(gateway.url + "/admin/pricing/gpt-4o-mini",
                      json={"input": 0.15, "output": 0.6})  # 11 in + 7 out: $0.00000585
    raw_key, _ = gateway.create_key(user="alice")
    call(gateway, raw_key)
    resp = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "project", "target": "default", "metric": "usd", "window": "month",
        "amount": 2.5})
    assert resp.status_code == 201
    usage = gateway.admin.get(gateway.url + "/admin/usage?group_by=user")
    assert "e-" not in usage.text and '"cost_usd": 0.00000585' in usage.text
    assert usage.json()["rows"][0]["cost_usd"] == pytest.approx(0.00000585)
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    assert "e-0" not in admin.get(gateway.url + "/reports/data").text
    page = admin.get(gateway.url + "/admin").text
    assert "$2.50/month" in page and "$2.5/" not in page
    assert ">1 request<" in page and "1 requests" not in page
    # One column, one number of decimals: $0.000006 beside $0.000000, not $0.00.
    spend = re.findall(r'data-label="Spend" class="n">([^<]+)<', page)
    assert spend and len({len(value.split(".")[1]) for value in spend}) == 1, spend


def test_a_bad_admin_form_value_keeps_the_form_and_says_why(gateway, browser):
    fresh(browser, gateway.url, "/")
    sign_in_admin(browser, gateway.url, ADMIN_TOKEN)
    browser.find_element(By.XPATH, "//section[@id='limits']//summary").click()
    browser.find_element(By.ID, "l-target").send_keys("alice")
    browser.find_element(By.ID, "l-amount").send_keys("five")
    Select(browser.find_element(By.ID, "l-window")).select_by_visible_text("day")
    click_and_wait(browser, browser.find_element(
        By.XPATH, "//section[@id='limits']//button[text()='Add limit']"))
    error = browser.find_element(By.CSS_SELECTOR, "#limits .error")
    assert error.is_displayed() and "amount" in error.text and "number" in error.text
    assert browser.find_element(By.ID, "l-amount").get_attribute("value") == "five"
    assert browser.find_element(By.ID, "l-target").get_attribute("value") == "alice"
    assert Select(browser.find_element(By.ID, "l-window")).first_selected_option.text == "day"
    # Fixed and sent again from the same form: saved.
    amount = browser.find_element(By.ID, "l-amount")
    amount.clear()
    amount.send_keys("5")
    click_and_wait(browser, browser.find_element(
        By.XPATH, "//section[@id='limits']//button[text()='Add limit']"))
    assert "Limit added." in browser.page_source
    assert gateway.admin.get(gateway.url + "/admin/limits").json()["data"][0]["amount"] == 5


def test_the_default_project_shows_the_upstream_in_force(gateway):
    project = gateway.admin.get(gateway.url + "/admin/projects/default").json()
    assert project["upstream_url"] is None
    assert project["upstream_url_in_force"] == gateway.config.upstream_url
    assert project["upstream_key_set"] is True
    assert project["upstream_key_source"] == "LLIMIT_UPSTREAM_KEY"
    page = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN).get(gateway.url + "/admin").text
    row = re.search(r"<b>default</b>(.*?)</tr>", page, re.S)[1]
    assert gateway.config.upstream_url in row and "LLIMIT_UPSTREAM_KEY" in row


@sqlite_only  # layout
@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_keys_and_usage_fit_the_screen(make_llimit, browser, size):
    server = priced(make_llimit())
    at_width(browser, size)
    try:
        sign_in_open(browser, server.url, "dora-with-a-rather-long-name", next_path="/keys")
        browser.find_element(By.ID, "note").send_keys("a note that is fairly long, too")
        click_and_wait(browser, browser.find_element(By.CSS_SELECTOR,
                                                     "form[action='/keys'] button"))
        raw_key = browser.find_element(By.ID, "new-key").text
        call(server, raw_key)
        server.admin.post(server.url + "/admin/limits", json={
            "scope": "user", "target": "dora-with-a-rather-long-name", "metric": "usd",
            "window": "day", "amount": 0.1})
        browser.get(server.url + "/keys")
        assert no_sideways_scroll(browser)
        assert in_view_horizontally(browser, browser.find_element(
            By.CSS_SELECTOR, "table.keys button.danger"))
        spend = browser.find_element(By.CSS_SELECTOR, "table.keys td[data-label=Spend]")
        assert in_view_horizontally(browser, spend) and spend.text.endswith("$0.0250")
        browser.get(server.url + "/usage")
        assert no_sideways_scroll(browser)
        amount = browser.find_element(By.CSS_SELECTOR, "td[data-label=Amount]")
        assert in_view_horizontally(browser, amount) and "$0.0250 of $0.10" in amount.text
        cost = browser.find_element(By.CSS_SELECTOR, "td[data-label=Cost]")
        assert in_view_horizontally(browser, cost)
    finally:
        at_width(browser, DESKTOP)


def test_page_css_is_a_cached_static_file_with_a_versioned_url(gateway):
    page = requests.get(gateway.url + "/")
    href = re.search(r'<link rel="stylesheet" href="([^"]+)">', page.text)[1]
    assert re.fullmatch(r"/static/llimit\.css\?v=[0-9a-f]{12}", href)
    assert "<style>" not in page.text
    assert "style-src 'self'" in page.headers["Content-Security-Policy"]
    css = requests.get(gateway.url + href)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert "max-age=31536000" in css.headers["Cache-Control"]
    assert "table.stack" in css.text
    script = re.search(r'<script src="(/static/llimit\.js\?v=[0-9a-f]{12})"',
                       http_sign_in(gateway.url, "alice").get(gateway.url + "/keys").text)[1]
    assert "max-age=31536000" in requests.get(gateway.url + script).headers["Cache-Control"]
    # One CSRF field helper and one key table for /keys and /admin.
    assert llimit.ADMIN_PAGE.count("{{!csrf_field}}") == llimit.ADMIN_PAGE.count("<form")
    assert "csrf_token" not in llimit.ADMIN_PAGE + llimit.KEYS_PAGE + llimit.LAYOUT
    assert "{{!key_table}}" in llimit.KEYS_PAGE and "{{!key_table}}" in llimit.ADMIN_PAGE


def test_a_bad_project_edit_reopens_that_projects_form_with_what_was_typed(gateway):
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    token = csrf_token(admin.get(gateway.url + "/admin").text)
    page = admin.post(gateway.url + "/admin", data={
        "csrf_token": token, "action": "update_project", "id": "default", "name": "Main <1>",
        "upstream_kind": "openai", "limit_message": "Ask #help", "budget_usd": "five"})
    assert page.status_code == 400 and "Not saved:" in page.text
    form = re.search(r'<details open><summary>Edit</summary>(.*?)</form>', page.text, re.S)[1]
    assert 'class="error"' in form and "budget_usd" in form
    assert 'value="Main &lt;1&gt;"' in form and 'value="five"' in form
    assert 'value="Ask #help"' in form
    assert gateway.admin.get(gateway.url + "/admin/projects/default").json()["name"] != "Main <1>"


def test_plans_on_the_admin_page_and_the_members_usage(gateway, fake, browser):
    gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "kim", "metric": "requests", "window": "day", "amount": 1})
    fresh(browser, gateway.url, "/")
    sign_in_admin(browser, gateway.url, ADMIN_TOKEN)
    browser.find_element(By.XPATH, "//section[@id='plans']//summary").click()
    browser.find_element(By.ID, "pl-id").send_keys("interns")
    browser.find_element(By.ID, "pl-name").send_keys("Interns")
    browser.find_element(By.ID, "pl-limits").send_keys("tokens:20000/day\nrequests:2/24h")
    click_and_wait(browser, browser.find_element(
        By.XPATH, "//section[@id='plans']//button[text()='Create plan']"))
    assert "Plan created." in browser.page_source
    plans = browser.find_element(By.ID, "plans").text
    assert "Interns" in plans and "20,000 tokens a day" in plans
    assert "2 requests per 24 hours" in plans
    browser.find_element(By.ID, "pl-user").send_keys("Kim")
    Select(browser.find_element(By.ID, "pl-plan")).select_by_visible_text("interns")
    click_and_wait(browser, browser.find_element(
        By.XPATH, "//section[@id='plans']//button[text()='Put on plan']"))
    assert gateway.admin.get(gateway.url + "/admin/users/kim").json()["plan"] == "interns"

    # The member sees the plan's limits on /usage, in words, like any other.
    raw_key, _ = gateway.create_key(user="kim")
    assert call(gateway, raw_key, model="gpt-4o").choices
    sign_in_open(browser, gateway.url, "kim", next_path="/usage")
    limits = browser.find_element(By.CSS_SELECTOR, "section table").text
    assert "2 requests per 24 hours" in limits and "1 request of 2 requests" in limits
    assert "20,000 tokens a day" in limits and "lim_" not in limits

    # Reset on /admin: the user's daily limit starts again now.
    with pytest.raises(openai.RateLimitError):
        call(gateway, raw_key, model="gpt-4o")
    gateway.config.clock.advance(1)  # calls in the second of a reset count after it
    fresh(browser, gateway.url, "/")
    sign_in_admin(browser, gateway.url, ADMIN_TOKEN)
    assert "interns" not in browser.find_element(By.ID, "limits").text  # listed with the plan
    click_and_wait(browser, browser.find_element(
        By.XPATH, "//section[@id='limits']//button[text()='Reset']"))
    assert "Limit reset" in browser.page_source
    assert call(gateway, raw_key, model="gpt-4o").choices
    click_and_wait(browser, browser.find_element(
        By.XPATH, "//section[@id='plans']//button[text()='Delete']"))
    assert "Plan deleted." in browser.page_source
    assert gateway.admin.get(gateway.url + "/admin/plans").json()["data"] == []
