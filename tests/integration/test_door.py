"""No open door (issue 24): a server bound beyond loopback needs a login (`--auth`, MARS_VIZ_AUTH) or an explicit
`--insecure-public`; a login keeps clients out; the Calibrate tab loads only the presets, the cached models and the
current one unless the server was started with `--allow-any-model`; the server's temporary files live in one folder
that goes when it stops."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


# ---- the decision, without a server ----------------------------------------------------------------------------------

@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                         ("127.8.9.10", True), ("0.0.0.0", False), ("192.168.1.20", False),
                                         ("::", False), ("example.org", False), ("", False)])
def test_is_loopback(host, local):
    from mars_viz.ui.launch import is_loopback

    assert is_loopback(host) is local


def test_parse_auth():
    from mars_viz.ui.launch import parse_auth

    assert parse_auth(None) is None
    assert parse_auth("ann:s3cret") == ("ann", "s3cret")
    assert parse_auth("ann:a:b:c") == ("ann", "a:b:c")  # only the first colon splits
    for bad in ("nocolon", ":pw", "ann:", " :pw", ""):
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_auth(bad)


def test_door_mode():
    from mars_viz.ui.launch import door_mode

    assert door_mode("127.0.0.1", None, False).startswith("local only")
    assert "login for user ann" in door_mode("localhost", ("ann", "pw"), False)
    public = door_mode("0.0.0.0", ("ann", "pw"), False)
    assert "public" in public and "login for user ann" in public and "WITHOUT" not in public and "pw" not in public
    assert "WITHOUT login" in door_mode("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="--auth USER:PASS.*--insecure-public"):
        door_mode("0.0.0.0", None, False)
    with pytest.raises(ValueError, match="--host 10.1.2.3"):
        door_mode("10.1.2.3", None, False)


@pytest.mark.parametrize("argv, match", [(["--host", "0.0.0.0"], "--insecure-public"),
                                         (["--auth", "ann"], "USER:PASS"),
                                         (["--max-new-tokens-limit", "0"], "--max-new-tokens-limit"),
                                         (["--session-ttl", "-1"], "--session-ttl")])
def test_launch_refuses_before_loading_anything(argv, match, monkeypatch):
    import argparse

    import mars_viz.ui.session as session_module
    from mars_viz.ui.launch import add_app_args, launch

    monkeypatch.delenv("MARS_VIZ_AUTH", raising=False)
    monkeypatch.setattr(session_module, "open_session", lambda *a, **k: pytest.fail("the model was loaded"))
    parser = argparse.ArgumentParser()
    add_app_args(parser)
    args = parser.parse_args(["--model", "/no/such/model", *argv])
    assert args.allow_any_model is False and args.insecure_public is False  # the safe defaults
    with pytest.raises(ValueError, match=match):
        launch(args)


def _fake_hf_cache(root: Path, model: Path, repo: str = "acme/tiny-vlm") -> Path:
    """A Hugging Face cache holding `model` as `repo`; returns its snapshot folder."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("a" * 40)
    shutil.copytree(model, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("a" * 40)
    (folder / "blobs").mkdir()
    return snap


def test_model_section_says_what_can_be_loaded(tiny_dirs, tmp_path, monkeypatch):
    import gradio as gr

    from mars_viz.ui.calibrate_tab import _model_section
    from mars_viz.ui.session import Session

    _fake_hf_cache(tmp_path / "hub", tiny_dirs("llava"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    session = Session(backbone=None, allow_any_model=False)
    try:
        with gr.Blocks():
            strict, _ = _model_section(session)
            session.allow_any_model = True
            free, _ = _model_section(session)
    finally:
        session.files.close()
    assert "--allow-any-model" in strict.label and "cache" in strict.label
    assert "acme/tiny-vlm" in [c[0] for c in strict.choices]
    assert "any hub id" in free.label and "--allow-any-model" not in free.label


# ---- the server ------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MARS_VIZ_AUTH", "GRADIO_TEMP_DIR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               MARS_VIZ_CACHE=str(tmp_path / "cache"), **extra)
    return env


def _app(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "config", timeout=2).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the app did not answer within {timeout:g}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("args, env_auth", [(["--host", "0.0.0.0"], None), (["--auth", "nocolon"], None),
                                            (["--host", "0.0.0.0"], ":nouser")],
                         ids=["public-without-login", "auth-without-colon", "env-auth-without-user"])
def test_refused_door_is_one_error_line(args, env_auth, tiny_dirs, tmp_path):
    env = _env(tmp_path, **({"MARS_VIZ_AUTH": env_auth} if env_auth else {}))
    cmd = [sys.executable, "app.py", "--model", str(tiny_dirs("qwen2_vl")), "--port", str(_free_port()), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "--auth" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded or cached


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_login_keeps_clients_out_and_temp_files_go_at_exit(tiny_dirs, tmp_path):
    from gradio_client import Client, handle_file

    port, tmp_dir, log = _free_port(), tmp_path / "server-tmp", tmp_path / "app.log"
    password = "pa:ss-word"  # through the env var (kept out of `ps`); a colon in a password is kept
    proc = _app(["--model", str(tiny_dirs("qwen2_vl")), "--host", "0.0.0.0", "--port", str(port),
                 "--tmp-dir", str(tmp_dir)], _env(tmp_path, MARS_VIZ_AUTH=f"ann:{password}"), log)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_up(proc, url, log)
        with pytest.raises(Exception, match="login|credentials"):
            Client(url, verbose=False)
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises ValueError or AuthenticationError
            Client(url, auth=("ann", "wrong"), verbose=False)
        assert httpx.get(url + "config", timeout=5).status_code == 401
        client = Client(url, auth=("ann", password), verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert [p["parameter_name"] for p in api["/load_model"]["parameters"]] == ["model"]  # no `request`
        bogus = tmp_path / "mars_state.json"
        bogus.write_text("not json")
        with pytest.raises(Exception):  # noqa: B017 - a broken state is refused; its upload is what we look for
            client.predict([handle_file(bogus)], api_name="/load_state")
        roots = list(tmp_dir.glob("mars_viz_server_*"))
        assert len(roots) == 1
        uploads = [p for p in (roots[0] / "gradio").rglob("*") if p.is_file()]  # Gradio's cache lives under it
        assert any(p.read_text() == "not json" for p in uploads), uploads
        client.close()  # no client stream open while the server shuts down
    finally:
        rc = _stop(proc)
    text = log.read_text()
    assert "[mars_viz] public on 0.0.0.0 with login for user ann" in text and password not in text
    assert rc == 0, text
    assert tmp_dir.is_dir() and not list(tmp_dir.iterdir())  # ours removed at exit; the given folder stays


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_insecure_public_starts_without_login(tiny_dirs, tmp_path):
    from gradio_client import Client

    port, log = _free_port(), tmp_path / "app.log"
    proc = _app(["--model", str(tiny_dirs("qwen2_vl")), "--host", "0.0.0.0", "--insecure-public", "--port",
                 str(port), "--tmp-dir", str(tmp_path / "t")], _env(tmp_path), log)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_up(proc, url, log)
        client = Client(url, verbose=False)
        try:
            assert "/load_model" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        finally:
            client.close()  # its heartbeat stream would otherwise be open while the server shuts down
    finally:
        # SIGTERM, which the app turns into Ctrl-C: a SIGINT is ignored by a process started in the background of a
        # non-interactive shell (CI started with `&` or nohup), and Python keeps it ignored
        rc = _stop(proc, signal.SIGTERM)
    assert "public on 0.0.0.0 WITHOUT login (--insecure-public)" in log.read_text()
    assert rc == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_model_takes_only_allowed_models_unless_allow_any_model(tiny_dirs, tmp_path, monkeypatch):
    from gradio_client import Client

    from mars_viz.ui import create_app
    from mars_viz.ui.app import launch_kwargs
    from mars_viz.ui.session import open_session

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path / "cache"))
    snapshot = _fake_hf_cache(tmp_path / "hub", tiny_dirs("llava"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    arbitrary = tiny_dirs("qwen2_5_vl")  # a loadable model that is neither a preset, cached nor current
    session = open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    session.allow_any_model = False
    demo = create_app(session)
    demo.queue(default_concurrency_limit=4)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, **launch_kwargs(port=port))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        before, generation = session.backbone, session.generation
        with pytest.raises(Exception, match=r"refused.*acme/tiny-vlm.*--allow-any-model"):
            client.predict(str(arbitrary), api_name="/load_model")
        with pytest.raises(Exception, match="refused"):
            client.predict(f"{snapshot}/../../../../../{arbitrary}", api_name="/load_model")  # no way around it
        assert session.backbone is before and session.generation == generation
        assert not session.lock.locked()

        client.predict(f"{snapshot}/", api_name="/load_model")  # a cached model, written another way
        assert session.backbone.model_type == "llava" and session.generation > generation

        session.allow_any_model = True
        client.predict(str(arbitrary), api_name="/load_model")
        assert session.backbone.model_type == "qwen2_5_vl" and session.loaded.source == str(arbitrary)
        session.allow_any_model = False
        reloaded = session.generation
        client.predict(str(arbitrary), api_name="/load_model")  # the current model may be loaded again
        assert session.backbone.model_type == "qwen2_5_vl" and session.generation > reloaded
    finally:
        demo.close()
        session.files.close()
