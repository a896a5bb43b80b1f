"""Schema changes go through append-only migrations, each applied once."""

import sqlite3

import psycopg
import pytest

import llimit
from tests.conftest import schema_url

ENGINES = ("sqlite", "postgres")


def _open(location):
    database = llimit.open_database(location)
    return database, database()


def _apply_as_shipped(db, migrations):
    """Bring a blank database to an older schema, as the llimit of that time did."""
    db.execute("create table _migrations (name text primary key, applied_at text not null)")
    for name, script in migrations:
        if llimit.engine_of(db) == "postgres":
            db.run_script(llimit.POSTGRES_MIGRATIONS.get(name) or script.strip()
                          .removeprefix("begin;").removesuffix("commit;"))
        else:
            db.executescript(script)
        db.execute("insert into _migrations values (?, 'then')", (name,))


def test_blank_database_gets_every_migration_once(databases):
    database, db = _open(databases("a.db"))
    assert llimit.migrate(db) == [name for name, _ in llimit.MIGRATIONS]
    assert llimit.migrate(db) == []
    names = [row[0] for row in db.execute("select name from _migrations order by name")]
    assert names == [name for name, _ in llimit.MIGRATIONS]
    database.close()


def test_each_older_schema_upgrades_keeping_its_data(databases):
    for step in range(1, len(llimit.MIGRATIONS)):
        location = databases(f"step{step}.db")
        database, old = _open(location)
        _apply_as_shipped(old, llimit.MIGRATIONS[:step])
        old.execute("insert into api_keys (id, key_hash, masked_key, project_id, created_at)"
                    " values ('key_old', 'h', 'llimit-abcd…wxyz', 'default', 'then')")
        old.execute("insert into usage_events (created_ms, key_id, endpoint, status_code,"
                    " stream, prompt_tokens, cached_tokens, cache_write_tokens,"
                    " completion_tokens, reasoning_tokens, cost_nusd, pricing, latency_ms,"
                    " overhead_ms) values (1, 'key_old', 'chat/completions', 200, 0, 11, 0, 0,"
                    " 7, 0, 97500, 'priced', 1.5, 0.5)")
        database.close()
        database, db = _open(location)
        applied = llimit.migrate(db)
        assert applied == [name for name, _ in llimit.MIGRATIONS[step:]]
        assert db.execute("select id from api_keys").fetchone()[0] == "key_old"
        assert db.execute("select cost_nusd from usage_events").fetchone()[0] == 97500
        database.close()


def test_first_schema_database_serves_after_upgrade(databases, make_llimit):
    location = databases("first.db")
    database, old = _open(location)
    _apply_as_shipped(old, llimit.MIGRATIONS[:1])
    database.close()
    gateway = make_llimit(db_path=location)
    raw_key, _ = gateway.create_key()
    import requests
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 200
    assert len(gateway.events()) == 1


def test_database_uses_wal_and_a_busy_timeout(tmp_path):
    db = llimit.connect(str(tmp_path / "w.db"))
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert db.execute("pragma busy_timeout").fetchone()[0] >= 1000
    assert isinstance(db.execute("select 1 as one").fetchone(), sqlite3.Row)


@pytest.mark.engines("postgres")
def test_the_tests_reuse_a_schema_only_as_migrating_left_it(schema_pool, engine):
    # tests/conftest.py hands the same PostgreSQL schemas from test to test.
    admin, template = schema_pool.admin, schema_pool.template

    def contents(schema):
        rows = {table: admin.execute(f"select * from {schema}.{table} order by 1").fetchall()
                for table in schema_pool.tables}
        rows.update({sequence: admin.execute(
            f"select last_value, is_called from {schema}.{sequence}").fetchall()
            for sequence in schema_pool.sequences})
        return rows

    written, altered = schema_pool.take(), schema_pool.take()
    assert contents(written) == contents(template)
    with psycopg.connect(schema_url(schema_pool.base, written), autocommit=True) as test:
        test.execute("delete from projects")  # triggers bump config_version
        test.execute("insert into settings select 'left', 'behind'")
        test.execute("select setval('usage_events_id_seq', 99)")
    admin.execute(f"create index left_behind on {altered}.usage_events (user_name)")
    schema_pool.give_back(written)
    schema_pool.give_back(altered)
    assert contents(written) == contents(template) != {}
    assert written in schema_pool.free and altered not in schema_pool.free
    assert admin.execute("select count(*) from pg_namespace where nspname = %s",
                         (altered,)).fetchone()[0] == 0
