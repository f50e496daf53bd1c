"""Parse app arguments, open the model session (with the offline fallback), build the Blocks and launch."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_app_args", "launch"]


def _pair_strategies() -> list[str]:
    from typing import get_args

    from ..steer.pair import PairStrategy

    return list(get_args(PairStrategy))


def add_app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local folder (default: Qwen/Qwen2-VL-2B-Instruct, "
                                                 "falling back to a built-in tiny model when offline)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
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


def launch(args: argparse.Namespace) -> int:
    from .app import create_app, launch_kwargs
    from .session import open_session

    session = open_session(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                           trust_remote_code=args.trust_remote_code, layers_path=args.layers_path)
    if session.notice:
        print(f"[mars_viz] {session.notice}", file=sys.stderr)
    session.pair_strategy = args.pair_strategy
    if args.state:
        session.load_state(args.state)
    demo = create_app(session)
    demo.queue(default_concurrency_limit=4)
    demo.launch(**launch_kwargs(args.host, args.port, args.max_upload_mb))
    return 0
