"""`generate --prompts-file`: many videos from one command (wan_lite/cli_batch.py), on the tiny
TI2V-5B checkpoints: every line checked before the first job, one model load, a failed job told
and the next one run, and with --gpus the planner's split-or-one-job-per-GPU decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wan_lite.api import GenerateRequest
from wan_lite.cli import main
from wan_lite.cli_batch import read_batch
from wan_lite.errors import InputError
from wan_lite.parallel.group import BACKEND_ENV

BASE = GenerateRequest(prompt="", model="ti2v-5b", steps=2, seed=None)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_prompts_file_reads_text_lines_and_json_lines_over_the_options(tmp_path):
    txt = _write(tmp_path, "p.txt", "# tonight's batch\na fox in snow\n\n  a heron at dawn  \n")
    assert [(n, r.prompt, r.steps) for n, r in read_batch(txt, BASE)] == [(2, "a fox in snow", 2),
                                                                         (4, "a heron at dawn", 2)]
    jsonl = _write(tmp_path, "p.jsonl", '{"prompt": "a fox", "seed": 7, "size": "704x1280"}\n'
                                        '# a note\n{"prompt": "a boat", "steps": 30, "loras": ["s.safetensors:0.5"]}\n')
    (n1, a), (n3, b) = read_batch(jsonl, BASE)
    assert (n1, a.seed, a.width, a.height, a.steps) == (1, 7, 704, 1280, 2)
    assert (n3, b.steps, b.loras, b.seed) == (3, 30, ["s.safetensors:0.5"], None)


@pytest.mark.parametrize(("text", "told"), [
    ('{"prompt": "a boat", "sed": 3}\n', "line 1 sets sed, which is no request field"),
    ('{"prompt": "a fox"}\n{"prompt": "a boat",\n', "line 2 is not a JSON object"),
    ('{"seed": 3}\n', "line 1 has no prompt"),
    ('{"prompt": "a fox", "size": "big"}\n', "size 'big' is not WIDTHxHEIGHT"),
    ("# nothing but a comment\n", "holds no prompt"),
])
def test_a_bad_prompts_file_is_told_with_its_line(tmp_path, text, told):
    with pytest.raises(InputError, match=told):
        read_batch(_write(tmp_path, "p.jsonl", text), BASE)
    with pytest.raises(InputError, match="Prompts file not found"):
        read_batch(tmp_path / "missing.txt", BASE)


def _generate(tiny_models, out: Path, prompts: Path, *extra: str) -> int:
    return main(["generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompts-file", str(prompts),
                 "--size", "64x64", "--frames", "5", "--steps", "2", "--device", "cpu", "--output-dir", str(out),
                 *extra])


def test_a_batch_checks_every_line_first_then_runs_each_and_goes_on_after_a_failure(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    # a line that cannot run is told before anything loads or runs
    bad = _write(tmp_path, "bad.jsonl", '{"prompt": "a fox"}\n{"prompt": "a boat", "image": "/no/such.png"}\n')
    assert _generate(tiny_models, out, bad) == 2
    assert "bad.jsonl, line 2: Image not found" in capsys.readouterr().err and not out.exists()
    # a job that fails while it runs (a broken LoRA file) is told; the next one runs
    broken = tmp_path / "broken_lora.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    jobs = _write(tmp_path, "jobs.jsonl", '{"prompt": "a red fox", "seed": 1}\n'
                  + json.dumps({"prompt": "a boat", "loras": [str(broken)], "turbo": False}) + "\n"
                  '{"prompt": "a lamp in the dark", "seed": 3, "steps": 1}\n')
    assert _generate(tiny_models, out, jobs) == 1
    captured = capsys.readouterr()
    assert "[2/3] line 2 failed:" in captured.err and "broken_lora" in captured.err
    assert "2 of 3 videos made. Failed:" in captured.err
    records = [json.loads(p.read_text()) for p in out.glob("*.json")]
    made = sorted((r["request"]["prompt"], r["request"]["seed"], r["request"]["steps"]) for r in records)
    assert made == [("a lamp in the dark", 3, 1), ("a red fox", 1, 2)]
    assert any("red-fox" in p.name for p in out.glob("*.mp4")) and len(list(out.glob("*.mp4"))) == 2
    # --out names one video
    assert _generate(tiny_models, out, jobs, "--out", str(tmp_path / "x.mp4")) == 2
    assert "--out names one video" in capsys.readouterr().err


def test_a_batch_on_several_gpus_follows_the_planner(tiny_models, tmp_path, capsys, monkeypatch):
    """--gpus 2 with three jobs (gloo processes here): the planner's decision is printed and
    followed; every video is made with its own seed."""
    monkeypatch.setenv(BACKEND_ENV, "gloo")
    out = tmp_path / "out"
    jobs = _write(tmp_path, "jobs.jsonl", "".join(json.dumps({"prompt": p, "seed": s}) + "\n"
                                                  for p, s in (("a fox", 1), ("a boat", 2), ("a lamp", 3))))
    assert _generate(tiny_models, out, jobs, "--gpus", "2") == 0
    err = capsys.readouterr().err
    assert "GPUs: " in err and "3 of 3 videos made." in err
    assert ("one job per GPU" in err) or ("One job over 2 GPUs" in err)
    assert sorted(json.loads(p.read_text())["request"]["seed"] for p in out.glob("*.json")) == [1, 2, 3]
