"""The search page's keyword side in real headless Chromium: mode selector, tag chips and facets, the search kept
in the URL (shareable, back button), and the large view, on an index with tags and captions (webindex)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
import requests
import webindex
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from integration.test_web_browser import browser, hits, set_input, status, wait_for  # noqa: F401 (browser: fixture)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    data = webindex.build(tmp_path_factory.mktemp("web-tags"), keywords=True)
    server = webindex.ThreadServer(data.index)
    server.app.live.warm()
    data.base = server.base
    yield data
    server.close()


def api(site, **params) -> list[dict]:
    r = requests.get(site.base + "/api/search", params={"k": 20, **params}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def cards(driver) -> list[dict]:
    """id, tag chips, caption and path of every result card, in page order (one script call)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results .hit')).map(c => ({id: c.dataset.id, "
        "tags: Array.from(c.querySelectorAll('.chip')).map(a => a.textContent), "
        "caption: (c.querySelector('.caption') || {}).textContent, path: c.querySelector('.path').textContent}));")


def url_args(driver) -> dict:
    return parse_qs(urlparse(driver.current_url).query)


def same_as_api(driver, rows: list[dict]) -> None:
    assert [(c["id"], c["tags"], c["caption"], c["path"]) for c in cards(driver)] == [
        (r["id"], r["tags"], r["caption"], r["path"]) for r in rows]


def facet(driver, tag: str):
    (link,) = [a for a in driver.find_elements(By.CSS_SELECTOR, "#facets a.facet-tag") if a.text == tag]
    return link


def no_script_ran(driver) -> bool:
    return driver.execute_script("return typeof window.__xss") == "undefined" and not driver.execute_script(
        "return document.querySelectorAll('#results script, #facets script, #viewer script, #facets img').length")


def test_chips_facets_url_state_back_button_and_large_view(tagged, browser):  # noqa: F811
    d = browser
    d.get(tagged.base + "/")
    wait_for(d, lambda d: "in all 43 images" in d.find_element(By.ID, "facets").text, "the facets of every image")
    assert d.find_element(By.CSS_SELECTOR, "#mode input:checked").get_attribute("value") == "vector"

    # a text query in the default mode: each result's chips and caption are the API's (tags best first)
    set_input(d, "query", "red circle")
    d.find_element(By.ID, "query").send_keys(Keys.ENTER)
    wait_for(d, lambda d: status(d).startswith("20 results for “red circle” · vector"), "vector results")
    first = api(tagged, q="red circle")
    same_as_api(d, first)
    assert url_args(d) == {"q": ["red circle"], "mode": ["vector"]}
    first_url = d.current_url

    # a facet narrows the search to its tag: every result carries it; the facets count within the results
    assert "in the best 43 results" in d.find_element(By.ID, "facets").text
    facet(d, "circle").click()
    wait_for(d, lambda d: "with tag:circle" in status(d), "results with tag:circle")
    circles = api(tagged, q="red circle", tag="circle")
    same_as_api(d, circles)
    assert all("circle" in c["tags"] for c in cards(d)) and url_args(d)["tag"] == ["circle"]
    circle_url = d.current_url

    # a chip under a result adds its tag too
    chip = next(a for a in d.find_elements(By.CSS_SELECTOR, "#results .hit .chip") if a.text == "red")
    chip.click()
    wait_for(d, lambda d: "with tag:circle tag:red" in status(d), "results with tag:circle and tag:red")
    red_circles = api(tagged, q="red circle", tag=["circle", "red"])
    same_as_api(d, red_circles)
    assert all({"circle", "red"} <= set(c["tags"]) for c in cards(d))
    shared = d.current_url

    # the URL opened in a fresh page restores the query, mode, filters and results
    d.switch_to.new_window("tab")
    d.get(shared)
    wait_for(d, lambda d: "with tag:circle tag:red" in status(d), "the restored search")
    same_as_api(d, red_circles)
    assert d.find_element(By.ID, "query").get_attribute("value") == "red circle"
    d.close()
    d.switch_to.window(d.window_handles[0])

    # back: the search before, and the one before that
    d.back()
    wait_for(d, lambda d: d.current_url == circle_url and "with tag:circle ·" in status(d), "back to tag:circle")
    same_as_api(d, circles)
    d.back()
    wait_for(d, lambda d: d.current_url == first_url and "“red circle” · vector" in status(d), "back to no filters")
    same_as_api(d, first)

    # the mode selector searches again in that mode
    d.find_element(By.CSS_SELECTOR, "#mode input[value=keyword]").click()
    wait_for(d, lambda d: "· keyword ·" in status(d), "keyword results")
    same_as_api(d, api(tagged, q="red circle", mode="keyword"))
    assert url_args(d)["mode"] == ["keyword"]

    # the image with a tag and caption with markup in them: shown as text, and nothing runs
    facet(d, webindex.HOSTILE_TAG).click()
    wait_for(d, lambda d: status(d).startswith("1 result for"), "the hostile-tagged image")
    (card,) = cards(d)
    assert webindex.HOSTILE_TAG in card["tags"] and card["caption"] == webindex.HOSTILE_CAPTION
    assert no_script_ran(d)

    # the large view: path, size, tags with their scores, caption; "more like this" searches by the image
    hits(d)[0].find_element(By.TAG_NAME, "img").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#viewer.open #more-like-this"), "the large view")
    details = requests.get(f"{tagged.base}/api/image/{card['id']}", timeout=60).json()
    assert d.find_element(By.ID, "viewer-path").text == details["path"] == card["path"]
    assert d.find_element(By.ID, "viewer-size").text == "96 × 96 px"
    assert d.find_element(By.ID, "viewer-tags").text.split("\n") == [
        x for t in details["tags"] for x in (t["tag"], f"{t['score']:.2f}")]
    assert d.find_element(By.ID, "viewer-caption").text == webindex.HOSTILE_CAPTION
    wait_for(d, lambda d: d.execute_script("const i = document.querySelector('#viewer img.large');"
                                           "return i.complete && i.naturalWidth === 96;"), "the large image")
    assert no_script_ran(d)
    d.find_element(By.ID, "more-like-this").click()
    wait_for(d, lambda d: status(d).startswith("20 results for images similar to"), "more like this")
    assert hits(d)[0].get_attribute("data-id") == card["id"] and url_args(d) == {"similar": [card["id"]]}
    assert "viewer closed" in d.find_element(By.ID, "viewer").get_attribute("class")
    similar = requests.get(f"{tagged.base}/api/similar/{card['id']}", params={"k": 20}, timeout=60).json()["results"]
    same_as_api(d, similar)
    assert no_script_ran(d)
