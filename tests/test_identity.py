"""The Identity rule: every source of a user name makes the same user, and a
migration brings names stored before the rule under it."""

import requests

import llimit
from tests.test_limits import add_limit
from tests.test_limits import call as chat

ENGINES = ("sqlite", "postgres")

CORP = ("corp.example",)


def test_one_person_under_every_spelling_is_one_user_with_one_budget(make_llimit, fake):
    server = make_llimit(user_domains=CORP, user_headers=("X-OpenWebUI-User-Email",))
    project_key, _ = server.create_key(user=None)
    add_limit(server, scope="global", each="user", metric="requests", window="day", amount=3)
    spellings = [({"X-LLimit-User": "Grace@corp.example"}, {}),
                 ({"X-OpenWebUI-User-Email": "grace@CORP.example"}, {}),
                 ({}, {"user": " grace "})]
    for headers, body in spellings:
        assert chat(server, project_key, headers, **body).status_code == 200
    refused = chat(server, project_key, {"X-LLimit-User": "GRACE"})
    assert refused.status_code == 429
    assert {row["user_name"] for row in server.events()} == {"grace"}
    # A personal key made for any spelling is grace's, and shares her budget.
    made = server.admin.post(server.url + "/admin/keys", json={"user": "Grace@Corp.Example"})
    assert made.json()["user"] == "grace"
    assert chat(server, made.json()["key"]).status_code == 429


def test_an_address_of_another_domain_is_never_the_local_user(make_llimit, fake):
    server = make_llimit(user_domains=CORP)
    project_key, _ = server.create_key(user=None)
    add_limit(server, scope="user", target="BOSS@corp.example", metric="requests",
              window="day", amount=1)
    limits = server.admin.get(server.url + "/admin/limits").json()["data"]
    assert [limit["target"] for limit in limits] == ["boss"]
    assert chat(server, project_key, {"X-LLimit-User": "boss"}).status_code == 200
    assert chat(server, project_key, {"X-LLimit-User": "boss@corp.example"}).status_code == 429
    # Someone else's boss is someone else, and not under boss's limit.
    assert chat(server, project_key,
                {"X-LLimit-User": "Boss@Partner.example"}).status_code == 200
    assert server.events()[-1]["user_name"] == "boss@partner.example"


def test_admin_users_are_matched_by_the_same_rule(make_llimit):
    server = make_llimit(auth="header", admin_users=("boss",), user_domains=CORP)
    outsider = requests.get(server.url + "/admin",
                            headers={"X-Forwarded-Email": "boss@partner.example"})
    assert outsider.status_code == 403
    insider = requests.get(server.url + "/admin",
                           headers={"X-Forwarded-Email": "Boss@Corp.example"})
    assert insider.status_code == 200 and "<h1>Admin</h1>" in insider.text


def test_user_domains_default_to_the_oidc_allowed_domains():
    config = llimit.Config(oidc_allowed_domains=("@Corp.example",))
    assert llimit.user_domains(config) == {"corp.example"}
    assert llimit.user_domains(llimit.Config(user_domains=("x.example",),
                                             oidc_allowed_domains=CORP)) == {"x.example"}


def test_a_project_key_must_name_its_user_under_a_per_user_limit(make_llimit, fake):
    server = make_llimit()
    project_key, _ = server.create_key(user=None)
    assert chat(server, project_key).status_code == 200  # no per-user limit yet
    server.admin.post(server.url + "/admin/projects", json={"id": "other"})
    add_limit(server, scope="project", target="other", each="user", metric="requests",
              window="day", amount=3)
    assert chat(server, project_key).status_code == 200  # another project's limit
    add_limit(server, scope="project", target="default", each="user", metric="requests",
              window="day", amount=3)
    for _ in range(8):
        refused = chat(server, project_key)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "user_required" and "X-LLimit-User" in error["message"]
    named = [chat(server, project_key, {"X-LLimit-User": "ann"}).status_code
             for _ in range(4)]
    assert named == [200, 200, 200, 429]


def _ledger(db):
    events = {row[0]: (row[1], row[2], row[3]) for row in db.execute(
        "select user_name, count(*), sum(prompt_tokens + completion_tokens), sum(cost_nusd)"
        " from usage_events group by user_name")}
    daily = {row[0]: (row[1], row[2], row[3]) for row in db.execute(
        "select user_name, sum(requests), sum(prompt_tokens + completion_tokens),"
        " sum(cost_nusd) from usage_daily group by user_name")}
    counters = {row[0]: (row[1], row[2], row[3]) for row in db.execute(
        "select subject, requests, tokens, cost_nusd from usage_counters"
        " where day = 'total' and (subject like 'u:%' or subject like 'pu:%')")}
    return events, daily, counters


def test_migration_merges_stored_names_keeps_every_row_and_is_idempotent(
        make_llimit, fake, tmp_path):
    db_path = str(tmp_path / "shared.db")
    before = make_llimit(db_path=db_path)  # no domains: each address is its own user
    for user in ("Grace@corp.example", "grace", "frank@corp.example"):
        raw_key, _ = before.create_key(user=user)
        assert chat(before, raw_key).status_code == 200
        assert chat(before, raw_key).status_code == 200
    add_limit(before, scope="user", target="grace@corp.example", metric="usd",
              window="month", amount=5)
    before.wait_idle()
    # What an older llimit stored as typed: mixed case, and a session.
    with llimit.transaction(before.db()) as db:
        db.execute("update api_keys set user_name = 'Frank@Corp.example'"
                   " where user_name = 'frank@corp.example'")
        db.execute("insert into sessions (id_hash, user_name, is_admin, csrf_token, pending,"
                   " created_at, expires_at) values ('h', 'Grace@corp.example', 0, 'c', null,"
                   " '2026-01-01T00:00:00Z', '2999-01-01T00:00:00Z')")
    events_before = before.events()
    before.stop()

    after = make_llimit(db_path=db_path, user_domains=CORP)
    db = after.db()
    assert len(after.events()) == len(events_before) == 6
    events, daily, counters = _ledger(db)
    assert events == {"grace": (4, 72, 4 * 97500), "frank": (2, 36, 2 * 97500)}
    assert daily == events
    assert counters["u:grace"] == events["grace"] and counters["u:frank"] == events["frank"]
    assert counters["pu:default\x1fgrace"] == events["grace"]
    assert len(counters) == 4  # the old names' totals were merged in, not left behind
    assert {row[0] for row in db.execute("select user_name from api_keys")} == {"grace", "frank"}
    assert db.execute("select target from limits").fetchone()[0] == "grace"
    assert db.execute("select user_name from sessions").fetchone()[0] == "grace"
    # grace's budget counts all her spend now.
    used = after.admin.get(after.url + "/admin/limits").json()["data"][0]["used"]
    assert used == 4 * 97500 / 1e9
    after.stop()

    again = make_llimit(db_path=db_path, user_domains=CORP)
    assert llimit.apply_identity_rule(again.db(), frozenset(CORP)) == {}
    assert _ledger(again.db()) == (events, daily, counters)


def test_text_no_database_stores_reaches_the_ledger_as_text_it_can(gateway, fake):
    # A lone surrogate (SQLite cannot encode it) or a NUL (PostgreSQL refuses it) in a
    # call's user or model once stopped the usage writer for good: every later call
    # still went upstream, then was refused, and was never metered.
    raw_key, _ = gateway.create_key(user="ann")
    odd = [{"user": "bo\ud800b"}, {"model": "gpt-4o\udfff"}, {"model": "gpt-4o\x00x"},
           {"user": "cy\x00"}]
    for body in odd + [{}]:
        resp = chat(gateway, raw_key, **body)
        assert resp.status_code == 200, (body, resp.text)
    assert requests.get(gateway.url + "/healthz").json()["usage_writer_healthy"] is True
    events = gateway.events()
    assert len(events) == len(odd) + 1 == len(fake.requests)
    assert all("\x00" not in event["model"] for event in events)
    models = requests.get(gateway.url + "/admin/usage?group_by=model",
                          headers={"Authorization": gateway.admin.headers["Authorization"]})
    assert models.status_code == 200 and models.json()["totals"]["requests"] == len(odd) + 1
