"""README.md, the Dockerfile and CI stay in step with the program."""

import os
import re

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
            assert f"{method} {shown}" in readme, (method, path)


def test_readme_starts_with_the_two_commands_ci_runs():
    readme = read("README.md")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    start, test = blocks[0].strip(), blocks[1].strip()
    assert "pip install -r requirements.txt" in start and "python llimit.py" in start
    assert read(".ci/run").strip().splitlines()[-1] == test


def test_dockerfile_installs_and_starts_as_the_readme_does():
    dockerfile = read("Dockerfile")
    assert "pip install --no-cache-dir -r requirements.txt" in dockerfile
    assert 'CMD ["python", "llimit.py"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "USER llimit" in dockerfile and "LLIMIT_HOST=0.0.0.0" in dockerfile
    assert "FROM python:3.12-slim" in dockerfile and "VOLUME /data" in dockerfile
    assert "chart.umd.js" in dockerfile


def test_runtime_requirements_are_the_contracts():
    names = {line.split("==")[0] for line in read("requirements.txt").split()}
    assert names == {"bottle", "waitress", "requests", "sseclient-py"}


def test_readme_docker_section_matches_the_dockerfile():
    readme, dockerfile = read("README.md"), read("Dockerfile")
    section = readme.split("## Docker\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    build, run = (part.strip() for part in command.split("&&"))
    assert f"# Build: {build}" in dockerfile and f"# Run:   {run}" in dockerfile
    assert "-p 8000:8000" in run and "EXPOSE 8000" in dockerfile
    assert "-v llimit-data:/data" in run and "VOLUME /data" in dockerfile
    for setting in ("LLIMIT_HOST=0.0.0.0", "LLIMIT_DB=/data/llimit.db", "LLIMIT_PORT=8000"):
        assert setting in dockerfile
    assert "`LLIMIT_HOST=0.0.0.0`" in section and "`LLIMIT_DB=/data/llimit.db`" in section
    assert "USER llimit" in dockerfile and "user `llimit`" in section
    assert "HEALTHCHECK" in dockerfile and "`HEALTHCHECK`" in section
    grace = next(default for field, _, _, default, *_ in llimit.SETTINGS
                 if field == "grace_seconds")
    assert f"`LLIMIT_GRACE_SECONDS` of {grace:g}" in section
    assert int(re.search(r"docker stop -t (\d+)", section).group(1)) > grace


def test_readme_reliability_commands_select_tests_that_exist():
    section = read("README.md").split("## Reliability\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"`python -m pytest -q (?:-s )?tests/(\w+)\.py -k (\w+)`", section)
    assert len(commands) >= 8
    for module, selector in commands:
        names = re.findall(r"^def (test_\w+)", read(f"tests/{module}.py"), re.M)
        assert any(selector in name for name in names), (module, selector)
