"""The admin API over HTTP: keys, projects, usage, CSV, pricing, OpenAPI."""

import csv
import hashlib
import io
import re

import requests

import llimit
from tests.conftest import sqlite_only

ENGINES = ("sqlite", "postgres")


def test_admin_api_needs_the_admin_token(gateway):
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("GET", "/admin/usage"), ("GET", "/admin/limits")):
        resp = requests.request(method, gateway.url + path, json={},
                                headers={"Authorization": "Bearer wrong"})
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_admin_token"


def test_key_is_shown_once_and_stored_only_as_a_hash(gateway):
    resp = gateway.admin.post(gateway.url + "/admin/keys",
                              json={"user": "carol", "note": "laptop"})
    assert resp.status_code == 201
    created = resp.json()
    raw_key = created["key"]
    assert raw_key.startswith("llimit-") and len(raw_key) >= len("llimit-") + 32
    row = gateway.db().execute("select * from api_keys where id = ?",
                               (created["id"],)).fetchone()
    assert row["key_hash"] == hashlib.sha256(raw_key.encode()).hexdigest()
    assert raw_key not in str(tuple(row))
    listed = gateway.admin.get(gateway.url + "/admin/keys?user=carol").json()["data"]
    assert [key["id"] for key in listed] == [created["id"]]
    assert raw_key not in str(listed)
    assert listed[0]["masked_key"].startswith(raw_key[:11])
    assert listed[0]["masked_key"].endswith(raw_key[-4:])
    single = gateway.admin.get(f"{gateway.url}/admin/keys/{created['id']}").json()
    assert "key" not in single and single["note"] == "laptop"


def test_key_filters_patch_and_revoke(gateway):
    _, first = gateway.create_key(user="dan")
    _, second = gateway.create_key(user="erin")
    patched = gateway.admin.patch(f"{gateway.url}/admin/keys/{first}",
                                  json={"note": "new note", "models": ["gpt-4o"]}).json()
    assert patched["note"] == "new note" and patched["models"] == ["gpt-4o"]
    gateway.admin.post(f"{gateway.url}/admin/keys/{second}/revoke")
    active = gateway.admin.get(gateway.url + "/admin/keys?active=true").json()["data"]
    assert [key["id"] for key in active] == [first]
    assert gateway.admin.get(gateway.url + "/admin/keys/key_nope").status_code == 404
    bad = gateway.admin.post(gateway.url + "/admin/keys", json={"project": "nope"})
    assert bad.status_code == 404
    bad = gateway.admin.post(gateway.url + "/admin/keys", json={"expires_at": "soon"})
    assert bad.status_code == 400 and "expires_at" in bad.json()["error"]["message"]


def test_usage_grouped_every_way_and_as_csv(gateway, fake):
    alice, alice_id = gateway.create_key(user="alice")
    bob, _ = gateway.create_key(user="bob")
    for raw_key, model in ((alice, "gpt-4o"), (alice, "gpt-4o-mini"), (bob, "gpt-4o")):
        fake.behaviour["model"] = model
        requests.post(gateway.url + "/v1/chat/completions", json={"model": model},
                      headers={"Authorization": f"Bearer {raw_key}"})
    gateway.wait_idle()
    by_user = gateway.admin.get(gateway.url + "/admin/usage?group_by=user").json()
    users = {row["user"]: row for row in by_user["rows"]}
    assert users["alice"]["requests"] == 2 and users["bob"]["requests"] == 1
    assert by_user["totals"]["requests"] == 3
    assert by_user["totals"]["prompt_tokens"] == 33
    for group in ("key", "project", "model", "day"):
        report = gateway.admin.get(f"{gateway.url}/admin/usage?group_by={group}").json()
        assert sum(row["requests"] for row in report["rows"]) == 3
        assert all(group in row for row in report["rows"])
    by_key = gateway.admin.get(gateway.url + "/admin/usage?group_by=key").json()
    assert {row["key"] for row in by_key["rows"]} >= {alice_id}
    csv_text = gateway.admin.get(gateway.url + "/admin/usage.csv").text
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert len(rows) == 3 and {row["user"] for row in rows} == {"alice", "bob"}
    assert all(float(row["cost_usd"]) > 0 for row in rows)
    bad = gateway.admin.get(gateway.url + "/admin/usage?start=yesterday")
    assert bad.status_code == 400


def test_projects_crud(gateway, monkeypatch):
    resp = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "team-a", "name": "Team A", "upstream_kind": "openai",
        "upstream_url": "https://example.invalid/v1", "upstream_key": "sk-secret-team-a",
        "budget": {"usd": 10, "window": "day"}})
    assert resp.status_code == 201, resp.text
    project = resp.json()
    assert "sk-secret-team-a" not in resp.text
    assert project["upstream_key_set"] is True and project["limits"][0]["amount"] == 10
    listed = gateway.admin.get(gateway.url + "/admin/projects").json()["data"]
    assert {p["id"] for p in listed} == {"default", "team-a"}
    assert "sk-secret-team-a" not in str(listed)
    patched = gateway.admin.patch(gateway.url + "/admin/projects/team-a",
                                  json={"allow_user_keys": False}).json()
    assert patched["allow_user_keys"] is False
    dup = gateway.admin.post(gateway.url + "/admin/projects", json={"id": "team-a"})
    assert dup.status_code == 409
    bad = gateway.admin.post(gateway.url + "/admin/projects",
                             json={"id": "x", "upstream_kind": "nope"})
    assert bad.status_code == 400 and "upstream_kind" in bad.json()["error"]["message"]
    assert gateway.admin.delete(gateway.url + "/admin/projects/team-a").status_code == 200
    assert gateway.admin.get(gateway.url + "/admin/projects/team-a").status_code == 404
    assert gateway.admin.delete(gateway.url + "/admin/projects/default").status_code == 400


def test_pricing_listing_and_bad_prices(gateway):
    listing = gateway.admin.get(gateway.url + "/admin/pricing").json()
    assert listing["models"]["gpt-4o"]["source"] == "file"
    bad = gateway.admin.put(gateway.url + "/admin/pricing/x", json={"input": -1, "output": 1})
    assert bad.status_code == 400
    ok = gateway.admin.put(gateway.url + "/admin/pricing/openrouter/acme",
                           json={"input": 1, "output": 2})
    assert ok.status_code == 200
    assert gateway.admin.get(gateway.url + "/admin/pricing").json()[
        "models"]["openrouter/acme"]["source"] == "override"


def test_openapi_describes_every_admin_route(gateway):
    spec = requests.get(gateway.url + "/admin/openapi.json").json()
    for method, path, _ in llimit.routes():
        if path.startswith("/admin/") and path != "/admin/openapi.json":
            openapi_path = (path.replace("<key_id>", "{id}").replace("<project_id>", "{id}")
                            .replace("<limit_id>", "{id}").replace("<model:path>", "{model}")
                            .replace("<plan_id>", "{id}").replace("<user_name>", "{user}")
                            .replace("<user_name:path>", "{user}"))
            assert method.lower() in spec["paths"][openapi_path], (method, path)


def upstream_key_patterns(spec):
    """Every pattern the spec gives a project's upstream_key, wherever it appears."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("upstream_key"), dict) and "pattern" in node["upstream_key"]:
                found.add(node["upstream_key"]["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(spec)
    return found


@sqlite_only  # input rules only
def test_the_spec_admits_exactly_the_env_upstream_keys_the_configured_glob_lets_through(
        make_llimit):
    # A fuzzer keeping to the spec must never be refused: with LLIMIT_UPSTREAM_ENV_PATTERN
    # set, the spec says which env: names a project's upstream_key may give.
    gateway = make_llimit(upstream_env_pattern="TEAM_?_KEY*")
    spec = requests.get(gateway.url + "/admin/openapi.json").json()
    patterns = upstream_key_patterns(spec)
    assert len(patterns) == 1, patterns
    pattern = re.compile(patterns.pop())
    for index, key in enumerate(["env:TEAM_A_KEY", "env:TEAM_B_KEY_2", "env:TEAM___KEY",
                                 "env:TEAM_AB_KEY", "env:OTHER", "env:TEAM_1_KEY",
                                 "env:LLIMIT_ADMIN_TOKEN", "sk-plain-key", "envoy-key"]):
        made = gateway.admin.post(gateway.url + "/admin/projects", json={
            "id": f"p{index}", "upstream_url": "https://example.invalid/v1",
            "upstream_key": key})
        assert made.status_code == (201 if pattern.match(key) else 400), (key, made.text)
        assert (made.status_code == 201) == (key in ("env:TEAM_A_KEY", "env:TEAM_B_KEY_2",
                                                     "env:TEAM___KEY", "env:TEAM_1_KEY",
                                                     "sk-plain-key", "envoy-key")), key


def test_times_of_any_year_the_spec_allows_are_stored_with_four_digits_and_hold(gateway,
                                                                               fake):
    # date-time admits years 0001-9999 and any offset. glibc writes year 638 as "638",
    # which sorts after "2026" as text: a limit starting then broke every call with a
    # 500, and a key that expired in 638 counted as active.
    made = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "global", "metric": "requests", "window": "84h", "amount": 1000,
        "starts_at": "0638-08-16T09:16:26.7Z"})
    assert made.status_code == 201, made.text
    assert made.json()["starts_at"] == "0638-08-16T09:16:26Z"
    listed = gateway.admin.get(gateway.url + "/admin/limits")
    assert listed.status_code == 200 and "0638-08-16T09:16:26Z" in listed.text
    live_key, _ = gateway.create_key(user="ann", expires_at="9999-12-31T23:00:00-05:00")
    assert requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {live_key}"}).status_code == 200
    for expires_at, stored in (("0638-01-01", "0638-01-01T00:00:00Z"),
                               ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00Z")):
        raw_key, key_id = gateway.create_key(user="bob", expires_at=expires_at)
        key = gateway.admin.get(f"{gateway.url}/admin/keys/{key_id}").json()
        assert key["expires_at"] == stored and key["active"] is False
        refused = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                                headers={"Authorization": f"Bearer {raw_key}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "key_expired"
    assert [key["expires_at"] for key in gateway.admin.get(
        gateway.url + "/admin/keys?user=ann").json()["data"]] == ["9999-12-31T23:59:59Z"]


@sqlite_only  # the spec alone
def test_the_spec_gives_a_user_limit_a_target_the_identity_rule_leaves_something_of(gateway):
    spec = requests.get(gateway.url + "/admin/openapi.json").json()
    limit_input = spec["paths"]["/admin/limits"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    user_scope = next(schema for schema in limit_input["oneOf"]
                      if schema["properties"]["scope"]["enum"] == ["user"])
    pattern = re.compile(user_scope["properties"]["target"]["pattern"])
    for target in (" ", "\t\n", "\x85"):
        assert not pattern.search(target)
        refused = gateway.admin.post(gateway.url + "/admin/limits", json={
            "scope": "user", "target": target, "metric": "requests", "window": "day",
            "amount": 1})
        assert refused.status_code == 400
    assert pattern.search(" ann ")


def test_user_filters_and_paths_read_names_as_stored(gateway, fake):
    for user in ("josé", "a/b"):
        raw_key, _ = gateway.create_key(user=user)
        assert requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                             headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200
    gateway.wait_idle()

    def usage_of(user):
        resp = gateway.admin.get(gateway.url + "/admin/usage", params={"user": user})
        assert resp.status_code == 200, resp.text
        return resp.json()["totals"]["requests"]
    # As UTF-8 (not latin-1), and under the Identity rule (case, spaces) as stored.
    assert usage_of("josé") == usage_of(" JOSÉ ") == 1
    assert [key["user"] for key in gateway.admin.get(
        gateway.url + "/admin/keys", params={"user": "José"}).json()["data"]] == ["josé"]
    # A name the rule leaves nothing of is no one, never everyone.
    for nobody in ("\x00", " "):
        assert gateway.admin.get(gateway.url + "/admin/keys",
                                 params={"user": nobody}).json()["data"] == []
    # A name holding a / is reachable at /admin/users/{user}, as the spec says.
    put = gateway.admin.put(gateway.url + "/admin/users/a%2Fb", json={"plan": None})
    assert put.status_code in (200, 400), put.text
    got = gateway.admin.get(gateway.url + "/admin/users/a%2Fb")
    assert got.status_code == 200 and got.json()["user"] == "a/b", got.text
    # A NUL, which PostgreSQL cannot even look up: an answer, never a 500.
    for path in ("/admin/keys/a%00b", "/admin/keys?project=%00", "/admin/pricing/a%00b"):
        method = "PUT" if "pricing" in path else "GET"
        answer = gateway.admin.request(method, gateway.url + path,
                                       json={"input": 1, "output": 2})
        assert answer.status_code in (200, 400, 404), (path, answer.text)
