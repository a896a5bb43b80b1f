"""llimit as it runs in production: a real `python llimit.py serve` process that is
stopped, killed, starved of its database, scraped and read, with calls under way."""

import concurrent.futures
import json
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests
import sseclient

from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY
from tests.process import WAIT, chat, complete_stream, llimit_env, wait_until

ENGINES = ("sqlite", "postgres")


def rows_by_key(proc):
    counts = {}
    for row in proc.events():
        counts[row["key_id"]] = counts.get(row["key_id"], 0) + 1
    return counts


def refuses_connections(proc):
    try:
        requests.get(proc.url + "/healthz", timeout=5)
    except requests.ConnectTimeout:
        return False
    except requests.ConnectionError:
        return True
    except requests.Timeout:
        return False  # connected, but not answered
    return False


# --- SIGTERM ---------------------------------------------------------------------------

def test_sigterm_refuses_new_connections_lets_open_calls_finish_and_meters_each_once(
        processes, fake, engine):
    chunks = 20
    fake.behaviour.update(chunks=chunks, chunk_delay=0.5, delay_first=1.0)
    proc = processes(LLIMIT_GRACE_SECONDS="30")
    keys = [proc.create_key(user=f"u{i}") for i in range(10)]
    streamed, whole = keys[:5], keys[5:]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        futures = {pool.submit(chat, proc, raw_key, stream=True): key_id
                   for raw_key, key_id in streamed}
        futures.update({pool.submit(chat, proc, raw_key): key_id for raw_key, key_id in whole})
        wait_until(lambda: len(fake.requests) == 10, what="every call to reach the upstream")
        proc.terminate()
        wait_until(lambda: refuses_connections(proc), timeout=10, what="connections refused")
        # Refused while the streams (about 10 s each) are still being relayed.
        assert proc.proc.poll() is None
        results = {futures[future]: future.result() for future in futures}
    assert proc.wait(timeout=WAIT) == 0
    for _, key_id in streamed:
        status, _, data = results[key_id]
        assert status == 200 and complete_stream(data, chunks), data
    for _, key_id in whole:
        status, _, body = results[key_id]
        assert status == 200 and body["choices"][0]["message"]["content"], body
    assert rows_by_key(proc) == {key_id: 1 for _, key_id in keys}
    assert all(row["pricing"] == "priced" for row in proc.events())
    assert "stopped; every finished call is metered" in proc.log()


def test_a_stream_longer_than_the_grace_period_is_cut_and_metered_as_estimated(
        processes, fake, engine):
    fake.behaviour["stall_after_first"] = 600  # the upstream never ends by itself
    proc = processes(LLIMIT_GRACE_SECONDS="1.5")
    raw_key, key_id = proc.create_key()
    resp = requests.post(proc.url + "/v1/chat/completions", stream=True, timeout=WAIT,
                         headers={"Authorization": f"Bearer {raw_key}"},
                         json={"model": "gpt-4o", "stream": True,
                               "messages": [{"role": "user", "content": "Hi"}]})
    events = sseclient.SSEClient(resp.iter_content(chunk_size=None)).events()
    first = json.loads(next(events).data)
    assert first["choices"]
    proc.terminate()
    rest = [event.data for event in events]
    assert proc.wait(timeout=WAIT) == 0
    assert "[DONE]" not in rest
    assert "error" in json.loads(rest[-1])
    rows = proc.events()
    assert [(row["key_id"], row["pricing"], row["stream"]) for row in rows] == \
        [(key_id, "estimated", 1)]
    assert rows[0]["completion_tokens"] > 0
    assert "grace period over: cutting 1 open streams" in proc.log()


# --- kill -9 ---------------------------------------------------------------------------

def test_after_kill_9_under_load_every_completed_call_has_exactly_one_row(
        processes, fake, engine):
    fake.behaviour.update(delay_first=0.05, chunk_delay=0.05)
    proc = processes()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        spare = list(pool.map(lambda i: proc.create_key(user=f"u{i % 7}"), range(800)))
    completed, attempted, lock, killed = [], [], threading.Lock(), threading.Event()

    def client(stream):
        while not killed.is_set():
            with lock:
                if not spare:
                    return
                raw_key, key_id = spare.pop()
                attempted.append(key_id)
            try:
                status, _, result = chat(proc, raw_key, stream=stream, timeout=30)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                continue  # cut by the kill
            whole = status == 200 and (complete_stream(result, 3) if stream
                                       else result["choices"][0]["message"]["content"])
            if whole:
                with lock:
                    completed.append(key_id)

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(completed) >= 300, what="300 completed calls")
    proc.kill()
    killed.set()
    for thread in threads:
        thread.join(WAIT)
    assert proc.wait() == -9
    assert 300 <= len(completed) <= len(attempted) < 800  # the kill came mid-load
    print(f"kill -9: {len(attempted)} calls sent, {len(completed)} completed")

    again = processes(db_path=proc.db_path)
    rows = rows_by_key(again)
    assert all(rows.get(key_id) == 1 for key_id in completed), "a completed call lost its row"
    assert max(rows.values()) == 1, "a call counted twice"
    assert set(rows) <= set(attempted)
    print(f"kill -9: {len(rows)} rows after restart, 0 completed calls without a row")
    # The restarted process meters on the same database.
    assert chat(again, *[raw for raw, key_id in spare[:1]])[0] == 200
    wait_until(lambda: len(again.events()) == len(rows) + 1, what="the new call's row")
    if engine == "sqlite":
        db = sqlite3.connect(proc.db_path)
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        db.close()


# --- a locked database -----------------------------------------------------------------

@pytest.mark.parametrize("lock_seconds", [3, 8])
def test_calls_survive_another_process_locking_the_database(processes, fake, lock_seconds):
    """8 s is longer than llimit's busy_timeout (5 s): the usage writer must retry."""
    proc = processes()
    keys = [proc.create_key(user=f"u{i}") for i in range(4)]
    locker = sqlite3.connect(proc.db_path, timeout=30, isolation_level=None)
    results, lock = [], threading.Lock()
    stop_at = []

    def client(raw_key, stream):
        while not stop_at or time.monotonic() < stop_at[0]:
            try:
                status, _, result = chat(proc, raw_key, stream=stream, timeout=WAIT)
            except requests.Timeout:
                status, result = "timeout", None
            with lock:
                results.append((raw_key, stream, status, result))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(raw_key, i % 2 == 1))
               for i, (raw_key, _) in enumerate(keys)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(results) >= 8, what="calls before the lock")
    locker.execute("begin exclusive")
    time.sleep(lock_seconds)
    before_release = len(results)
    locker.execute("commit")
    locker.close()
    stop_at.append(time.monotonic() + 1.0)
    for thread in threads:
        thread.join(WAIT * 2)
    assert not any(thread.is_alive() for thread in threads)

    statuses = {status for *_, status, _ in results}
    assert statuses <= {200, 503}, statuses
    ok = [(raw_key, stream, result) for raw_key, stream, status, result in results
          if status == 200]
    for raw_key, stream, result in ok:
        assert complete_stream(result, 3) if stream else result["usage"]["total_tokens"] == 18
    for *_, status, result in results:
        if status == 503:
            assert result["error"]["type"] == "service_unavailable", result
    wait_until(lambda: len(proc.events()) >= len(ok), what="every successful call's row")
    counts = rows_by_key(proc)
    for raw_key, key_id in keys:
        made = sum(1 for key, _, status, _ in results if key == raw_key and status == 200)
        assert counts.get(key_id, 0) == made, (key_id, made, counts)
    assert "unexpected error" not in proc.log()
    if lock_seconds > 5:  # the writer gave up waiting once, and tried again
        assert "usage write failed" in proc.log()
    print(f"lock {lock_seconds}s: {len(results)} calls, {len(ok)} ok, "
          f"{before_release} answered before the lock ended, {len(proc.events())} rows")


# --- /metrics --------------------------------------------------------------------------

def test_metrics_of_a_real_process_after_a_mix_of_calls(processes, fake, engine):
    proc = processes()
    raw_key, _ = proc.create_key()
    for _ in range(2):
        assert chat(proc, raw_key)[0] == 200
    status, _, data = chat(proc, raw_key, stream=True, model="gpt-4o-mini")
    assert status == 200 and complete_stream(data, 3)
    fake.behaviour["status"] = 500
    assert chat(proc, raw_key)[0] == 500
    fake.reset()
    limited_key, limited_id = proc.create_key(user="bob")
    resp = proc.admin.post(proc.url + "/admin/limits", timeout=WAIT, json={
        "scope": "key", "target": limited_id, "metric": "requests", "window": "minute",
        "amount": 1})
    assert resp.status_code == 201, resp.text
    assert chat(proc, limited_key)[0] == 200
    assert chat(proc, limited_key)[0] == 429

    # The 429's refusal count is written after the five rows: idle means an empty queue.
    wait_until(lambda: len(proc.events()) == 5
               and proc.metrics()["llimit_usage_queue_depth"] == 0, what="five rows, idle")
    metrics = proc.metrics()
    calls = lambda model, status: metrics.get(  # noqa: E731
        f'llimit_requests_total{{project="default",model="{model}",status="{status}"}}')
    assert calls("gpt-4o", 200) == 3
    assert calls("gpt-4o-mini", 200) == 1
    assert calls("gpt-4o", 500) == 1
    assert sum(value for name, value in metrics.items()
               if name.startswith("llimit_requests_total")) == 5
    tokens = lambda model, kind: metrics[  # noqa: E731
        f'llimit_tokens_total{{project="default",model="{model}",kind="{kind}"}}']
    assert (tokens("gpt-4o", "prompt"), tokens("gpt-4o", "completion")) == (33, 21)
    assert (tokens("gpt-4o-mini", "prompt"), tokens("gpt-4o-mini", "completion")) == (11, 7)
    for model in ("gpt-4o", "gpt-4o-mini"):
        stored = sum(row["cost_nusd"] or 0 for row in proc.events() if row["model"] == model)
        shown = metrics[f'llimit_cost_usd_total{{project="default",model="{model}"}}']
        assert stored > 0 and shown == pytest.approx(stored / 1e9)
    buckets = [(name, value) for name, value in metrics.items()
               if name.startswith("llimit_upstream_latency_seconds_bucket")]
    counts = [value for _, value in buckets]
    assert len(buckets) > 5 and buckets[-1][0].endswith('{le="+Inf"}')
    assert counts == sorted(counts), "buckets must be cumulative"
    assert counts[-1] == metrics["llimit_upstream_latency_seconds_count"] == 5
    assert metrics["llimit_upstream_latency_seconds_sum"] > 0
    assert metrics['llimit_rejections_total{type="rate_limit_exceeded"}'] == 1
    assert metrics["llimit_usage_queue_depth"] == 0
    assert metrics["llimit_open_streams"] == 0

    fake.behaviour["stall_after_first"] = 120  # open until the process is stopped
    resp = requests.post(proc.url + "/v1/chat/completions", stream=True, timeout=WAIT,
                         headers={"Authorization": f"Bearer {raw_key}"},
                         json={"model": "gpt-4o", "stream": True, "messages": []})
    next(sseclient.SSEClient(resp.iter_content(chunk_size=None)).events())
    assert proc.metrics()["llimit_open_streams"] == 1
    resp.close()


# --- the log ---------------------------------------------------------------------------

FORGED_MODEL = 'gpt-4o" status=200\n2026-01-01 00:00:00,000 INFO llimit call request_id=forged'
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+ ")
LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
CALL_FIELDS = ("method", "path", "status", "project", "user", "model", "prompt_tokens",
               "completion_tokens", "cost_usd", "latency_ms")


def secret_marked_calls(processes, fake, log_format):
    """Calls (and failed sign-ins) whose prompt, completion and every secret carry a
    marker; returns (the process, the marker, the raw key, the calls answered); one
    more call, with a wrong key, is refused."""
    marker = secrets.token_hex(8)
    proc = processes(LLIMIT_LOG_FORMAT=log_format, LLIMIT_ADMIN_TOKEN=f"admin-{marker}",
                     LLIMIT_UPSTREAM_KEY=f"sk-upstream-{marker}")
    proc.admin.headers["Authorization"] = f"Bearer admin-{marker}"
    raw_key, _ = proc.create_key(user="alice")
    fake.behaviour["text"] = f"completion-{marker}"
    prompt = f"prompt-{marker}"
    assert chat(proc, raw_key, content=prompt)[2]["choices"][0]["message"]["content"] == \
        f"completion-{marker}"
    assert complete_stream(chat(proc, raw_key, stream=True, content=prompt)[2], 3)
    assert chat(proc, raw_key, model=FORGED_MODEL)[0] == 200
    assert chat(proc, f"llimit-wrong-{marker}", content=prompt)[0] == 401
    assert requests.get(proc.url + "/admin/keys", timeout=WAIT,
                        headers={"Authorization": f"Bearer admin-{marker}x"}).status_code == 401
    # The upstream got the upstream key, so it was in the process all along.
    assert fake.requests[-1].headers["Authorization"] == f"Bearer sk-upstream-{marker}"
    proc.terminate()
    assert proc.wait(timeout=WAIT) == 0
    return proc, marker, raw_key, 3


def assert_no_secrets(log, marker, raw_key):
    assert marker not in log
    assert raw_key not in log and raw_key[-12:] not in log
    assert ADMIN_TOKEN not in log and UPSTREAM_KEY not in log


def test_text_log_has_one_line_per_call_and_no_secret(processes, fake):
    proc, marker, raw_key, calls = secret_marked_calls(processes, fake, "text")
    log = proc.log()
    assert_no_secrets(log, marker, raw_key)
    lines = log.splitlines()
    assert all(TEXT_LINE.match(line) for line in lines), \
        [line for line in lines if not TEXT_LINE.match(line)]
    call_lines = [line for line in lines if " llimit call " in line]
    assert len(call_lines) == calls + 1
    parsed = [{name: json.loads(value) if value.startswith('"') else value
               for name, value in LOGFMT_FIELD.findall(line.split(" llimit call ", 1)[1])}
              for line in call_lines]
    parsed, refused = parsed[:calls], parsed[calls]
    assert (refused["status"], refused["key_id"], refused["pricing"], refused["path"]) == \
        ("401", "-", "refused", "/v1/chat/completions")
    for fields in parsed:
        assert set(CALL_FIELDS) <= set(fields), fields
        assert (fields["method"], fields["path"], fields["status"], fields["project"],
                fields["user"]) == ("POST", "/v1/chat/completions", "200", "default", "alice")
        assert (fields["prompt_tokens"], fields["completion_tokens"]) == ("11", "7")
        assert float(fields["latency_ms"]) > 0
    assert [fields["model"] for fields in parsed] == ["gpt-4o", "gpt-4o", FORGED_MODEL]
    assert [fields["stream"] for fields in parsed] == ["False", "True", "False"]
    assert float(parsed[0]["cost_usd"]) > 0
    assert "request_id=forged" not in [fields["request_id"] for fields in parsed]


def test_json_log_lines_are_each_valid_json_with_the_call_fields(processes, fake):
    proc, marker, raw_key, calls = secret_marked_calls(processes, fake, "json")
    log = proc.log()
    assert_no_secrets(log, marker, raw_key)
    entries = [json.loads(line) for line in log.splitlines()]
    call_entries = [entry for entry in entries if entry.get("event") == "call"]
    assert len(call_entries) == calls + 1
    call_entries, refused = call_entries[:calls], call_entries[calls]
    assert (refused["status"], refused["key_id"], refused["pricing"]) == (401, None, "refused")
    for entry in call_entries:
        assert set(CALL_FIELDS) <= set(entry), entry
        assert (entry["method"], entry["path"], entry["status"], entry["project"],
                entry["user"]) == ("POST", "/v1/chat/completions", 200, "default", "alice")
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (11, 7)
        assert entry["latency_ms"] > 0
    assert [entry["model"] for entry in call_entries] == ["gpt-4o", "gpt-4o", FORGED_MODEL]
    assert [entry["stream"] for entry in call_entries] == [False, True, False]
    # The forged model has no price: metered, and logged, with a null cost.
    assert call_entries[0]["cost_usd"] > 0 and call_entries[2]["cost_usd"] is None
    assert any("serving on" in entry.get("message", "") for entry in entries)


def test_sigterm_with_the_database_locked_past_the_writers_wait_exits_1_and_says_so(
        processes, fake, tmp_path):
    """The usage writer waits LLIMIT_WRITER_CLOSE_SECONDS at shutdown; a longer lock must
    not pass as a clean stop. Both of llimit's waits are shortened to keep the test short."""
    proc = processes(LLIMIT_GRACE_SECONDS="1", LLIMIT_COMMIT_WAIT_SECONDS="2",
                     LLIMIT_WRITER_CLOSE_SECONDS="2")
    raw_key, _ = proc.create_key()
    assert chat(proc, raw_key)[0] == 200
    wait_until(lambda: len(proc.events()) == 1, what="the first row")
    locker = sqlite3.connect(proc.db_path, timeout=30, isolation_level=None)
    locker.execute("begin exclusive")
    try:
        # Withheld (503) after llimit's commit wait (2 s here), its row still queued.
        status, request_id, _ = chat(proc, raw_key)
        assert status == 503
        # The log is written by its own thread: the line may follow the answer by a moment.
        wait_until(lambda: f"usage of request_id={request_id} not yet committed after 2.0s"
                   in proc.log(), timeout=10, what="the log line of the withheld call")
        proc.terminate()
        # The lock is held far past the 2 s wait: a writer that waited its default 30 s
        # instead would commit once the lock goes, and the process would exit 0.
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            code = "still running 20 s after SIGTERM"
    finally:
        locker.execute("rollback")
        locker.close()
    assert code == 1
    assert "stopped with usage unwritten" in proc.log()
    assert "every finished call is metered" not in proc.log()


# --- imports put off until a server needs them ---------------------------------------------

def test_a_server_finishes_the_imports_it_put_off_before_its_threads_start(tmp_path):
    # CLI commands skip importing urllib3, sseclient and requests. importlib's LazyLoader
    # is not thread-safe on Python 3.11: two first streams at once found sseclient
    # half-loaded, and one was answered 500 (yet metered).
    script = ("import dataclasses, sys, types, llimit\n"
              "names = ('requests', 'sseclient', 'urllib3')\n"
              "def loaded(): return [type(sys.modules[name]) is types.ModuleType for name in names]\n"
              "config = dataclasses.replace(llimit.Config(), db_path=sys.argv[1],"
              " admin_token='t' * 32)\n"
              "state = llimit.make_app(config).llimit.start()\n"
              "print(loaded())\n"
              "state.close()\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "llimit.db")],
                          env=llimit_env(), capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[True, True, True]"
