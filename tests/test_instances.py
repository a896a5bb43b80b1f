"""Several llimit instances on one PostgreSQL database are one system: what one
instance changes holds on the others' next call, usage from all shows on every
one, a page session or a new key's page moves between them, and a proxied call
costs one round trip to the database before it goes upstream."""

import concurrent.futures
import re
import threading
import time

import pytest
import requests

import llimit

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


def test_an_outage_fails_every_call_closed_before_it_goes_upstream_and_recovers(
        make_llimit, databases, fake, tmp_path_factory):
    # b reaches PostgreSQL through a relay that can cut it; a directly.
    relay = PostgresRelay(databases("ledger"), str(tmp_path_factory.mktemp("relay")))
    try:
        a, b = make_llimit(db_path=databases("ledger")), make_llimit(db_path=relay.url)
        raw_key, key_id = a.create_key(user="alice")  # no limit applies to it
        other_key, _ = a.create_key(user="bob", note="never revoked")
        for key in (raw_key, other_key):
            assert call(b, key).status_code == 200  # b holds both key rows in its cache
        assert a.admin.post(f"{a.url}/admin/keys/{key_id}/revoke").status_code == 200
        relay.cut()  # b's next call finds the database gone, the revoked row still cached
        seen = len(fake.requests)
        outage_began = time.monotonic()
        for key in (raw_key, other_key):
            refused = call(b, key)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "ledger_unavailable"
            assert refused.json()["error"]["type"] == "service_unavailable"
        listed = requests.get(b.url + "/v1/models", headers={"Authorization": f"Bearer {other_key}"})
        assert listed.status_code == 503
        assert len(fake.requests) == seen, "nothing went upstream while the ledger was gone"
        health = requests.get(b.url + "/healthz")
        assert health.status_code == 503 and health.json()["error"]["code"] == "ledger_unavailable"
        assert requests.get(a.url + "/healthz").status_code == 200
        # Only the first waits for a connection; the rest fail at once rather than
        # each hold a thread (4 waits would take 4 x POSTGRES_CONNECT_SECONDS).
        assert time.monotonic() - outage_began < 2 * llimit.POSTGRES_CONNECT_SECONDS
        relay.restore()  # b recovers by itself: no restart
        deadline = time.monotonic() + 30
        while call(b, other_key).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert call(b, other_key).status_code == 200
        revoked = call(b, raw_key)
        assert revoked.status_code == 403 and revoked.json()["error"]["code"] == "key_revoked"
        assert requests.get(b.url + "/healthz").status_code == 200
        assert len(fake.requests) == seen + 2
        b.wait_idle()  # the revoked key's refusal counted before the relay goes
    finally:
        relay.close()


def test_the_concurrency_caps_hold_per_instance(make_llimit, fake):
    # LLIMIT_MAX_CONCURRENT_PER_KEY / _PER_USER keep one key holder from holding an
    # instance's worker threads, so each instance counts its own (README: a key may
    # have instances x the cap under way); spend across instances is the limits' job.
    a, b = (make_llimit(db_path="shared.db", max_concurrent_per_key=2,
                        max_concurrent_per_user=3) for _ in range(2))
    raw_key, _ = a.create_key(user="hog")
    second_key, _ = a.create_key(user="hog")
    fake.behaviour["delay_first"] = 3
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = [pool.submit(call, a, raw_key) for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(fake.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fake.requests) == 2  # a's two slots of this key are taken
        capped = call(a, raw_key)
        assert capped.status_code == 429, capped.text
        assert capped.json()["error"]["code"] == "too_many_concurrent_calls"
        assert capped.headers["Retry-After"] == "1"
        held.append(pool.submit(call, a, second_key))  # the user's third call on a
        while len(fake.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        over_user = call(a, second_key)
        assert over_user.status_code == 429 and "User hog has 3" in over_user.text
        # b counts its own: the same key and user still get its slots.
        on_b = [pool.submit(call, b, raw_key) for _ in range(2)]
        assert [future.result().status_code for future in held + on_b] == [200] * 5
    assert len(fake.requests) == 5
    a.wait_idle()
    assert len(a.events()) == 5 and a.reservations_held() == 0 and b.reservations_held() == 0
