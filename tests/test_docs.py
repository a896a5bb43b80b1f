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
