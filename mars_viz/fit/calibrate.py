"""Calibration: text prompt sets + neutral media -> activations -> a fitted `MarsState`.

Steps (our formulation of MARS; README, "The formulation"):
  1. seeded fit / held-out split of the harmful (U), harmless (S) and look-alike text sets (look-alikes are harmless
     requests with alarming words; their fit half joins the safe side); residuals of every layer;
  2. behaviour filter: the unsafe centroid uses the harmful fit prompts the model refuses, the safe one the harmless
     prompts it answers (falls back to all harmful prompts when fewer than `min_refused` are refused);
  3. centroids and refusal directions; thresholds tau by balanced accuracy on held-out text;
  4. modality offsets from K neutral solid-colour images (and videos) paired with safe fit prompts;
  5. layer scores (separability, consistency, steerability, misalignment) and the two layers: the detection layer
     (best held-out separability: where the gate reads) and the push layer (best consistency x steerability among
     layers whose separability reaches 90% of the best);
  6. the target level t* from the refusal rate of held-out harmless prompts pushed to each level;
  7. for the "Where in the input" maps: per-position offsets of the neutral inputs at the detection layer
     (`maps.neutral_position_offsets`, `MarsConfig.map_neutral` inputs per modality; only plotted);
  8. where the gate reads: the same centroids, thresholds and offsets at t_inst (the last token of the user's text;
     fitted by intent: every harmful fit prompt against the harmless and look-alike ones), and the (position, layer)
     with the best held-out detection rate minus false-positive rate on harmless and look-alike prompts
     (`geometry.gate_rates`, `geometry.choose_gate_site`; the look-alikes it is measured on are a selection split
     that no centroid uses and no evaluation reuses).

Example:
    >>> state = calibrate(backbone, MarsConfig(max_prompts=64), progress=print)   # doctest: +SKIP
    >>> state.save("runs/my-model")                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..core import geometry as G
from ..core.projection import pca_basis, plane_basis, plane_coords
from ..core.state import Diagnostics, GateAxis, MarsConfig, MarsState
from ..data.datasets import SURFACE_FORMS, builtin_prompts, prompts_hash, split, surface_forms
from ..data.judge import RefusalJudge, default_judge
from ..maps.maps import neutral_position_offsets
from ..model.activations import collect_activations, collect_sites
from ..model.backbone import Backbone
from ..model.hooks import edit_position
from ..model.inputs import Query, build_batch
from ..model.media import neutral_images, neutral_video
from ..steer.generate import generate_batch, greedy_texts
from ..steer.steering import push_to_level_edit

__all__ = ["CalibrationProgress", "calibrate", "refusal_logprob_gain", "split_sets"]

CalibrationProgress = Callable[[str, int, int], None]  # (stage, done, total)
FALLBACK_OPENING = "I'm sorry, but I can't"
OPENING_TOKENS = 6
# Seed offsets from MarsConfig.seed, so that each random draw is its own stream and no two coincide:
SEED_HARMLESS = 1  # the harmless set's subsample and fit/held-out split (the harmful set uses the seed itself)
SEED_NEUTRAL_VIDEOS = 1000  # neutral video k (fit, for the video offset) uses seed + 1000 + k
SEED_HELDOUT_VIDEOS = 2000  # neutral video i for held-out misalignment uses seed + 2000 + i
HELDOUT_COLOUR_SHIFT = 7  # held-out misalignment pairs prompt i with neutral colour i + 7: unlike the fit pairs
SEED_LOOKALIKE = 3  # the look-alike set's fit/held-out split
SEED_LOOKALIKE_SELECT = 4  # the look-alike fit part's centroid / gate-selection split
LOOKALIKE_SELECT_FRAC = 1 / 3  # share of the fit look-alikes kept out of the centroids to choose the gate's site


def _subsample(prompts: list[str], limit: int | None, seed: int) -> list[str]:
    if limit is None or len(prompts) <= limit:
        return list(prompts)
    idx = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in idx]


def split_sets(cfg: MarsConfig, harmful: Sequence[str] | None = None, harmless: Sequence[str] | None = None,
               lookalike: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The exact fit / held-out prompt lists a calibration with `cfg` uses: keys u_fit, u_held, s_fit, s_held, and
    la_fit, la_sel, la_held (look-alikes: harmless requests with alarming words; la_fit joins the safe centroids,
    la_sel chooses the gate's site, la_held is for evaluations; empty when `cfg.lookalike` is off).

    Evaluations call this to measure on prompts the state was not fitted on.
    """
    harmful = _subsample(list(harmful or builtin_prompts("harmful")), cfg.max_prompts, cfg.seed)
    harmless = _subsample(list(harmless or builtin_prompts("harmless")), cfg.max_prompts, cfg.seed + SEED_HARMLESS)
    if len(harmful) < 4 or len(harmless) < 4:
        raise ValueError(f"need at least 4 harmful and 4 harmless prompts, got {len(harmful)} and {len(harmless)}")
    u_fit, u_held = split(harmful, cfg.heldout_frac, cfg.seed)
    s_fit, s_held = split(harmless, cfg.heldout_frac, cfg.seed + SEED_HARMLESS)
    la_fit: list[str] = []
    la_sel: list[str] = []
    la_held: list[str] = []
    if cfg.lookalike:
        looks = [p for p in (lookalike or builtin_prompts("lookalike")) if p not in set(harmless)]
        if len(looks) >= 2:
            la_fit, la_held = split(looks, cfg.lookalike_frac, cfg.seed + SEED_LOOKALIKE)
        if len(la_fit) >= 2:
            la_fit, la_sel = split(la_fit, LOOKALIKE_SELECT_FRAC, cfg.seed + SEED_LOOKALIKE_SELECT)
    return {"u_fit": u_fit, "u_held": u_held, "s_fit": s_fit, "s_held": s_held, "la_fit": la_fit,
            "la_sel": la_sel, "la_held": la_held, "harmful": harmful, "harmless": harmless}


def _stage(progress: CalibrationProgress | None, name: str):
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


def _refusal_opening(texts_ids: Sequence[tuple[list[int], str]], refused: Sequence[bool], tokenizer) -> str:
    """The model's own most frequent refusal opening (first few tokens of its refusals)."""
    openings = [tokenizer.decode(ids[:OPENING_TOKENS], skip_special_tokens=True).strip()
                for (ids, _), r in zip(texts_ids, refused, strict=True) if r and ids]
    openings = [o for o in openings if o]
    if not openings:
        return FALLBACK_OPENING
    return Counter(openings).most_common(1)[0][0]


def _extend(batch, extra_ids: torch.Tensor):
    """Append the same token ids to every row of a left-padded text batch (all [B, P] keys extended)."""
    b, _ = batch["input_ids"].shape
    ext = extra_ids.to(batch["input_ids"].device).unsqueeze(0).expand(b, -1)
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == b and v.shape[1] == batch["input_ids"].shape[1]:
            fill = ext if k == "input_ids" else torch.ones_like(ext) if k == "attention_mask" else torch.zeros_like(ext)
            out[k] = torch.cat([v, fill.to(v.dtype)], dim=1)
        else:
            out[k] = v
    return out


def _opening_logprob(backbone: Backbone, batch: dict, open_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log P(opening | prompt) per row `[B]`; the opening fills the last k positions of `batch`."""
    k = open_ids.numel()
    logits = backbone.model(**batch, use_cache=False, logits_to_keep=k + 1).logits[:, :k].float()  # [B, k, V]
    lp = torch.log_softmax(logits, dim=-1)
    target = open_ids.to(lp.device).view(1, k, 1).expand(lp.shape[0], k, 1)
    return lp.gather(-1, target).squeeze(-1).sum(-1).double().cpu()


@torch.inference_mode()
def refusal_logprob_gain(backbone: Backbone, prompts: Sequence[str], opening: str, mu_minus: torch.Tensor,
                         r: torch.Tensor, level: float = 1.0, batch_size: int = 8,
                         progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Per layer: mean gain in teacher-forced log P(opening | prompt) when each prompt's last position is pushed to
    `level` along r_l at layer l. One forward per layer per batch, no generation. Returns float64 `[L]`."""
    tok = backbone.tokenizer
    open_ids = torch.tensor(tok(opening, add_special_tokens=False)["input_ids"])
    if open_ids.numel() == 0:
        raise ValueError("the refusal opening is empty")
    num_layers = backbone.num_layers
    total = torch.zeros(num_layers, dtype=torch.float64)
    n_done = 0
    steps = num_layers * ((len(prompts) + batch_size - 1) // batch_size)
    step = 0
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        prompt_batch = build_batch(backbone, [Query(p) for p in chunk])
        p_len = prompt_batch["input_ids"].shape[1]
        batch = _extend(prompt_batch, open_ids)
        base = _opening_logprob(backbone, batch, open_ids)  # [B]
        levels = torch.full((len(chunk),), float(level), dtype=torch.float64)
        for layer in range(num_layers):
            edit = push_to_level_edit(mu_minus[layer], r[layer], levels)
            with edit_position(backbone.layers[layer], edit, position=p_len - 1):
                total[layer] += (_opening_logprob(backbone, batch, open_ids) - base).sum()
            step += 1
            if progress:
                progress(step, steps)
        n_done += len(chunk)
    return total / max(n_done, 1)


@torch.inference_mode()
def _target_curve(backbone: Backbone, prompts: Sequence[str], layer: int, mu_minus: torch.Tensor, r: torch.Tensor,
                  levels: Sequence[float], judge: RefusalJudge, max_new_tokens: int, batch_size: int,
                  progress: Callable[[int, int], None] | None) -> dict[float, float]:
    cases = [(p, t) for t in levels for p in prompts]
    refused: dict[float, list[bool]] = {float(t): [] for t in levels}
    for i in range(0, len(cases), batch_size):
        chunk = cases[i:i + batch_size]
        batch = build_batch(backbone, [Query(p) for p, _ in chunk])
        edit = push_to_level_edit(mu_minus, r, torch.tensor([t for _, t in chunk], dtype=torch.float64))
        with edit_position(backbone.layers[layer], edit, position=-1):
            gen = generate_batch(backbone, batch, max_new_tokens)
        for (_, t), v in zip(chunk, judge([txt for _, txt in gen]), strict=True):
            refused[float(t)].append(v)
        if progress:
            progress(min(i + batch_size, len(cases)), len(cases))
    return {t: sum(v) / len(v) for t, v in refused.items()}


def calibrate(backbone: Backbone, config: MarsConfig | None = None, harmful: Sequence[str] | None = None,
              harmless: Sequence[str] | None = None, judge: RefusalJudge | None = None,
              progress: CalibrationProgress | None = None) -> MarsState:
    """Fit MARS on `backbone` from text prompt sets (default: our built-in sets) and neutral media."""
    cfg = config or MarsConfig()
    judge = judge or default_judge()
    sets = split_sets(cfg, harmful, harmless)
    harmful, harmless = sets["harmful"], sets["harmless"]
    u_fit, u_held, s_fit, s_held = sets["u_fit"], sets["u_held"], sets["s_fit"], sets["s_held"]
    la_fit, la_sel = sets["la_fit"], sets["la_sel"]
    jailbreak = [p for p in builtin_prompts("jailbreak") if p not in set(harmful)]  # only plotted (the plane)
    bs = cfg.batch_size

    # 1. text activations at both gate positions (t_post: the last prompt position; t_inst: the user's last token) --
    texts = u_fit + u_held + s_fit + s_held + la_fit
    extra = la_sel + jailbreak
    sites = collect_sites(backbone, [Query(p) for p in texts + extra], bs, _stage(progress, "text activations"))
    acts, acts_i = sites["post"][: len(texts)], sites["inst"][: len(texts)]  # [n, L, d]
    a, b, c, e = (len(u_fit), len(u_fit) + len(u_held), len(u_fit) + len(u_held) + len(s_fit),
                  len(texts) - len(la_fit))
    acts_u_fit, acts_u_held, acts_s_fit, acts_s_held = acts[:a], acts[a:b], acts[b:c], acts[c:e]  # [n, L, d]
    acts_la_fit = acts[e:]
    n_sel = len(la_sel)
    extra_sites = {k: v[len(texts):] for k, v in sites.items()}  # la_sel then jailbreak

    # 2. behaviour filter ---------------------------------------------------------------------------------------------
    behaviour: dict = {"enabled": cfg.behaviour_filter}
    gen_prompts = u_fit + (s_fit if cfg.behaviour_filter else [])
    gens = greedy_texts(backbone, [Query(p) for p in gen_prompts], cfg.filter_tokens, bs,
                        _stage(progress, "behaviour filter"))
    verdicts = judge([t for _, t in gens])
    u_refused = torch.tensor(verdicts[:a], dtype=torch.bool)
    opening = _refusal_opening(gens[:a], verdicts[:a], backbone.tokenizer)
    behaviour.update(harmful_total=a, harmful_refused=int(u_refused.sum()), refusal_opening=opening)
    u_keep = torch.ones(a, dtype=torch.bool)
    s_keep = torch.ones(len(s_fit), dtype=torch.bool)
    notes: list[str] = []
    if cfg.behaviour_filter:
        s_answered = ~torch.tensor(verdicts[a:], dtype=torch.bool)
        behaviour.update(harmless_total=len(s_fit), harmless_answered=int(s_answered.sum()))
        if int(u_refused.sum()) >= cfg.min_refused:
            u_keep = u_refused
        else:
            notes.append(f"behaviour filter: only {int(u_refused.sum())} of {a} harmful fit prompts were refused "
                         f"(< {cfg.min_refused}); the unsafe centroid uses all of them")
        if int(s_answered.sum()) >= 2:
            s_keep = s_answered
        else:
            notes.append("behaviour filter: fewer than 2 harmless prompts were answered; the safe centroid uses all")
    behaviour.update(fallback=bool(notes), notes=notes, unsafe_used=int(u_keep.sum()), safe_used=int(s_keep.sum()),
                     lookalike_used=len(la_fit))

    # 3. centroids, directions, thresholds ----------------------------------------------------------------------------
    # Look-alikes (harmless requests with alarming words) join the safe side by intent, whatever the model does with
    # them: on the real 0.5B backbone this raised held-out separability at the best layer from 0.972 to 0.987 and
    # cut the gate's false positives on plain harmless text from 0.105 to 0.026 (bench/detectors.py).
    mu_plus = G.mean_activation(acts_u_fit[u_keep])  # [L, d] float64
    mu_minus = G.mean_activation(torch.cat([acts_s_fit[s_keep], acts_la_fit]))
    r, _ = G.refusal_direction(mu_plus, mu_minus)
    s_u_held, s_s_held = G.unsafety_score(acts_u_held, mu_minus, r), G.unsafety_score(acts_s_held, mu_minus, r)
    taus, bacc = G.balanced_accuracy_threshold(s_u_held, s_s_held)  # [L], [L]
    fpr = (s_s_held > taus).double().mean(0)  # [L] gate opens on held-out harmless text
    fnr = (s_u_held <= taus).double().mean(0)  # [L] gate stays closed on held-out harmful text
    s_u_fit = G.unsafety_score(acts_u_fit[u_keep], mu_minus, r)
    s_s_fit = G.unsafety_score(acts_s_fit[s_keep], mu_minus, r)

    # 4. modality offsets from neutral media ---------------------------------------------------------------------------
    n_prompts = s_fit[: cfg.neutral_prompts]
    idx_text = [s_fit.index(p) for p in n_prompts]
    images = neutral_images(cfg.k_neutral, seed=cfg.seed, size=cfg.neutral_size)
    img_sites = collect_sites(backbone, [Query(p, images=(images[i % len(images)],)) for i, p in enumerate(n_prompts)],
                              bs, _stage(progress, "neutral images"))
    acts_img = img_sites["post"]
    text_idx = [b + i for i in idx_text]  # the same prompts as text, in `acts` / `acts_i`
    offsets = {"image": G.modality_offset(acts_img, acts_s_fit[idx_text])}
    offsets_i = {"image": G.modality_offset(img_sites["inst"], acts_i[text_idx])}
    acts_vid = None
    if "video" in backbone.modalities:
        videos = [neutral_video(cfg.neutral_video_frames, seed=cfg.seed + SEED_NEUTRAL_VIDEOS + k,
                                size=cfg.neutral_size) for k in range(cfg.k_neutral)]
        vid_sites = collect_sites(backbone, [Query(p, video=tuple(videos[i % len(videos)]))
                                             for i, p in enumerate(n_prompts)], bs, _stage(progress, "neutral videos"))
        acts_vid = vid_sites["post"]
        offsets["video"] = G.modality_offset(acts_vid, acts_s_fit[idx_text])
        offsets_i["video"] = G.modality_offset(vid_sites["inst"], acts_i[text_idx])

    # misalignment on *held-out* safe prompts with neutral images (not the prompts the offset was fitted on)
    held_n = s_held[: cfg.neutral_prompts]
    acts_img_held = collect_activations(backbone, [Query(p, images=(images[(i + HELDOUT_COLOUR_SHIFT) % len(images)],))
                                                   for i, p in enumerate(held_n)], bs,
                                        _stage(progress, "misalignment"))
    mis_before = G.misalignment(G.unsafety_score(acts_img_held, mu_minus, r))
    mis_after = G.misalignment(G.unsafety_score(G.recentre(acts_img_held, offsets["image"]), mu_minus, r))
    mis_video: dict[str, list[float]] = {}
    if acts_vid is not None:
        acts_vid_held = collect_activations(backbone, [Query(p, video=tuple(neutral_video(
            cfg.neutral_video_frames, seed=cfg.seed + SEED_HELDOUT_VIDEOS + i, size=cfg.neutral_size)))
            for i, p in enumerate(held_n)], bs, _stage(progress, "misalignment (video)"))
        mis_video["misalignment_video_before"] = [float(x) for x in G.misalignment(
            G.unsafety_score(acts_vid_held, mu_minus, r))]
        mis_video["misalignment_video_after"] = [float(x) for x in G.misalignment(
            G.unsafety_score(G.recentre(acts_vid_held, offsets["video"]), mu_minus, r))]

    # 5. layer scores and choice ---------------------------------------------------------------------------------------
    gains = refusal_logprob_gain(backbone, s_held[: cfg.steer_prompts], opening, mu_minus, r, 1.0, bs,
                                 _stage(progress, "steerability"))
    steer = G.normalise_steerability(gains)
    sep, cons = G.auroc(s_u_held, s_s_held), G.consistency(acts_u_fit[u_keep], mu_minus, r)
    combined = G.combined_score(cons, steer)
    scores = G.LayerScores(separability=sep, fisher=G.fisher_ratio(s_u_held, s_s_held), consistency=cons,
                           split_half=G.split_half_cosine(acts_u_fit[u_keep], acts_s_fit[s_keep], seed=cfg.seed),
                           steerability=steer, misalignment_before=mis_before, misalignment_after=mis_after,
                           combined=combined)
    allowed = G.allowed_layer_range(sep, cfg.min_sep_frac)
    for name, value in (("layer", cfg.layer), ("detect_layer", cfg.detect_layer)):
        if value is not None and not 0 <= value < backbone.num_layers:
            raise ValueError(f"{name} {value} is out of range 0..{backbone.num_layers - 1}")
    layer = cfg.layer if cfg.layer is not None else G.choose_layer(combined, allowed)
    # 8. (before t*, which does not depend on it) the gate's site: both positions' axes, rated on held-out prompts
    mu_plus_i = G.mean_activation(acts_i[:a])  # by intent: every harmful fit prompt, refused or not
    mu_minus_i = G.mean_activation(torch.cat([acts_i[b:c], acts_i[e:]]))
    r_i, _ = G.refusal_direction(mu_plus_i, mu_minus_i)
    s_u_held_i, s_s_held_i = G.unsafety_score(acts_i[a:b], mu_minus_i, r_i), G.unsafety_score(acts_i[c:e], mu_minus_i,
                                                                                              r_i)
    taus_i, _ = G.balanced_accuracy_threshold(s_u_held_i, s_s_held_i)
    sel = {"post": G.unsafety_score(extra_sites["post"][:n_sel], mu_minus, r),
           "inst": G.unsafety_score(extra_sites["inst"][:n_sel], mu_minus_i, r_i)}
    rates = {"post": G.gate_rates(s_u_held, s_s_held, sel["post"], taus),
             "inst": G.gate_rates(s_u_held_i, s_s_held_i, sel["inst"], taus_i)}
    seps = {"post": sep, "inst": G.auroc(s_u_held_i, s_s_held_i)}
    # the same rated prompts with their final punctuation flipped, a trailing space and lower case: a site whose
    # decision follows the surface (t_inst is often "?" or ".") is not eligible
    surface: dict[str, torch.Tensor] = {}
    if cfg.surface_check:
        rated = u_held + s_held + la_sel
        forms = collect_sites(backbone, [Query(surface_forms(p)[f]) for f in SURFACE_FORMS for p in rated], bs,
                              _stage(progress, "surface forms"))
        held = {"post": (s_u_held, s_s_held, mu_minus, r, taus), "inst": (s_u_held_i, s_s_held_i, mu_minus_i, r_i,
                                                                           taus_i)}
        for pos, (s_u, s_s, mu_m, rr, tt) in held.items():
            s_orig = torch.cat([s_u, s_s, sel[pos]])  # [N, L]: the rated prompts' scores, computed above
            s_f = G.unsafety_score(forms[pos], mu_m, rr).view(len(SURFACE_FORMS), len(rated), -1)  # [F, N, L]
            surface[pos] = G.surface_agreement(s_orig, s_f, tt)
    eligible = {pos: v >= cfg.min_surface_agreement for pos, v in surface.items()} or None
    position, best = G.choose_gate_site({k: v["quality"] for k, v in rates.items()}, seps, eligible=eligible)
    if cfg.gate_position is not None:
        position = cfg.gate_position
        best = int(torch.argmax(torch.where(torch.isfinite(rates[position]["quality"]), rates[position]["quality"],
                                            torch.full_like(rates[position]["quality"], -math.inf))))
    if cfg.detect_layer is not None:
        best = cfg.detect_layer
    # each position's own layer: the chosen one, and the best of the other position by the same measure
    site_layers = {pos: best if pos == position else G.choose_gate_site(
        {pos: rates[pos]["quality"]}, seps, (pos,), None if eligible is None else {pos: eligible[pos]})[1]
        for pos in rates}
    detect = site_layers["post"]
    inst_axis = GateAxis("inst", mu_plus_i, mu_minus_i, taus_i, offsets_i, site_layers["inst"])
    gate_choice = {"position": position, "chosen_by": "override" if cfg.gate_position or cfg.detect_layer is not None
                   else "held-out tpr - fpr harmless - fpr look-alike", "n_lookalike_select": n_sel,
                   "min_surface_agreement": cfg.min_surface_agreement if surface else None,
                   "surface_fallback": bool(eligible) and not any(bool(v.any()) for v in eligible.values()),
                   **{pos: {"layer": site_layers[pos], "separability": [float(x) for x in seps[pos]],
                            **({"surface_agreement": [float(x) for x in surface[pos]]} if surface else {}),
                            **{k: [float(x) for x in v] for k, v in rates[pos].items()}} for pos in rates}}

    # 6. target level t* ---------------------------------------------------------------------------------------------
    curve = _target_curve(backbone, s_held[: cfg.curve_prompts], layer, mu_minus[layer], r[layer], cfg.levels, judge,
                          cfg.filter_tokens, bs, _stage(progress, "target level"))
    t_star = G.choose_target_level(list(curve), list(curve.values()), tol=cfg.level_tol)

    # 7. per-position offsets for the "Where in the input" maps, at the gate's layer (neutral media, fit prompts)
    map_stats: dict = {}
    if cfg.map_neutral > 0:
        k = cfg.map_neutral
        map_queries = {"image": [Query(p, images=(images[i % len(images)],)) for i, p in enumerate(n_prompts[:k])]}
        if acts_vid is not None:
            map_queries["video"] = [Query(p, video=tuple(videos[i % len(videos)])) for i, p in enumerate(n_prompts[:k])]
        gate_layer, gate_mu_minus = site_layers[position], (mu_minus if position == "post" else mu_minus_i)
        cells, tokens = neutral_position_offsets(backbone, map_queries, gate_layer, gate_mu_minus[gate_layer],
                                                 _stage(progress, "map offsets"))
        map_stats = dict(map_layer=gate_layer, map_position=position, map_cells=cells, map_tokens=tokens)

    # points for the centroid and plane plots: raw at the chosen layer (for UMAP), 2-D PCA at every layer
    every = [acts, acts_img] + ([acts_vid] if acts_vid is not None else [])
    all_acts = torch.cat(every)  # [N, L, d]
    labels = ["unsafe"] * b + ["safe"] * (len(texts) - b) + ["image"] * len(acts_img)
    if acts_vid is not None:
        labels += ["video"] * len(acts_vid)
    proj_mean, proj_basis = pca_basis(all_acts)
    proj_points = torch.einsum("nld,lkd->nlk", all_acts - proj_mean, proj_basis)  # [N, L, 2]
    plane_pc = plane_basis(all_acts, mu_minus, r)  # [L, d]
    plane_points = torch.stack([plane_coords(all_acts[:, i], mu_minus[i], r[i], plane_pc[i])
                                for i in range(backbone.num_layers)], 1)  # [N, L, 2]
    # the harmfulness x refusal plane: x at t_inst (the inst axis at its layer), y at t_post (the push layer)
    li = site_layers["inst"]
    hr_post = torch.cat([acts, extra_sites["post"]])[:, layer]  # [N, d]: texts, then la_sel, then jailbreak
    hr_inst = torch.cat([acts_i, extra_sites["inst"]])[:, li]
    hr_points = torch.stack([G.unsafety_score(hr_inst, mu_minus_i[li], r_i[li]),
                             G.unsafety_score(hr_post, mu_minus[layer], r[layer])], dim=1).float()  # [N, 2]
    hr_labels = (["harmful"] * b + ["harmless"] * (e - b) + ["look-alike"] * (len(la_fit) + n_sel)
                 + ["jailbreak"] * len(jailbreak))
    diagnostics = Diagnostics(
        layer_scores=scores, target_curve=curve, spread_unsafe=s_u_fit.std(dim=0, unbiased=False),
        spread_safe=s_s_fit.std(dim=0, unbiased=False), balanced_accuracy=[float(x) for x in bacc],
        gate_fpr=[float(x) for x in fpr], gate_fnr=[float(x) for x in fnr],
        steerability_gain_nats=[float(x) for x in gains], allowed_layers=(allowed.start, allowed.stop),
        refusal_opening=opening, behaviour=behaviour,
        prompt_hashes={"harmful": prompts_hash(harmful), "harmless": prompts_hash(harmless)},
        calib_points=all_acts[:, layer].float().clone(), calib_labels=labels, proj_mean=proj_mean,
        proj_basis=proj_basis, proj_points=proj_points, plane_pc=plane_pc, plane_points=plane_points, **mis_video,
        **map_stats, gate_choice=gate_choice, hr_points=hr_points, hr_labels=hr_labels)
    return MarsState(model_id=backbone.model_id, model_type=backbone.model_type, num_layers=backbone.num_layers,
                     hidden_size=backbone.hidden_size, mu_plus=mu_plus, mu_minus=mu_minus, offsets=offsets, taus=taus,
                     layer=layer, target_level=float(t_star), config=cfg, diagnostics=diagnostics,
                     detect_layer=detect, inst=inst_axis, gate_position=position)
