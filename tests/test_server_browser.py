"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) with Selenium
against a live gradio_server.py on 127.0.0.1 with the tiny random-weight tree.

An empty prompt shows an error and queues/writes nothing; a small job typed into the form plays in the
page, and the seed the page shows is the one in the sidecar next to the mp4. A screenshot of the finished
page is kept as a test artefact (.cache/test-artifacts/server_page.png and the pytest tmp dir).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hyvideo.testing.tiny import write_tiny_checkpoints
from tests.server_launch import REPO, LiveServer

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACT = REPO / ".cache" / "test-artifacts" / "server_page.png"
WAIT_S = 120


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    yield driver
    driver.quit()


def _set(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text, Keys.TAB)


def test_page_generates_a_video_and_refuses_an_empty_prompt(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    save = tmp_path / "out"
    server = LiveServer(write_tiny_checkpoints(tmp_path / "ckpts"), save).wait_ready()
    wait = WebDriverWait(browser, WAIT_S)
    try:
        browser.get(server.url + "/")
        prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        assert "TINY RANDOM weights" in browser.find_element(By.ID, "tiny-banner").text
        # 1. An empty prompt: an error message, no job, no file.
        _set(prompt, "   ")
        browser.find_element(By.ID, "generate").click()
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[contains(text(), 'prompt is empty')]")))
        assert server.client.get("/v1/videos").json()["data"] == []
        assert not save.exists() or not any(p.suffix in (".mp4", ".json") for p in save.iterdir())
        # 2. A small job from the form.
        _set(prompt, "A cat walks on the grass, realistic style.")
        for field, value in (("width", "64"), ("height", "48"), ("frames", "5")):
            _set(browser.find_element(By.CSS_SELECTOR, f"#{field} input"), value)
        _set(browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]"), "2")
        browser.find_element(By.ID, "generate").click()
        video = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result video[src]")))
        assert video.get_attribute("src")
        seed_box = browser.find_element(By.CSS_SELECTOR, "#seed_used textarea")
        wait.until(lambda _: seed_box.get_attribute("value").strip().isdigit())
        shown_seed = int(seed_box.get_attribute("value"))
        browser.save_screenshot(str(tmp_path / "server_page.png"))
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "server_page.png", ARTIFACT)
        (mp4,) = save.glob("*.mp4")
        sidecar = json.loads(mp4.with_suffix(".json").read_text())
        assert sidecar["seed"] == shown_seed and sidecar["size"] == [48, 64, 5]
        assert f"_seed{shown_seed}_" in mp4.name
        (job,) = server.client.get("/v1/videos").json()["data"]  # the page's job is in the API's queue
        assert job["status"] == "completed" and job["seed"] == shown_seed
    finally:
        server.stop()
