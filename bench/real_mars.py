"""MARS on the real refusing backbone: the acceptance figures (issues 3, 11 and 20).

usage: python bench/real_mars.py --model /tmp/mars-real/qwen2-vl-qwen2.5-0.5b --state DIR [--out figures.json]
       (fit the state first: python -m mars_viz fit --model ... --out DIR)

Measures, on the held-out splits the state was NOT fitted on:
  - separability (AUROC) at the detection layer and steerability at the push layer; the gate's false-positive rate
    on held-out harmless text and false-negative rate on held-out harmful text (from the fit);
  - held-out harmless text with the gate forced open at lambda = 1 vs the calibration curve at t*;
  - held-out harmful text: refusal unsteered vs MARS;
  - held-out harmless text: gate closed and answer identical;
  - held-out harmless text + a neutral image (and a neutral video when the model takes video), re-centring on: gate
    closed and answer identical; the same with re-centring off;
  - held-out look-alikes (harmless requests with alarming words): refusal unsteered vs MARS;
  - jailbreak framings (harmful requests in role-play / fiction): refusal unsteered vs MARS;
  - each of these at both gate positions (t_post and t_inst, `out["positions"]`; the state's choice at the top level);
  - how often the gate decides the same when the held-out prompts lose their final punctuation, gain a trailing
    space or are lower-cased, per position (`out["surface_agreement"]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mars_viz.analysis.evaluate import gate_surface_agreement  # noqa: E402
from mars_viz.core.state import MarsState  # noqa: E402
from mars_viz.data.datasets import builtin_prompts  # noqa: E402
from mars_viz.fit.calibrate import split_sets  # noqa: E402
from mars_viz.model.backbone import load_backbone  # noqa: E402
from mars_viz.model.inputs import Query  # noqa: E402
from mars_viz.model.media import neutral_images, neutral_video  # noqa: E402
from mars_viz.steer.pair import run_pairs  # noqa: E402
from mars_viz.steer.steering import SteerOptions, plan  # noqa: E402


def rate(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--out")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--limit", type=int, default=0, help="cap prompts per held-out set (0 = all)")
    ap.add_argument("--detect-layer", type=int, help="override the state's detection layer")
    ap.add_argument("--layer", type=int, help="override the state's push layer (t* stays the fitted one)")
    ap.add_argument("--positions", choices=("both", "post", "inst"), default="both",
                    help="gate positions to run the steered sets at (default: both, the state's choice first)")
    args = ap.parse_args()
    t0 = time.time()
    state = MarsState.load(args.state).with_overrides(layer=args.layer, detect_layer=args.detect_layer)
    bb = load_backbone(args.model)
    state.check_compatible(bb)
    cfg = state.config
    sets = split_sets(cfg)
    u_held, s_held, la_held = sets["u_held"], sets["s_held"], sets["la_held"]
    jailbreak = builtin_prompts("jailbreak")
    if args.limit:
        u_held, s_held, la_held = u_held[: args.limit], s_held[: args.limit], la_held[: args.limit]
    layer, detect, diag = state.layer, state.detect_layer, state.diagnostics
    ls = diag.layer_scores
    out: dict = {"model": args.model, "layer": layer, "detect_layer": detect, "tau": state.tau,
                 "target_level": state.target_level,
                 "target_curve": {f"{k:g}": v for k, v in diag.target_curve.items()},
                 "separability_at_detect_layer": float(ls.separability[detect]),
                 "separability_at_layer": float(ls.separability[layer]),
                 "steerability_at_layer": float(ls.steerability[layer]),
                 "gate_fpr_heldout_harmless_fit": diag.gate_fpr[detect] if diag.gate_fpr else None,
                 "gate_fnr_heldout_harmful_fit": diag.gate_fnr[detect] if diag.gate_fnr else None,
                 "behaviour": diag.behaviour, "n_harmful_heldout": len(u_held),
                 "n_harmless_heldout": len(s_held), "n_lookalike_heldout": len(la_held), "n_jailbreak": len(jailbreak)}
    tok = args.max_new_tokens
    gl = state.gate_layer
    out.update(gate_position=state.gate_position, gate_layer=gl,
               gate_choice={pos: {k: (v[site["layer"]] if isinstance(v, list) else v) for k, v in site.items()}
                            for pos, site in diag.gate_choice.items() if isinstance(site, dict)})

    forced = run_pairs(bb, state, [Query(p) for p in s_held], SteerOptions(tau=-100.0),
                       max_new_tokens=cfg.filter_tokens, batch_size=8)
    out["harmless_forced_open_refusal"] = rate(r.steered.refused for r in forced)
    out["curve_at_t_star"] = state.diagnostics.target_curve[state.target_level]

    # item 3 of issue 20: does the gate decide the same under surface changes (no generation, forward passes only)
    out["surface_agreement"] = gate_surface_agreement(bb, state, u_held + s_held + la_held)

    images = neutral_images(cfg.k_neutral, seed=cfg.seed + 99, size=cfg.neutral_size)
    img_queries = [Query(p, images=(images[i % len(images)],)) for i, p in enumerate(s_held)]
    vid_queries = [Query(p, video=tuple(neutral_video(4, seed=cfg.seed + 99 + i, size=112)))
                   for i, p in enumerate(s_held)] if "video" in bb.modalities else []
    positions = [state.gate_position] + [p for p in state.positions if p != state.gate_position]
    if args.positions != "both":
        positions = [args.positions]
    out["positions"] = {}
    harm = []
    for position in positions:
        opts = SteerOptions(gate_position=position)
        res: dict = {"gate_layer": plan(state, opts).detect_layer, "tau": plan(state, opts).rule.tau}
        harm = run_pairs(bb, state, [Query(p) for p in u_held], opts, max_new_tokens=tok, batch_size=8)
        res["harmful_text_refusal_unsteered"] = rate(r.unsteered.refused for r in harm)
        res["harmful_text_refusal_mars"] = rate(r.steered.refused for r in harm)
        res["harmful_text_gate_open_rate"] = rate(r.gate_open for r in harm)

        plain = run_pairs(bb, state, [Query(p) for p in s_held], opts, max_new_tokens=tok, batch_size=8)
        res["harmless_text_gate_closed_rate"] = rate(not r.gate_open for r in plain)
        res["harmless_text_unchanged_rate"] = rate(r.steered.text == r.unsteered.text for r in plain)
        res["harmless_text_refusal_unsteered"] = rate(r.unsteered.refused for r in plain)
        res["harmless_text_refusal_mars"] = rate(r.steered.refused for r in plain)

        for name, prompts in (("lookalike", la_held), ("jailbreak", jailbreak)):
            got = run_pairs(bb, state, [Query(p) for p in prompts], opts, max_new_tokens=tok, batch_size=8)
            res[f"{name}_refusal_unsteered"] = rate(r.unsteered.refused for r in got)
            res[f"{name}_refusal_mars"] = rate(r.steered.refused for r in got)
            res[f"{name}_gate_open_rate"] = rate(r.gate_open for r in got)

        on = run_pairs(bb, state, img_queries, opts, max_new_tokens=tok, batch_size=8)
        res["harmless_image_gate_closed_rate"] = rate(not r.gate_open for r in on)
        res["harmless_image_unchanged_rate"] = rate(r.steered.text == r.unsteered.text for r in on)
        res["harmless_image_refusal_unsteered"] = rate(r.unsteered.refused for r in on)
        res["harmless_image_refusal_mars"] = rate(r.steered.refused for r in on)
        res["spurious_score_shift_mean"] = rate(r.score_raw - r.score_recentred for r in on)
        res["image_gate_score_mean"] = rate(r.gate_score for r in on)
        if position == state.gate_position:
            off = run_pairs(bb, state, img_queries, replace(opts, recenter=False), max_new_tokens=tok, batch_size=8)
            res["no_recenter_gate_open_rate"] = rate(r.gate_open for r in off)
            res["no_recenter_unchanged_rate"] = rate(r.steered.text == r.unsteered.text for r in off)
            res["no_recenter_refusal"] = rate(r.steered.refused for r in off)
        if vid_queries:
            vids = run_pairs(bb, state, vid_queries, opts, max_new_tokens=tok, batch_size=8)
            res["harmless_video_gate_closed_rate"] = rate(not r.gate_open for r in vids)
            res["harmless_video_unchanged_rate"] = rate(r.steered.text == r.unsteered.text for r in vids)
        res["examples"] = [{"prompt": r.prompt, "unsteered": r.unsteered.text, "steered": r.steered.text,
                            "s_gate": r.gate_score} for r in harm if r.steered.refused != r.unsteered.refused][:5]
        out["positions"][position] = res
        print(f"[real_mars] {position}: {json.dumps({k: v for k, v in res.items() if k != 'examples'})}",
              file=sys.stderr, flush=True)
    if state.gate_position in out["positions"]:  # the defaults' figures at the top level too, as before
        out.update({k: v for k, v in out["positions"][state.gate_position].items() if k not in ("gate_layer", "tau")})
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
