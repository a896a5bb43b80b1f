"""llimit under load, as a real process: many long streams at once, and sustained
calls from many clients, with every call metered exactly once."""

import concurrent.futures
import itertools
import threading
import time

import pytest

from tests.process import WAIT, chat, complete_stream, wait_until

pytestmark = pytest.mark.slow  # about a minute; `-m "not slow"` skips it locally, CI runs it

STREAMS = 200
STREAM_SECONDS = 30
LOAD_THREADS = 16
LOAD_SECONDS = 10  # thousands of calls from 16 threads here, each row checked


def test_200_streams_open_for_30_seconds_all_complete(processes, fake):
    """One waitress thread per open stream: LLIMIT_THREADS must exceed the streams."""
    fake.behaviour.update(chunks=STREAM_SECONDS + 1, chunk_delay=1.0)
    # 20 streams per key and user here: above the default concurrency caps of 16.
    proc = processes(LLIMIT_THREADS="256", LLIMIT_MAX_CONCURRENT_PER_KEY="32",
                     LLIMIT_MAX_CONCURRENT_PER_USER="32")
    keys = [proc.create_key(user=f"u{i}") for i in range(10)]
    idle_rss_kb = proc.peak_rss_kb()
    most_open = []

    def watch():
        while not done.is_set():
            most_open.append(proc.metrics()["llimit_open_streams"])
            time.sleep(0.5)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            results = list(pool.map(
                lambda i: chat(proc, keys[i % 10][0], stream=True, timeout=WAIT * 2),
                range(STREAMS)))
    finally:
        done.set()
        watcher.join(WAIT)
    peak_rss_kb = proc.peak_rss_kb()
    assert all(status == 200 and complete_stream(data, STREAM_SECONDS + 1)
               for status, _, data in results)
    assert max(most_open) == STREAMS, "the streams were not all open at once"
    wait_until(lambda: len(proc.events()) == STREAMS, what="a row per stream")
    rows = proc.events()
    assert all(row["pricing"] == "priced" and row["stream"] == 1 for row in rows)
    assert sum(row["completion_tokens"] for row in rows) == STREAMS * 7
    print(f"\n{STREAMS} streams x {STREAM_SECONDS} s: peak RSS {peak_rss_kb / 1024:.0f} MiB"
          f" (idle {idle_rss_kb / 1024:.0f} MiB)")


def test_sustained_load_loses_and_doubles_no_row(processes, fake):
    proc = processes()
    keys = [proc.create_key(user=f"u{i}") for i in range(LOAD_THREADS)]
    stop_at = time.monotonic() + LOAD_SECONDS

    def vary_usage():  # so that a lost or doubled row shows in the token sums too
        figures = itertools.cycle(range(1, 1000, 7))
        while time.monotonic() < stop_at:
            fake.behaviour.update(prompt_tokens=next(figures), completion_tokens=next(figures))
            time.sleep(0.003)

    varier = threading.Thread(target=vary_usage)
    varier.start()

    def client(raw_key):
        made = []
        while time.monotonic() < stop_at:
            status, _, body = chat(proc, raw_key)
            assert status == 200, body
            made.append(body["usage"])
        return made

    with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
        made = list(pool.map(client, [raw_key for raw_key, _ in keys]))
    varier.join(WAIT)
    calls = sum(len(usages) for usages in made)
    wait_until(lambda: len(proc.events()) >= calls, what="a row per call")
    rows = proc.events()
    assert len(rows) == calls == len(fake.requests)
    for (_, key_id), usages in zip(keys, made):
        assert sum(1 for row in rows if row["key_id"] == key_id) == len(usages)
    assert len({usage["prompt_tokens"] for usages in made for usage in usages}) > 50
    assert sum(row["prompt_tokens"] for row in rows) == \
        sum(usage["prompt_tokens"] for usages in made for usage in usages)
    assert sum(row["completion_tokens"] for row in rows) == \
        sum(usage["completion_tokens"] for usages in made for usage in usages)
    metrics = proc.metrics()
    assert metrics['llimit_requests_total{project="default",model="gpt-4o",status="200"}'] \
        == calls
    print(f"\nsustained load: {calls} calls from {LOAD_THREADS} threads in {LOAD_SECONDS} s,"
          f" {len(rows)} rows, 0 lost, 0 doubled")
