"""The search page in real headless Chromium against `lakelens serve` on a small index of real images."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
import webindex
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lakelens.search import MAX_K
from lakelens.web.app import next_k

TOKEN = "browser-test-token"
WAIT = 60  # an upper bound for a wait-for-condition on 2 busy cores, not a speed check
POLL = 0.1  # seconds between looks at the page while waiting (Selenium's default, 0.5 s, idles most waits)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    data = webindex.build(root)
    # the real command line, on a free port it picks itself and announces on stdout
    with webindex.serve_command(data.index, root / "server.log", env={**os.environ, "LAKELENS_TOKEN": TOKEN}) as (
            base, _, line):
        assert f"({data.version}, {len(data.ids)} images, model lakelens-tiny)" in line
        data.base = base
        yield data


@pytest.fixture(scope="module")
def browser():
    driver = webindex.headless_chromium(1280, 1000)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    return WebDriverWait(driver, WAIT, poll_frequency=POLL).until(lambda d: condition(d), message=f"waiting for {what}")


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


def blur(driver) -> None:
    """Click outside the inputs: a debounced input (the query box, the slider's number) commits its value."""
    driver.find_element(By.TAG_NAME, "h1").click()


def remove_image(driver) -> None:
    driver.find_element(By.ID, "remove-image").click()
    wait_for(driver, lambda d: "none" in d.find_element(By.ID, "image-row").get_attribute("class"), "no query image")


def search(driver, query: str, status_starts: str) -> None:
    """Type a new query, press Enter, and wait for the status line this search writes (each query text
    is new, so the status line changes even when the results do not)."""
    set_input(driver, "query", query)
    driver.find_element(By.ID, "query").send_keys(Keys.ENTER)
    wait_for(driver, lambda d: status(d).startswith(status_starts) and f"“{query}”" in status(d),
             f"status {status_starts!r} for {query!r}")


def test_search_click_similar_upload_and_hostile_names(site, browser, tmp_path):
    d = browser
    # a browser that holds no token cookie for this host (cookies ignore the port: one run of part of the
    # suite here once showed the page without the token, most likely through such a cookie)
    d.execute_cdp_cmd("Network.clearBrowserCookies", {})
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

    # clicking a result opens it large (path, size; this index has no tags or captions); its "more like
    # this" searches by that image: it is its own top match (exact index, its stored vector)
    target = hits(d)[2]
    target_id, target_path = target.get_attribute("data-id"), target.find_element(By.CLASS_NAME, "path").text
    target.find_element(By.TAG_NAME, "img").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#viewer.open #more-like-this"), "the large view")
    assert d.find_element(By.ID, "viewer-path").text == target_path
    assert d.find_element(By.ID, "viewer-size").text == "96 × 96 px"
    assert d.find_element(By.ID, "viewer-tags").text == "no tags" and d.find_element(By.ID, "viewer-caption").text == ""
    d.find_element(By.ID, "more-like-this").click()
    wait_for(d, lambda d: status(d).startswith("5 results for images similar to"), "similar results")
    assert "viewer closed" in d.find_element(By.ID, "viewer").get_attribute("class")
    assert target_path in status(d)
    first = hits(d)[0]
    assert first.get_attribute("data-id") == target_id
    assert first.find_element(By.CLASS_NAME, "path").text == target_path
    assert "score 1.0000" in first.find_element(By.CLASS_NAME, "score").text
    wait_for(d, thumbs_loaded, "thumbnails of similar images")
    d.save_screenshot(str(tmp_path / "similar.png"))

    # uploading an indexed image (with no text: the image alone) finds that image first
    set_input(d, "query", "")
    blur(d)
    upload = site.paths[7]
    d.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(upload)
    wait_for(d, lambda d: status(d).startswith("5 results for uploaded image"), "upload results")
    assert Path(upload).name in status(d)
    assert hits(d)[0].get_attribute("data-id") == str(int(site.ids[7]))
    wait_for(d, thumbs_loaded, "thumbnails of upload results")
    d.save_screenshot(str(tmp_path / "upload.png"))
    remove_image(d)  # the text searches below search the text alone

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


def api(site, method: str, path: str, **kw) -> list[dict]:
    """The JSON API's results for the same inputs (its own request, with the server's token)."""
    r = requests.request(method, site.base + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60, **kw)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def shown(driver) -> list[tuple[int, str, float]]:
    """(rank, id, score) of every result card, in page order (one script call, not three per card)."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#results .hit'))"
        ".map(c => [c.dataset.rank, c.dataset.id, c.querySelector('.score').textContent]);")
    return [(int(rank), id_, float(re.search(r"score (-?[\d.]+)", score).group(1))) for rank, id_, score in rows]


def assert_same(page: list, rows: list[dict]) -> None:
    assert [(r, i) for r, i, _ in page] == [(r["rank"], r["id"]) for r in rows]
    assert all(abs(score - r["score"]) < 6e-5 for (_, _, score), r in zip(page, rows))  # 4 decimals shown


def scroll_to_end(driver) -> None:
    driver.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")


def more(driver):
    return driver.find_element(By.CSS_SELECTOR, "#results .more")


def set_balance(driver, value: str) -> None:
    """Type the image's weight into the slider's number box; it commits when the box loses focus."""
    set_input_element(driver.find_element(By.CSS_SELECTOR, "#weights input"), value)
    blur(driver)
    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#weights [role=slider]").get_attribute("aria-valuenow")
             == value, f"the slider at {value}")


def set_input_element(box, text: str) -> None:
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text)


def test_pages_stop_at_the_searchers_bound():
    assert next_k(20, 0) == 20 and next_k(20, 40) == 20
    assert next_k(1000, MAX_K - 300) == 300  # the last page asks only for what k + offset allows
    assert next_k(20, MAX_K) == 0


def test_scroll_loads_next_pages_text_and_image_with_weights(site, browser):
    d = browser
    d.get(site.base + "/?token=" + TOKEN)
    wait_for(d, lambda d: d.find_elements(By.ID, "query"), "the page")

    # query arithmetic that only subtracts: a readable message on the page, not a failed callback
    set_input(d, "query", "- a red circle")
    d.find_element(By.ID, "query").send_keys(Keys.ENTER)
    wait_for(d, lambda d: "only subtracts" in d.find_element(By.CSS_SELECTOR, "#status .error").text, "the error")
    assert hits(d) == []

    # arithmetic, then scrolling: each scroll to the end appends the next page (offset = cards shown),
    # the very ranks and ids the API gives for offset 20 and 40, until the 43 images run out
    q = "a red circle + a blue square"
    expected = [r for offset in (0, 20, 40) for r in api(site, "GET", "/api/search",
                                                        params={"q": q, "k": 20, "offset": offset})]
    assert len(expected) == len(site.ids) == 43
    search(d, q, "20 results for")
    assert_same(shown(d), expected[:20])
    assert more(d).get_attribute("class") == "more open" and "scroll down for more" in more(d).text
    scroll_to_end(d)
    wait_for(d, lambda d: len(hits(d)) >= 40, "the second page")
    page = shown(d)
    assert_same(page, expected[:len(page)])
    scroll_to_end(d)
    wait_for(d, lambda d: more(d).get_attribute("class") == "more done", "the end of the results")
    assert_same(shown(d), expected)
    assert more(d).text == "end of results" and status(d).startswith(f"43 results for “{q}”")
    wait_for(d, thumbs_loaded, "thumbnails of every page")

    # a text and an image with weights 0.3 / 0.7: the page's results are the API's for the same inputs
    d.execute_script("window.scrollTo(0, 0)")
    text, image = "a blue square", site.paths[3]
    search(d, text, "20 results for")
    set_balance(d, "0.7")  # no image yet: nothing is searched
    d.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(image)
    wait_for(d, lambda d: "combined with weights 0.3 and 0.7" in status(d), "the text and image results")
    assert status(d).startswith(f"20 results for “{text}” and uploaded image {Path(image).name}")

    def combined(weights: str, offset: int = 0) -> list[dict]:
        with open(image, "rb") as f:
            return api(site, "POST", "/api/search/image", files={"image": (Path(image).name, f)},
                       data={"q": text, "weights": weights, "k": "20", "offset": str(offset)})

    top = combined("0.3,0.7")
    assert_same(shown(d), top)
    assert top != api(site, "GET", "/api/search", params={"q": text, "k": 20})  # the image counts
    scroll_to_end(d)  # the next page of the same text, image and weights
    wait_for(d, lambda d: len(hits(d)) >= 40, "the second page of text and image")
    assert_same(shown(d)[:40], top + combined("0.3,0.7", offset=20))

    # moving the slider searches again with the new balance; its second page comes on scrolling too
    # (a new search: the page asked for at 20 cards of the last one does not stand in for it)
    d.execute_script("window.scrollTo(0, 0)")
    set_balance(d, "0.2")
    wait_for(d, lambda d: "combined with weights 0.8 and 0.2" in status(d), "results for the new weights")
    top = combined("0.8,0.2")
    assert_same(shown(d), top)
    scroll_to_end(d)
    wait_for(d, lambda d: len(hits(d)) >= 40, "the second page for the new weights")
    assert_same(shown(d)[:40], top + combined("0.8,0.2", offset=20))
    remove_image(d)
