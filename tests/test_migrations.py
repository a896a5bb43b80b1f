"""Schema changes go through append-only migrations, each applied once."""

import sqlite3

import llimit


def test_blank_database_gets_every_migration_once(tmp_path):
    db = llimit.connect(str(tmp_path / "a.db"))
    assert llimit.migrate(db) == [name for name, _ in llimit.MIGRATIONS]
    assert llimit.migrate(db) == []
    names = [row[0] for row in db.execute("select name from _migrations order by name")]
    assert names == [name for name, _ in llimit.MIGRATIONS]


def test_each_older_schema_upgrades_keeping_its_data(tmp_path):
    for step in range(1, len(llimit.MIGRATIONS)):
        path = str(tmp_path / f"step{step}.db")
        old = llimit.connect(path)
        old.execute("create table _migrations (name text primary key, applied_at text not null)")
        for name, script in llimit.MIGRATIONS[:step]:
            old.executescript(script)
            old.execute("insert into _migrations values (?, 'then')", (name,))
        old.execute("insert into api_keys (id, key_hash, masked_key, project_id, created_at)"
                    " values ('key_old', 'h', 'llimit-abcd…wxyz', 'default', 'then')")
        old.close()
        db = llimit.connect(path)
        applied = llimit.migrate(db)
        assert applied == [name for name, _ in llimit.MIGRATIONS[step:]]
        assert db.execute("select id from api_keys").fetchone()[0] == "key_old"


def test_first_schema_database_serves_after_upgrade(tmp_path, make_llimit):
    path = str(tmp_path / "first.db")
    old = llimit.connect(path)
    old.execute("create table _migrations (name text primary key, applied_at text not null)")
    name, script = llimit.MIGRATIONS[0]
    old.executescript(script)
    old.execute("insert into _migrations values (?, 'then')", (name,))
    old.close()
    gateway = make_llimit(db_path=path)
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
