"""Plans (named sets of limits for each member), rolling windows counted from
starts_at, limit resets, and the X-LLimit-Warning sentence, against a real
llimit with real clients. The fake upstream's chat answer is 11 + 7 tokens."""

import pytest
import requests

from tests.conftest import LazyModule
from tests.test_limits import CALL_NUSD, add_limit, call

openai = LazyModule("openai")

ENGINES = ("sqlite", "postgres")

DAY = 86400
MIDNIGHT = 1_795_046_400.0  # 2026-11-19T00:00:00Z


def admin(server, method, path, **kwargs):
    return server.admin.request(method, server.url + path, **kwargs)


def used(server, limit_id):
    server.wait_idle()
    return admin(server, "GET", f"/admin/limits/{limit_id}").json()["used"]


# --- rolling windows ---------------------------------------------------------------

def test_a_rolling_window_counts_exactly_its_period_across_midnight(make_llimit, fake, clock, engine):
    clock.now = MIDNIGHT + 6 * 3600  # 06:00: two calls before the limit exists
    server = make_llimit()
    raw_key, key_id = server.create_key()
    assert call(server, raw_key).status_code == 200
    assert call(server, raw_key).status_code == 200
    clock.now = MIDNIGHT + 12 * 3600  # 12:00: a 24h window from now, 3 requests
    limit = add_limit(server, scope="key", target=key_id, metric="requests", window="24h",
                      amount=3)
    assert limit["starts_at"] == "2026-11-19T12:00:00Z"
    assert limit["resets_at"] == "2026-11-20T12:00:00Z" and limit["used"] == 0
    clock.now = MIDNIGHT + 13 * 3600
    assert call(server, raw_key).status_code == 200
    clock.now = MIDNIGHT + DAY + 3 * 3600  # the next day, 03:00, same period
    assert call(server, raw_key).status_code == 200
    assert used(server, limit["id"]) == 2

    # A second llimit on the same database reads the period afresh: the partial
    # first day from the events (not the 06:00 calls), the rest from the totals.
    other = make_llimit(db_path=server.config.db_path)
    assert used(other, limit["id"]) == 2
    assert call(other, raw_key).status_code == 200
    refused = call(other, raw_key)
    assert refused.status_code == 429
    assert "allowance per 24 hours of 3 requests is used up" in refused.json()["error"]["message"]
    assert "It resets at 2026-11-20 12:00 UTC." in refused.json()["error"]["message"]

    clock.now = MIDNIGHT + DAY + 12 * 3600  # 12:00 the next day: a new period
    assert call(server, raw_key).status_code == 200
    assert used(server, limit["id"]) == 1


def test_a_rolling_window_from_a_given_start_and_its_usd_budget(gateway, fake, clock, engine):
    clock.now = MIDNIGHT + 10 * DAY + 5 * 3600
    raw_key, key_id = gateway.create_key()
    limit = add_limit(gateway, scope="user", target="alice", metric="usd", window="7d",
                      amount=2.5 * CALL_NUSD / 1e9, starts_at="2026-11-19T05:00:00+00:00")
    # 10 days after the start: the second 7-day period began on day 7 at 05:00.
    assert limit["starts_at"] == "2026-11-19T05:00:00Z"
    assert limit["resets_at"] == "2026-12-03T05:00:00Z"
    for _ in range(3):
        assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 429
    assert used(gateway, limit["id"]) == pytest.approx(3 * CALL_NUSD / 1e9)


@pytest.mark.parametrize("window", ["0d", "7w", "24", "h", "10000d", "1.5h"])
def test_a_bad_rolling_window_is_a_clear_400(gateway, window):
    resp = admin(gateway, "POST", "/admin/limits", json={
        "scope": "global", "metric": "requests", "window": window, "amount": 1})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_window"


# --- resets ------------------------------------------------------------------------

def test_reset_starts_the_current_period_now_and_keeps_history(gateway, fake, clock, engine):
    clock.now = MIDNIGHT + 8 * 3600
    raw_key, key_id = gateway.create_key()
    daily = add_limit(gateway, scope="key", target=key_id, metric="requests", window="day",
                      amount=2)
    rolling = add_limit(gateway, scope="user", target="alice", metric="tokens", window="30d",
                        amount=1000)
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 429
    clock.now += 60
    reset = admin(gateway, "POST", f"/admin/limits/{daily['id']}/reset")
    assert reset.status_code == 200
    assert reset.json()["used"] == 0 and reset.json()["reset_at"] == "2026-11-19T08:01:00Z"
    assert reset.json()["resets_at"] == "2026-11-20T00:00:00Z"  # the next day as usual
    assert used(gateway, rolling["id"]) == 36
    again = admin(gateway, "POST", f"/admin/limits/{rolling['id']}/reset").json()
    assert again["used"] == 0 and again["starts_at"] == "2026-11-19T08:01:00Z"
    assert again["resets_at"] == "2026-12-19T08:01:00Z"
    assert call(gateway, raw_key).status_code == 200
    assert used(gateway, daily["id"]) == 1 and used(gateway, rolling["id"]) == 18
    assert len(gateway.events()) == 3  # history stays
    assert admin(gateway, "POST", "/admin/limits/lim_nope/reset").status_code == 404


def test_reset_of_a_minute_and_a_total_window_counts_from_the_reset(gateway, fake, clock):
    clock.now = MIDNIGHT + 10 * 3600 + 30  # 10:00:30
    raw_key, key_id = gateway.create_key()
    total = add_limit(gateway, scope="key", target=key_id, metric="requests", window="total",
                      amount=3)
    minute = add_limit(gateway, scope="key", target=key_id, metric="requests",
                       window="minute", amount=2)
    assert [call(gateway, raw_key).status_code for _ in range(3)] == [200, 200, 429]
    clock.now += 10  # 10:00:40: the minute starts again, the 2 calls stay in the total
    assert admin(gateway, "POST", f"/admin/limits/{minute['id']}/reset").json()["used"] == 0
    assert call(gateway, raw_key).status_code == 200       # minute 1 of 2, total 3 of 3
    refused = call(gateway, raw_key)
    assert refused.status_code == 429 and refused.headers["X-LLimit-Limit-Id"] == total["id"]
    clock.now += 10  # 10:00:50: the total starts again; the minute holds 1 call
    assert admin(gateway, "POST", f"/admin/limits/{total['id']}/reset").json()["used"] == 0
    assert [call(gateway, raw_key).status_code for _ in range(2)] == [200, 429]  # minute: 2
    assert used(gateway, minute["id"]) == 2 and used(gateway, total["id"]) == 1
    clock.now = MIDNIGHT + DAY + 3 * 3600  # the next day: 1 call on the reset day, then 2
    assert [call(gateway, raw_key).status_code for _ in range(3)] == [200, 200, 429]
    assert used(gateway, total["id"]) == 3 and used(gateway, minute["id"]) == 2
    assert len(gateway.events()) == 6


# --- the warning the key holder reads ------------------------------------------------

def test_warning_at_alert_thresholds_reads_for_the_key_holder(gateway, fake, clock):
    clock.now = MIDNIGHT + 3600
    admin(gateway, "PATCH", "/admin/projects/default",
          json={"limit_message": "More: https://wiki.example/ai-budget"})
    raw_key, _ = gateway.create_key(user="dana")
    limit = add_limit(gateway, scope="user", target="dana", metric="usd", window="month",
                      amount=0.0004, alert_at=[50, 90])
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)

    def warning():
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[])
        return raw.headers.get("X-LLimit-Warning")

    assert warning() is None       # $0 used
    assert warning() is None       # $0.0000975: 24%
    assert warning() is None       # $0.000195: 48%
    # $0.0002925 of $0.0004: 73.125%, past 50%
    text = warning()
    assert text == ("You have used 73% of your monthly budget of $0.0004; it resets on"
                    " 2026-12-01. More: https://wiki.example/ai-budget")
    assert limit["id"] not in text and "lim_" not in text
    assert warning().startswith("You have used 97% of your monthly budget")  # past 90%


def test_warn_limit_reached_is_said_on_every_answer_and_streams(gateway, fake, clock, engine):
    clock.now = MIDNIGHT + 3600
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="tokens", window="24h", amount=18,
              action="warn")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[])
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=[], stream=True) as stream:
        assert stream.headers["X-LLimit-Warning"] == (
            "You have used 100% of your allowance per 24 hours of 18 tokens; it resets at"
            " 2026-11-20 01:00 UTC.")
        list(stream.iter_lines())


# --- plans ---------------------------------------------------------------------------

def make_plan(server, plan_id, *limits, name=None):
    resp = admin(server, "POST", "/admin/plans",
                 json={"id": plan_id, "name": name or plan_id, "limits": list(limits)})
    assert resp.status_code == 201, resp.text
    return resp.json()


def put_user(server, user, plan):
    resp = admin(server, "PUT", f"/admin/users/{user}", json={"plan": plan})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_plan_limits_each_member_separately(make_llimit, fake, clock):
    clock.now = MIDNIGHT + 3600
    server = make_llimit(user_domains=("corp.example",))
    plan = make_plan(server, "interns", {"metric": "requests", "window": "day", "amount": 2},
                     name="Interns")
    assert plan["name"] == "Interns" and plan["limits"][0]["scope"] == "plan"
    assert "used" not in plan["limits"][0]
    shown = put_user(server, "Alice@Corp.example", "interns")  # the Identity rule
    assert shown["user"] == "alice" and shown["plan"] == "interns"
    assert shown["plan_source"] == "admin"
    put_user(server, "carol", "interns")
    alice, _ = server.create_key(user="alice")
    carol, _ = server.create_key(user="carol")
    bob, _ = server.create_key(user="bob")
    for _ in range(2):
        assert call(server, alice).status_code == 200
    refused = call(server, alice)
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith(
        "Your daily allowance of 2 requests is used up")
    assert call(server, carol).status_code == 200  # her own allowance
    for _ in range(4):
        assert call(server, bob).status_code == 200  # on no plan

    me = requests.get(server.url + "/llimit/me",
                      headers={"Authorization": f"Bearer {alice}"}).json()
    assert me["plan"] == "interns"
    mine, = [lim for lim in me["limits"] if lim["scope"] == "plan"]
    assert mine["used"] == 2 and mine["remaining"] == 0
    user = admin(server, "GET", "/admin/users/ALICE").json()
    assert user["limits"][0]["used"] == 2

    # A plan's limits change with PATCH, kept by id; the next call sees it.
    limit_id = plan["limits"][0]["id"]
    patched = admin(server, "PATCH", "/admin/plans/interns", json={"limits": [
        {"id": limit_id, "amount": 3}, {"metric": "usd", "window": "month", "amount": 5}]})
    assert patched.status_code == 200
    assert sorted(lim["amount"] for lim in patched.json()["limits"]) == [3, 5]
    assert call(server, alice).status_code == 200
    assert call(server, alice).status_code == 429
    # Plan limits are edited with the plan, not as loose limits.
    assert admin(server, "PATCH", f"/admin/limits/{limit_id}",
                 json={"amount": 100}).json()["error"]["code"] == "limit_in_plan"
    assert limit_id not in str(admin(server, "GET", "/admin/limits").json())

    assert admin(server, "DELETE", "/admin/plans/interns").json()["deleted"] is True
    assert call(server, alice).status_code == 200  # on no plan any more
    assert admin(server, "GET", "/admin/users/alice").json()["plan"] is None
    assert admin(server, "PUT", "/admin/users/alice",
                 json={"plan": "nope"}).status_code == 404


def test_the_default_plan_and_a_change_from_another_process(make_llimit, fake, clock):
    clock.now = MIDNIGHT + 3600
    server = make_llimit(default_plan="basic")
    make_plan(server, "basic", {"metric": "requests", "window": "day", "amount": 1})
    make_plan(server, "research", {"metric": "requests", "window": "day", "amount": 3})
    raw_key, _ = server.create_key(user="erin")
    assert call(server, raw_key).status_code == 200
    assert call(server, raw_key).status_code == 429  # basic: 1 a day
    assert admin(server, "GET", "/admin/users/erin").json()["plan_source"] == "default"

    # Another llimit on the same database moves erin to research: the first
    # one sees it on its next call (config_version, no query per call).
    other = make_llimit(db_path=server.config.db_path, default_plan="basic")
    put_user(other, "erin", "research")
    assert call(server, raw_key).status_code == 200
    assert call(server, raw_key).status_code == 200
    assert call(server, raw_key).status_code == 429  # research: 3 a day

    # A project key's calls that name no user are under no plan.
    app_key = admin(server, "POST", "/admin/keys", json={"project": "default"}).json()["key"]
    assert call(server, app_key).status_code == 200


def test_a_project_key_names_its_end_users_plan_only_from_plans_allowed(gateway, fake, clock):
    clock.now = MIDNIGHT + 3600
    make_plan(gateway, "free", {"metric": "requests", "window": "day", "amount": 1})
    make_plan(gateway, "pro", {"metric": "requests", "window": "day", "amount": 3})
    make_plan(gateway, "staff", {"metric": "requests", "window": "day", "amount": 100})
    project = admin(gateway, "POST", "/admin/projects",
                    json={"id": "app", "plans_allowed": ["free", "pro"]})
    assert project.status_code == 201 and project.json()["plans_allowed"] == ["free", "pro"]
    app_key = admin(gateway, "POST", "/admin/keys", json={"project": "app"}).json()["key"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=app_key, max_retries=0)

    def ask(user, plan):
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[],
            extra_headers={"X-LLimit-User": user, "X-LLimit-Plan": plan})

    ask("u1", "free")
    with pytest.raises(openai.RateLimitError):
        ask("u1", "free")
    ask("u2", "pro")
    ask("u2", "pro")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        ask("u3", "staff")  # exists, but not on the project's list
    assert refused.value.body["code"] == "plan_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        ask("u3", "gone")
    with pytest.raises(openai.BadRequestError) as nameless:
        client.chat.completions.create(model="gpt-4o", messages=[],
                                       extra_headers={"X-LLimit-Plan": "pro"})
    assert nameless.value.body["code"] == "user_required"
    assert all(r.headers.get("X-LLimit-Plan") is None for r in fake.requests)

    # A personal key cannot pick a larger plan: its header is ignored.
    put_user(gateway, "frank", "free")
    raw_key, _ = gateway.create_key(user="frank", project="app")
    assert call(gateway, raw_key, headers={"X-LLimit-Plan": "pro"}).status_code == 200
    assert call(gateway, raw_key, headers={"X-LLimit-Plan": "pro"}).status_code == 429


def test_plan_input_is_checked(gateway):
    assert admin(gateway, "POST", "/admin/plans", json={"name": "x"}).status_code == 400
    bad = admin(gateway, "POST", "/admin/plans", json={"id": "p", "limits": [
        {"scope": "global", "metric": "usd", "window": "day", "amount": 1}]})
    assert bad.status_code == 400 and "scope" in bad.json()["error"]["message"]
    make_plan(gateway, "p")
    assert admin(gateway, "POST", "/admin/plans", json={"id": "p"}).status_code == 409
    assert admin(gateway, "PATCH", "/admin/plans/p", json={"limits": [
        {"id": "lim_other", "amount": 1}]}).status_code == 400
    assert admin(gateway, "GET", "/admin/plans/nope").status_code == 404
    assert admin(gateway, "PATCH", "/admin/projects/default",
                 json={"plans_allowed": ["../x"]}).status_code == 400


def test_a_plan_follows_the_sign_in_header_groups(make_llimit, fake, clock):
    server = make_llimit(auth="header", plan_claim="X-Forwarded-Groups",
                         plan_groups=(("research", "research-plan"), ("interns", "intern-plan")))
    make_plan(server, "research-plan")
    make_plan(server, "intern-plan")
    proxy = requests.Session()
    proxy.headers.update({"X-Forwarded-Email": "gus@example.com",
                          "X-Forwarded-Groups": "staff,interns"})
    assert proxy.get(server.url + "/usage").status_code == 200
    row = admin(server, "GET", "/admin/users/gus@example.com").json()
    assert (row["plan"], row["plan_source"]) == ("intern-plan", "sign-in")
    # A new sign-in with other groups: the first pair that matches wins.
    proxy.headers.update({"X-Forwarded-Email": "ida@example.com",
                          "X-Forwarded-Groups": "interns, research"})
    proxy.get(server.url + "/usage")
    assert admin(server, "GET", "/admin/users/ida@example.com").json()["plan"] == "research-plan"
    proxy.headers.update({"X-Forwarded-Email": "gus@example.com", "X-Forwarded-Groups": "staff"})
    proxy.get(server.url + "/usage")
    assert admin(server, "GET", "/admin/users/gus@example.com").json()["plan"] is None
