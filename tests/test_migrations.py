"""Schema changes go through append-only migrations, each applied once."""

import sqlite3

import llimit

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
