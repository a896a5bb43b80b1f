"""Screenshots of llimit's pages, for docs/screenshots/ (README.md shows them).

    bash tests/install.sh          # chromium, chromedriver and vendor/chart.umd.js
    python docs/screenshots.py     # writes docs/screenshots/*.png

Starts the tests' fake upstream and llimit on free ports with a throwaway
database, makes three weeks of calls for a handful of people (through the real
proxy, with the fake clock moved day by day), then signs in with a real
headless Chromium and saves the home page, a fresh key (and /keys at a phone's width), the usage
page (also at a phone's width), the reports and the admin dashboard.
"""

import dataclasses
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import openai  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

import llimit  # noqa: E402
from tests.browser import (VENDOR_CHARTJS, click_and_wait, sign_in_admin,  # noqa: E402
                           sign_in_open, start_chromium)
from tests.conftest import ADMIN_TOKEN, Clock, LlimitServer  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402

OUT = os.path.join(ROOT, "docs", "screenshots")
DAYS = 21
PEOPLE = {  # user: (project, calls a day, models they use)
    "alice": ("default", 6, ("gpt-4o", "gpt-4o-mini")),
    "bob": ("research", 9, ("gpt-4o", "o3-mini")),
    "carol": ("research", 4, ("gpt-4o-mini",)),
    "dan": ("default", 3, ("gpt-4o-mini", "acme-llm-7b")),
    "erin": ("support-bot", 5, ("gpt-4o-mini",)),
    "frank": ("default", 2, ("gpt-4o",)),
}


def seed(server, fake, clock):
    """Projects, limits, keys, and DAYS days of calls."""
    admin = server.admin
    for project, budget in (("research", 150), ("support-bot", 40)):
        resp = admin.post(server.url + "/admin/projects", json={
            "id": project, "name": project.replace("-", " ").title(),
            "upstream_url": fake.url + "/v1", "upstream_key": "env:OPENAI_API_KEY",
            "budget": {"usd": budget, "window": "month"}})
        assert resp.status_code == 201, resp.text
    for limit in ({"scope": "user", "target": "alice", "metric": "usd", "window": "day",
                   "amount": 2},
                  {"scope": "project", "target": "default", "each": "user", "metric": "usd",
                   "window": "month", "amount": 25, "alert_at": [80]},
                  {"scope": "global", "metric": "requests", "window": "minute",
                   "amount": 600}):
        assert admin.post(server.url + "/admin/limits", json=limit).status_code == 201
    keys = {user: server.create_key(user=user, project=project, note="laptop")[0]
            for user, (project, _, _) in PEOPLE.items()}
    rng = random.Random(7)
    today = clock.now
    for day in range(DAYS - 1, -1, -1):
        clock.now = today - day * 86400
        for user, (_, per_day, models) in PEOPLE.items():
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=keys[user])
            for _ in range(rng.randint(max(per_day - 3, 0), per_day + 3)):
                fake.behaviour.update(prompt_tokens=rng.randint(400, 9000),
                                      completion_tokens=rng.randint(100, 2500))
                client.chat.completions.create(model=rng.choice(models), messages=[
                    {"role": "user", "content": "Hello"}])
    clock.now = today
    server.wait_idle()


def shoot(driver, name, width=1280, max_height=3200):
    """A PNG of the whole page (up to max_height pixels), as a phone when narrow."""
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {**metrics, "height": min(height, max_height)})
    path = os.path.join(OUT, name + ".png")
    driver.save_screenshot(path)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print("wrote", os.path.relpath(path, ROOT))


def main():
    os.makedirs(OUT, exist_ok=True)
    os.environ.setdefault("OPENAI_API_KEY", "sk-fake")
    work = tempfile.mkdtemp(prefix="llimit-shots-")
    clock = Clock()
    with FakeUpstream() as fake:
        config = dataclasses.replace(
            llimit.Config(), db_path=os.path.join(work, "llimit.db"), admin_token=ADMIN_TOKEN,
            upstream_url=fake.url + "/v1", upstream_key="sk-fake", threads=16, clock=clock,
            chartjs=VENDOR_CHARTJS, public_url=None)
        server = LlimitServer(config)
        driver = start_chromium(os.path.join(work, "chromium"))
        try:
            seed(server, fake, clock)
            sign_in_open(driver, server.url, "alice", next_path="/keys")
            driver.find_element(By.ID, "note").send_keys("notebook")
            click_and_wait(driver, driver.find_element(By.CSS_SELECTOR,
                                                       "form[action='/keys'] button"))
            shoot(driver, "keys")
            driver.get(server.url + "/keys")  # the secret was shown once; now the list
            shoot(driver, "keys-phone", width=390)
            driver.get(server.url + "/usage")
            shoot(driver, "usage")
            shoot(driver, "usage-phone", width=390)
            sign_in_admin(driver, server.url, ADMIN_TOKEN, next_path="/")
            driver.get(server.url + "/")
            shoot(driver, "home")
            driver.get(server.url + "/reports")
            shoot(driver, "reports")
            driver.get(server.url + "/admin")
            shoot(driver, "admin")
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main()
