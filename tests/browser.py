"""A real headless Chromium for the page tests (Debian's chromium and
chromedriver, driven by selenium), and small helpers for the page forms."""

import os
import re
import shutil

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR_CHARTJS = os.path.join(os.path.dirname(HERE), "vendor", "chart.umd.js")
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,900")


def start_chromium(profile_dir):
    """A headless Chromium with a fresh profile; quit() it when done."""
    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.implicitly_wait(0)
    return driver


def fresh(driver, base_url, path="/"):
    """Open a page as a stranger would: no cookies left by an earlier test's llimit."""
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})  # without loading a page first
    driver.get(base_url + path)


def sign_in_open(driver, url, user_name, next_path="/"):
    """Sign in on /login with a typed user name (LLIMIT_AUTH=open)."""
    fresh(driver, url, f"/login?next={next_path}")
    driver.find_element(By.ID, "user").send_keys(user_name)
    click_and_wait(driver, driver.find_element(By.CSS_SELECTOR, "form button[type=submit]"))


def sign_in_admin(driver, url, admin_token, next_path="/admin"):
    """Sign in on /login with the admin token."""
    driver.get(f"{url}/login?next={next_path}")
    field = driver.find_element(By.ID, "admin_token")
    if not field.is_displayed():
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
    field.send_keys(admin_token)
    click_and_wait(driver, field.find_element(By.XPATH, "./ancestor::form//button"))


def click_and_wait(driver, element, timeout=10):
    """Click something that loads a new page, and wait until it has."""
    driver.execute_script("window.llimitTestOldPage = true;")
    element.click()
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return !window.llimitTestOldPage && document.readyState === 'complete';"))


def csrf_token(html):
    """The CSRF token a page's forms carry."""
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def http_sign_in(url, user_name=None, admin_token=None):
    """A requests.Session signed in through the /login form (as a user, the admin, or both)."""
    session = requests.Session()
    page = session.get(url + "/login")
    if user_name:
        page = session.post(url + "/login", data={"csrf_token": csrf_token(page.text),
                                                  "user": user_name, "next": "/"})
        assert page.status_code == 200, page.text
    if admin_token:
        page = session.post(url + "/login", data={"csrf_token": csrf_token(page.text),
                                                  "admin_token": admin_token, "next": "/"})
        assert page.status_code == 200, page.text
    return session
