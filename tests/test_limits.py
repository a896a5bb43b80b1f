"""Budgets, quotas and rate limits: one mechanism, exact under concurrency."""

import calendar
import concurrent.futures
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.conftest import LazyModule

openai = LazyModule("openai")

ENGINES = ("sqlite", "postgres")
CALL_NUSD = round((11 * 2.5 + 7 * 10.0) * 1000)  # the fake's usage at gpt-4o list prices


def call(gateway, raw_key, headers=None, **body):
    return requests.post(gateway.url + "/v1/chat/completions",
                         json={"model": "gpt-4o", "messages": [], **body},
                         headers={"Authorization": f"Bearer {raw_key}", **(headers or {})})


def add_limit(gateway, **fields):
    resp = gateway.admin.post(gateway.url + "/admin/limits", json=fields)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_budget_blocks_with_a_clear_429_and_resets_next_window(gateway, fake, clock):
    clock.now = 1_795_000_000.0  # a fixed moment, mid-day UTC
    gateway.admin.patch(gateway.url + "/admin/projects/default",
                        json={"limit_message": "Ask #ai-budget for more."})
    raw_key, key_id = gateway.create_key()
    limit = add_limit(gateway, scope="key", target=key_id, metric="usd", window="day",
                      amount=2.5 * CALL_NUSD / 1e9)
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 200  # 2 calls used < 2.5 calls' worth
    blocked = call(gateway, raw_key)
    assert blocked.status_code == 429
    error = blocked.json()["error"]
    assert error["type"] == "budget_exceeded"
    # Written for the key holder: what ran out, when it comes back, whom to ask;
    # the limit's id goes to a header, for the admin they ask.
    assert error["message"].startswith("Your daily budget of $")
    assert "It resets at 2026-11-19 00:00 UTC." in error["message"]
    assert limit["id"] not in error["message"] and "lim_" not in error["message"]
    assert blocked.headers["X-LLimit-Limit-Id"] == limit["id"]
    assert error["message"].endswith("UTC. Ask #ai-budget for more.")
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=raw_key,
                      max_retries=0).chat.completions.create(model="gpt-4o", messages=[])
    assert len(gateway.events()) == 3
    clock.advance(86400)
    assert call(gateway, raw_key).status_code == 200


def test_rate_limit_per_minute_with_retry_after_and_headers(gateway, fake, clock):
    clock.now = 1_795_000_010.0
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="minute",
              amount=2)
    # OpenAI's meaning: what remains once this call is counted, so 0 on the last one allowed.
    first = call(gateway, raw_key)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "10s"  # 50 s into the minute
    assert call(gateway, raw_key).headers["x-ratelimit-remaining-requests"] == "0"
    blocked = call(gateway, raw_key)
    assert blocked.status_code == 429
    assert blocked.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    clock.advance(60)
    assert call(gateway, raw_key).status_code == 200


def test_token_quota_per_day(gateway, fake, clock):
    raw_key, _ = gateway.create_key(user="free-user")
    add_limit(gateway, scope="user", target="free-user", metric="tokens", window="day",
              amount=40)
    assert call(gateway, raw_key, max_tokens=7).status_code == 200   # 18 tokens
    assert call(gateway, raw_key).status_code == 200                 # 36 tokens
    # Bounded by max_tokens, a call that could cross the quota is refused ...
    resp = call(gateway, raw_key, max_tokens=7)
    assert resp.status_code == 429 and "tokens" in resp.json()["error"]["message"]
    # ... an unbounded one goes while something is left, and then nothing does.
    assert call(gateway, raw_key).status_code == 200                 # 54 tokens
    assert call(gateway, raw_key).status_code == 429


def test_each_user_of_a_project_has_its_own_budget(gateway, fake):
    add_limit(gateway, scope="project", target="default", each="user", metric="requests",
              window="month", amount=1)
    raw_key, _ = gateway.create_key(user=None)  # a project key
    assert call(gateway, raw_key, {"X-LLimit-User": "ann"}).status_code == 200
    assert call(gateway, raw_key, {"X-LLimit-User": "ann"}).status_code == 429
    assert call(gateway, raw_key, user="ben").status_code == 200
    assert call(gateway, raw_key, {"X-LLimit-User": "ben"}).status_code == 429
    assert {e["user_name"] for e in gateway.events()} == {"ann", "ben"}


def test_configured_user_headers_name_the_end_user(make_llimit, fake):
    gateway = make_llimit(user_headers=("X-OpenWebUI-User-Email",))
    add_limit(gateway, scope="user", target="zoe@corp.example", metric="requests",
              window="day", amount=1)
    raw_key, _ = gateway.create_key(user=None)
    headers = {"X-OpenWebUI-User-Email": "zoe@corp.example"}
    assert call(gateway, raw_key, headers).status_code == 200
    assert call(gateway, raw_key, headers).status_code == 429
    assert "x-openwebui-user-email" not in {h.lower() for h in fake.requests[-1].headers}


def test_a_personal_key_ignores_user_headers(gateway, fake):
    raw_key, _ = gateway.create_key(user="owner")
    call(gateway, raw_key, {"X-LLimit-User": "someone-else"}, user="also-else")
    (event,) = gateway.events()
    assert event["user_name"] == "owner"


def test_warn_limits_never_block_but_say_so(gateway, fake):
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="day",
              amount=1, action="warn")
    assert "X-LLimit-Warning" not in call(gateway, raw_key).headers
    second = call(gateway, raw_key)
    assert second.status_code == 200 and second.headers["X-LLimit-Warning"].startswith(
        "You have used 100% of your daily allowance of 1 request")


def test_llimit_me_shows_every_limit_that_applies(gateway, fake, clock):
    clock.now = 1_795_000_000.0
    raw_key, key_id = gateway.create_key(user="max")
    add_limit(gateway, scope="user", target="max", metric="usd", window="month", amount=5)
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="minute",
              amount=10)
    add_limit(gateway, scope="user", target="someone-else", metric="usd", window="day",
              amount=1)
    call(gateway, raw_key)
    gateway.wait_idle()
    me = requests.get(gateway.url + "/llimit/me",
                      headers={"Authorization": f"Bearer {raw_key}"}).json()
    assert (me["user"], me["project"]) == ("max", "default")
    assert raw_key not in json.dumps(me) and me["key"].startswith(raw_key[:11])
    by_metric = {limit["metric"]: limit for limit in me["limits"]}
    assert set(by_metric) == {"usd", "requests"}
    assert by_metric["usd"]["used"] == pytest.approx(CALL_NUSD / 1e9)
    assert by_metric["usd"]["remaining"] == pytest.approx(5 - CALL_NUSD / 1e9)
    assert by_metric["usd"]["resets_at"] == "2026-12-01T00:00:00Z"
    assert by_metric["requests"]["used"] == 1
    assert requests.get(gateway.url + "/llimit/me").status_code == 401


def test_budget_remaining_header(gateway, fake):
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="usd", window="total", amount=1)
    call(gateway, raw_key)
    remaining = float(call(gateway, raw_key).headers["X-LLimit-Budget-Remaining"])
    assert remaining == pytest.approx(1 - CALL_NUSD / 1e9, abs=1e-6)


def test_a_limit_added_mid_window_counts_what_was_spent(gateway, fake):
    raw_key, key_id = gateway.create_key()
    for _ in range(3):
        call(gateway, raw_key)
    gateway.wait_idle()
    limit = add_limit(gateway, scope="key", target=key_id, metric="requests", window="day",
                      amount=3)
    assert limit["used"] == 3
    assert call(gateway, raw_key).status_code == 429
    gateway.admin.patch(f"{gateway.url}/admin/limits/{limit['id']}", json={"amount": 4})
    assert call(gateway, raw_key).status_code == 200
    gateway.admin.delete(f"{gateway.url}/admin/limits/{limit['id']}")
    assert call(gateway, raw_key).status_code == 200


@pytest.mark.parametrize("window,step,expect_reset", [
    ("day", 86400, "2026-11-25T00:00:00Z"),
    ("week", 7 * 86400, "2026-11-30T00:00:00Z"),
    ("month", 31 * 86400, "2026-12-01T00:00:00Z"),
])
def test_windows_roll_over_in_utc(gateway, fake, clock, window, step, expect_reset):
    clock.now = calendar.timegm((2026, 11, 24, 23, 59, 59))  # a Tuesday, 1 s before midnight
    raw_key, key_id = gateway.create_key()
    limit = add_limit(gateway, scope="key", target=key_id, metric="requests", window=window,
                      amount=1)
    assert limit["resets_at"] == expect_reset
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 429
    clock.advance(step)
    assert call(gateway, raw_key).status_code == 200


def test_total_window_is_prepaid_and_survives_restart(make_llimit, fake, clock, tmp_path):
    db_path = str(tmp_path / "persist.db")
    gateway = make_llimit(db_path=db_path)
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="total",
              amount=2)
    call(gateway, raw_key)
    call(gateway, raw_key)
    gateway.stop()
    again = make_llimit(db_path=db_path)
    clock.advance(400 * 86400)
    assert call(again, raw_key).status_code == 429


def _spend(gateway):
    return sum(event["cost_nusd"] for event in gateway.events())


def _call_at_once(fake, instances, raw_key, max_tokens, calls=48):
    # Calls at once, spread over the instances, each held a little upstream; their statuses.
    fake.behaviour["delay_first"] = 0.05
    extra = {"max_tokens": max_tokens} if max_tokens else {}
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        statuses = list(pool.map(
            lambda n: call(instances[n % len(instances)], raw_key, **extra).status_code,
            range(calls)))
    for instance in instances:
        instance.wait_idle()
    assert set(statuses) <= {200, 429} and 429 in statuses
    return statuses


@pytest.mark.parametrize("max_tokens", [7, None], ids=["max_tokens", "unbounded"])
def test_concurrent_calls_do_not_overrun_a_budget(make_llimit, fake, max_tokens, engine):
    gateway = make_llimit()
    # On PostgreSQL the calls are spread over two instances sharing the ledger.
    instances = [gateway] + ([make_llimit(db_path=gateway.config.db_path)]
                             if engine == "postgres" else [])
    budget_nusd = 5 * CALL_NUSD + CALL_NUSD // 2
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="usd", window="day",
              amount=budget_nusd / 1e9)
    statuses = _call_at_once(fake, instances, raw_key, max_tokens)
    spend = _spend(gateway)
    if max_tokens:
        assert spend <= budget_nusd
    else:
        assert spend <= budget_nusd + CALL_NUSD
    assert statuses.count(200) == len(gateway.events())
    assert_running_totals_match_events(gateway)
    assert gateway.reservations_held() == 0, "no reservation may leak"


@pytest.mark.parametrize("max_tokens", [7, None], ids=["max_tokens", "unbounded"])
def test_concurrent_calls_do_not_overrun_a_rolling_window(make_llimit, fake, clock, max_tokens,
                                                          engine):
    # A 5h window from 22:00 holds 02:00 the next day: its period is [22:00, 03:00),
    # a partial first day (22:00-24:00) and a day counted from midnight.
    midnight = 1_795_046_400.0  # 2026-11-19T00:00:00Z
    clock.now = midnight - 3 * 3600  # 21:00, before the period
    gateway = make_llimit()
    # On PostgreSQL the calls are spread over two instances sharing the ledger.
    instances = [gateway] + ([make_llimit(db_path=gateway.config.db_path)]
                             if engine == "postgres" else [])
    raw_key, key_id = gateway.create_key()
    assert call(gateway, raw_key).status_code == 200
    clock.now = midnight - 3600  # 23:00: in the first (partial) day
    assert call(instances[-1], raw_key).status_code == 200
    clock.now = midnight + 3600  # 01:00: the next day
    assert call(gateway, raw_key).status_code == 200
    clock.now = midnight + 2 * 3600  # 02:00
    budget_nusd = 5 * CALL_NUSD + CALL_NUSD // 2
    limit = add_limit(gateway, scope="key", target=key_id, metric="usd", window="5h",
                      amount=budget_nusd / 1e9, starts_at="2026-11-18T22:00:00Z")
    assert limit["resets_at"] == "2026-11-19T03:00:00Z"
    assert limit["used"] == pytest.approx(2 * CALL_NUSD / 1e9)  # 23:00 and 01:00, not 21:00
    statuses = _call_at_once(fake, instances, raw_key, max_tokens)
    admitted = statuses.count(200)
    if max_tokens:
        # Each call reserves its bound: 52 bytes of body / 3 = 17 prompt tokens and 7
        # output, $0.0001125. With 2 calls used ($0.000195), a 3rd new one fits beside
        # 2 held ($0.0005325 <= $0.00053625); a 4th beside 3 settled ($0.0006) never.
        assert admitted == 3
    period_spend = (2 + admitted) * CALL_NUSD
    assert period_spend <= budget_nusd + (0 if max_tokens else CALL_NUSD)
    events = gateway.events()
    assert len(events) == 3 + admitted
    assert sum(event["cost_nusd"] for event in events
               if event["created_ms"] >= (midnight - 2 * 3600) * 1000) == period_spend
    for instance in instances:
        shown = instance.admin.get(f"{instance.url}/admin/limits/{limit['id']}").json()
        assert shown["used"] == pytest.approx(period_spend / 1e9)
    assert gateway.reservations_held() == 0, "no reservation may leak"


def assert_running_totals_match_events(gateway):
    db = gateway.db()
    events = gateway.events()
    for subject, matches in (("*", lambda e: True),
                             (f"k:{events[0]['key_id']}", lambda e: True),
                             ("p:default", lambda e: True)):
        total = db.execute("select requests, tokens, cost_nusd from usage_counters"
                           " where subject = ? and day = 'total'", (subject,)).fetchone()
        mine = [e for e in events if matches(e)]
        assert tuple(total) == (len(mine),
                                sum(e["prompt_tokens"] + e["completion_tokens"] for e in mine),
                                sum(e["cost_nusd"] or 0 for e in mine))


def test_failed_calls_release_their_reservation(make_llimit, fake):
    gateway = make_llimit(upstream_timeout=0.2)
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="requests", window="day",
              amount=100)
    fake.behaviour["delay_first"] = 1.0
    assert call(gateway, raw_key).status_code == 504
    fake.behaviour.clear()
    fake.behaviour.update(cut_after=1)
    resp = call(gateway, raw_key, stream=True)
    resp.content
    gateway.wait_idle()
    assert gateway.reservations_held() == 0


def test_fail_closed_when_usage_cannot_be_written(make_llimit, fake, engine):
    if engine == "postgres":
        pytest.skip("SQLite's lock; test_postgres_outage_fails_closed_and_recovers is PostgreSQL's")
    gateway = make_llimit(commit_wait_seconds=1.0)  # the answer need not wait 10 s
    raw_key, key_id = gateway.create_key()
    add_limit(gateway, scope="key", target=key_id, metric="usd", window="day", amount=100)
    free_key, _ = gateway.create_key(user="no-limits")
    blocker = sqlite3.connect(gateway.config.db_path, isolation_level=None)
    blocker.execute("begin exclusive")
    try:
        # Its answer is withheld (no answer without a durable row); its usage waits in the queue.
        withheld = call(gateway, raw_key)
        assert withheld.status_code == 503
        assert withheld.json()["error"]["code"] == "ledger_unavailable"
        deadline = time.monotonic() + 20
        while gateway.state.writer.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        # Now known: every call is refused before it goes upstream (an answer
        # paid for would be withheld), limits or none, and /healthz says so.
        seen = len(fake.requests)
        for key in (raw_key, free_key):
            refused = call(gateway, key)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "ledger_unavailable"
        assert len(fake.requests) == seen
        health = requests.get(gateway.url + "/healthz")
        assert health.status_code == 503 and health.json()["error"]["code"] == "ledger_unavailable"
    finally:
        blocker.execute("rollback")
        blocker.close()
    gateway.wait_idle()
    assert len(gateway.events()) == 1, "the queued usage was written, not lost"
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, free_key).status_code == 200
    assert requests.get(gateway.url + "/healthz").status_code == 200


@pytest.mark.parametrize("body,field", [
    ({"scope": "nope", "metric": "usd", "window": "day", "amount": 1}, "scope"),
    ({"scope": "user", "metric": "usd", "window": "day", "amount": 1}, "target"),
    ({"scope": "global", "metric": "euros", "window": "day", "amount": 1}, "metric"),
    ({"scope": "global", "metric": "usd", "window": "year", "amount": 1}, "window"),
    ({"scope": "global", "metric": "usd", "window": "day", "amount": -1}, "amount"),
    ({"scope": "global", "metric": "usd", "window": "day", "amount": "1"}, "amount"),
    ({"scope": "global", "metric": "usd", "window": "day", "amount": 1, "alert_at": [120]},
     "alert_at"),
    ({"scope": "global", "metric": "usd", "window": "day", "amount": 1, "colour": "red"},
     "colour"),
])
def test_bad_limits_get_a_400_naming_the_field(gateway, body, field):
    resp = gateway.admin.post(gateway.url + "/admin/limits", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith(field)


class Webhook:
    """A real HTTP endpoint that collects alert posts."""

    def __init__(self, fail_first=0, answer_delay=0.0):
        self.posts, self.fail_first = [], fail_first
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hook.fail_first > 0:
                    hook.fail_first -= 1
                    self.send_response(500)
                else:
                    hook.posts.append(body)
                    time.sleep(answer_delay)  # seen here before llimit hears it was delivered
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count, timeout=15):
        deadline = time.monotonic() + timeout
        while len(self.posts) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.posts


def test_alerts_fire_once_per_threshold_even_across_restart(make_llimit, fake, tmp_path):
    # A stop just after the webhook has a post, before its answer: the stopping
    # instance still notes the alert delivered (it was resent by the next start).
    hook = Webhook(fail_first=1, answer_delay=0.5)
    db_path = str(tmp_path / "alerts.db")
    gateway = make_llimit(db_path=db_path, alert_webhook=hook.url)
    raw_key, key_id = gateway.create_key(user="ola")
    add_limit(gateway, scope="user", target="ola", metric="requests", window="day",
              amount=4, alert_at=[50])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: call(gateway, raw_key), range(3)))
    posts = hook.wait_for(1)
    assert len(posts) == 1 and "50%" in posts[0]["text"] and "ola" in posts[0]["text"]
    gateway.stop()
    again = make_llimit(db_path=db_path, alert_webhook=hook.url)
    call(again, raw_key)
    posts = hook.wait_for(2)
    call(again, raw_key)  # refused: still no further alert
    again.wait_idle()
    # Every alert is stored before it is posted: once both stored ones are delivered,
    # no further post can come.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stored = again.db().execute("select delivered_at from alerts_sent").fetchall()
        if all(row["delivered_at"] for row in stored):
            break
        time.sleep(0.05)
    assert len(stored) == 2 and all(row["delivered_at"] for row in stored)
    texts = [post["text"] for post in hook.posts]
    assert len(texts) == 2 and "reached" in texts[1]


def test_a_minute_window_survives_a_restart_and_counts_a_new_limits_past(make_llimit, fake,
                                                                         clock, tmp_path):
    clock.now = 1_794_999_980.0  # 20 s into a minute
    db_path = str(tmp_path / "persist.db")
    gateway = make_llimit(db_path=db_path)
    raw_key, _ = gateway.create_key(user="alice")
    assert call(gateway, raw_key).status_code == 200
    # Added after a call in this minute: it counts that call.
    add_limit(gateway, scope="user", target="alice", metric="requests", window="minute",
              amount=2)
    assert call(gateway, raw_key).status_code == 200
    assert call(gateway, raw_key).status_code == 429
    gateway.stop()
    clock.advance(10)
    again = make_llimit(db_path=db_path)
    blocked = call(again, raw_key)
    assert blocked.status_code == 429, blocked.text
    assert blocked.headers["Retry-After"] == "30"
    clock.advance(30)
    assert call(again, raw_key).status_code == 200


def test_postgres_outage_fails_closed_and_recovers(make_llimit, fake, engine, databases,
                                                   tmp_path_factory):
    if engine != "postgres":
        pytest.skip("test_fail_closed_when_usage_cannot_be_written is SQLite's")
    from tests.pg_proxy import PostgresRelay

    relay = PostgresRelay(databases("ledger"), str(tmp_path_factory.mktemp("relay")))
    try:
        gateway = make_llimit(db_path=relay.url, commit_wait_seconds=1)
        raw_key, key_id = gateway.create_key()
        add_limit(gateway, scope="key", target=key_id, metric="usd", window="day", amount=100)
        assert call(gateway, raw_key).status_code == 200
        # A call admitted before the outage, answered by the upstream during it:
        # its answer is withheld (not durable), and its usage is not lost.
        fake.behaviour["delay_first"] = 1.0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            under_way = pool.submit(call, gateway, raw_key)
            time.sleep(0.5)
            relay.cut()
            withheld = under_way.result()
            assert withheld.status_code == 503
            assert withheld.json()["error"]["code"] == "ledger_unavailable"
        fake.behaviour.clear()
        refused = call(gateway, raw_key)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "ledger_unavailable"
        assert requests.get(gateway.url + "/healthz").status_code == 503
        relay.restore()
        deadline = time.monotonic() + 30
        while call(gateway, raw_key).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert requests.get(gateway.url + "/healthz").status_code == 200
        gateway.wait_idle()
        deadline = time.monotonic() + 30
        while len(gateway.events()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(gateway.events()) == 3, "the call answered during the outage was metered"
        assert gateway.reservations_held() == 0
        assert_running_totals_match_events(gateway)
    finally:
        relay.close()


def test_reservations_of_a_killed_instance_expire(processes, fake, engine, databases):
    if engine != "postgres":
        pytest.skip("one SQLite process holds its reservations in memory")
    url = databases("shared")
    first = processes(db_path=url, name="first", LLIMIT_RESERVATION_SECONDS="3")
    second = processes(db_path=url, name="second", LLIMIT_RESERVATION_SECONDS="3")
    raw_key, key_id = first.create_key()
    add_limit(first, scope="key", target=key_id, metric="requests", window="day", amount=1)
    fake.behaviour["delay_first"] = 60
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(call, first, raw_key)
        deadline = time.monotonic() + 30
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        fake.behaviour.clear()
        assert call(second, raw_key).status_code == 429  # the first call holds the only one
        first.kill()
        first.wait()
    started = time.monotonic()
    while call(second, raw_key).status_code == 429 and time.monotonic() - started < 30:
        time.sleep(0.2)
    waited = time.monotonic() - started
    assert waited < 10, "the dead instance's reservation expired in its bounded time"
    assert call(second, raw_key).status_code == 429  # and the limit holds again
    assert len(second.events()) == 1
