"""Parse app arguments, open the model session (with the offline fallback), build the Blocks and launch.

The door: a server bound to anything but loopback needs a login (`--auth USER:PASS`, or the env var MARS_VIZ_AUTH so
the password stays out of `ps`), or an explicit `--insecure-public`; `door_mode` decides, before any model is loaded.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["add_app_args", "door_mode", "is_loopback", "launch", "parse_auth"]

AUTH_ENV = "MARS_VIZ_AUTH"


def _pair_strategies() -> list[str]:
    from typing import get_args

    from ..steer.pair import PairStrategy

    return list(get_args(PairStrategy))


def add_app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local folder (default: Qwen/Qwen2-VL-2B-Instruct, "
                                                 "falling back to a built-in tiny model when offline)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only; any other "
                                                       "address needs --auth or --insecure-public)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device-map", default=None)
    p.add_argument("--layers-path", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="upload size limit (default 200 MB)")
    p.add_argument("--state", default=None, help="a MARS state folder (from `fit`); default: the per-model cache, "
                                                 "else fitted on the first run")
    p.add_argument("--pair-strategy", default="auto", choices=_pair_strategies(),
                   help="how both answers are computed (default auto: measured once per model and device)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help=f"require this login (default: the env var {AUTH_ENV}, which keeps the password out of `ps`)")
    p.add_argument("--insecure-public", action="store_true",
                   help="allow a non-loopback --host WITHOUT a login (anyone who reaches the port can use the model)")
    p.add_argument("--allow-any-model", action="store_true",
                   help="let the Calibrate tab load any hub id or local folder (default: only the presets, the models "
                        "in the local Hugging Face cache and the current one)")
    p.add_argument("--max-new-tokens-limit", type=int, default=512, metavar="N",
                   help="the most tokens one answer may ask for (default 512)")
    p.add_argument("--session-ttl", type=float, default=7200.0, metavar="SECONDS",
                   help="a page's results and files are dropped this long after their last update (default 7200)")
    p.add_argument("--tmp-dir", default=None, metavar="DIR",
                   help="where the server's temporary files go (a fresh folder inside DIR, removed at exit; "
                        "default: a fresh folder in the system's temp dir)")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: localhost, 127.x.y.z, ::1."""
    host = (host or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, or "": reachable from elsewhere
        return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`USER:PASS` as Gradio's `auth=(user, pass)`; None for no value. The password may itself contain colons."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError("--auth (or MARS_VIZ_AUTH) must be USER:PASS with a non-empty user and password")
    return user.strip(), password


def door_mode(host: str, auth: tuple[str, str] | None, insecure_public: bool) -> str:
    """Who can reach the server, in words; ValueError for a public bind with neither a login nor --insecure-public."""
    if is_loopback(host):
        return (f"local only ({host}){f', with login for user {auth[0]}' if auth else ''}: "
                "only this machine can reach the server")
    if auth:
        return f"public on {host} with login for user {auth[0]}"
    if insecure_public:
        return (f"public on {host} WITHOUT login (--insecure-public): anyone who can reach this port can use the "
                "model")
    raise ValueError(f"--host {host} exposes the server beyond this machine: give --auth USER:PASS (or set "
                     f"{AUTH_ENV}), or --insecure-public to serve without a login")


def launch(args: argparse.Namespace) -> int:
    # The door is decided before anything slow (the model load) happens.
    auth = parse_auth(getattr(args, "auth", None) or os.environ.get(AUTH_ENV) or None)
    mode = door_mode(args.host, auth, getattr(args, "insecure_public", False))
    if getattr(args, "max_new_tokens_limit", 512) < 1:
        raise ValueError(f"--max-new-tokens-limit must be at least 1, got {args.max_new_tokens_limit}")
    if getattr(args, "session_ttl", 7200.0) <= 0:
        raise ValueError(f"--session-ttl must be a positive number of seconds, got {args.session_ttl:g}")
    print(f"[mars_viz] {mode}", file=sys.stderr)

    from .app import create_app, launch_kwargs
    from .serving import ServerLimits, SessionFiles
    from .session import open_session

    session = open_session(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                           trust_remote_code=args.trust_remote_code, layers_path=args.layers_path)
    if session.notice:
        print(f"[mars_viz] {session.notice}", file=sys.stderr)
    session.pair_strategy = args.pair_strategy
    session.allow_any_model = bool(getattr(args, "allow_any_model", False))
    session.limits = ServerLimits(max_new_tokens=getattr(args, "max_new_tokens_limit", 512),
                                  session_ttl_s=getattr(args, "session_ttl", 7200.0))
    session.files = SessionFiles(_server_tmp(getattr(args, "tmp_dir", None)), ttl_s=session.limits.session_ttl_s)
    atexit.register(session.files.close)
    _stop_on_sigterm()  # `kill`, systemd, docker stop: shut down like Ctrl-C, so the atexit clean-up runs
    os.environ.setdefault("GRADIO_TEMP_DIR", str(session.files.root / "gradio"))  # Gradio's upload cache
    print(f"[mars_viz] temporary files under {session.files.root}", file=sys.stderr)
    if args.state:
        session.load_state(args.state)
    demo = create_app(session)
    demo.queue(default_concurrency_limit=4)
    demo.launch(**launch_kwargs(args.host, args.port, args.max_upload_mb), auth=auth)
    return 0


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt (Gradio's `launch` closes the server on it and returns); Python's default
    for SIGTERM ends the process without running atexit handlers. Only possible from the main thread."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _server_tmp(tmp_dir: str | None) -> Path:
    """A fresh folder for this server's temporary files: inside `tmp_dir` when given (created if missing; the folder
    itself is never removed, only ours inside it), else in the system's temp dir."""
    if tmp_dir:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="mars_viz_server_", dir=tmp_dir or None))
