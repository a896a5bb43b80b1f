#!/usr/bin/env python3
"""How long llimit takes to refuse a wrong key or admin token: a secret wrong only in
its last character (near the right one) against one wrong in its first (far from it).

    python bench/secret_timing.py               # 300 calls of each, after 20 to warm up
    python bench/secret_timing.py --rounds 1000

llimit's app runs in this process under waitress on 127.0.0.1, on a temporary
database; nothing goes upstream (a wrong secret never does). One client sends
every call on one keep-alive connection, near and far in turn. The clock llimit
reads moves on 4 s per call, so its throttle (20 wrong secrets a minute from an
address, then 429) never answers: every call is a plain 401, and anything else
stops the run. Prints the medians as README's "Guessing secrets" table shows them.

Measured, not asserted: the tests check what can be checked without timing (keys
are looked up by their SHA-256, the admin token is compared with
hmac.compare_digest; tests/test_hostile.py).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time

import requests
import waitress
import waitress.wasyncore

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llimit  # noqa: E402  (the llimit.py of this checkout)

ADMIN_TOKEN = "bench-admin-token"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
WARM_UP = 20
CLOCK_STEP = 4.0  # seconds per call: 20 failures span 80 s, more than the throttle's minute


class Clock:
    """llimit's clock, moved on by hand."""

    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def flip(char):
    return "B" if char == "A" else "A"


def serve(config):
    """llimit under waitress in a thread: (base URL, stop function)."""
    app = llimit.make_app(config)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4,
                                    asyncore_use_poll=True)
    stopping = threading.Event()

    def run():  # waitress's loop in 50 ms slices; it closes its sockets itself at the end
        while not stopping.is_set():
            waitress.wasyncore.loop(timeout=0.05, map=server._map, use_poll=True, count=1)
        waitress.wasyncore.close_all(server._map)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop():
        server.task_dispatcher.shutdown(timeout=2)
        stopping.set()
        thread.join(10)
        app.llimit.close()

    return f"http://127.0.0.1:{server.effective_port}", stop


def measure(send, near, far, rounds, clock):
    """Median milliseconds of a refused call for the near and the far secret."""
    times = {"near": [], "far": []}
    for round_number in range(rounds + WARM_UP):
        for which, secret in (("near", near), ("far", far)):
            started = time.perf_counter()
            resp = send(secret)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if resp.status_code != 401:
                raise SystemExit(f"expected 401 for a wrong secret, got {resp.status_code}:"
                                 f" {resp.text[:300]}")
            clock.now += CLOCK_STEP
            if round_number >= WARM_UP:
                times[which].append(elapsed_ms)
    return {which: statistics.median(values) for which, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300,
                        help="measured calls of each secret (default 300)")
    args = parser.parse_args(argv)
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="llimit-secret-timing-") as tmp:
        config = dataclasses.replace(
            llimit.Config(), db_path=os.path.join(tmp, "llimit.db"), admin_token=ADMIN_TOKEN,
            upstream_url="http://127.0.0.1:9/v1", upstream_key="sk-unused", threads=4,
            clock=clock, log_level="ERROR")
        url, stop = serve(config)
        try:
            session = requests.Session()
            created = session.post(url + "/admin/keys", json={"user": "bench"},
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            created.raise_for_status()
            raw_key = created.json()["key"]

            def key_call(secret):
                return session.post(url + "/v1/chat/completions", json=CHAT,
                                    headers={"Authorization": f"Bearer {secret}"})

            def token_call(secret):
                return session.get(url + "/admin/projects",
                                   headers={"Authorization": f"Bearer {secret}"})

            pairs = {
                "key": (key_call, raw_key[:-1] + flip(raw_key[-1]),
                        raw_key[:7] + flip(raw_key[7]) + raw_key[8:]),
                "admin token": (token_call, ADMIN_TOKEN[:-1] + "X", "X" + ADMIN_TOKEN[1:]),
            }
            figures = {name: measure(send, near, far, args.rounds, clock)
                       for name, (send, near, far) in pairs.items()}
        finally:
            stop()
    print(f"Median time of a refused call, {args.rounds} calls each (one client,"
          " HTTP keep-alive):\n")
    print("| secret | last character wrong | first character wrong |")
    print("|---|---|---|")
    for name, medians in figures.items():
        print(f"| {name} | {medians['near']:.3f} ms | {medians['far']:.3f} ms |")


if __name__ == "__main__":
    main()
