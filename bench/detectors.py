"""Which detector should the gate read? Single layer vs a band of layers vs look-alikes on the safe side (issue 11).

usage: python bench/detectors.py --model /tmp/mars-real/llava-qwen2.5-0.5b [--out figures.json] [--cache DIR]

Text only (the grafts' text path is the text model's). Collects the residual at the last prompt position of every
layer for the built-in harmful, harmless, look-alike and jailbreak sets once (cached), judges the model's own
greedy answers (behaviour filter, look-alike refusals), then compares detectors on held-out prompts, each as an
affine score along the refusal axis r of its layer(s) (0 at the safe centroid, 1 at the unsafe one):

  single      s_l, centroids from the fit split (behaviour-filtered)
  band        mean of s over layers l-k..l+k (each layer's own axis)
  lookalike   like single, but the safe centroid also averages a fit split of look-alike prompts
  band+la     both

For each: held-out AUROC (harmful vs harmless, and harmful vs look-alike), and at the balanced-accuracy threshold tau
fitted on the held-out text (as MARS does): the false-positive rate on held-out harmless text, on held-out
look-alikes, and the false-negative rate on held-out harmful text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mars_viz.core import rule as R  # noqa: E402
from mars_viz.core import selection as S  # noqa: E402
from mars_viz.core.state import MarsConfig  # noqa: E402
from mars_viz.data.datasets import ASSETS, load_prompts, split  # noqa: E402
from mars_viz.data.judge import default_judge  # noqa: E402
from mars_viz.fit.calibrate import split_sets  # noqa: E402
from mars_viz.model.activations import collect_activations  # noqa: E402
from mars_viz.model.backbone import load_backbone  # noqa: E402
from mars_viz.model.inputs import Query  # noqa: E402
from mars_viz.steer.generate import greedy_texts  # noqa: E402


def collect(model: str, cache: Path, cfg: MarsConfig, tokens: int) -> dict:
    path = cache / (Path(model).name + ".pt")
    if path.exists():
        return torch.load(path)
    bb = load_backbone(model)
    sets = split_sets(cfg)
    la = load_prompts(ASSETS / "prompts" / "harmless_lookalike.txt")
    jb = load_prompts(ASSETS / "prompts" / "harmful_jailbreak.txt")
    la_fit, la_held = split(la, 0.5, cfg.seed + 3)
    names = {"u_fit": sets["u_fit"], "u_held": sets["u_held"], "s_fit": sets["s_fit"], "s_held": sets["s_held"],
             "la_fit": la_fit, "la_held": la_held, "jb": jb}
    judge = default_judge()
    out: dict = {"prompts": names, "acts": {}, "refused": {}}
    for k, ps in names.items():
        t = time.time()
        out["acts"][k] = collect_activations(bb, [Query(p) for p in ps], 8)
        out["refused"][k] = judge([txt for _, txt in greedy_texts(bb, [Query(p) for p in ps], tokens, 16)])
        print(f"[detectors] {k}: {len(ps)} prompts, refused {sum(out['refused'][k])}, {time.time() - t:.0f}s",
              file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def scores(acts: torch.Tensor, mu_minus: torch.Tensor, r: torch.Tensor, band: int) -> torch.Tensor:
    """[N, L] score per layer, or its mean over a centred band of 2*band+1 layers (clipped at the ends)."""
    s = R.unsafety_score(acts.double(), mu_minus, r)  # [N, L]
    if band == 0:
        return s
    L = s.shape[1]
    return torch.stack([s[:, max(0, i - band):min(L, i + band + 1)].mean(1) for i in range(L)], 1)


def evaluate(data: dict, band: int, lookalike: bool, behaviour: bool = True) -> dict:
    a, ref = data["acts"], data["refused"]
    u_keep = torch.tensor(ref["u_fit"]) if behaviour and sum(ref["u_fit"]) >= 8 else torch.ones(len(ref["u_fit"]),
                                                                                                  dtype=torch.bool)
    s_keep = ~torch.tensor(ref["s_fit"]) if behaviour else torch.ones(len(ref["s_fit"]), dtype=torch.bool)
    safe = [a["s_fit"][s_keep]] + ([a["la_fit"]] if lookalike else [])
    mu_plus, mu_minus = R.mean_activation(a["u_fit"][u_keep]), R.mean_activation(torch.cat(safe))
    r, _ = R.refusal_direction(mu_plus, mu_minus)
    s = {k: scores(a[k], mu_minus, r, band) for k in ("u_held", "s_held", "la_held", "jb")}
    negatives = torch.cat([s["s_held"]] + ([s["la_held"]] if lookalike else []))
    tau, _ = S.balanced_accuracy_threshold(s["u_held"], negatives)  # [L]
    per_layer = {
        "auroc_harmful_vs_harmless": S.auroc(s["u_held"], s["s_held"]),
        "auroc_harmful_vs_lookalike": S.auroc(s["u_held"], s["la_held"]),
        "fpr_harmless": (s["s_held"] > tau).double().mean(0),
        "fpr_lookalike": (s["la_held"] > tau).double().mean(0),
        "fnr_harmful": (s["u_held"] <= tau).double().mean(0),
        "tpr_jailbreak": (s["jb"] > tau).double().mean(0),
    }
    best = int(per_layer["auroc_harmful_vs_harmless"].argmax())
    return {"best_layer": best, **{k: round(float(v[best]), 3) for k, v in per_layer.items()},
            "per_layer": {k: [round(float(x), 3) for x in v] for k, v in per_layer.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cache", default="/tmp/mars-explore")
    ap.add_argument("--out")
    ap.add_argument("--tokens", type=int, default=12)
    args = ap.parse_args()
    cfg = MarsConfig()
    data = collect(args.model, Path(args.cache), cfg, args.tokens)
    out = {"model": args.model, "counts": {k: len(v) for k, v in data["prompts"].items()},
           "refused": {k: sum(v) for k, v in data["refused"].items()}, "detectors": {}}
    for name, band, la in (("single", 0, False), ("band1", 1, False), ("band2", 2, False), ("lookalike", 0, True),
                           ("band1+lookalike", 1, True), ("band2+lookalike", 2, True)):
        out["detectors"][name] = evaluate(data, band, la)
    out["detectors"]["single_no_filter"] = evaluate(data, 0, False, behaviour=False)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
