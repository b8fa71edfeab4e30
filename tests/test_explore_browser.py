"""The explorer page in a real headless Chromium (Debian's `chromium`, driven by Playwright): the `explore` command
serves it, and the test does what a user does. Screenshots go to the test's temporary folder (and to
$ROBUST_TRAIN_SCREENSHOTS when set, to look at them)."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(explore_checkpoints):
    """`python -m robust_train explore --port 0 ...` in a subprocess; yields its address."""
    a, b = explore_checkpoints
    process = subprocess.Popen(
        [sys.executable, "-m", "robust_train", "explore", "--ckpt", str(a), "--compare", str(b), "--port", "0",
         "--n", "60", "--points", "11"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    address, deadline = None, time.time() + 240
    while time.time() < deadline and address is None:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            pytest.fail(f"explore exited {process.returncode}: {process.stderr.read()[-2000:]}")
        found = re.search(r"(http://\S+/)", line)
        address = found.group(1) if found else None
    assert address, "explore printed no address"
    yield address
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("no chromium: install Debian's chromium (apt-get install chromium), as .ci/run does")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def shoot(page, tmp_path, name):
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("ROBUST_TRAIN_SCREENSHOTS"):
        folder = Path(os.environ["ROBUST_TRAIN_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)


def wait_until(page, expression: str, timeout: float = 120):
    """Poll a JavaScript expression until it is true. (page.wait_for_function evaluates its string with eval,
    which the page's Content-Security-Policy rightly forbids; page.evaluate is not subject to it.)"""
    deadline = time.time() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.time() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        page.wait_for_timeout(100)


def watch(page, requests: list, problems: list):
    page.on("request", lambda r: requests.append(r.url))
    # The refused upload's 400 is the one error the browser is expected to log.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and "status of 400" not in m.text
            else None)
    page.on("pageerror", lambda e: problems.append(str(e)))


def scores(page, panel="a"):
    return page.locator(f"#scores-{panel} li").all_inner_texts()


def test_explorer_page_end_to_end(server, browser, tmp_path):
    assert urlparse(server).hostname == "127.0.0.1"  # bound to this machine unless --host says otherwise
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, problems = [], []
    watch(page, requests, problems)
    page.goto(server)

    # It opens on the first test image with FGSM picked, at ε 0: τ is 1 and the top class is the label.
    page.wait_for_selector("#scores-a li")
    assert page.locator("#attack").input_value() == "fgsm"
    assert page.locator(".thumb.selected").get_attribute("data-id") == "t0"
    assert page.locator("#tau").inner_text() == "1.000"
    assert page.locator("#eps-label").inner_text().startswith("ε = 0.000 (L∞)")
    assert len(scores(page)) == 5 and scores(page)[0].startswith("7")
    page.wait_for_selector("#graph g.layer circle")
    shoot(page, tmp_path, "1-open")

    # Move the slider: a lookup, the scores and the overlay follow.
    before_scores, before_map = scores(page), page.locator("#map-adv").get_attribute("src")
    page.locator("#eps-slider").fill("10")
    assert page.locator("#eps-label").inner_text().startswith("ε = 0.400")
    wait_until(page, "document.querySelector('#bluff-caption').innerText.startsWith('ε = 0.400')")
    assert "stale" not in (page.locator("#graph").get_attribute("class") or "")
    assert scores(page) != before_scores
    assert page.locator("#map-adv").get_attribute("src") != before_map
    assert float(page.locator("#tau").inner_text()) < 1
    assert "‖·‖∞ 0.400" in page.locator("#delta-size").inner_text()
    # The transfer panel: model B's scores of the same x'.
    assert page.locator("#panel-b").is_visible() and len(scores(page, "b")) == 5
    # Bluff's graph: k channels per layer, for the k asked.
    wait_until(page, "document.querySelectorAll('#graph g.layer').length === 3")
    for layer in page.locator("#graph g.layer").all():
        assert layer.locator("circle").count() == 5
    page.locator("#k").fill("3")
    page.locator("#k").dispatch_event("change")
    wait_until(page, "[...document.querySelectorAll('#graph g.layer')].every(g => "
                           "g.querySelectorAll('circle').length === 3)")
    page.locator("#graph g.layer").nth(1).locator("circle").first.click()
    page.wait_for_selector("#channel-examples img")
    assert page.locator("#channel-chart polyline").count() == 1
    shoot(page, tmp_path, "2-eps-0.4")

    # A bad upload shows its message, and the next action still works.
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.locator("#upload").set_input_files(str(bad))
    page.wait_for_selector("#message:not([hidden])")
    assert "not a readable PNG or JPEG" in page.locator("#message").inner_text()
    shoot(page, tmp_path, "3-bad-upload")
    page.locator("#eps-slider").fill("2")
    assert page.locator("#eps-label").inner_text().startswith("ε = 0.080")

    # Another image, another attack: targeted PGD towards 9 (the seed's 7 → 9), then DeepFool.
    page.locator("#attack").select_option("pgd_target")
    page.locator("#target").select_option("9")
    wait_until(page, "document.querySelector('#busy').hidden")
    page.locator("#eps-slider").fill("10")
    wait_until(page, "document.querySelector('#scores-a li').innerText.startsWith('9')")
    assert page.locator("#message").is_hidden()
    page.locator("#attack").select_option("deepfool")
    wait_until(page, "document.querySelector('#eps-label').innerText.includes('L2')")
    assert "DeepFool" in page.locator("#eps-label").inner_text()
    page.locator(".thumb").nth(1).click()
    wait_until(page, "document.querySelector('.thumb.selected').dataset.id === 't1'")
    wait_until(page, "document.querySelector('#busy').hidden")
    shoot(page, tmp_path, "4-deepfool")

    # A second tab works beside the first.
    other = browser.new_page()
    watch(other, requests, problems)
    other.goto(server)
    other.wait_for_selector("#scores-a li")
    assert len(other.locator("#scores-a li").all_inner_texts()) == 5
    other.close()

    # Nothing left this machine: every request went to the server's own address (or was a data: URI).
    origin = server.rstrip("/")
    outside = [u for u in requests if not (u.startswith((origin, "data:")))]
    assert requests and not outside, outside
    # No script error and no Content-Security-Policy violation (an inline style or script would be one).
    assert not problems, problems
    page.close()


def test_filters_and_good_upload(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    page.wait_for_selector("#scores-a li")
    total = page.locator(".thumb").count()
    page.locator("#filter-class").select_option("3")
    wait_until(page, f"document.querySelectorAll('.thumb').length < {total}")
    labels = page.locator(".thumb span").all_inner_texts()
    assert labels and set(labels) == {"3"}
    page.locator("#filter-class").select_option("all")
    page.locator("#filter-show").select_option("fragile")
    wait_until(page, "document.querySelector('#gallery-count').innerText !== ''")
    # A real PNG: accepted, becomes the selected image, and its grid is computed.
    from PIL import Image

    digit = tmp_path / "digit.png"
    bar = Image.new("L", (56, 56), 0)
    bar.paste(255, (24, 4, 32, 52))  # a vertical stroke: a 1
    bar.save(digit)
    before = page.locator("#img-clean").get_attribute("src")
    page.locator("#upload").set_input_files(str(digit))
    wait_until(page, f"document.querySelector('#img-clean').src !== {before!r} && "
                     "document.querySelector('#busy').hidden")
    assert page.locator("#message").is_hidden()
    assert page.locator(".thumb.selected").count() == 0  # the upload, not a test image, is shown
    assert len(scores(page)) == 5
    page.locator("#eps-slider").fill("10")
    assert page.locator("#eps-label").inner_text().startswith("ε = 0.400")
    wait_until(page, "document.querySelector('#bluff-caption').innerText.startsWith('ε = 0.400')")
    assert "stale" not in (page.locator("#graph").get_attribute("class") or "")
    shoot(page, tmp_path, "5-upload")
    page.close()
