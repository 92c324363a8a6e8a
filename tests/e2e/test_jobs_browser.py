"""Jobs in a real Chromium against the real app and Engine on tiny checkpoints (CPU): a reload
mid-run does not stop the job; a second tab sees it and can cancel it; three queued jobs are
reordered and are still there, in that order, after the app restarts, then run.

The page starts with small settings (written to settings.json as the app would remember them),
so each run takes seconds, not minutes, on a 2-core CPU. Screenshots go to the test's tmp folder
(-v --basetemp=...); WAN_LITE_SCREENSHOTS=docs/screenshots also writes the queue-*.png ones
there (the docs' pictures of the queue and a running job).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    _free_port,
    _real_engine,
    _set_slider,
    hold_next_run,
)

pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 300_000  # one tiny run on a busy 2-core CPU: text encoder, steps, decode
SMALL = {"size": "128x128", "frames": 5, "mode": "quality", "model": "ti2v-5b", "seed": -1}
VIEWPORT = {"width": 1920, "height": 1080}


class App:
    """The real app on a tiny model folder; `restart()` stops it and starts it again on the same
    config folder (the queue file) and output folder, as a user closing and reopening it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.uploads, self.out, self.models = tmp / "uploads", tmp / "outputs", tmp / "models"
        for d in (self.uploads, self.out, self.models):
            d.mkdir(exist_ok=True)
        self.engine = _real_engine(self.models, self.out)
        self.ui = None
        self.url = ""

    def start(self) -> str:
        from wan_lite.engine import Engine
        from wan_lite.ui.app import build_ui, launch

        if self.ui is not None:  # a new process would have a new engine
            self.engine = Engine(self.models, self.out, device="cpu")
        self.ui = build_ui(self.engine, self.uploads)
        port = _free_port()
        launch(self.ui, host="127.0.0.1", port=port, share=False, open_browser=False, output_dir=self.out,
               block=False)
        self.url = f"http://127.0.0.1:{port}/"
        return self.url

    def stop(self) -> None:
        if self.ui is not None:
            self.ui.jobs.cancel()  # a test that failed mid-run leaves no job behind
            self.ui.jobs.close(timeout=60)
            self.ui.demo.close()

    def restart(self) -> str:
        self.stop()
        return self.start()

    def hold_next_run(self, stage: str = "denoise", step: int = 1) -> threading.Event:
        """The next run waits once it reports `stage` at `step` until the returned event is set: a
        test that must see a run in a given stage (after a reload, or to cancel its decode) does
        not race a fast machine to it. Only the waiting is added; the work is the engine's own."""
        release = threading.Event()
        hold_next_run(self.engine, stage, step, lambda cancel: release.wait(RUN_TIMEOUT_MS / 1000))
        return release


@pytest.fixture()
def app(tmp_path, monkeypatch) -> Iterator[App]:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "config"))
    _remember(SMALL | {"user_prompt": "A red fox trots through fresh snow", "steps": 30})
    app = App(tmp_path)
    app.start()
    try:
        yield app
    finally:
        app.stop()


def _remember(values: dict) -> None:
    """Settings as the page remembers them, so a fresh page opens with them."""
    from wan_lite.ui import form
    from wan_lite.ui.presets import BUILTIN_DIR, load_presets
    from wan_lite.ui.settings import SettingsStore

    SettingsStore().save(form.settings_from_values(form.default_values() | values, load_presets(BUILTIN_DIR, None)))


def _shots(tmp: Path) -> Path:
    shots = tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    return shots


def _keep(page, shots: Path, name: str) -> None:
    """A full-page screenshot for the test's folder; queue-* ones also to WAN_LITE_SCREENSHOTS."""
    page.screenshot(path=str(shots / name), full_page=True)
    docs = os.environ.get("WAN_LITE_SCREENSHOTS")
    if docs and name.startswith("queue-"):  # the part of the page about the job: Generate to the queue
        Path(docs).mkdir(parents=True, exist_ok=True)
        boxes = [b for b in (x.bounding_box() for x in page.locator("#wl-generate, #wl-queue-box").all()) if b]
        left, top = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
        right, bottom = max(b["x"] + b["width"] for b in boxes), max(b["y"] + b["height"] for b in boxes)
        scroll = page.evaluate("window.scrollY")
        clip = {"x": left - 8, "y": top + scroll - 8, "width": right - left + 16, "height": bottom - top + 16}
        page.screenshot(path=str(Path(docs) / name), full_page=True, clip=clip)


def _open(browser, url: str):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    page.goto(url)
    from playwright.sync_api import expect

    # the page's load handlers answer slowly while a run holds the 2 CPU cores
    expect(page.locator("#wl-prompt textarea")).not_to_have_value("", timeout=60_000)
    return page


WATCH_STATUS = """() => {
    window.__wlStatus = [];
    const root = document.querySelector('#wl-status');
    const record = () => {
        const text = root.textContent.trim();
        const last = window.__wlStatus[window.__wlStatus.length - 1];
        if (!last || last[1] !== text) window.__wlStatus.push([performance.now(), text]);
    };
    new MutationObserver(record).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def _label(page):
    return page.locator("#wl-progress .wl-label")


def test_reload_keeps_the_run_and_a_second_tab_cancels_it(app):
    from playwright.sync_api import expect, sync_playwright

    shots = _shots(app.tmp)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = _open(browser, app.url)
        release = app.hold_next_run()
        try:
            page.locator("#wl-generate").click()
            expect(_label(page)).to_contain_text(re.compile(r"step \d+/30"), timeout=RUN_TIMEOUT_MS)
            running = app.ui.jobs.view().running
            page.reload()  # the tab goes away and comes back mid-run
            expect(_label(page)).to_contain_text(re.compile(r"step \d+/30"))
            expect(page.locator("#wl-queue")).to_contain_text("▶ now")
            _keep(page, shots, "reloaded.png")
            release.set()
            expect(page.locator("#wl-status")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
            expect(page.locator("#wl-video video")).to_have_attribute("src", re.compile(r".+"))
            (done,) = app.ui.jobs.view().finished
            assert done.id == running.id and done.state == "done" and Path(done.result["video"]).is_file()

            # A second run; another tab sees it and cancels it. Both say so.
            # (long enough to open a tab meanwhile: the tiny model's steps are quick, its decode is not)
            page.locator("#wl-size input").fill("384x384")
            page.locator("#wl-size input").press("Enter")
            page.locator("#wl-frames input[type=number]").fill("17")
            page.locator("#wl-frames input[type=number]").press("Enter")
            page.get_by_text("Advanced settings").click()
            _set_slider(page, "#wl-steps", 100)
            release = app.hold_next_run("decode", 0)  # it waits at the decode's start until cancelled
            page.locator("#wl-generate").click()
            # (100 tiny steps may pass between two of the page's polls: it may show the decode at once)
            expect(_label(page)).to_contain_text(re.compile(r"step \d+/100|Decoding video"), timeout=RUN_TIMEOUT_MS)
            # meanwhile one more job is queued behind it, and taken off again
            page.locator("#wl-prompt textarea").fill("A heron lands on a misty pond")
            page.locator("#wl-queue-add").click()
            expect(page.locator("#wl-queue-note")).to_contain_text("#1 in the queue; it runs when")
            expect(page.locator("#wl-queue .wl-q-queued")).to_contain_text("heron")
            _keep(page, shots, "queue-running.png")
            page.locator("#wl-queue-pick input").click()
            page.get_by_role("option", name=re.compile("heron")).click()
            page.locator("#wl-queue-remove").click()
            expect(page.locator("#wl-queue .wl-q-queued")).to_have_count(0)
            other = _open(browser, app.url)
            expect(_label(other)).to_contain_text(re.compile(r"step \d+/100|Decoding video"), timeout=30_000)
            # Cancel in the decode (the long part here): it stops there, and the latents stay
            expect(_label(other)).to_contain_text("Decoding video", timeout=RUN_TIMEOUT_MS)
            other.evaluate(WATCH_STATUS)
            other.locator("#wl-cancel").click()
            clicked = other.evaluate("performance.now()")
            release.set()
            for tab in (other, page):
                expect(tab.locator("#wl-progress .wl-progress")).to_have_attribute(
                    "data-state", "cancelled", timeout=RUN_TIMEOUT_MS)
            seen = other.evaluate("window.__wlStatus")
            # "Stopping after this step…" at once (not when the step ends), then "Cancelled"
            stopping = [t for t, text in seen if "Stopping after this step" in text]
            cancelled_at = [t for t, text in seen if "Cancelled by the user" in text]
            assert stopping and cancelled_at and stopping[0] < cancelled_at[0], seen
            assert stopping[0] - clicked < 1500, (clicked, seen)
            for tab in (other, page):
                expect(tab.locator("#wl-status")).to_contain_text("Cancelled by the user")
            _keep(page, shots, "cancelled.png")
            cancelled = app.ui.jobs.view().finished[0]
            assert cancelled.state == "cancelled"
            assert not list(app.out.glob(".*.partial")) and len(list(app.out.glob("*.mp4"))) == 1
            assert cancelled.latents and Path(cancelled.latents).is_file()
            expect(page.locator("#wl-status")).to_contain_text("latents are kept")

            # The History offers those latents: "Make the video" decodes them, no denoising again.
            page.get_by_role("tab", name="History").click()
            expect(page.locator("#wl-latents-pick input")).to_have_value(re.compile("fox.*TI2V-5B · 384×384"))
            _keep(page, shots, "history-latents.png")
            page.locator("#wl-latents-decode").click()
            expect(page.locator("#wl-latents-note")).to_contain_text("Making the video")
            page.get_by_role("tab", name="Create").click()
            expect(page.locator("#wl-status")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
            decoded = app.ui.jobs.view().finished[0]
            assert decoded.kind == "decode" and decoded.result["video"].endswith(".decoded.mp4")
            assert Path(decoded.result["video"]).is_file()
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            release.set()
            browser.close()


def _queue_rows(page) -> list[str]:
    return page.locator("#wl-queue .wl-q-queued").all_inner_texts()


def test_three_queued_jobs_reordered_survive_a_restart_then_run(app):
    from playwright.sync_api import expect, sync_playwright

    shots = _shots(app.tmp)
    prompts = ["A lighthouse in a storm", "A cat asleep on a windowsill", "Paper boats on a rain puddle"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        _remember(SMALL | {"user_prompt": prompts[0], "steps": 4})
        page = _open(browser, app.url)
        try:
            box = page.locator("#wl-prompt textarea")
            for i, prompt in enumerate(prompts):
                box.fill(prompt)
                page.locator("#wl-queue-add").click()
                expect(page.locator("#wl-queue-note")).to_contain_text(f"#{i + 1} in the queue")
            expect(page.locator("#wl-queue")).to_contain_text("3 waiting, held")
            expect(page.locator("#wl-queue-run")).to_contain_text("Run the queue (3 waiting)")
            # the third one first: pick it, move it up twice
            page.locator("#wl-queue-pick input").click()
            page.get_by_role("option", name=re.compile("Paper boats")).click()
            for _ in range(2):
                page.locator("#wl-queue-up").click()
                page.wait_for_timeout(300)
            expect(page.locator("#wl-queue .wl-q-queued").first).to_contain_text("Paper boats")
            order = _queue_rows(page)
            assert "Paper boats" in order[0] and "lighthouse" in order[1] and "cat asleep" in order[2], order
            _keep(page, shots, "queue-waiting.png")
            assert not list(app.out.glob("*.mp4"))  # "Add to queue" ran nothing

            url = app.restart()  # the app is closed and started again
            page.goto(url)
            expect(page.locator("#wl-queue")).to_contain_text("3 waiting, held")
            assert [r.split("\n")[1] for r in _queue_rows(page)] == [r.split("\n")[1] for r in order]
            _keep(page, shots, "queue-after-restart.png")
            page.locator("#wl-queue-run").click()
            expect(page.locator("#wl-queue")).to_contain_text("▶ now", timeout=RUN_TIMEOUT_MS)
            _keep(page, shots, "restarted-running.png")
            expect(page.locator("#wl-queue")).to_contain_text("Queue: empty", timeout=3 * RUN_TIMEOUT_MS)
            expect(page.locator("#wl-status")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
            finished = app.ui.jobs.view().finished
            assert [j.state for j in finished] == ["done"] * 3
            ran = [j.prompt for j in sorted(finished, key=lambda j: j.started)]
            assert [p.split(".")[0] for p in ran] == [prompts[2], prompts[0], prompts[1]]
            assert len(list(app.out.glob("*.mp4"))) == 3
            _keep(page, shots, "done.png")
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
