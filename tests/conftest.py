"""Real servers for the tests: a fake upstream speaking each provider's wire
format, and llimit itself under waitress, both on 127.0.0.1 port 0."""

import dataclasses
import threading
import time

import pytest
import requests
import waitress
import waitress.wasyncore

import llimit
from tests.fake_upstream import FakeUpstream

ADMIN_TOKEN = "test-admin-token"
UPSTREAM_KEY = "sk-upstream-secret-123"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a long load test; CI runs it, `-m \"not slow\"` skips it locally")


class Clock:
    """A settable clock for llimit's config, so window tests never sleep."""

    def __init__(self, now=None):
        self.now = time.time() if now is None else now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class LlimitServer:
    """llimit's make_app(config) under waitress in this process."""

    def __init__(self, config):
        self.config = config
        self.app = llimit.make_app(config)
        self.state = self.app.llimit.start()  # as serve() does: the threads start here
        self.server = waitress.create_server(self.app, host="127.0.0.1", port=0,
                                             threads=config.threads, asyncore_use_poll=True)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        # As `serve` does once bound: links and redirects name the port it got.
        self.config = self.state.config = dataclasses.replace(
            config, host="127.0.0.1", port=self.server.effective_port)
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.admin = requests.Session()
        self.admin.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"

    def _serve(self):
        # waitress's loop in slices of at most 50 ms, so that it sees stop() soon and
        # closes every socket itself: nothing is closed under its poll, and no other
        # thread writes to its trigger (a thunk that closed the trigger could run, on
        # a wake-up already pending, before pull_trigger had written to it).
        while not self._stopping.is_set():
            waitress.wasyncore.loop(timeout=0.05, map=self.server._map, use_poll=True,
                                    count=1)
        waitress.wasyncore.close_all(self.server._map)

    def create_key(self, user="alice", project="default", **fields):
        """A fresh key: (raw key, key id)."""
        resp = self.admin.post(self.url + "/admin/keys",
                               json={"user": user, "project": project, **fields})
        assert resp.status_code == 201, resp.text
        return resp.json()["key"], resp.json()["id"]

    def db(self):
        """A connection to llimit's database, for reading rows back."""
        return llimit.connect(self.config.db_path)

    def events(self):
        """Every stored usage event, oldest first, once the writer is idle."""
        self.wait_idle()
        return [dict(row) for row in self.db().execute(
            "select * from usage_events order by id")]

    def wait_idle(self, timeout=60):
        """Return once every usage event submitted so far is committed (and counted)."""
        assert self.state.writer.flush(timeout), f"usage still uncommitted after {timeout} s"

    def stop(self):
        """Stop serving and close llimit (its usage writer included); safe to call twice."""
        self.server.task_dispatcher.shutdown(timeout=2)
        self._stopping.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "waitress's loop did not stop"
        self.state.close()


@pytest.fixture
def fake():
    """A fake upstream (OpenAI, Azure and Anthropic wire formats)."""
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_llimit(tmp_path, fake, clock):
    """Start llimit with config overrides; stopped after the test."""
    servers = []

    def start(**overrides):
        settings = dict(db_path=str(tmp_path / f"llimit{len(servers)}.db"),
                        admin_token=ADMIN_TOKEN, upstream_url=fake.url + "/v1",
                        upstream_key=UPSTREAM_KEY, threads=48, clock=clock,
                        upstream_timeout=5.0, connect_timeout=2.0)
        settings.update(overrides)
        server = LlimitServer(dataclasses.replace(llimit.Config(), **settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(make_llimit):
    """llimit with default settings in front of the fake upstream."""
    return make_llimit()


@pytest.fixture
def processes(tmp_path, fake):
    """Start `python llimit.py serve` processes (tests/process.py); stopped after the test."""
    from tests.process import LlimitProcess  # not at the top: it imports this module

    started = []

    def start(**settings):
        proc = LlimitProcess(tmp_path, fake.url + "/v1", **settings)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium (tests/browser.py), one for each test module that asks."""
    from tests.browser import start_chromium

    driver = start_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()
