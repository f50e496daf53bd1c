"""`python -m mars_viz graft`: argument checks, a progress line on stderr, a JSON summary on stdout."""

from __future__ import annotations

import json
import sys

__all__ = ["progress_line", "run"]


def progress_line(row: dict) -> str:
    """One tqdm-like line: bar over the time (or step) budget, loss, held-out reading score."""
    if row.get("phase") == "read":
        return f"[graft] reading training images with the frozen recognizer: {row['items']} read, " \
               f"{row['seconds'] / 60:.1f} min of {row['budget_s'] / 60:.0f}"
    if row.get("steps_total"):
        frac = row["step"] / row["steps_total"]
    else:
        frac = row["seconds"] / max(1e-9, row["budget_s"])
    frac = min(1.0, max(0.0, frac))
    bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
    return (f"[graft] |{bar}| {frac * 100:5.1f}% step {row['step']} {row['seconds'] / 60:.1f} min "
            f"loss {row['loss']:.3f} (ctc {row['ctc']:.2f} cell {row.get('cell', 0.0):.2f} pull {row['pull']:.2f} "
            f"letters {row.get('letters', 0.0):.2f}) "
            f"held-out read: words {row['read_recall']:.2f} chars {row['read_char']:.2f}")


def run(args) -> int:
    from .build import graft

    if args.minutes is not None and args.minutes <= 0:
        raise ValueError("--minutes must be > 0")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)

    def show(row: dict) -> None:
        if not args.quiet:
            print(progress_line(row), file=sys.stderr, flush=True)

    stem = getattr(args, "stem", "vit")
    if stem == "recognizer":
        from .reader import reader_graft

        summary = reader_graft(args.llm, args.out, minutes=args.minutes or 25.0, seed=args.seed, steps=args.steps,
                               progress=show, weights=getattr(args, "weights", None),
                               max_train=getattr(args, "max_train", None),
                               install=not getattr(args, "no_install", False))
    else:
        summary = graft(args.llm, args.out, minutes=args.minutes or 60.0, seed=args.seed, steps=args.steps,
                        progress=show)
    print(json.dumps({"out": str(args.out), "steps": summary["steps"], "seconds": summary["seconds"],
                      "heldout_read_recall": summary["final"].get("read_recall"),
                      "heldout_read_char": summary["final"].get("read_char"),
                      "vocab_tokens": summary["vocab_tokens"], "words": summary["words"],
                      "stem": summary.get("stem", "vit"), "timing_s": summary.get("timing_s")}))
    return 0
