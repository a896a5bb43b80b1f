"""Real servers for the tests: a fake upstream speaking each provider's wire
format, and llimit itself under waitress, both on 127.0.0.1 port 0."""

import dataclasses
import glob
import importlib
import importlib.util
import os
import pathlib
import py_compile
import secrets
import threading
import time
import urllib.parse

import pytest
import requests
import waitress
import waitress.wasyncore

import llimit
from tests.fake_upstream import FakeUpstream

# Every server of the tests listens on 127.0.0.1: so that requests does not look
# through the environment for a proxy on each call (a sixth of a call's CPU).
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


TESTS = os.path.dirname(os.path.abspath(__file__))
ADMIN_TOKEN = "test-admin-token"
UPSTREAM_KEY = "sk-upstream-secret-123"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a long load test; CI runs it, `-m \"not slow\"` skips it locally")
    config.addinivalue_line(
        "markers", "engines(*names): the engines this test runs on, instead of its module's"
        " ENGINES (sqlite_only: a test of input or of SQLite itself)")
    if not hasattr(config, "workerinput"):  # once, before pytest -n starts its workers
        compile_once(config)


def compile_once(config):
    """Write the bytecode that every test process and every `python -m llimit` of
    the tests reads (tests/process.py), even under PYTHONDONTWRITEBYTECODE: each
    pytest worker would otherwise compile the helpers and rewrite the asserts of
    every test module itself (2.5 s of its CPU, of 5 for collecting them all)."""
    rewritten, compiled = [], [llimit.__file__]
    for path in glob.glob(os.path.join(TESTS, "*.py")):
        name = os.path.basename(path)
        (rewritten if name == "conftest.py" or name.startswith("test_") else compiled).append(
            pathlib.Path(path))
    for path in compiled:
        py_compile.compile(path, cfile=importlib.util.cache_from_source(path), doraise=True)
    # The asserts as pytest rewrites them, where each worker looks for them first;
    # through pytest internals, so a change there only skips this.
    try:
        from _pytest.assertion import rewrite

        for source in rewritten:
            cached = rewrite.get_cache_dir(source) / (source.stem + rewrite.PYC_TAIL)
            if rewrite._read_pyc(source, cached) is None and rewrite.try_makedirs(
                    cached.parent):
                source_stat, code = rewrite._rewrite_test(source, config)
                rewrite._write_pyc(config.stash[rewrite.assertstate_key], code,
                                   source_stat, cached)
    except (ImportError, AttributeError, KeyError, TypeError):
        pass


class LazyModule:
    """A client SDK, imported when a test first uses one of its names: at collection,
    the SDKs cost each pytest worker 3 s of CPU (anthropic alone 1.7 s), also a
    worker that runs none of their tests. Names with a leading underscore never
    import it: pytest looks at every module-level object while collecting."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(importlib.import_module(self._name), attribute)


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
        self._reader = None

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
        if llimit.is_postgres_url(self.config.db_path):
            if self._reader is None:  # its own pool, so it outlives stop()
                self._reader = llimit.open_database(self.config.db_path, pool_size=2)
            return self._reader()
        return llimit.connect(self.config.db_path)

    def close_reader(self):
        if self._reader is not None:
            self._reader.close()

    def reservations_held(self):
        """Calls under way that hold a reservation: in memory (SQLite) or shared (PostgreSQL)."""
        if isinstance(self.state.limits, llimit.SharedLimits):
            # Settled by the usage writer's commit, which may still be under way.
            deadline = time.monotonic() + 10
            while llimit.count_reservations(self.db()) and time.monotonic() < deadline:
                time.sleep(0.05)
            return llimit.count_reservations(self.db())
        return len(self.state.limits._reserved)

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


# --- the database engines ------------------------------------------------------
# A test module that sets ENGINES = ("sqlite", "postgres") runs each test that
# starts llimit on both; a test marked `sqlite_only` (its input reaches no
# storage, or it tests SQLite itself) runs on SQLite alone. PostgreSQL is the
# server at LLIMIT_TEST_POSTGRES_URL, or else the local one tests/install.sh
# starts (database llimit_test, made when missing); each test gets schemas of
# its own, which no other test uses at the same time (SchemaPool).

POSTGRES_URL_ENV = "LLIMIT_TEST_POSTGRES_URL"
LOCAL_POSTGRES = "postgresql:///llimit_test?host=/var/run/postgresql"


def pytest_generate_tests(metafunc):
    engines = getattr(metafunc.module, "ENGINES", None)
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is not None:
        engines = marker.args
    if engines and "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", engines)


# Set on a test: it runs on SQLite only, even in a module whose ENGINES lists both.
sqlite_only = pytest.mark.engines("sqlite")


@pytest.fixture
def engine():
    """The database engine a test runs on: sqlite unless its module lists ENGINES."""
    return "sqlite"


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a PostgreSQL database the tests make schemas in; fails in CI if none."""
    import psycopg

    url = os.environ.get(POSTGRES_URL_ENV) or LOCAL_POSTGRES
    try:
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as error:
            if os.environ.get(POSTGRES_URL_ENV) or "does not exist" not in str(error):
                raise
            with psycopg.connect(url.replace("/llimit_test?", "/postgres?"),
                                 autocommit=True, connect_timeout=5) as admin:
                try:
                    admin.execute("create database llimit_test")
                except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    pass  # another test process (pytest -n) made it first
    except psycopg.OperationalError as error:
        message = (f"no PostgreSQL at {url} (run tests/install.sh, or set"
                   f" {POSTGRES_URL_ENV}): {error}")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


# The catalog of a schema as text, with the schema's own name taken out: two
# schemas with the same fingerprint have the same tables, columns, defaults,
# constraints, indexes, functions and triggers.
SCHEMA_FINGERPRINT_SQL = """
select md5(string_agg(item, E'\\n' order by item)) from (
  select replace(item, %(schema)s::text, '~') as item from (
    select format('%%s %%s', relname, relkind) as item from pg_class
     where relnamespace = %(schema)s::text::regnamespace
    union all
    select format('%%s.%%s %%s %%s %%s %%s', a.attrelid::regclass, a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
                  pg_get_expr(d.adbin, d.adrelid))
      from pg_attribute a join pg_class c on c.oid = a.attrelid
      left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
     where c.relnamespace = %(schema)s::text::regnamespace and a.attnum > 0
       and not a.attisdropped
    union all
    select format('%%s %%s', conname, pg_get_constraintdef(oid)) from pg_constraint
     where connamespace = %(schema)s::text::regnamespace
    union all
    select pg_get_indexdef(i.indexrelid) from pg_index i
      join pg_class c on c.oid = i.indexrelid
     where c.relnamespace = %(schema)s::text::regnamespace
    union all
    select pg_get_functiondef(oid) from pg_proc
     where pronamespace = %(schema)s::text::regnamespace
    union all
    select pg_get_triggerdef(t.oid) from pg_trigger t join pg_class c on c.oid = t.tgrelid
     where c.relnamespace = %(schema)s::text::regnamespace and not t.tgisinternal
  ) as named
) as catalog
"""


def schema_url(base, schema):
    """The URL of `base` whose connections see only `schema`."""
    options = urllib.parse.quote(f"-csearch_path={schema}")
    return base + ("&" if "?" in base else "?") + f"options={options}"


class SchemaPool:
    """Migrated PostgreSQL schemas that the tests of one process take turns at.

    Making, migrating and dropping a schema costs PostgreSQL about 100 ms; giving
    one back costs 15: its rows are replaced by those of a template migrated once,
    after a check that its catalog is still exactly the template's. A schema a
    test altered (or could not be reset) is dropped instead, as are all at the end.
    """

    def __init__(self, base):
        import psycopg

        self.psycopg = psycopg
        self.base = base
        self.admin = psycopg.connect(base, autocommit=True)
        self.free = []
        self.made = set()  # every schema not yet dropped, even one a failed test kept
        self.template = self._make()
        self.fingerprint = self._fingerprint(self.template)
        relations = self.admin.execute(
            "select relname, relkind from pg_class where relnamespace = %s::regnamespace"
            " and relkind in ('r', 'S') order by relname", (self.template,)).fetchall()
        self.tables = [name for name, kind in relations if kind == "r"]
        self.sequences = [name for name, kind in relations if kind == "S"]
        self.seeded = [table for table in self.tables if self.admin.execute(
            f"select exists (select from {self.template}.{table})").fetchone()[0]]

    def create(self):
        """A new empty schema: its name."""
        schema = "t_" + secrets.token_hex(6)
        self.admin.execute(f"create schema {schema}")
        self.made.add(schema)
        return schema

    def _make(self):
        schema = self.create()
        database = llimit.open_database(schema_url(self.base, schema), pool_size=2)
        try:
            llimit.migrate(database())
        finally:
            database.close()
        return schema

    def _fingerprint(self, schema):
        return self.admin.execute(SCHEMA_FINGERPRINT_SQL, {"schema": schema}).fetchone()[0]

    def take(self):
        """A migrated schema holding only what migrating wrote: its name."""
        return self.free.pop() if self.free else self._make()

    def give_back(self, schema):
        """Reset a schema that take() gave for the next test, or drop it."""
        try:
            if self._fingerprint(schema) == self.fingerprint:
                self._reset(schema)
                self.free.append(schema)
                return
        except self.psycopg.Error:  # as a role that may not disable triggers
            self.admin.rollback()
        self.drop(schema)

    def _reset(self, schema):
        # As the template holds them: no trigger (nor foreign key) fires while its
        # rows are copied in, so config_version and the rest are copied, not bumped.
        statements = ["begin", "set local lock_timeout = '10s'",
                      "set local session_replication_role = replica"]
        statements += [f"delete from {schema}.{table}" for table in self.tables]
        statements += [f"insert into {schema}.{table} overriding system value"
                       f" select * from {self.template}.{table}" for table in self.seeded]
        statements += [f"select setval('{schema}.{sequence}', last_value, is_called)"
                       f" from {self.template}.{sequence}" for sequence in self.sequences]
        self.admin.execute(";\n".join(statements + ["commit"]))

    def drop(self, schema):
        self.admin.execute(f"drop schema {schema} cascade")
        self.made.discard(schema)

    def close(self):
        for schema in list(self.made):
            self.drop(schema)
        self.admin.close()


@pytest.fixture(scope="session")
def schema_pool(postgres_url):
    pool = SchemaPool(postgres_url)
    yield pool
    pool.close()


@pytest.fixture
def databases(request, engine, tmp_path):
    """databases(name): a SQLite file in tmp_path, or the URL of a PostgreSQL schema
    of the test's own (the test's engine, unless `engine=` says).

    The same name gives the same database within a test. On PostgreSQL,
    `migrated=True` gives a schema migrated already (from the pool, so it
    costs less), else an empty one: what a first start finds.
    """
    made = {}
    taken, created = [], []

    def location(name, engine=engine, migrated=False):
        if engine == "sqlite":
            return str(tmp_path / name)
        if name not in made:
            pool = request.getfixturevalue("schema_pool")
            if migrated:
                schema = pool.take()
                taken.append(schema)
            else:
                schema = pool.create()
                created.append(schema)
            made[name] = schema_url(pool.base, schema)
        return made[name]

    yield location
    if taken or created:
        pool = request.getfixturevalue("schema_pool")
        for schema in taken:
            pool.give_back(schema)
        for schema in created:
            pool.drop(schema)


@pytest.fixture
def make_llimit(databases, fake, clock):
    """Start llimit with config overrides; stopped after the test.

    A `db_path` override names a database (a file in tmp_path, or on
    PostgreSQL a schema of that name); servers given the same one share it.
    """
    servers = []

    def start(**overrides):
        if "db_path" in overrides and not llimit.is_postgres_url(overrides["db_path"]):
            overrides["db_path"] = databases(os.path.basename(overrides["db_path"]),
                                             migrated=True)
        settings = dict(db_path=databases(f"llimit{len(servers)}.db", migrated=True),
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
        server.close_reader()


@pytest.fixture
def gateway(make_llimit):
    """llimit with default settings in front of the fake upstream."""
    return make_llimit()


@pytest.fixture
def processes(request, tmp_path, fake):
    """Start `python llimit.py serve` processes (tests/process.py); stopped after the test.

    A test that takes `engine` runs them on it: each `name` gets its database of
    `databases`, unless `db_path` names one.
    """
    from tests.process import LlimitProcess  # not at the top: it imports this module

    started = []

    def start(**settings):
        if "db_path" not in settings and "engine" in request.fixturenames:
            databases = request.getfixturevalue("databases")
            settings["db_path"] = databases(settings.get("name", "llimit") + ".db")
        proc = LlimitProcess(tmp_path, fake.url + "/v1", **settings)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless Chromium (tests/browser.py), one for each test process that asks
    (starting one costs 1.5 s of CPU); a test leaves it at the desktop width, and
    tests/browser.py fresh() opens a page without an earlier test's cookies."""
    from tests.browser import start_chromium

    driver = start_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()
