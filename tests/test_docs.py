"""README.md, the Dockerfile and CI stay in step with the program."""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import urllib.parse

import requests

import llimit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def test_readme_names_every_setting():
    readme = read("README.md")
    for _field, env, flag, *_ in llimit.SETTINGS:
        assert f"`{env}`" in readme, env
        if flag:
            assert f"`{flag}`" in readme, flag


def test_readme_names_every_admin_route():
    readme = read("README.md")
    for method, path, _ in llimit.routes():
        if path.startswith("/admin/"):
            shown = re.sub(r"<(\w+:)?(\w+)>", "<id>", path).replace("<id>", "<id>")
            shown = shown.replace("/admin/pricing/<id>", "/admin/pricing/<model>")
            shown = shown.replace("/admin/users/<id>", "/admin/users/<user>")
            assert f"{method} {shown}" in readme, (method, path)


def bash_blocks(text):
    return [block.strip() for block in re.findall(r"```bash\n(.*?)\n```", text, re.S)]


def test_readme_starts_with_the_two_commands_ci_runs():
    readme = read("README.md")
    start, test = bash_blocks(readme)[:2]
    # One line that works on a Python that refuses a system-wide pip (PEP 668) and has
    # no `python` binary: a venv, its pip, its python.
    assert "\n" not in start
    assert start.split(" && ") == ["python3 -m venv .venv",
                                   ".venv/bin/pip install -r requirements.txt",
                                   ".venv/bin/python llimit.py"]
    assert read(".ci/run").strip().splitlines()[-1] == test
    assert "Python 3.10 or newer" in readme.split("## ", 1)[0]
    assert "python3-venv" in readme.split("## ", 1)[0]


def test_the_quick_start_block_works_when_pasted(tmp_path, fake):
    # Pasted as it stands, but for the port, the database and the upstream (the fake).
    readme = read("README.md")
    section = readme.split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = bash_blocks(section)[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
              .replace("https://api.openai.com/v1", fake.url + "/v1")
              .replace(".venv/bin/python", sys.executable))
    assert script.count(str(port)) >= 2
    env = {**os.environ, "LLIMIT_PORT": str(port), "LLIMIT_DB": str(tmp_path / "llimit.db")}
    result = subprocess.run(["bash", "-c", script + "\nkill $!; wait $!"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    created = json.loads(result.stdout)  # the key the block's last command made
    assert created["user"] == "alice" and created["key"].startswith("llimit-")
    assert result.returncode == 0, result.stderr  # the server stopped cleanly on SIGTERM


def test_dockerfile_installs_and_starts_as_the_readme_does():
    dockerfile = read("Dockerfile")
    assert "pip install --no-cache-dir -r requirements.txt" in dockerfile
    assert 'CMD ["python", "llimit.py"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "USER llimit" in dockerfile and "LLIMIT_HOST=0.0.0.0" in dockerfile
    assert "FROM python:3.12-slim" in dockerfile and "VOLUME /data" in dockerfile
    assert "chart.umd.js" in dockerfile


def test_docker_and_install_vendor_the_chartjs_the_pages_pin():
    dockerfile, install = read("Dockerfile"), read("tests/install.sh")
    version, file_name = re.search(r"chart\.js@([\d.]+)/dist/(\S+)$",
                                   llimit.CHARTJS_CDN_URL).groups()
    assert f"ARG CHARTJS_VERSION={version}\n" in dockerfile
    sha = llimit.CHARTJS_CDN_INTEGRITY.removeprefix("sha384-")
    assert f"ARG CHARTJS_SHA384={sha}\n" in dockerfile
    assert f"package/dist/{file_name} " in dockerfile  # the file whose hash is checked
    assert 'createHash("sha384")' in dockerfile and "process.exit(1)" in dockerfile
    assert f"chart.js@{version} " in install


def test_dockerignore_keeps_databases_out_and_lets_the_copied_files_in():
    ignore = [line for line in read(".dockerignore").splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"  # nothing but what is let in again below
    let_in = {line[1:] for line in ignore[1:] if line.startswith("!")}
    assert len(let_in) == len(ignore) - 1
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.*) \S+$", read("Dockerfile"), re.M):
        copied.update(sources.split())
    assert copied == let_in == {"requirements.txt", "requirements-postgres.txt", "llimit.py",
                                  "pricing.json"}


def test_the_docker_healthcheck_asks_the_port_llimit_listens_on(processes):
    command = re.search(r'CMD python -c "(.*?)" \|\| exit 1', read("Dockerfile")).group(1)
    proc = processes()  # listens on a port of its own choosing, as LLIMIT_PORT says
    port = proc.url.rsplit(":", 1)[1]
    env = {**os.environ, "LLIMIT_PORT": port}
    assert subprocess.run([sys.executable, "-c", command], env=env, timeout=30).returncode == 0
    proc.terminate()
    proc.wait()
    gone = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True,
                          timeout=30)
    assert gone.returncode != 0


def test_the_log_names_a_postgresql_database_without_its_password(processes, databases):
    # docs/docker-compose.yml's LLIMIT_DB carries a password, and `docker compose logs`
    # (or a log shipper) is read by more people than the database's owner.
    url = databases("compose.db", engine="postgres")
    password = urllib.parse.urlsplit(url).password
    if password is None:  # the local server's peer sign-in ignores this one
        password = "compose-db-secret"
        url += ("&" if "?" in url else "?") + f"password={password}"
    proc = processes(db_path=url)
    assert proc.admin.get(proc.url + "/admin/keys").status_code == 200
    log = proc.log()
    assert "serving on" in log and password not in log
    assert "(database postgresql://" in log and "password=***" in log


def test_runtime_requirements_are_the_contracts():
    names = {line.split("==")[0] for line in read("requirements.txt").split()}
    assert names == {"bottle", "waitress", "requests", "sseclient-py"}


def test_readme_docker_section_matches_the_dockerfile():
    readme, dockerfile = read("README.md"), read("Dockerfile")
    section = readme.split("## Docker\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    build, run = (part.strip() for part in command.split("&&"))
    assert f"# Build: {build}" in dockerfile and f"# Run:   {run}" in dockerfile
    # Published on this machine only: the pages' default sign-in is open.
    assert "-p 127.0.0.1:8000:8000" in run and "EXPOSE 8000" in dockerfile
    assert "LLIMIT_AUTH=open" in section and "**The example publishes on 127.0.0.1 only" in section
    assert "-v llimit-data:/data" in run and "VOLUME /data" in dockerfile
    for setting in ("LLIMIT_HOST=0.0.0.0", "LLIMIT_DB=/data/llimit.db", "LLIMIT_PORT=8000"):
        assert setting in dockerfile
    assert "`LLIMIT_HOST=0.0.0.0`" in section and "`LLIMIT_DB=/data/llimit.db`" in section
    uid = re.search(r"useradd --system --uid (\d+) ", dockerfile).group(1)
    assert "USER llimit" in dockerfile and f"user `llimit` (uid {uid})" in section
    assert f"sudo chown {uid} data" in section
    assert "HEALTHCHECK" in dockerfile and "`HEALTHCHECK`" in section
    assert "os.environ.get('LLIMIT_PORT'" in dockerfile
    assert "`/healthz` at `LLIMIT_PORT`" in section.replace("\n", " ")
    grace = next(default for field, _, _, default, *_ in llimit.SETTINGS
                 if field == "grace_seconds")
    assert f"`LLIMIT_GRACE_SECONDS` of {grace:g}" in section
    assert int(re.search(r"docker stop -t (\d+)", section).group(1)) > grace


def test_reliability_commands_select_tests_that_exist():
    section = read("docs/reliability.md")
    commands = re.findall(r"`python -m pytest -q (?:-s )?tests/(\w+)\.py -k (\w+)`", section)
    assert len(commands) >= 8
    for module, selector in commands:
        names = re.findall(r"^def (test_\w+)", read(f"tests/{module}.py"), re.M)
        assert any(selector in name for name in names), (module, selector)


def test_readme_links_the_guides_and_they_exist():
    readme = read("README.md")
    for guide in ("running", "clients", "performance", "reliability"):
        assert f"](docs/{guide}.md)" in readme, guide
        assert read(f"docs/{guide}.md").startswith("# ")
    for heading in ("## Quick start", "## Metering and pricing", "## Settings",
                    "## Performance", "## Docker", "## Reliability", "## Clients"):
        assert f"\n{heading}\n" in readme, heading
    assert "CONTRACT.md" not in llimit.__doc__ and "README.md" in llimit.__doc__


def test_the_running_guide_names_real_settings_and_waits_out_the_grace_period():
    guide = read("docs/running.md")
    env_file = re.search(r"`/etc/llimit.env`.*?```ini\n(.*?)```", guide, re.S).group(1)
    names = [line.split("=", 1)[0] for line in env_file.splitlines() if line]
    known = {env for _, env, *_ in llimit.SETTINGS}
    assert names and set(names) <= known, set(names) - known
    unit = re.search(r"llimit.service`.*?```ini\n(.*?)```", guide, re.S).group(1)
    start = bash_blocks(read("README.md"))[0]
    assert "ExecStart=/opt/llimit/.venv/bin/python llimit.py" in unit
    assert ".venv/bin/python llimit.py" in start
    grace = next(default for field, _, _, default, *_ in llimit.SETTINGS
                 if field == "grace_seconds")
    assert int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1)) > grace
    assert "proxy_buffering off;" in guide and "LLIMIT_PUBLIC_URL" in guide
    assert ".backup" in guide and "vacuum into" in guide


def test_a_lost_generated_admin_token_is_replaced_by_setting_one_and_restarting(
        processes, tmp_path):
    # As docs/running.md tells: the generated token is gone; set one, restart.
    first = processes(LLIMIT_ADMIN_TOKEN="")
    generated = re.search(r"(llimit-admin-\S+)", first.log()).group(1)
    keys = first.url + "/admin/keys"
    assert requests.get(keys, headers={"Authorization": f"Bearer {generated}"}).status_code == 200
    first.terminate()
    assert first.wait() == 0
    again = processes(db_path=first.db_path, LLIMIT_ADMIN_TOKEN="a-new-token")
    keys = again.url + "/admin/keys"
    assert requests.get(keys, headers={"Authorization": "Bearer a-new-token"}).status_code == 200
    assert requests.get(keys, headers={"Authorization": f"Bearer {generated}"}).status_code == 401
    assert "generated an admin token" not in again.log()


def test_a_sqlite_backup_taken_while_llimit_runs_holds_its_rows(processes, tmp_path):
    # docs/running.md's VACUUM INTO, run as written against a live server.
    proc = processes()
    raw_key, key_id = proc.create_key(user="bo")
    guide = read("docs/running.md")
    command = re.search(r'python3 -c "(.*?)" \\', guide).group(1)
    backup = tmp_path / "backup.db"
    subprocess.run([sys.executable, "-c", command, proc.db_path, str(backup)], check=True,
                   timeout=60)
    copy = sqlite3.connect(backup)
    assert copy.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert copy.execute("select id from api_keys").fetchall() == [(key_id,)]


def python_blocks(text, heading):
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", section, re.S)


def test_the_sdk_examples_of_the_clients_guide_run_against_llimit(gateway, fake):
    # docs/clients.md's OpenAI and Anthropic examples, as written, but for HOST and the key.
    guide = read("docs/clients.md")
    host = gateway.url.removeprefix("http://").rsplit(":", 1)[0]
    port = gateway.url.rsplit(":", 1)[1]
    made = gateway.admin.post(gateway.url + "/admin/projects", json={
        "id": "claude-team", "upstream_kind": "anthropic", "upstream_url": fake.url + "/v1",
        "upstream_key": "sk-ant-upstream"})
    assert made.status_code == 201, made.text
    for heading, project, calls in (("OpenAI SDK", "default", 2),
                                    ("Anthropic SDK", "claude-team", 1)):
        raw_key, key_id = gateway.create_key(user="cy", project=project)
        code = python_blocks(guide, heading)[0]
        assert "HOST:8000" in code and '"llimit-..."' in code
        exec(code.replace("HOST:8000", f"{host}:{port}").replace('"llimit-..."', repr(raw_key)),
             {})
        rows = [row for row in gateway.events() if row["key_id"] == key_id]
        assert len(rows) == calls and {row["status_code"] for row in rows} == {200}, heading
        assert {row["pricing"] for row in rows} == {"priced"}, heading
