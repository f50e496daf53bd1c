"""Command line: `python -m mars_viz {app,demo-model,capture,...}`.

Bad arguments or inputs exit non-zero with one line starting `error:`, never a traceback.

Example:
    $ python -m mars_viz demo-model --arch qwen2_vl --out /tmp/tiny-qwen2-vl
    $ python -m mars_viz capture --model /tmp/tiny-qwen2-vl --prompt "Describe" --image cat.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints usage + exits 2; keep exit 2, one clear line
        self.exit(2, f"error: {message} (see --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or local folder")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)")
    p.add_argument("--layers-path", default=None, help="dotted path of the decoder layers, if not found automatically")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _load(args):
    from .backbone import load_backbone

    return load_backbone(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                         trust_remote_code=args.trust_remote_code, layers_path=args.layers_path)


def _cmd_demo_model(args) -> int:
    from .demo_models import build_demo_model

    path = build_demo_model(args.arch, args.out, seed=args.seed)
    print(json.dumps({"arch": args.arch, "path": str(path)}))
    return 0


def _cmd_capture(args) -> int:
    from .activations import collect_activations
    from .inputs import Query, clean_prompt
    from .media import load_image, read_video

    # Inputs are checked before the (slow) model load, so a bad file fails fast.
    images = tuple(load_image(p) for p in args.image or [])
    video = tuple(read_video(args.video, num_frames=args.frames).frames) if args.video else None
    q = Query(clean_prompt(args.prompt), images=images, video=video)
    bb = _load(args)
    acts = collect_activations(bb, [q])[0]  # [L, d]
    print(json.dumps({**bb.describe(), "modality": q.modality,
                      "residual_norm": [round(float(x), 5) for x in acts.norm(dim=-1)]}))
    return 0


def _cmd_app(args) -> int:
    from .ui.launch import launch

    return launch(args)


def build_parser() -> argparse.ArgumentParser:
    from .demo_models import ARCHITECTURES

    parser = _Parser(prog="python -m mars_viz", description="MARS: modality-agnostic refusal steering, visualised.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo-model", help="build a tiny random offline model of one architecture")
    p.add_argument("--arch", required=True, choices=list(ARCHITECTURES))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo_model)

    p = sub.add_parser("capture", help="print per-layer residual norms at the first generated token's position")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", action="append", help="image file (repeat for several)")
    media.add_argument("--video", help="video file (frames sampled with decord)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from a video (default 8)")
    p.set_defaults(func=_cmd_capture)

    p = sub.add_parser("app", help="launch the dashboard (same as python app.py)")
    from .ui.launch import add_app_args

    add_app_args(p)
    p.set_defaults(func=_cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable = args.func
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
