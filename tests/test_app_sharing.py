"""Sharing the app (issue 23, item 7): a password or an explicit --no-auth beyond this computer,
Scan and Save confined to the known folders, rejected uploads not kept where the app serves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from wan_lite.engine import Engine
from wan_lite.loading.discovery import RememberedChoices
from wan_lite.ui import components_panel
from wan_lite.ui.handlers import discard_upload

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("wan_lite_app_entry", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serving(app, *argv: str):
    return app.serving(app.parse_args(list(argv)))


@pytest.mark.parametrize("argv", [["--listen"], ["--share"], ["--host", "192.168.1.5"]])
def test_serving_beyond_this_computer_needs_auth_or_no_auth(app, argv, capsys, monkeypatch):
    with pytest.raises(app.StartError, match="needs a password") as err:
        _serving(app, *argv)
    assert "--auth USER:PASS" in str(err.value) and "--no-auth" in str(err.value)
    monkeypatch.setattr("wan_lite.ui.app.launch", lambda *a, **k: pytest.fail("must not start"))
    assert app.main(argv) == 2 and "needs a password" in capsys.readouterr().err
    assert _serving(app, *argv, "--auth", "ann:s3cret:x")[1] == [("ann", "s3cret:x")]
    assert _serving(app, *argv, "--no-auth")[1] is None


def test_local_serving_needs_nothing_and_auth_comes_from_a_file(app, tmp_path):
    assert _serving(app) == ("127.0.0.1", None)
    users = tmp_path / "users.txt"
    users.write_text("# who may use it\nann:one\n\nbob: two \n", encoding="utf-8")
    host, auth = _serving(app, "--listen", "--auth", str(users))
    assert host == "0.0.0.0" and auth == [("ann", "one"), ("bob", " two")]  # a line's end is trimmed
    users.write_text("ann:one\nbob\n", encoding="utf-8")
    with pytest.raises(app.StartError, match=r"users.txt, line 2: expected USER:PASS"):
        _serving(app, "--listen", "--auth", str(users))
    with pytest.raises(app.StartError, match="neither USER:PASS nor a file"):
        _serving(app, "--listen", "--auth", "nocolon")
    with pytest.raises(app.StartError, match="contradict"):
        _serving(app, "--listen", "--auth", "a:b", "--no-auth")


def test_launch_hands_the_logins_to_gradio(tmp_path):
    from wan_lite.ui.app import launch

    seen = {}

    class Demo:
        def queue(self, **kwargs):
            pass

        def launch(self, **kwargs):
            seen.update(kwargs)

    ui = type("UI", (), {"demo": Demo(), "upload_dir": tmp_path})()
    launch(ui, host="0.0.0.0", port=None, share=False, open_browser=False, output_dir=tmp_path,
           auth=[("ann", "one")])
    assert seen["auth"] == [("ann", "one")] and seen["server_name"] == "0.0.0.0"


@pytest.fixture()
def engine(tmp_path):
    models, comfy = tmp_path / "models", tmp_path / "ComfyUI" / "models"
    models.mkdir()
    comfy.mkdir(parents=True)
    choices = RememberedChoices()
    choices.add_comfy_dir(comfy)
    choices.save()
    return Engine(models, tmp_path / "out")


def test_a_shared_page_scans_and_saves_only_in_known_folders(engine, tmp_path):
    secret = tmp_path / "private" / "diary.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"x")
    for typed in (str(secret.parent), str(tmp_path / "no" / "such" / "folder"), f"{engine.models_root}/../private"):
        found, text = components_panel.scan(engine, typed, confine=True)
        assert found == [] and text.startswith("⛔ This page is shared over the network")
        assert "private" not in text and "no/such" not in text  # the same words, exists or not
    found, text = components_panel.scan(engine, str(engine.comfy_dirs()[0]), confine=True)
    assert not text.startswith("⛔")

    before = RememberedChoices().data
    message = components_panel.save(engine, "ti2v-5b", {"dit": str(secret)}, confine=True)
    assert message.startswith("⛔ This page is shared over the network") and RememberedChoices().data == before
    inside = engine.models_root / "dit.safetensors"
    message = components_panel.save(engine, "ti2v-5b", {"dit": str(inside)}, confine=True)
    assert "shared over the network" not in message  # checked as a model file, like on this computer
    assert not components_panel.save(engine, "ti2v-5b", {"dit": str(secret)}).startswith("⛔ This page is shared")


def test_a_rejected_upload_is_deleted_from_the_upload_folder_only(tmp_path):
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "mine"
    (uploads / "abc").mkdir(parents=True)
    elsewhere.mkdir()
    page = uploads / "abc" / "x.html"
    page.write_text("<script>alert(1)</script>")
    mine = elsewhere / "x.svg"
    mine.write_text("<svg/>")
    assert discard_upload(page, uploads) and not page.exists()
    assert not discard_upload(mine, uploads) and mine.exists()


def test_the_upload_widget_takes_images_only():
    source = (ROOT / "wan_lite" / "ui" / "app.py").read_text(encoding="utf-8")
    line = next(ln for ln in source.splitlines() if "file_types=" in ln)
    assert "html" not in line and "svg" not in line and ".png" in line


def test_a_page_posted_to_the_upload_route_is_served_as_a_download_not_as_a_page(tmp_path, monkeypatch):
    """Stored cross-site scripting through Gradio's own upload route (issue 23, item 7): the
    widget takes images only, but anyone who can reach the app can POST any file to
    /gradio_api/upload. Served back from a folder given to Gradio as allowed, an .html or .svg came
    inline as text/html from the app's origin; uploads are now served as Gradio serves files it
    made itself: images inline, anything else as an attachment of type application/octet-stream.
    The real app on a real port, the scripted engine (no model needed)."""
    import socket
    import urllib.request
    import uuid

    from tests.e2e.fake_engine import FakeEngine
    from wan_lite.ui.app import build_ui, launch

    uploads, out, models = tmp_path / "uploads", tmp_path / "outputs", tmp_path / "models"
    for d in (uploads, out, models):
        d.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "config"))
    ui = build_ui(FakeEngine(models, out, step_s=0.01), uploads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(ui, host="127.0.0.1", port=port, share=False, open_browser=False, output_dir=out, block=False)
    base = f"http://127.0.0.1:{port}/gradio_api"
    try:
        served = {}
        for name, body, kind in (("x.html", b"<script>alert(1)</script>", "text/html"),
                                 ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
                                  "image/svg+xml"),
                                 ("x.png", _png_bytes(), "image/png")):
            boundary = uuid.uuid4().hex
            form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: {kind}\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
            request = urllib.request.Request(f"{base}/upload", data=form, method="POST",
                                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            with urllib.request.urlopen(request, timeout=30) as r:
                stored = __import__("json").loads(r.read())[0]
            with urllib.request.urlopen(f"{base}/file={stored}", timeout=30) as r:
                served[name] = (r.headers.get("Content-Type", ""), r.headers.get("Content-Disposition", ""))
    finally:
        ui.demo.close()
    for name in ("x.html", "x.svg"):
        kind, disposition = served[name]
        assert "html" not in kind and "svg" not in kind and disposition.startswith("attachment"), (name, served[name])
    assert served["x.png"][0] == "image/png" and served["x.png"][1].startswith("inline")  # the preview still shows


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()
