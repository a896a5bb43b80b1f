"""Who hits their limits: calls llimit refuses for a known key (limits, routes,
models, revoked keys) are counted per user, project and reason, with no request
content, and shown on /reports (and its JSON feed) and /admin."""

import requests
from selenium.webdriver.common.by import By

import llimit
from tests.browser import http_sign_in, sign_in_admin
from tests.conftest import ADMIN_TOKEN

ENGINES = ("sqlite", "postgres")

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "secret prompt"}]}


def post(gateway, raw_key, body=CHAT, path="/v1/chat/completions", **headers):
    return requests.post(gateway.url + path, json=body,
                         headers={"Authorization": f"Bearer {raw_key}", **headers})


def refused_calls(gateway):
    gateway.wait_idle()
    admin = http_sign_in(gateway.url, admin_token=ADMIN_TOKEN)
    resp = admin.get(gateway.url + "/reports/data")
    assert resp.status_code == 200, resp.text
    return {(row["user"], row["project"], row["reason"]): row["refused"]
            for row in resp.json()["refused"]}


def refuse_some_calls(gateway):
    alice, _ = gateway.create_key(user="alice")
    resp = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "alice", "metric": "requests", "window": "day",
        "amount": 1, "action": "block"})
    assert resp.status_code == 201, resp.text
    assert post(gateway, alice).status_code == 200
    for _ in range(3):
        assert post(gateway, alice).status_code == 429
    bob, bob_id = gateway.create_key(user="bob", models=["gpt-4o"])
    assert post(gateway, bob).status_code == 403  # gpt-4o-mini is not his
    assert post(gateway, bob, {}, "/v1/realtime/sessions").status_code == 403
    gateway.admin.post(f"{gateway.url}/admin/keys/{bob_id}/revoke")
    assert post(gateway, bob).status_code == 403
    # A project key's end user is the one counted.
    app, _ = gateway.create_key(user=None)
    gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "carol", "metric": "requests", "window": "day",
        "amount": 0, "action": "block"})
    assert post(gateway, app, **{"X-LLimit-User": "carol"}).status_code == 429
    # Not counted: an unknown key (no user to count), a malformed body (the client's bug).
    assert post(gateway, "llimit-" + "z" * 40).status_code == 401
    assert requests.post(gateway.url + "/v1/chat/completions", data=b"{broken",
                         headers={"Authorization": f"Bearer {alice}",
                                  "Content-Type": "application/json"}).status_code == 400


def test_refused_calls_are_counted_per_user_project_and_reason(gateway, fake):
    refuse_some_calls(gateway)
    assert refused_calls(gateway) == {
        ("alice", "default", "budget_exceeded"): 3,
        ("bob", "default", "model_not_allowed"): 1,
        ("bob", "default", "route_not_allowed"): 1,
        ("bob", "default", "key_revoked"): 1,
        ("carol", "default", "budget_exceeded"): 1,
    }
    # No request content is kept: the table holds counts, and nothing else.
    db = gateway.db()
    columns = db.execute("select * from refusals_daily").fetchone().keys()
    assert list(columns) == ["day", "project_id", "user_name", "reason", "refused"]
    dump = "\n".join(repr(tuple(row)) for table in llimit.list_tables(db)
                     for row in db.execute(f"select * from {table}"))
    assert "alice" in dump and "secret prompt" not in dump


def test_reports_and_admin_show_who_hits_their_limits(gateway, fake, browser):
    refuse_some_calls(gateway)
    gateway.wait_idle()
    sign_in_admin(browser, gateway.url, ADMIN_TOKEN, next_path="/admin")
    rows = [row.text for row in browser.find_elements(
        By.XPATH, "//h3[@id='refused']/following-sibling::div[1]//tr")]
    assert rows[0].split() == ["User", "Project", "Reason", "Refused"]
    assert rows[1] == "alice default limit reached 3", rows
    assert "bob default revoked key 1" in rows and "carol default limit reached 1" in rows
    browser.get(gateway.url + "/reports")
    section = browser.find_element(By.ID, "refused")
    assert "Refused calls (who hits their limits)" in section.text
    assert "alice default limit reached 3" in section.text
    assert "bob default model not allowed 1" in section.text
