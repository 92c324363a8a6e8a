"""The app's job manager (wan_lite.ui.jobs.JobManager): jobs run in the server one after another,
whatever the browser tabs do; the queue is ordered, reordered, edited and kept across restarts; a
job cut short by a crash is listed as interrupted with its latents; Cancel answers at once and
works during the decode. The scripted engine (tests/e2e/fake_engine.py) drives the queue logic;
the real Engine on tiny checkpoints drives latents, decode and cancel."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.fake_engine import FakeEngine
from wan_lite.api import GenerateRequest
from wan_lite.engine import Engine
from wan_lite.ui import history
from wan_lite.ui.jobs import JobManager, error_message

PROMPT = "A red fox trots through fresh snow in a birch forest"
SMALL = dict(width=64, height=64, frames=5, steps=2)


def _fake(tmp_path: Path, step_s: float = 0.0) -> FakeEngine:
    return FakeEngine(tmp_path / "models", tmp_path / "out", step_s=step_s)


def _job(engine: Engine, prompt: str = PROMPT, **fields):
    return engine.resolve(GenerateRequest(prompt=prompt, **{"steps": 3, "seed": 1, **fields}))


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_jobs_run_one_after_another_in_queue_order(tmp_path):
    engine = _fake(tmp_path, step_s=0.02)
    jobs = JobManager(engine, tmp_path / "queue.json")
    first = jobs.submit(_job(engine, "first", steps=5))
    second = jobs.submit(_job(engine, "second"))
    third = jobs.submit(_job(engine, "third"))
    for j in (first, second, third):
        assert jobs.wait(j.id).state == "done"
    assert [r.prompt for r in engine.requests] == ["first", "second", "third"]
    view = jobs.view()
    assert view.running is None and view.queued == [] and not view.active
    assert [j.prompt for j in view.finished] == ["third", "second", "first"]  # newest first
    done = view.current
    assert done.prompt == "third" and Path(done.result["video"]).is_file() and done.result["seed"] == 1
    assert done.progress is not None and done.progress.preview is not None  # the last picture stays
    jobs.close()


def test_add_to_queue_waits_reorder_remove_then_run(tmp_path):
    engine = _fake(tmp_path)
    jobs = JobManager(engine, tmp_path / "queue.json")
    a, b, c = (jobs.submit(_job(engine, p), start=False) for p in ("a", "b", "c"))
    time.sleep(0.1)
    assert engine.requests == [] and not jobs.view().active  # "Add to queue" alone runs nothing
    assert jobs.move(c.id, -1) and [j.prompt for j in jobs.view().queued] == ["a", "c", "b"]
    assert jobs.move(a.id, +5) and [j.prompt for j in jobs.view().queued] == ["c", "b", "a"]
    assert not jobs.move(c.id, -1)  # already first
    assert jobs.remove(b.id) and not jobs.remove(b.id)
    jobs.start()
    jobs.wait(a.id)
    assert [r.prompt for r in engine.requests] == ["c", "a"]
    jobs.close()


def test_the_queue_survives_a_restart_and_waits(tmp_path):
    engine = _fake(tmp_path)
    path = tmp_path / "queue.json"
    jobs = JobManager(engine, path)
    ids = [jobs.submit(_job(engine, p, seed=7), start=False).id for p in ("one", "two", "three")]
    jobs.move(ids[2], -2)
    jobs.close()
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert [j["request"]["prompt"] for j in saved["jobs"]] == ["three", "one", "two"]

    again = JobManager(_fake(tmp_path), path)  # the app started again
    view = again.view()
    assert [j.prompt for j in view.queued] == ["three", "one", "two"] and not view.active
    assert view.queued[0].request == _job(engine, "three", seed=7).request.to_dict() | {"loras": []}
    again.start()
    again.wait(ids[1])
    assert [r.prompt for r in again.engine.requests] == ["three", "one", "two"]
    assert [r.seed for r in again.engine.requests] == [7, 7, 7]
    again.close()


def test_a_job_running_when_the_app_died_is_listed_as_interrupted(tmp_path):
    path = tmp_path / "queue.json"
    request = _job(_fake(tmp_path)).request.to_dict()
    path.write_text(json.dumps({"format": "wan_lite.queue", "version": 1, "active": True, "jobs": [
        {"id": "j1", "request": request, "state": "running", "started": 1.0, "where": "Denoising, step 12/50"},
        {"id": "j2", "request": request | {"prompt": "next"}, "state": "queued"},
        {"id": "bad", "request": "not a dict", "state": "running"},
    ]}), encoding="utf-8")
    jobs = JobManager(_fake(tmp_path), path)
    view = jobs.view()
    assert [j.prompt for j in view.queued] == ["next"] and not view.active
    (gone,) = view.finished
    assert gone.state == "interrupted" and gone.latents is None
    assert gone.message == "The app stopped while this job ran (Denoising, step 12/50)."
    assert json.loads(path.read_text(encoding="utf-8"))["jobs"][1]["state"] == "interrupted"  # said once
    assert jobs.remove("j1") and jobs.view().finished == []
    # a file that is not a queue is set aside, not lost, and the app starts
    path.write_text("{", encoding="utf-8")
    assert JobManager(_fake(tmp_path), path).view().queued == []
    assert (tmp_path / "queue.json.broken").read_text(encoding="utf-8") == "{"


def test_cancel_answers_at_once_and_the_next_job_runs(tmp_path):
    engine = _fake(tmp_path, step_s=0.05)
    jobs = JobManager(engine, None)
    long = jobs.submit(_job(engine, steps=400))
    after = jobs.submit(_job(engine, "after"))
    jobs.wait(long.id, states=("running",))
    _wait_for(lambda: (jobs.get(long.id).progress or 0) and jobs.get(long.id).progress.step >= 2)
    assert jobs.cancel("some-other-id") is None
    told = jobs.cancel()
    assert told.id == long.id and told.state == "cancelling"  # before the step ends
    assert jobs.wait(long.id).state == "cancelled"
    assert engine.cancelled_at is not None and engine.cancelled_at < 20
    assert jobs.wait(after.id).state == "done"
    assert jobs.cancel() is None  # nothing runs


def test_errors_are_plain_words_and_the_queue_goes_on(tmp_path):
    engine = _fake(tmp_path)
    jobs = JobManager(engine, None)
    bad = jobs.submit(_job(engine, "FAIL please"))
    good = jobs.submit(_job(engine, "fine"))
    failed = jobs.wait(bad.id)
    assert failed.state == "failed"
    assert failed.message == "The fake engine was asked to fail.\n  -> Remove FAIL from the prompt."
    assert jobs.wait(good.id).state == "done"
    assert "not finished yet" in error_message(NotImplementedError())
    assert "ZeroDivisionError" in error_message(ZeroDivisionError("x"))


# ------------------------------------------------------------------ the real engine, tiny models
@pytest.fixture()
def real(tiny_models, tmp_path):
    return Engine(tiny_models["ti2v-5b"].parent, tmp_path / "out", device="cpu",
                  folders={"ti2v-5b": tiny_models["ti2v-5b"]})


def _press_cancel_in_decode(engine: Engine, jobs: JobManager, before=None) -> None:
    """Press Cancel (through the manager, as the page does) once the VAE decode has begun."""
    real_pipeline = engine.pipeline

    def pipeline(*args, **kwargs):  # the placement sets decode_fn as it binds: wrap it after that
        pipe = real_pipeline(*args, **kwargs)
        decode = pipe.decode_fn

        def pressed(vae, z):
            if before is not None:
                before()
            jobs.cancel()
            return decode(vae, z)

        pipe.decode_fn = pressed
        return pipe

    engine.pipeline = pipeline


def test_cancel_during_decode_keeps_the_latents_and_leaves_no_video(real, tmp_path):
    jobs = JobManager(real, tmp_path / "queue.json")
    _press_cancel_in_decode(real, jobs)
    job = jobs.submit(real.resolve(GenerateRequest(prompt=PROMPT, seed=5, **SMALL)))
    done = jobs.wait(job.id, timeout=300)
    assert done.state == "cancelled" and "latents are kept" in done.message
    files = sorted(p.name for p in real.output_dir.iterdir())
    assert len(files) == 1 and files[0].endswith(".latents.safetensors"), files  # no mp4, no partial
    assert done.latents == str(real.output_dir / files[0])
    assert history.pending_latents(real.output_dir) == [Path(done.latents)]
    jobs.close()


def test_an_interrupted_job_keeps_its_latents_and_the_history_decodes_them(real, tmp_path):
    """The app dies during the decode: the queue file then says "running" and names the latents.
    The next start lists the job as interrupted with them, and "Make the video" decodes them."""
    path = tmp_path / "queue.json"
    jobs = JobManager(real, path)
    at_crash = tmp_path / "queue-at-crash.json"
    _press_cancel_in_decode(real, jobs, before=lambda: shutil.copy(path, at_crash))
    job = jobs.submit(real.resolve(GenerateRequest(prompt=PROMPT, seed=9, **SMALL)))
    assert jobs.wait(job.id, timeout=300).state == "cancelled"
    jobs.close()
    crashed = json.loads(at_crash.read_text(encoding="utf-8"))["jobs"][0]
    assert crashed["state"] == "running" and crashed["latents"].endswith(".latents.safetensors")
    shutil.copy(at_crash, path)  # what the file held when the process died

    again = JobManager(Engine(real.models_root, real.output_dir, device="cpu", folders=real.library.folders), path)
    (gone,) = again.view().finished
    assert gone.state == "interrupted" and gone.latents == crashed["latents"]
    assert "latents were saved" in gone.message and "History" in gone.message
    (pending,) = history.pending_latents(real.output_dir)
    assert str(pending) == gone.latents and "seed 9" in history.describe_latents(pending)
    decode = again.submit_decode(pending, (history.latents_record(pending) or {}).get("settings"))
    made = again.wait(decode.id, timeout=300)
    assert made.state == "done", made.message
    video = Path(made.result["video"])
    assert video.is_file() and video.name.endswith(".decoded.mp4")
    assert history.pending_latents(real.output_dir) == []
    assert any(e.video == video for e in history.read_history(real.output_dir))
    again.close()


def test_find_latents_matches_the_request_not_just_the_name(real, tmp_path):
    result = real.generate(real.resolve(GenerateRequest(prompt=PROMPT, seed=4, **SMALL)))
    record = history.latents_record(result.latents_path)
    request = record["request"]
    assert history.find_latents(real.output_dir, request) == result.latents_path
    assert history.find_latents(real.output_dir, request | {"steps": 3}) is None
    assert history.find_latents(real.output_dir, request, since=time.time() + 60) is None
    assert history.pending_latents(real.output_dir) == []  # it has its video


# ------------------------------------------------------------------ the page's side (no browser)
@pytest.fixture()
def ui(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "up"))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "cfg"))
    from wan_lite.ui.app import build_ui

    ui = build_ui(FakeEngine(tmp_path / "models", tmp_path / "out", step_s=0.0), tmp_path / "up")
    yield ui
    ui.jobs.close()


def _values(**extra):
    from wan_lite.ui import form

    return form.default_values() | {"user_prompt": PROMPT, "steps": 3} | extra


def _skipped(value) -> bool:
    import gradio as gr

    return isinstance(value, dict) and value == gr.skip()


def _watch_until(ui, seen: dict, done, timeout: float = 30.0) -> dict:
    """Run a tab's watcher until `done(shown)` holds; returns what the tab shows, by name."""
    from wan_lite.ui.queue_panel import watch_updates

    shown: dict = {}
    deadline = time.monotonic() + timeout
    while True:
        for name, value in watch_updates(ui, seen).items():
            if not _skipped(value):
                shown[name] = value
        seen.update(shown.get("jobs_seen", {}))
        if done(shown):
            return shown
        if time.monotonic() > deadline:
            raise TimeoutError(shown)
        time.sleep(0.02)


def test_generate_answers_at_once_and_any_tab_shows_the_run(ui):
    from wan_lite.ui.queue_panel import submit_form

    out = submit_form(ui, _values(user_prompt=""), start=True)
    assert "prompt is empty" in out["status"] and ui.jobs.view().queued == []
    out = submit_form(ui, _values(seed="1234"), start=True)
    assert 'data-state="running"' in out["progress"] and "Starting" in out["progress"]
    tab = _watch_until(ui, {}, lambda s: "Done" in s.get("status", ""))
    assert "seed **1234**" in tab["status"] and Path(tab["video"]).is_file() and tab["last_seed"] == "1234"
    assert tab["history"][0][0] == tab["video"] and 'data-state="done"' in tab["progress"]
    # a tab opened later shows the same result; nothing changed: the next tick sends nothing
    later = {}
    shown = _watch_until(ui, later, lambda s: "video" in s)
    assert shown["video"] == tab["video"]
    from wan_lite.ui.queue_panel import WATCH_OUTPUTS, watch_updates

    again = watch_updates(ui, later)
    assert set(again) == set(WATCH_OUTPUTS) and all(_skipped(v) for v in again.values())
    assert ui.store.load()["user_prompt"] == PROMPT  # remembered for the next start


def test_cancel_says_stopping_at_once_then_cancelled(ui):
    from wan_lite.ui.queue_panel import cancel_updates, submit_form

    ui.engine.step_s = 0.05
    assert cancel_updates(ui, {})["status"] == "Nothing is running."
    submit_form(ui, _values(steps=300), start=True)
    seen: dict = {}
    _watch_until(ui, seen, lambda s: "step " in s.get("progress", ""))
    other_tab: dict = {}
    _watch_until(ui, other_tab, lambda s: "step " in s.get("progress", ""))  # a second tab sees it
    answer = cancel_updates(ui, other_tab)  # and cancels it
    assert answer["status"] == "⏹ Stopping after this step…" and 'data-state="cancelling"' in answer["progress"]
    shown = _watch_until(ui, seen, lambda s: 'data-state="cancelled"' in s.get("progress", ""))
    assert shown["status"] == "⏹ Cancelled by the user."
    assert ui.engine.cancelled_at is not None and ui.engine.cancelled_at < 40


def test_queue_buttons_reorder_remove_and_run(ui):
    from wan_lite.ui.queue_panel import queue_command, submit_form

    for prompt in ("first", "second", "third"):
        out = submit_form(ui, _values(user_prompt=prompt), start=False)
    assert "#3 in the queue" in out["queue_note"] and "waits" in out["queue_note"]
    assert out["queue_run"]["visible"] and "3 waiting" in out["queue_run"]["value"]
    ids = [j.id for j in ui.jobs.view().queued]
    table = queue_command(ui, "up", ids[2], {})["queue_table"]
    assert table.index("third") < table.index("second")
    assert "Pick a job" in queue_command(ui, "remove", None, {})["queue_note"]
    queue_command(ui, "remove", ids[0], {})
    assert [j.prompt for j in ui.jobs.view().queued] == ["third.", "second."]
    queue_command(ui, "run", None, {})
    ui.jobs.wait(ids[1])
    assert [r.prompt for r in ui.engine.requests] == ["third.", "second."]


def test_the_job_handlers_skip_gradios_queue(ui):
    fns = {fn.name: fn for fn in ui.demo.fns.values()}
    for name in ("generate", "add_to_queue", "cancel", "watch", "queue_up", "queue_remove", "make_video"):
        assert not fns[name].queue, name  # nothing waits behind a job: it runs in the manager


def test_error_words():
    from wan_lite.errors import CheckpointError

    assert error_message(CheckpointError("Wan2.2_VAE.pth is truncated.")) == "Wan2.2_VAE.pth is truncated."


def test_make_the_video_takes_only_listed_latents(ui, tmp_path):
    from wan_lite.ui.queue_panel import decode_latents

    secret = tmp_path / "elsewhere.latents.safetensors"
    secret.write_bytes(b"x")
    assert "not in the output folder" in decode_latents(ui, str(secret))["latents_note"]
    assert "Pick saved latents" in decode_latents(ui, None)["latents_note"]
    ui.engine.output_dir.mkdir(parents=True, exist_ok=True)
    kept = ui.engine.output_dir / "20261206-101010_ti2v-5b_s1_fox.latents.safetensors"
    kept.write_bytes(b"x")
    (ui.engine.output_dir / "20261206-101010_ti2v-5b_s1_cat.mp4").write_bytes(b"x")  # another run's video
    assert history.pending_latents(ui.engine.output_dir) == [kept]
    assert "Making the video from" in decode_latents(ui, str(kept))["latents_note"]
    view = ui.jobs.view()  # the decode job, wherever it is by now (it may already have failed: "x" is no latents)
    job = next(j for j in [view.running, *view.queued, *view.finished] if j is not None and j.kind == "decode")
    assert job.latents == str(kept)


def test_the_app_stopping_mid_run_stops_the_job_and_lists_it_as_interrupted(tmp_path):
    engine = _fake(tmp_path, step_s=0.05)
    path = tmp_path / "queue.json"
    jobs = JobManager(engine, path)
    job = jobs.submit(_job(engine, steps=400))
    jobs.submit(_job(engine, "later"), start=False)
    _wait_for(lambda: (jobs.get(job.id).progress or 0) and jobs.get(job.id).progress.step >= 2)
    jobs.shutdown()  # what the exit hook does when the app is stopped (Ctrl+C)
    assert engine.cancelled_at is not None and not jobs._thread.is_alive()
    stopped = jobs.get(job.id)
    assert stopped.state == "interrupted" and stopped.message.startswith("The app stopped while this job ran (")
    again = JobManager(_fake(tmp_path), path)
    assert [j.prompt for j in again.view().queued] == ["later"]
    assert again.view().finished[0].state == "interrupted"


def test_cancel_during_the_mp4_write_leaves_no_video(real, tmp_path, monkeypatch):
    import wan_lite.output as output

    jobs = JobManager(real, None)
    write = output.write_mp4

    def write_and_press_cancel(path, frames, *args, **kwargs):
        def pressed_after_the_first():
            for i, frame in enumerate(frames):
                if i == 1:
                    jobs.cancel()
                yield frame

        return write(path, pressed_after_the_first(), *args, **kwargs)

    monkeypatch.setattr(output, "write_mp4", write_and_press_cancel)
    job = jobs.submit(real.resolve(GenerateRequest(prompt=PROMPT, seed=6, **SMALL)))
    done = jobs.wait(job.id, timeout=300)
    assert done.state == "cancelled" and "latents are kept" in done.message
    names = sorted(p.name for p in real.output_dir.iterdir())
    assert len(names) == 1 and names[0].endswith(".latents.safetensors"), names  # no mp4, no .partial
    jobs.close()


def test_a_job_for_two_gpus_runs_from_the_queue_as_two_ranks(real, tmp_path, monkeypatch):
    """The app's GPUs menu at 2: the queued job spawns two ranks (gloo here), the page's progress
    comes from rank 0, the video is written and the job ends done, as a one-GPU job does."""
    from wan_lite.parallel.group import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    jobs = JobManager(real, tmp_path / "queue.json")
    job = jobs.submit(real.resolve(GenerateRequest(prompt=PROMPT, seed=4, gpus=2, **SMALL)))
    done = jobs.wait(job.id, timeout=300)
    assert done.state == "done", done.message
    assert Path(done.result["video"]).is_file() and done.progress is not None
    record = json.loads(Path(done.result["video"]).with_suffix(".json").read_text(encoding="utf-8"))
    assert record["request"]["gpus"] == 2 and any("Ran on 2 ranks" in n for n in record["notes"])
    jobs.close()
