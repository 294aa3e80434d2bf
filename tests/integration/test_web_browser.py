"""The search page in real headless Chromium against `lakelens serve` on a small index of real images."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import webindex
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; setup.sh installs them
TOKEN = "browser-test-token"
WAIT = 60  # an upper bound for a wait-for-condition on 2 busy cores, not a speed check


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    data = webindex.build(root)
    log = open(root / "server.log", "w")
    # the real command line, on a free port it picks itself and announces on stdout
    proc = subprocess.Popen([sys.executable, "-m", "lakelens.cli", "serve", "--index", str(data.index),
                             "--port", "0", "--threads", "4"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, text=True, env={**os.environ, "LAKELENS_TOKEN": TOKEN})
    try:
        line = proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
        assert match, f"server did not start: {line!r}\n{(root / 'server.log').read_text()}"
        assert f"({data.version}, {len(data.ids)} images, model lakelens-tiny)" in line
        data.base = match.group(1)
        yield data
    finally:
        proc.terminate()
        proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    return WebDriverWait(driver, WAIT).until(lambda d: condition(d), message=f"waiting for {what}")


def hits(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#results .hit")


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def thumbs_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = Array.from(document.querySelectorAll('#results img'));"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def set_input(driver, element_id: str, text: str) -> None:
    # select-all + type goes through React's change events, which element.clear() does not
    box = driver.find_element(By.ID, element_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if text:
        box.send_keys(text)


def search(driver, query: str, status_starts: str) -> None:
    """Type a new query, press Enter, and wait for the status line this search writes (each query text
    is new, so the status line changes even when the results do not)."""
    set_input(driver, "query", query)
    driver.find_element(By.ID, "query").send_keys(Keys.ENTER)
    wait_for(driver, lambda d: status(d).startswith(status_starts) and f"“{query}”" in status(d),
             f"status {status_starts!r} for {query!r}")


def test_search_click_similar_upload_and_hostile_names(site, browser, tmp_path):
    d = browser
    d.get(site.base + "/")  # the server requires its token ($LAKELENS_TOKEN): without it, no page
    assert "access token" in d.find_element(By.TAG_NAME, "body").text
    d.get(site.base + "/?token=" + TOKEN)  # once; the page's own requests then carry it as a cookie
    wait_for(d, lambda d: d.find_elements(By.ID, "query"), "the page")
    assert f"index {site.version} · {len(site.ids)} images" in d.find_element(By.ID, "index-info").text

    # text query, submitted with Enter: a grid of the default K=20 results with loaded thumbnails
    search(d, "a red circle", "20 results for")
    wait_for(d, thumbs_loaded, "thumbnails")
    cards = hits(d)
    assert [c.get_attribute("data-rank") for c in cards] == [str(i) for i in range(1, 21)]
    scores = [float(re.search(r"score (-?[\d.]+)", c.find_element(By.CLASS_NAME, "score").text).group(1))
              for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert {c.find_element(By.CLASS_NAME, "path").text for c in cards} <= set(site.uris)
    srcs = [c.find_element(By.TAG_NAME, "img").get_attribute("src") for c in cards]
    assert all(s.startswith(f"{site.base}/thumb/{c.get_attribute('data-id')}?v=") for s, c in zip(srcs, cards))
    d.save_screenshot(str(tmp_path / "text.png"))

    # the K control
    set_input(d, "k", "5")
    search(d, "a blue square", "5 results for")
    assert len(hits(d)) == 5

    # clicking a result searches by that image: it is its own top match (exact index, its stored vector)
    target = hits(d)[2]
    target_id, target_path = target.get_attribute("data-id"), target.find_element(By.CLASS_NAME, "path").text
    target.click()
    wait_for(d, lambda d: status(d).startswith("5 results for images similar to"), "similar results")
    assert target_path in status(d)
    first = hits(d)[0]
    assert first.get_attribute("data-id") == target_id
    assert first.find_element(By.CLASS_NAME, "path").text == target_path
    assert "score 1.0000" in first.find_element(By.CLASS_NAME, "score").text
    wait_for(d, thumbs_loaded, "thumbnails of similar images")
    d.save_screenshot(str(tmp_path / "similar.png"))

    # uploading an indexed image finds that image first
    upload = site.paths[7]
    d.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(upload)
    wait_for(d, lambda d: status(d).startswith("5 results for uploaded image"), "upload results")
    assert Path(upload).name in status(d)
    assert hits(d)[0].get_attribute("data-id") == str(int(site.ids[7]))
    wait_for(d, thumbs_loaded, "thumbnails of upload results")
    d.save_screenshot(str(tmp_path / "upload.png"))

    # file names with markup: the path-prefix filter finds exactly them; they show as text, nothing runs
    img_dir = str(Path(site.paths[0]).parent)
    for i, name in enumerate(webindex.HOSTILE):
        set_input(d, "prefix", f"file:{img_dir}/{name[:6]}")
        search(d, f"shape {i}", "1 result for")
        (card,) = hits(d)
        assert card.find_element(By.CLASS_NAME, "path").text == f"file:{img_dir}/{name}"
        assert d.execute_script("return document.querySelectorAll('#results img').length") == 1
        assert d.execute_script("return document.querySelectorAll('#results script').length") == 0
        assert d.execute_script("return typeof window.__xss") == "undefined"
        wait_for(d, thumbs_loaded, "the hostile-named image's thumbnail")
    d.save_screenshot(str(tmp_path / "hostile-names.png"))

    # a minimum score no text query reaches with this model: the page says so
    set_input(d, "prefix", "")
    set_input(d, "min-score", "0.99")
    search(d, "a green star", "No results for")
    assert hits(d) == [] and d.find_element(By.CSS_SELECTOR, "#results .empty").text == "No results"
    assert d.execute_script("return typeof window.__xss") == "undefined"
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("text.png", "similar.png", "upload.png"))
