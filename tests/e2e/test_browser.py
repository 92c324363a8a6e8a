"""End to end in a real Chromium: the page as a user drives it.

Two engines run the same script:
- "scripted": tests/e2e/fake_engine.py, which follows the Engine interface and writes real mp4
  files without any model math (it tests the page, the queue, progress, cancel and history);
- "real": wan_lite.engine.Engine on a tiny model folder from tests/tiny_ckpt (skipped until the
  engine and a tiny-folder writer exist).

Chromium is Debian's (/usr/bin/chromium); nothing is downloaded. Screenshots go to the test's
tmp folder (pytest prints it with -v --basetemp=...).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("WAN_LITE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_engine(models: Path, out: Path):
    """wan_lite's Engine on a tiny random TI2V-5B folder in the official layout (tests/tiny_ckpt)."""
    try:
        from tests.tiny_ckpt.dit import write_dit
        from tests.tiny_ckpt.t5 import write_t5
        from tests.tiny_ckpt.vae import write_vae
    except ImportError as err:
        pytest.skip(f"tiny checkpoint writers not available: {err}")
    from wan_lite.engine import Engine

    engine = Engine(models, out, device="cpu")
    folder = engine.model_folder("ti2v-5b")
    write_dit(folder, in_dim=48, out_dim=48, dim=128, ffn_dim=256, num_layers=2, model_type="ti2v", text_dim=64)
    write_vae(folder / "Wan2.2_VAE.pth", "2.2")
    write_t5(folder)
    try:
        state = {s.name: s.state for s in engine.model_status()}
    except NotImplementedError:
        pytest.skip("wan_lite.engine.Engine.model_status is not implemented yet")
    assert state["ti2v-5b"] == "installed", state
    return engine


@pytest.fixture(params=["scripted", "real"])
def app_url(request, tmp_path, monkeypatch) -> Iterator[tuple[str, object, Path]]:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    uploads, out, models = tmp_path / "uploads", tmp_path / "outputs", tmp_path / "models"
    for d in (uploads, out, models):
        d.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "config"))
    if request.param == "scripted":
        from tests.e2e.fake_engine import FakeEngine

        engine = FakeEngine(models, out, step_s=0.1)
    else:
        engine = _real_engine(models, out)
    from wan_lite.ui.app import build_ui, launch

    ui = build_ui(engine, uploads)
    port = _free_port()
    launch(ui, host="127.0.0.1", port=port, share=False, open_browser=False, output_dir=out, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", engine, tmp_path
    finally:
        ui.demo.close()


WATCH_PROGRESS = """() => {
    window.__wlProgress = [];
    const root = document.querySelector('#wl-progress');
    const record = () => {
        const bar = root.querySelector('.wl-progress');
        if (!bar) return;
        const entry = [bar.dataset.state, Number(bar.dataset.pct), bar.textContent];
        const last = window.__wlProgress[window.__wlProgress.length - 1];
        if (!last || last.join('|') !== entry.join('|')) window.__wlProgress.push(entry);
    };
    new MutationObserver(record).observe(root, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def hold_next_run(engine, stage: str, step: int, wait) -> None:
    """The engine's next run, once it reports `stage` at `step`, calls `wait(cancel)` (with the
    run's cancel token) before it goes on: a test that must act on a run in a given stage does not
    race a fast machine to it. Only the waiting is added; the work is the engine's own."""
    real = engine.generate

    def generate(request, on_progress=None, cancel=None, **kw):
        engine.generate = real  # this run only

        def report(p) -> None:
            if on_progress is not None:
                on_progress(p)
            if p.stage == stage and p.step == step:
                wait(cancel)

        return real(request, on_progress=report, cancel=cancel, **kw)

    engine.generate = generate


def _wait_for_cancel_at_step_1(engine) -> None:
    """The engine's next run waits at step 1 until its cancel token is set (at most 120 s)."""
    def until_cancelled(cancel) -> None:
        deadline = time.monotonic() + 120
        while cancel is not None and not cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)

    hold_next_run(engine, "denoise", 1, until_cancelled)


def _set_slider(page, elem_id: str, value: int) -> None:
    """Type `value` into a slider's number box. An update still on its way from an earlier
    change (a mode preset sets the steps) may land after the typing and overwrite it; then the
    value is typed again, as a user would."""
    from playwright.sync_api import expect

    box = page.locator(f"{elem_id} input[type=number]")
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        try:
            expect(box).to_have_value(str(value), timeout=3000)
            page.wait_for_timeout(300)  # a late overwrite shows within this
            if box.input_value() == str(value):
                return
        except AssertionError:
            if attempt == 2:
                raise
    expect(box).to_have_value(str(value))


def _start_image(path: Path) -> Path:
    """A 900x600 picture with a transparent corner (the upload check must flatten it)."""
    im = Image.new("RGBA", (900, 600), (30, 120, 200, 255))
    for x in range(0, 200):
        for y in range(0, 100):
            im.putpixel((x, y), (0, 0, 0, 0))
    im.save(path)
    return path


def _comfy_folder(models: Path) -> Path:
    """A ComfyUI models/ folder with a Wan 2.2 VAE single file and a copy of it; returns the VAE."""
    import shutil as sh

    from tests.tiny_ckpt.formats import write_comfy
    from tests.tiny_ckpt.vae import random_vae_state

    vae = write_comfy(models / "vae" / "wan2.2_vae.safetensors", random_vae_state("2.2", seed=5))
    sh.copy(vae, models / "vae" / "copy_of_wan2.2_vae.safetensors")
    return vae


def test_create_generate_history_cancel(app_url):
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.fake_engine import FakeEngine

    url, engine, tmp = app_url
    shots = tmp / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(url)
            prompt = page.locator("#wl-prompt textarea")
            final = page.locator("#wl-final textarea")
            expect(prompt).to_be_visible()
            # The estimate is shown before anything is generated.
            expect(page.locator("#wl-estimate")).to_contain_text("frames")

            # Presets: a bundle ticks its terms; the composed prompt follows the rules live.
            prompt.fill("A red fox trots through fresh snow in a birch forest")
            page.locator("#wl-bundle input").click()
            page.get_by_role("option", name="Golden hour portrait").click()
            expect(final).to_have_value(re.compile(r"^A red fox trots.*\. Backlighting, sunset, close-up shot, warm colors\.$"))
            page.get_by_role("tab", name=re.compile("Motion & camera")).click()
            page.locator("#wl-terms-camera_movement").get_by_label(re.compile("Camera pushes in")).check()
            expect(final).to_have_value(re.compile(r"warm colors\. Camera pushes in\.$"))
            page.screenshot(path=str(shots / "1-composed.png"), full_page=True)

            # Image-to-video: upload, the crop preview appears, the prompt keeps only motion/camera words.
            page.locator("#wl-upload input[type=file]").set_input_files(str(_start_image(tmp / "start.png")))
            expect(page.locator("#wl-crop-note")).to_contain_text("The video will be")
            expect(page.locator("#wl-crop img")).to_be_visible()
            expect(final).to_have_value(re.compile(r"^A red fox trots.*\. Camera pushes in\.$"))
            expect(page.locator("#wl-prompt-notes")).to_contain_text("Image-to-video")

            # Draft sets a small size, 2 s and few steps at once; a typed size and frame count go
            # smaller still (the real engine runs its tiny models on the CPU here).
            page.locator("#wl-mode").get_by_label("Draft").check()
            expect(page.locator("#wl-size input")).to_have_value(re.compile("640×352"))
            expect(page.locator("#wl-frames input[type=number]")).to_have_value("49")
            page.locator("#wl-size input").fill("256x160")
            page.locator("#wl-size input").press("Enter")
            page.locator("#wl-frames input[type=number]").fill("5")
            page.locator("#wl-frames input[type=number]").press("Enter")
            expect(page.locator("#wl-estimate")).to_contain_text("5 frames")
            page.get_by_text("Advanced settings").click()
            # Enough steps to watch the bar move: the page polls every 0.5 s, and the real engine's
            # tiny model can take 40 steps in one poll (CI saw only step 22/40), so it runs 100.
            _set_slider(page, "#wl-steps", 40 if isinstance(engine, FakeEngine) else 100)

            # Every state the progress bar goes through is recorded in the page, so a fast run
            # cannot slip between two polls of the test.
            page.evaluate(WATCH_PROGRESS)
            page.locator("#wl-generate").click()
            expect(page.locator("#wl-progress .wl-label")).to_contain_text(re.compile(r"step \d+/\d+|Finished"),
                                                                        timeout=120_000)  # loading: seconds under load
            page.screenshot(path=str(shots / "2-progress.png"), full_page=True)
            # The video appears and plays.
            expect(page.locator("#wl-status")).to_contain_text("Done", timeout=180_000)
            video = page.locator("#wl-video video")
            expect(video).to_have_attribute("src", re.compile(r".+"))
            page.wait_for_function(
                "() => { const v = document.querySelector('#wl-video video'); return v && v.readyState >= 1 && v.duration > 0; }")
            expect(page.locator("#wl-download-video")).to_be_visible()
            seed = page.locator("#wl-last-seed textarea, #wl-last-seed input").first.input_value()
            assert seed.isdigit()
            seen = page.evaluate("window.__wlProgress")
            steps = [pct for state, pct, label in seen if state == "running" and "step" in label]
            assert len(set(steps)) >= 2 and steps == sorted(steps), seen
            assert any("elapsed" in label and "left" in label for _, _, label in seen), seen
            assert seen[-1][0] == "done" and seen[-1][1] == 100
            expect(page.locator("#wl-preview img")).to_be_visible()
            page.screenshot(path=str(shots / "3-result.png"), full_page=True)

            # History: the result is there with its seed; reuse puts its settings back.
            page.get_by_role("tab", name="History").click()
            page.wait_for_function(
                "() => { const v = document.querySelector('#wl-history video'); return v && v.readyState >= 1 && v.duration > 0; }")
            page.locator("#wl-history button.thumbnail-item, #wl-history .thumbnail-item").first.click()
            expect(page.locator("#wl-history-details")).to_contain_text(f"Seed: {seed}")
            page.screenshot(path=str(shots / "4-history.png"), full_page=True)
            page.locator("#wl-reuse").click()
            # It brings the user back to the Create tab with the settings in place.
            expect(page.locator("#wl-status")).to_contain_text("loaded")
            expect(page.get_by_role("tab", name="Create")).to_have_attribute("aria-selected", "true")
            expect(page.locator("#wl-seed textarea, #wl-seed input").first).to_have_value(seed)
            # The prompt comes back as it was composed: the prompt box, the ticked terms (issue 22).
            expect(prompt).to_have_value(re.compile(r"^A red fox trots through fresh snow in a birch forest$"))
            expect(final).to_have_value(re.compile("Camera pushes in"))

            # A second run, cancelled mid-way: the page says so and stays usable. The run waits at
            # step 1 until the cancel has reached it (the tiny model could otherwise finish first).
            page.locator("#wl-seed textarea, #wl-seed input").first.fill("-1")
            _set_slider(page, "#wl-steps", 100)
            _wait_for_cancel_at_step_1(engine)
            page.locator("#wl-generate").click()
            expect(page.locator("#wl-progress .wl-label")).to_contain_text(re.compile(r"step \d+/\d+"))
            page.locator("#wl-cancel").click()
            expect(page.locator("#wl-status")).to_contain_text("Cancel", timeout=60_000)
            expect(page.locator("#wl-progress .wl-progress")).to_have_attribute("data-state", "cancelled")
            page.screenshot(path=str(shots / "5-cancelled.png"), full_page=True)
            if hasattr(engine, "cancelled_at"):
                assert engine.cancelled_at is not None and engine.cancelled_at < engine.requests[-1].steps

            # The models panel says what is installed, where, and how to get the rest.
            page.get_by_role("tab", name="Models").click()
            models = page.locator("#wl-models")
            expect(models).to_contain_text("Wan-AI/Wan2.2-T2V-A14B")
            expect(models).to_contain_text(str(engine.model_folder("ti2v-5b")))
            page.screenshot(path=str(shots / "6-models.png"), full_page=True)

            # Files the user already has: scan a ComfyUI folder, pick its VAE, save.
            comfy_vae = _comfy_folder(tmp / "ComfyUI" / "models")
            page.locator("#wl-comfy-dir textarea, #wl-comfy-dir input").first.fill(str(comfy_vae.parents[1]))
            page.locator("#wl-scan").click()
            found = page.locator("#wl-found")
            expect(found).to_contain_text("the Wan 2.2 VAE")
            expect(found).to_contain_text("same file as")  # the copy is flagged
            vae_box = page.locator("#wl-slot-vae input")
            vae_box.fill(str(comfy_vae))
            vae_box.press("Enter")
            page.locator("#wl-comp-save").click()
            expect(page.locator("#wl-comp-status")).to_contain_text("Saved for Wan2.2 TI2V-5B")
            expect(models).to_contain_text(str(comfy_vae))
            assert engine.chosen_components("ti2v-5b") == {"vae": comfy_vae}
            page.screenshot(path=str(shots / "7-components.png"), full_page=True)

            # A new page starts with the last used settings.
            page.reload()
            expect(final).to_have_value(re.compile("Camera pushes in"))
            expect(page.locator("#wl-seed textarea, #wl-seed input").first).to_have_value("-1")
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
