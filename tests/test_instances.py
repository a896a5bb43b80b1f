"""Several llimit instances on one PostgreSQL database are one system: what one
instance changes holds on the others' next call, usage from all shows on every
one, a page session or a new key's page moves between them, and a proxied call
costs one round trip to the database before it goes upstream."""

import re
import threading
import time

import pytest
import requests

from tests.browser import csrf_token, http_sign_in
from tests.conftest import ADMIN_TOKEN
from tests.pg_proxy import PostgresRelay
from tests.test_limits import add_limit, call

ENGINES = ("postgres",)


@pytest.fixture
def pair(make_llimit, engine):
    """Two instances on one database: (a, b)."""
    return make_llimit(db_path="shared.db"), make_llimit(db_path="shared.db")


def test_a_revocation_or_a_limit_made_on_one_instance_holds_on_the_others_next_call(pair):
    a, b = pair
    raw_key, key_id = a.create_key(user="alice")
    assert call(b, raw_key).status_code == 200  # b holds the key row in its cache now
    assert call(b, raw_key).status_code == 200
    add_limit(a, scope="key", target=key_id, metric="requests", window="day", amount=2)
    refused = call(b, raw_key)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "budget_exceeded"
    other_key, other_id = a.create_key(user="bob")
    assert call(b, other_key).status_code == 200
    assert a.admin.post(f"{a.url}/admin/keys/{other_id}/revoke").status_code == 200
    revoked = call(b, other_key)
    assert revoked.status_code == 403 and revoked.json()["error"]["code"] == "key_revoked"
    # A look-up (no limits apply to it) sees the revocation too.
    listed = requests.get(b.url + "/v1/models", headers={"Authorization": f"Bearer {other_key}"})
    assert listed.status_code == 403


def test_usage_from_both_instances_shows_on_each(pair):
    a, b = pair
    raw_key, _ = a.create_key(user="alice")
    for server in (a, b, b, a, b):
        assert call(server, raw_key).status_code == 200
    for server in pair:
        server.wait_idle()
    # 5 calls of 11 + 7 tokens at gpt-4o's list price ($2.50 / $10.00 per million).
    cost = 5 * (11 * 2.5 + 7 * 10.0) / 1e6
    for server in pair:
        rows = server.admin.get(server.url + "/admin/usage?group_by=user").json()["rows"]
        alice = next(row for row in rows if row["user"] == "alice")
        assert alice["requests"] == 5 and alice["cost_usd"] == pytest.approx(cost)
        admin = http_sign_in(server.url, None, admin_token=ADMIN_TOKEN)
        report = admin.get(server.url + "/reports/data").json()
        assert sum(row["requests"] for row in report["by_user"]) == 5
        page = http_sign_in(server.url, "alice").get(server.url + "/usage").text
        assert re.search(r'<div class="stat">5</div>', page), "5 requests this month"


def test_a_page_session_made_on_one_instance_is_valid_on_the_other(pair):
    a, b = pair
    alice = http_sign_in(a.url, "alice")
    cookie = alice.cookies.get("llimit_session")
    assert cookie
    page = alice.get(b.url + "/keys", allow_redirects=False)
    assert page.status_code == 200 and "Keys of alice" in page.text
    signed_out = requests.get(b.url + "/keys", allow_redirects=False)
    assert signed_out.status_code in (302, 303)


def test_a_new_key_made_on_one_instance_is_shown_once_by_the_other(pair):
    a, b = pair
    alice = http_sign_in(a.url, "alice")
    token = csrf_token(alice.get(a.url + "/keys").text)
    made = alice.post(a.url + "/keys", data={"csrf_token": token, "project": "default",
                                             "note": "mine"}, allow_redirects=False)
    assert made.status_code == 303
    # The load balancer sends the GET that follows to the other instance.
    shown = alice.get(b.url + "/keys")
    raw_key = re.search(r'id="new-key" class="secret">([^<]+)<', shown.text).group(1)
    assert call(a, raw_key).status_code == 200
    assert raw_key not in alice.get(a.url + "/keys").text  # once, on either instance
    assert raw_key not in alice.get(b.url + "/keys").text
    # Kept sealed: the database holds no trace of the secret a copy could read.
    dump = repr([tuple(row) for row in a.db().execute("select * from sessions")])
    assert raw_key not in dump and raw_key[7:20] not in dump


def test_a_sealed_key_opens_only_with_its_own_session_id():
    import llimit

    sealed = llimit.seal_for_session("session-one", '{"raw_key": "llimit-secret"}')
    assert "llimit-secret" not in sealed
    assert llimit.open_for_session("session-one", sealed) == '{"raw_key": "llimit-secret"}'
    assert llimit.open_for_session("session-two", sealed) is None
    tampered = sealed[:30] + ("A" if sealed[30] != "A" else "B") + sealed[31:]
    assert llimit.open_for_session("session-one", tampered) is None


@pytest.mark.parametrize("limits", ["none", "warn", "block", "rolling"])
def test_a_call_costs_one_round_trip_to_postgresql_before_going_upstream(
        make_llimit, databases, fake, tmp_path_factory, limits):
    relay = PostgresRelay(databases("ledger"), str(tmp_path_factory.mktemp("relay")))
    try:
        gateway = make_llimit(db_path=relay.url)
        raw_key, key_id = gateway.create_key()
        if limits != "none":
            action = "warn" if limits == "warn" else "block"
            add_limit(gateway, scope="key", target=key_id, metric="usd", window="day",
                      amount=100, action=action)
            add_limit(gateway, scope="global", metric="requests", window="minute",
                      amount=10_000, action=action)
        if limits == "rolling":  # a rolling window and a reset day: their totals too
            add_limit(gateway, scope="key", target=key_id, metric="tokens", window="5h",
                      amount=10_000_000)
            reset = add_limit(gateway, scope="global", metric="usd", window="day", amount=100)
            assert gateway.admin.post(
                f"{gateway.url}/admin/limits/{reset['id']}/reset").status_code == 200
        for _ in range(8):  # warm: the key row cached, the statements prepared
            assert call(gateway, raw_key).status_code == 200
        for route in ("chat", "models"):
            gateway.wait_idle()
            time.sleep(0.3)
            before = relay.round_trips
            fake.behaviour["delay_first"] = 1.0  # the upstream holds the call; count meanwhile
            seen = len(fake.requests)
            done = []
            if route == "chat":
                thread = threading.Thread(target=lambda: done.append(call(gateway, raw_key)))
            else:
                thread = threading.Thread(target=lambda: done.append(requests.get(
                    gateway.url + "/v1/models", headers={"Authorization": f"Bearer {raw_key}"})))
            thread.start()
            deadline = time.monotonic() + 10
            while len(fake.requests) == seen and time.monotonic() < deadline:
                time.sleep(0.01)
            assert relay.round_trips - before == 1, (route, relay.round_trips - before)
            thread.join()
            fake.behaviour.clear()
            assert done[0].status_code == 200
    finally:
        relay.close()


def test_a_reprice_rebuilds_the_minute_totals_every_instance_reads(pair, fake):
    a, b = pair
    fake.behaviour["model"] = "acme-llm-7b"
    raw_key, key_id = a.create_key()
    minute = add_limit(a, scope="key", target=key_id, metric="usd", window="minute",
                       amount=1, action="warn")
    for server in (a, b):
        assert requests.post(server.url + "/v1/chat/completions", json={"model": "acme-llm-7b"},
                             headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200
        server.wait_idle()
    assert b.admin.get(f"{b.url}/admin/limits/{minute['id']}").json()["used"] == 0
    assert a.admin.put(a.url + "/admin/pricing/acme-llm-7b",
                       json={"input": 1.0, "output": 2.0}).status_code == 200
    assert a.admin.post(a.url + "/admin/reprice").json()["changed"] == 2
    # 2 calls of 11 input and 7 output tokens at $1 and $2 per million: $0.00005.
    for server in (a, b):
        used = server.admin.get(f"{server.url}/admin/limits/{minute['id']}").json()["used"]
        assert used == pytest.approx(2 * (11 * 1.0 + 7 * 2.0) / 1e6)
