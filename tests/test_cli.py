"""The command line, run as a real process against the same database."""

import json
import subprocess
import sys

import requests

ENGINES = ("sqlite", "postgres")


def run_cli(gateway, *args):
    result = subprocess.run([sys.executable, "llimit.py", *args, "--db", gateway.config.db_path],
                            capture_output=True, text=True, timeout=60)
    return result


def test_keys_create_list_revoke(gateway, fake):
    created = run_cli(gateway, "keys", "create", "--user", "frank", "--note", "cli")
    assert created.returncode == 0, created.stderr
    lines = {name: value.strip() for name, value in
             (line.split(":", 1) for line in created.stdout.splitlines() if ": " in line)}
    raw_key, key_id = lines["key"], lines["id"]
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 200
    listing = run_cli(gateway, "keys", "list", "--user", "frank").stdout
    assert key_id in listing and raw_key not in listing
    assert run_cli(gateway, "keys", "revoke", key_id).returncode == 0
    resp = requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "key_revoked"
    assert run_cli(gateway, "keys", "revoke", "key_missing").returncode == 2


def test_usage_by_user(gateway, fake):
    for user in ("gina", "gina", "hal"):
        raw_key, _ = gateway.create_key(user=user)
        requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                      headers={"Authorization": f"Bearer {raw_key}"})
    gateway.wait_idle()
    table = run_cli(gateway, "usage", "--group-by", "user")
    assert table.returncode == 0
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[2:]}
    assert rows["gina"][1] == "2" and rows["hal"][1] == "1" and rows["TOTAL"][1] == "3"
    report = json.loads(run_cli(gateway, "usage", "--group-by", "model", "--json").stdout)
    assert report["totals"]["requests"] == 3


def test_limits_and_projects_from_the_cli(gateway):
    made = run_cli(gateway, "limits", "create", "--scope", "user", "--target", "ivy",
                   "--metric", "usd", "--window", "month", "--amount", "50")
    assert made.returncode == 0, made.stderr
    limit_id = made.stdout.split()[-1]
    assert limit_id in run_cli(gateway, "limits", "list").stdout
    bad = run_cli(gateway, "limits", "create", "--scope", "user", "--metric", "usd",
                  "--window", "day", "--amount", "5")
    assert bad.returncode == 2 and "target" in bad.stderr
    assert run_cli(gateway, "limits", "delete", limit_id).returncode == 0
    assert run_cli(gateway, "projects", "create", "ops", "--upstream-key",
                   "env:OPS_KEY").returncode == 0
    assert "ops" in run_cli(gateway, "projects", "list").stdout


def test_serve_help_names_every_flag():
    out = subprocess.run([sys.executable, "llimit.py", "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--host", "--port", "--db", "--threads", "--upstream-url", "--pricing",
                 "--auth", "--chartjs"):
        assert flag in out


def test_what_the_cli_changes_holds_from_the_servers_next_call(gateway, fake):
    # The server keeps keys and limits in memory; the CLI writes the database
    # from another process, and the next call must see it all the same.
    raw_key, key_id = gateway.create_key(user="jo")

    def chat():
        return requests.post(gateway.url + "/v1/chat/completions", timeout=30,
                             headers={"Authorization": f"Bearer {raw_key}"},
                             json={"model": "gpt-4o", "messages": []}).status_code

    assert chat() == 200 and chat() == 200  # the key and limits are now held in memory
    gateway.wait_idle()
    version = gateway.db().execute("select version from config_version").fetchone()[0]
    assert chat() == 200
    gateway.wait_idle()  # the usage writer's last_used_at updates leave the version be
    assert gateway.db().execute("select version from config_version").fetchone()[0] == version
    made = run_cli(gateway, "limits", "create", "--scope", "user", "--target", "jo",
                   "--metric", "requests", "--window", "day", "--amount", "2")
    assert made.returncode == 0, made.stderr
    assert chat() == 429
    limit_id = made.stdout.split()[-1]
    assert run_cli(gateway, "limits", "delete", limit_id).returncode == 0
    assert chat() == 200
    assert run_cli(gateway, "keys", "revoke", key_id).returncode == 0
    assert chat() == 403


def test_migrate_db_copies_everything_once(make_llimit, fake, databases, postgres_url):
    old = make_llimit()
    raw_key, key_id = old.create_key(user="mona", note="moved")
    old.admin.patch(old.url + "/admin/projects/default", json={"limit_message": "Ask ops."})
    old.admin.post(old.url + "/admin/projects", json={"id": "team-b", "name": "Team B"})
    limit = old.admin.post(old.url + "/admin/limits", json={
        "scope": "key", "target": key_id, "metric": "requests", "window": "total",
        "amount": 3}).json()
    old.admin.put(old.url + "/admin/pricing/house-model", json={"input": 1, "output": 2})
    for _ in range(2):
        assert requests.post(old.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                             headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200
    old.wait_idle()
    usage_before = old.admin.get(old.url + "/admin/usage?group_by=user").json()
    source = old.config.db_path
    old.stop()
    target = databases("moved", engine="postgres")
    first = subprocess.run([sys.executable, "llimit.py", "migrate-db", "--from", source,
                            "--to", target], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    copied = {line.split(":")[0]: line.split(": ")[1] for line in first.stdout.splitlines()
              if " rows copied" in line}
    assert copied["api_keys"] == "1 of 1 rows copied"
    assert copied["usage_events"] == "2 of 2 rows copied"
    assert copied["projects"] == "2 of 2 rows copied"  # the default one's settings too
    assert copied["limits"] == "1 of 1 rows copied"
    assert copied["model_prices"] == "1 of 1 rows copied"
    for table in ("usage_daily", "usage_counters", "sessions", "settings", "price_snapshots"):
        assert table in copied
    again = subprocess.run([sys.executable, "llimit.py", "migrate-db", "--from", source,
                            "--to", target], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing new to copy" in again.stdout
    new = make_llimit(db_path=target)
    assert new.admin.get(new.url + "/admin/usage?group_by=user").json() == usage_before
    assert new.admin.get(f"{new.url}/admin/limits/{limit['id']}").json()["used"] == 2
    assert new.admin.get(new.url + "/admin/projects/default").json()["limit_message"] \
        == "Ask ops."
    headers = {"Authorization": f"Bearer {raw_key}"}
    assert requests.post(new.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers=headers).status_code == 200
    assert requests.post(new.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers=headers).status_code == 429  # the total limit: 3 of 3
    ids = [event["id"] for event in new.events()]
    assert len(ids) == 3 and len(set(ids)) == 3  # new ids follow the copied ones
