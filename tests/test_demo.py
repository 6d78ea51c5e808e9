"""`python -m tagmoe_lit demo` in a real headless browser (Debian's chromium + chromium-driver, which
`.ci/run` installs): load the page, upload a PNG, type an instruction, press Edit, find the edit and
the routing bars; the page reaches nothing but the demo's own server; the temporary folder is gone
after the demo stops. Without a browser the test fails in CI and is skipped elsewhere."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import EDIT_MODEL, tiny_checkpoint

ROOT = Path(__file__).parents[1]


def browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited with {process.returncode}: {process.log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo did not answer at {url} within {seconds} s")


@pytest.fixture
def demo(tmp_path):
    """The demo command serving a tiny checkpoint on a free local port: (url, process, its TMPDIR)."""
    ckpt = tiny_checkpoint(tmp_path / "last.ckpt")
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "demo.log", "w")  # a file, not a pipe: a full pipe nobody reads would block the demo
    process = subprocess.Popen([sys.executable, "-m", "tagmoe_lit", "demo", *EDIT_MODEL, "--ckpt_path", str(ckpt), "--port", str(port)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    process.log = tmp_path / "demo.log"
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process)
        yield url, process, tmp
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def test_the_page_edits_an_upload_and_shows_the_routing(demo, tmp_path):
    chromium, driver_path = browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, process, tmp = demo
    pixels = np.zeros((30, 50, 3), dtype=np.uint8)
    pixels[..., 2], pixels[5:15, 5:20] = 200, (230, 20, 20)
    Image.fromarray(pixels).save(tmp_path / "upload.png")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser_ = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser_.get(url)
        wait = WebDriverWait(browser_, 120)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#source input[type=file]"))).send_keys(str(tmp_path / "upload.png"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#source img")))  # the upload is shown
        browser_.find_element(By.CSS_SELECTOR, "#instruction textarea").send_keys("make the red square green")
        browser_.find_element(By.CSS_SELECTOR, "#edit").click()
        edited = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#edited img")))
        routing = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#routing img")))
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#tags"), "The router reads the task as"))
        assert edited.get_attribute("src") and routing.get_attribute("src")
        first = edited.get_attribute("src")  # a second edit of the same upload, another seed: a new image
        seed = browser_.find_element(By.CSS_SELECTOR, "#seed input")
        seed.clear()
        seed.send_keys("7")
        browser_.find_element(By.CSS_SELECTOR, "#edit").click()
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#edited img").get_attribute("src") not in (None, "", first))
        edited, routing = (browser_.find_element(By.CSS_SELECTOR, f"#{name} img") for name in ("edited", "routing"))
        assert browser_.execute_script("return arguments[0].naturalWidth", routing) > 100  # the bars are an image
        browser_.save_screenshot(os.environ.get("TAGMOE_DEMO_SCREENSHOT", str(tmp_path / "demo.png")))
        requests = [json.loads(entry["message"])["message"] for entry in browser_.get_log("performance")]
        urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    finally:
        browser_.quit()
    web = {u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))}  # not the browser's own chrome:// pages
    assert any(u.startswith(url) for u in web)
    outside = sorted(u for u in web if not u.startswith((url, url.replace("http:", "ws:"))))
    assert not outside, f"the page reached outside the demo: {outside[:5]}"
    process.send_signal(signal.SIGTERM)  # as a service manager stops it: the demo closes and removes its folder
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the demo did not stop on Ctrl-C: {process.log.read_text()[-3000:]}") from None
    assert not list(tmp.glob("tagmoe_demo_*")), "the demo's temporary folder outlived it"
