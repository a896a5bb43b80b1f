"""llimit as its users run it: `python llimit.py serve` in a child process.

For the tests that stop, kill, load or read the log of a real llimit process;
the rest use the in-process server of conftest.py.

    proc = LlimitProcess(tmp_path, fake.url + "/v1", LLIMIT_GRACE_SECONDS="5")
    proc.url, proc.pid, proc.admin      # base URL, process id, admin session
    proc.terminate(); proc.wait()       # SIGTERM; the exit code
    proc.log()                          # everything it wrote to stderr and stdout
    proc.events()                       # usage rows read straight from its database
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import requests
import sseclient

from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLIMIT = os.path.join(ROOT, "llimit.py")


def llimit_command(*args):
    """The argv of `python llimit.py ARGS`, as `python -m llimit ARGS`: the same main(),
    from the bytecode conftest.py compiled once, where a script is compiled afresh on
    each run (0.16 s of CPU, times some 200 runs). Tests of the command as users type
    it spell out `python llimit.py`. Pass llimit_env() along."""
    return [sys.executable, "-m", "llimit", *args]


def llimit_env(env=None):
    """`env` (os.environ when None) with llimit.py importable from any directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (ROOT, env.get("PYTHONPATH"))))
    return env
SERVING = re.compile(r"serving on http://[\d.]+:(\d+)")
START_SECONDS = 30
WAIT = 60  # seconds: a generous bound on anything a test waits for


class LlimitProcess:
    """One `python llimit.py serve` on 127.0.0.1, a port of its own choosing."""

    def __init__(self, tmp_path, upstream_url, db_path=None, name="llimit", cwd=ROOT,
                 **settings):
        self.db_path = str(db_path or tmp_path / f"{name}.db")  # or a postgresql:// URL
        self.log_path = str(tmp_path / f"{name}-{time.monotonic_ns()}.log")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("LLIMIT_") and key != "OPENAI_API_KEY"}
        env.update(LLIMIT_HOST="127.0.0.1", LLIMIT_PORT="0", LLIMIT_DB=self.db_path,
                   LLIMIT_ADMIN_TOKEN=ADMIN_TOKEN, LLIMIT_UPSTREAM_URL=upstream_url,
                   LLIMIT_UPSTREAM_KEY=UPSTREAM_KEY, LLIMIT_CONNECT_TIMEOUT="2",
                   PYTHONUNBUFFERED="1")
        env.update({key: str(value) for key, value in settings.items()})
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(llimit_command("serve"), cwd=cwd, env=llimit_env(env),
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{self._wait_for_port()}"
        self.admin = requests.Session()
        self.admin.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"

    def _wait_for_port(self):
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            found = SERVING.search(self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("llimit did not start:\n" + self.log())

    def log(self):
        """What the process has written so far (stderr and stdout)."""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def create_key(self, user="alice", project="default", **fields):
        """A fresh key: (raw key, key id)."""
        resp = self.admin.post(self.url + "/admin/keys",
                               json={"user": user, "project": project, **fields}, timeout=30)
        assert resp.status_code == 201, resp.text
        return resp.json()["key"], resp.json()["id"]

    def metrics(self, **headers):
        """{sample line's name and labels: value} scraped from /metrics."""
        resp = requests.get(self.url + "/metrics", headers=headers, timeout=10)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    def terminate(self):
        """Send SIGTERM, as docker stop and Kubernetes do."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self):
        """Send SIGKILL: no cleanup of any kind."""
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout=60):
        """The exit code, once the process has exited."""
        return self.proc.wait(timeout)

    def peak_rss_kb(self):
        """The process's peak resident set size so far (VmHWM), in KiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def events(self):
        """Every usage row in the database, oldest first (the process may be gone)."""
        if self.db_path.startswith("postgresql://"):
            import psycopg
            import psycopg.rows

            with psycopg.connect(self.db_path, row_factory=psycopg.rows.dict_row) as db:
                return db.execute("select * from usage_events order by id").fetchall()
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute("select * from usage_events order by id")]
        finally:
            db.close()

    def close(self):
        """Stop the process if it still runs, and close its log."""
        if self.proc.poll() is None:
            self.kill()
            self.proc.wait(30)
        self._log_file.close()


def parse_metrics(text):
    """Prometheus text as {'name{labels}': float}; comments skipped."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def chat(proc, raw_key, stream=False, content="Hi", model="gpt-4o", timeout=WAIT):
    """One chat call: (status, request id, JSON body or list of SSE data strings)."""
    resp = requests.post(proc.url + "/v1/chat/completions", timeout=timeout, stream=stream,
                         headers={"Authorization": f"Bearer {raw_key}"},
                         json={"model": model, "stream": stream,
                               "messages": [{"role": "user", "content": content}]})
    request_id = resp.headers.get("X-LLimit-Request-Id")
    if not stream or resp.status_code != 200:
        return resp.status_code, request_id, resp.json()
    events = sseclient.SSEClient(resp.iter_content(chunk_size=None)).events()
    return resp.status_code, request_id, [event.data for event in events]


def complete_stream(data, chunks):
    """True when a relayed stream has every content chunk and ends with [DONE]."""
    pieces = [json.loads(item) for item in data[:-1]]
    return (bool(data) and data[-1] == "[DONE]" and len(pieces) == chunks
            and all(piece.get("choices") for piece in pieces))


def wait_until(condition, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
