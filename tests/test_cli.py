"""The command line, run as a real process against the same database."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.process import llimit_command, llimit_env
from tests.test_limits import Webhook

ENGINES = ("sqlite", "postgres")


def run_cli(gateway, *args):
    return subprocess.run(llimit_command(*args, "--db", gateway.config.db_path),
                          env=llimit_env(), capture_output=True, text=True, timeout=60)


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
    alone = run_cli(gateway, "projects", "create", "ops", "--upstream-key", "env:LLIMIT_UPSTREAM_KEY_OPS")
    assert alone.returncode == 2 and "upstream_url" in alone.stderr  # never the default URL
    assert run_cli(gateway, "projects", "create", "ops", "--upstream-key", "env:LLIMIT_UPSTREAM_KEY_OPS",
                   "--url", "https://ops.example/v1", "--allow-async").returncode == 0
    assert "ops" in run_cli(gateway, "projects", "list").stdout


def test_plans_from_the_cli_limit_a_running_llimit(gateway, fake, engine):
    made = run_cli(gateway, "plans", "create", "interns", "--name", "Interns",
                   "--limit", "requests:1/24h", "--limit", "usd:20/month")
    assert made.returncode == 0, made.stderr
    assert run_cli(gateway, "plans", "assign", "Jo", "interns").returncode == 0
    listing = run_cli(gateway, "plans", "list").stdout
    assert "Interns" in listing and "1 request per 24 hours" in listing
    assert "$20.00 a month" in listing
    raw_key, _ = gateway.create_key(user="jo")
    ask = lambda: requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                                headers={"Authorization": f"Bearer {raw_key}"}).status_code
    assert ask() == 200 and ask() == 429  # the running llimit sees the CLI's plan
    bad = run_cli(gateway, "plans", "create", "x", "--limit", "usd:1/fortnight")
    assert bad.returncode == 2 and "window" in bad.stderr
    assert run_cli(gateway, "plans", "delete", "interns").returncode == 0
    assert ask() == 200
    assert run_cli(gateway, "plans", "delete", "interns").returncode == 1


def test_serve_help_names_every_flag():
    out = subprocess.run([sys.executable, "llimit.py", "serve", "--help"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
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


def run_llimit(*args, cwd=None, env=None, timeout=60):
    """`python llimit.py ARGS` (tests/process.py llimit_command) from `cwd`."""
    return subprocess.run(llimit_command(*args), capture_output=True, text=True,
                          cwd=cwd, env=llimit_env(env), timeout=timeout)


READ_COMMANDS = [("keys", "list"), ("keys", "revoke", "key_x"), ("projects", "list"),
                 ("limits", "list"), ("limits", "delete", "lim_x"), ("usage",),
                 ("pricing", "missing"), ("pricing", "list")]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_commands_that_read_refuse_a_missing_database(tmp_path, command):
    # From another directory, ./llimit.db is not there: say so, create nothing.
    result = run_llimit(*command, cwd=tmp_path)
    assert result.returncode != 0
    assert "no database at ./llimit.db" in result.stderr and "--db" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_a_command_that_creates_says_it_made_a_new_database(tmp_path):
    result = run_llimit("limits", "create", "--scope", "global", "--metric", "usd",
                        "--window", "day", "--amount", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "created a new database at ./llimit.db" in result.stderr
    assert run_llimit("limits", "list", cwd=tmp_path).stdout.count("global") == 1


def test_cli_commands_post_nothing_to_the_alert_webhook(make_llimit, processes, fake, tmp_path):
    # One alert stored and not delivered (no webhook when it fired).
    db_path = str(tmp_path / "alerts.db")
    gateway = make_llimit(db_path=db_path)
    raw_key, _ = gateway.create_key(user="una")
    made = gateway.admin.post(gateway.url + "/admin/limits", json={
        "scope": "user", "target": "una", "metric": "requests", "window": "day",
        "amount": 2, "alert_at": [50]})
    assert made.status_code == 201, made.text
    assert requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                         headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200
    gateway.wait_idle()
    gateway.stop()
    undelivered = "select count(*) from alerts_sent where delivered_at is null"
    assert gateway.db().execute(undelivered).fetchone()[0] == 1

    hook = Webhook()
    env = {**os.environ, "LLIMIT_ALERT_WEBHOOK": hook.url, "LLIMIT_DB": gateway.config.db_path}
    # (The review's six runs of `keys list` posted it twice: a CLI run started the
    # sender. A sender started by any one run would post within the wait below.)
    for command in READ_COMMANDS + [
            ("keys", "create", "--user", "vic"), ("projects", "create", "cli-made")]:
        result = run_llimit(*command, env=env)
        assert "Traceback" not in result.stderr, result.stderr
    time.sleep(0.5)  # a sender thread of a CLI process would have posted by now
    assert hook.posts == []
    assert gateway.db().execute(undelivered).fetchone()[0] == 1
    # The listener and the alert are real: `python llimit.py serve` delivers it, once
    # (through requests, which llimit imports on first use).
    processes(db_path=gateway.config.db_path, LLIMIT_ALERT_WEBHOOK=hook.url)
    assert len(hook.wait_for(1)) == 1 and "una" in hook.posts[0]["text"]
    deadline = time.monotonic() + 10
    while gateway.db().execute(undelivered).fetchone()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.db().execute(undelivered).fetchone()[0] == 0


def test_settings_before_the_subcommand_apply_to_it(gateway, fake):
    raw_key, _ = gateway.create_key(user="wes")
    requests.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o"},
                  headers={"Authorization": f"Bearer {raw_key}"})
    gateway.wait_idle()
    for args in (("--db", gateway.config.db_path, "usage"),
                 ("usage", "--db", gateway.config.db_path),
                 (f"--db={gateway.config.db_path}", "keys", "list", "--user", "wes")):
        result = run_llimit(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "wes" in result.stdout
    refused = run_llimit("--threads", "8", "keys", "list", "--db", gateway.config.db_path)
    assert refused.returncode == 2 and "--threads does not apply to keys" in refused.stderr


HELP_OPTION = re.compile(r"^  (-[-\w]+)(?: (?:[A-Z_]+|\{[^}]*\}))?(?:\s{2,}(\S.*))?$", re.M)


@pytest.mark.parametrize("command", [("keys", "create"), ("keys", "list"), ("keys", "revoke"),
                                     ("projects", "create"), ("limits", "create"),
                                     ("limits", "delete"), ("usage",), ("pricing",)],
                         ids=" ".join)
def test_each_subcommands_help_gives_its_options_with_help_and_only_its_settings(command):
    out = run_llimit(*command, "--help").stdout
    lines = out.split("options:", 1)[1].splitlines()
    options = {}
    for index, line in enumerate(lines):
        found = HELP_OPTION.match(line)
        if found:  # the help text is on the same line or the next, indented
            text = found.group(2) or (lines[index + 1].strip() if index + 1 < len(lines)
                                      else "")
            options[found.group(1)] = text
    assert "--db" in options
    assert not {"--threads", "--host", "--port", "--auth", "--chartjs"} & set(options)
    assert ("--pricing" in options) == (command == ("pricing",))
    for option, text in options.items():
        assert text and not text.startswith("-"), (command, option)
    parser_options = {"keys create": {"--user", "--project-key", "--project", "--note",
                                      "--expires-at", "--models"},
                      "limits create": {"--scope", "--target", "--each", "--metric", "--window",
                                        "--amount", "--action", "--alert-at"},
                      "usage": {"--group-by", "--start", "--end", "--json"}}
    assert parser_options.get(" ".join(command), set()) <= set(options)


def test_a_reader_that_leaves_early_gets_no_traceback(gateway):
    # `pricing list | head -1`: the reader closes before llimit writes.
    proc = subprocess.Popen(llimit_command("pricing", "list", "--db", gateway.config.db_path),
                            env=llimit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) != 0 or stderr == ""
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_keys_create_asks_for_a_user_or_says_project_key(gateway):
    neither = run_cli(gateway, "keys", "create", "--note", "bot")
    assert neither.returncode == 2
    assert "--user NAME" in neither.stderr and "--project-key" in neither.stderr
    assert gateway.db().execute("select count(*) from api_keys").fetchone()[0] == 0
    both = run_cli(gateway, "keys", "create", "--user", "xena", "--project-key")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    shared = run_cli(gateway, "keys", "create", "--project-key", "--note", "bot")
    assert shared.returncode == 0, shared.stderr
    key_id = shared.stdout.split()[1]
    row = gateway.admin.get(gateway.url + f"/admin/keys/{key_id}").json()
    assert row["user"] is None and row["note"] == "bot"


def test_a_port_in_use_is_one_clear_line_and_a_failing_exit(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_llimit("--port", str(port), "--db", str(tmp_path / "l.db"),
                            env={**os.environ, "LLIMIT_ADMIN_TOKEN": "t", "LLIMIT_AUTH": "open"})
    finally:
        taken.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in errors[0]


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
    # The target is in use now: its own usage would collide with the source's ids.
    new.stop()
    late = subprocess.run([sys.executable, "llimit.py", "migrate-db", "--from", source,
                           "--to", target], capture_output=True, text=True, timeout=120)
    assert late.returncode != 0
    assert "--to already holds usage that is not from --from" in late.stderr
    assert "rows copied" not in late.stdout
