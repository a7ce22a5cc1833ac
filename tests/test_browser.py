"""serve, end to end: the real server in a subprocess, driven by headless Chromium (Selenium).

Needs Debian's ``chromium`` and ``chromium-driver`` (installed by .ci/run); skipped without
them. Selenium is pointed at the system chromedriver, so nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from cifar_inception.data import CLASSES

pytestmark = pytest.mark.browser

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (CHROMIUM and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("chromium and chromedriver are not installed "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 30


def draw_scene(path: Path) -> Path:
    """A made-up picture (a boat at sea), larger than 32x32 so the server has to resize it."""
    image = Image.new("RGB", (320, 240), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 150, 320, 240], fill=(30, 90, 150))
    draw.polygon([(90, 150), (230, 150), (205, 180), (115, 180)], fill=(120, 60, 40))
    draw.rectangle([157, 70, 162, 150], fill=(60, 40, 30))
    draw.polygon([(163, 75), (163, 145), (215, 145)], fill=(245, 245, 240))
    draw.ellipse([250, 25, 290, 65], fill=(255, 220, 90))
    image.save(path)
    return path


def make_run(folder: Path) -> Path:
    import torch

    from cifar_inception import checkpoint as ckpt_mod
    from cifar_inception.models import create_model

    torch.manual_seed(0)
    model = create_model("googlenet", width=0.25)
    ckpt_mod.save_checkpoint(folder / "best.pt", ckpt_mod.make_checkpoint(
        model_name="googlenet", model_options={"width": 0.25}, num_classes=10,
        classes=list(CLASSES), mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
        state_dict=model.state_dict()))
    (folder / "eval.json").write_text(json.dumps({"test_top1": 0.8125, "checkpoint": "best.pt"}))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "notes.txt").write_text("this is not an image\n")
    return {"scene": draw_scene(folder / "boat.png"), "text": folder / "notes.txt"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``cifar-inception serve`` on a free loopback port; yields its URL."""
    run = make_run(tmp_path_factory.mktemp("run"))
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cifar_inception", "serve", str(run), "--port", "0",
             "--no-access-log"],
            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = ""
        assert "serving googlenet" in first, f"server did not start: {first!r}\n{log.read_text()}"
        url = first.split(" at ")[1].split()[0]
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url + "api/health", timeout=5) as response:
                if json.load(response)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"server never became healthy:\n{log.read_text()}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     "--hide-scrollbars", "--window-size=900,900",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def open_page(browser, url: str) -> None:
    browser.get(url)
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "model-line").get_attribute("data-model"))
    browser.get_log("browser")  # start each test with an empty console


def done_cards(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".result-card.is-done")


def read_predictions(card) -> list[tuple[str, float, float]]:
    """(class, percent shown, bar width in px) for each row of a result card."""
    rows = []
    for row in card.find_elements(By.CSS_SELECTOR, ".prediction"):
        label = row.find_element(By.CSS_SELECTOR, ".label").text
        percent = float(row.find_element(By.CSS_SELECTOR, ".value").text.rstrip("%"))
        width = row.find_element(By.CSS_SELECTOR, ".bar-fill").size["width"]
        rows.append((label, percent, width))
    return rows


def test_uploading_an_image_shows_it_at_32x32_beside_the_top5(server, browser, files,
                                                              tmp_path_factory):
    open_page(browser, server)
    header = browser.find_element(By.ID, "model-line").text
    assert "googlenet" in header and "test accuracy 81.25%" in header

    browser.find_element(By.ID, "file-input").send_keys(str(files["scene"]))
    WebDriverWait(browser, WAIT_S).until(lambda b: len(done_cards(b)) == 1)
    (card,) = done_cards(browser)
    assert card.find_element(By.CSS_SELECTOR, ".file-name").text == "boat.png"

    rows = read_predictions(card)
    assert len(rows) == 5
    labels = [label for label, _, _ in rows]
    assert len(set(labels)) == 5 and set(labels) <= set(CLASSES)
    percents = [percent for _, percent, _ in rows]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
    widths = [width for _, _, width in rows]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0

    model_input = card.find_element(By.CSS_SELECTOR, "img.model-input")
    assert browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", model_input) == [32, 32]
    assert model_input.value_of_css_property("image-rendering") == "pixelated"
    assert model_input.size["width"] >= 4 * 32  # shown scaled up

    shot = tmp_path_factory.mktemp("screenshots") / "serve-page.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script error, CSP violation or failed request


def test_a_non_image_shows_an_error_message_and_the_page_keeps_working(server, browser, files):
    open_page(browser, server)
    browser.find_element(By.ID, "file-input").send_keys(str(files["text"]))
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, ".result-card.is-error .error-message"))
    message = browser.find_element(By.CSS_SELECTOR, ".result-card.is-error .error-message")
    assert "notes.txt" in message.text and "not an image" in message.text
    assert message.get_attribute("role") == "alert"
    assert not done_cards(browser)

    browser.find_element(By.ID, "file-input").send_keys(str(files["scene"]))
    WebDriverWait(browser, WAIT_S).until(lambda b: len(done_cards(b)) == 1)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".result-card")) == 2


def test_several_files_and_a_dropped_image_each_get_a_card(server, browser, files):
    open_page(browser, server)
    browser.find_element(By.ID, "file-input").send_keys(
        "\n".join(str(files[name]) for name in ("scene", "text", "scene")))
    WebDriverWait(browser, WAIT_S).until(lambda b: len(done_cards(b)) == 2)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".result-card.is-error")) == 1

    # A drop event carrying an image made in the page: the drag-and-drop path.
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const canvas = document.createElement("canvas");
        canvas.width = 40; canvas.height = 30;
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#3a7"; ctx.fillRect(0, 0, 40, 30);
        ctx.fillStyle = "#d33"; ctx.fillRect(10, 8, 20, 14);
        canvas.toBlob((blob) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], "dropped.png", {type: "image/png"}));
          const zone = document.getElementById("drop-zone");
          zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true,
                                                    cancelable: true}));
          done();
        }, "image/png");
    """)
    WebDriverWait(browser, WAIT_S).until(lambda b: len(done_cards(b)) == 3)
    names = [c.find_element(By.CSS_SELECTOR, ".file-name").text for c in done_cards(browser)]
    assert names[0] == "dropped.png"  # newest first

    browser.find_element(By.ID, "clear-button").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".result-card")
