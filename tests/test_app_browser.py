"""The web page in a real browser: `python -m wavflow.app` on a free loopback port with a small
checkpoint, driven by headless Chromium (Debian's chromium + chromium-driver, through
selenium; .ci/run installs them). Caption only, then a video upload, then a bad upload.

WAVFLOW_APP_SCREENSHOT=PATH also saves the page after the video request there (docs/app.png
is made this way)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

from tests.media import write_video
from tests.test_predict import save_checkpoints, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(check, what: str, timeout: float = WAIT_S):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, wavflow_cache_dir):
    root = tmp_path_factory.mktemp("app_browser")
    ckpt = save_checkpoints(root / "ckpt", tiny_cfg())["full"]
    port = _free_port()
    log = open(root / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wavflow.app", f"model.ckpt_path={ckpt}", "encoders.profile=tiny",
         "sampling.num_steps=25", "inference.cfg=1.5", f"output.output_dir={root / 'out'}", "--port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "WAVFLOW_CACHE_DIR": str(wavflow_cache_dir)})
    url = f"http://127.0.0.1:{port}/"
    start = time.time()

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}: {(root / 'app.log').read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False
    _wait_until(up, "the page to answer")
    print(f"page answers {time.time() - start:.1f} s after start")
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _click(driver, selector: str) -> None:
    """Click `selector` once the page has rendered it (Gradio renders its blocks one by one)."""
    _wait_until(lambda: _css(driver, selector), selector)[0].click()


def _text(driver, selector: str) -> str:
    found = _css(driver, selector)
    return found[0].text if found else ""


def _download(driver, component: str, since: set[str]) -> str:
    """The href of `component`'s download link once it is a new one (a finished request)."""
    def new_link():
        links = [a.get_attribute("href") for a in _css(driver, f"#{component} a[download]")]
        return next((h for h in links if h and h not in since), None)
    return _wait_until(new_link, f"a result in #{component}")


def _fetch(url: str, to: Path) -> Path:
    with urllib.request.urlopen(url, timeout=30) as r:
        to.write_bytes(r.read())
    return to


def _links(driver, component: str) -> set[str]:
    return {a.get_attribute("href") for a in _css(driver, f"#{component} a[download]")}


@pytest.mark.slow
def test_the_page_generates_from_a_caption_a_video_and_refuses_a_bad_upload(app_url, browser, tmp_path):
    url, root = app_url
    start = time.time()
    browser.get(url)
    caption = _wait_until(lambda: _css(browser, "#caption textarea"), "the caption box")[0]
    print(f"first page load {time.time() - start:.1f} s")

    # 1. caption only (T2A): a wav of the requested length
    caption.send_keys("two sharp clicks")
    start = time.time()
    _click(browser, "#generate")
    wav_url = _download(browser, "audio_out", set())
    print(f"T2A request {time.time() - start:.1f} s (the first may wait for the text encoder to load)")
    wave, sr = sf.read(_fetch(wav_url, tmp_path / "t2a.wav"))
    assert (sr, len(wave)) == (16000, 16000)
    _wait_until(lambda: '"mode": "T2A"' in _text(browser, "#settings"), "the settings of the T2A request")

    # 2. with a video (VT2A), Duration left at 0: the whole video (1.52 s: 38 frames at 25 fps,
    # past the trained 1 s: 3 windows), the wav and the mp4 with it muxed
    video = tmp_path / "clip.mp4"
    write_video(video, seconds=1.5, fps=25)
    whole = round(16000 * 1.52)
    before = _links(browser, "audio_out")
    _css(browser, "#video_in input[type=file]")[0].send_keys(str(video))
    time.sleep(1.0)  # the upload finishes before the click
    start = time.time()
    _click(browser, "#generate")
    wav_url = _download(browser, "audio_out", before)
    mp4_url = _download(browser, "video_out", set())
    print(f"VT2A request {time.time() - start:.1f} s")
    wave, sr = sf.read(_fetch(wav_url, tmp_path / "vt2a.wav"))
    assert (sr, len(wave)) == (16000, whole)
    import av

    with av.open(str(_fetch(mp4_url, tmp_path / "vt2a.mp4"))) as box:
        assert {s.type for s in box.streams} >= {"video", "audio"}
    _wait_until(lambda: '"mode": "VT2A"' in _text(browser, "#settings"), "the settings of the VT2A request")
    assert "predict.sh" in _css(browser, "#settings")[0].text and '"windows": 3' in _css(browser, "#settings")[0].text
    shot = os.environ.get("WAVFLOW_APP_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)

    # compare modes: VT2A, V2A and T2A from the same video and caption
    start = time.time()
    _click(browser, "#compare")
    for mode in ("VT2A", "V2A", "T2A"):
        wave, sr = sf.read(_fetch(_download(browser, f"audio_{mode}", set()), tmp_path / f"cmp_{mode}.wav"))
        assert (sr, len(wave)) == (16000, whole), mode
    print(f"compare modes {time.time() - start:.1f} s")

    # 3. a file that is not a video: the page says so, no traceback
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    _css(browser, "#video_in button[aria-label='Clear']")[0].click() if _css(
        browser, "#video_in button[aria-label='Clear']") else None
    _css(browser, "#video_in input[type=file]")[0].send_keys(str(bad))
    time.sleep(1.0)
    _click(browser, "#generate")
    _wait_until(lambda: "is not a video that can be read" in browser.page_source, "the error message")
    assert "Traceback" not in browser.page_source
    # the uploads were copied into per-request folders, all removed again
    assert not list((root / "out" / ".uploads").glob("*/*"))
