"""Calibration: text prompt sets + neutral media -> activations -> a fitted `MarsState`.

`calibrate` runs these steps in order (our formulation of MARS; README, "The formulation"); each is one function:
  1. `PromptSets.of`: seeded fit / held-out split of the harmful (U), harmless (S) and look-alike text sets
     (look-alikes are harmless requests with alarming words; their fit part joins the safe side), plus jailbreak
     prompts that are only plotted; `_text_activations`: residuals of every layer at both gate positions;
  2. `_behaviour_filter`: the unsafe centroid uses the harmful fit prompts the model refuses, the safe one the
     harmless prompts it answers (falls back to all harmful prompts when fewer than `min_refused` are refused);
  3. `_fit_axis` at t_post: centroids, refusal directions, thresholds tau by balanced accuracy on held-out text;
  4. `_neutral_media`: modality offsets from K neutral solid-colour images (and videos) paired with safe fit
     prompts; `_misalignment` of held-out safe prompts with other neutral inputs, before and after re-centring;
  5. `_layer_scores` (separability, consistency, steerability, misalignment) and `_push_layer`: the best
     consistency x steerability among layers whose separability reaches `min_sep_frac` of the best;
  6. `_gate_site`: the same axis at t_inst (`_fit_axis` again, by intent: every harmful fit prompt against the
     harmless and look-alike ones), and the (position, layer) with the best held-out detection rate minus
     false-positive rate on harmless and look-alike prompts (`selection.gate_rates`, `selection.choose_gate_site`;
     the look-alikes it is measured on are a selection split that no centroid uses and no evaluation reuses),
     among the sites that pass `_surface_agreement`;
  7. `_target_level`: t* from the refusal rate of held-out harmless prompts pushed to each level at the push layer;
  8. `_map_offsets`: for the "Where in the input" maps, per-position offsets of the neutral inputs at the gate's
     layer (`maps.offsets.neutral_position_offsets`, `MarsConfig.map_neutral` inputs per modality; only plotted);
  9. `_plot_points`: the calibration points in the planes the dashboard draws (only plotted).

`FitChoices` forces what steps 5 and 6 would choose (the CLI's `fit --layer/--detect-layer/--gate-position/--tau`).

Example:
    >>> state = calibrate(backbone, MarsConfig(max_prompts=64), progress=print)   # doctest: +SKIP
    >>> state = calibrate(backbone, choices=FitChoices(layer=12))                 # doctest: +SKIP
    >>> state.save("runs/my-model")                                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core import rule as R
from ..core import selection as S
from ..core.projection import pca_basis, plane_basis, plane_coords
from ..core.state import Diagnostics, GateAxis, MarsConfig, MarsState
from ..data.datasets import SURFACE_FORMS, builtin_prompts, prompts_hash, split, surface_forms
from ..data.judge import RefusalJudge, default_judge
from ..maps.offsets import neutral_position_offsets
from ..model.activations import collect_activations, collect_sites
from ..model.backbone import Backbone
from ..model.hooks import edit_position
from ..model.inputs import GATE_POSITIONS, Query, build_batch
from ..model.media import neutral_images, neutral_video
from ..steer.generate import (
    _cache_of,
    _kept_rope_deltas,
    _no_rope_deltas,
    _prefill_all_but_last,
    _rewind,
    generate_batch,
    greedy_texts,
)
from ..steer.steering import push_to_level_edit

__all__ = ["CalibrationProgress", "FitChoices", "calibrate", "refusal_logprob_gain", "split_sets"]

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


def _opening_logprob(backbone: Backbone, batch: dict, open_ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Teacher-forced log P(opening | prompt) per row `[B]`; the opening fills the last k positions of `batch`. With
    `cache` (the prompt's prefix), `batch` holds the positions after it (its mask still covers all of them)."""
    k = open_ids.numel()
    kw = {"use_cache": False} if cache is None else {"cache": cache, "use_cache": True}
    logits = backbone.model(**batch, **kw, logits_to_keep=k + 1).logits[:, :k].float()  # [B, k, V]
    lp = torch.log_softmax(logits, dim=-1)
    target = open_ids.to(lp.device).view(1, k, 1).expand(lp.shape[0], k, 1)
    return lp.gather(-1, target).squeeze(-1).sum(-1).float().cpu().double()  # float64 on the CPU (MPS has none)


@torch.inference_mode()
def refusal_logprob_gain(backbone: Backbone, prompts: Sequence[str], opening: str, mu_minus: torch.Tensor,
                         r: torch.Tensor, level: float = 1.0, batch_size: int = 8,
                         progress: Callable[[int, int], None] | None = None,
                         share_prefix: bool = True) -> torch.Tensor:
    """Per layer: mean gain in teacher-forced log P(opening | prompt) when each prompt's last position is pushed to
    `level` along r_l at layer l. No generation. Returns float64 `[L]`.

    With `share_prefix`, each batch's prompt minus its last position is prefilled once, and each layer's forward
    runs only the last prompt position and the opening on that cache (cut back after each); without it (or where a
    cache cannot be cut), one full forward per layer per batch."""
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
        levels = torch.full((len(chunk),), float(level), dtype=torch.float64)
        with _no_rope_deltas(backbone.model):  # text only: positions follow the cache, not an earlier input's deltas
            scorer = _shared_prefix_scorer(backbone, batch, open_ids, p_len) if share_prefix else None
            score = scorer or functools.partial(_opening_logprob, backbone, batch, open_ids)
            at = 0 if scorer else p_len - 1  # the edited position: the last prompt position, in the scored call
            base = score()  # [B]
            for layer in range(num_layers):
                edit = push_to_level_edit(mu_minus[layer], r[layer], levels)
                with edit_position(backbone.layers[layer], edit, position=at):
                    total[layer] += (score() - base).sum()
                step += 1
                if progress:
                    progress(step, steps)
        n_done += len(chunk)
    return total / max(n_done, 1)


def _shared_prefix_scorer(backbone: Backbone, batch: dict, open_ids: torch.Tensor,
                          p_len: int) -> Callable[[], torch.Tensor] | None:
    """The prompt minus its last position, prefilled once; returns a scorer that runs only the last prompt position
    and the opening on that cache (then cuts it back), or None where a cache cannot be cut back (`_rewind`) or a
    prefix-LM's could not be shared."""
    if backbone.arch.prefix_lm:  # its prompt attends both ways: a prefix's cache is not the prompt's
        return None
    ids = batch["input_ids"]
    per_token = {k for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2 and v.shape == ids.shape}
    pre = {k: (v[:, :p_len - 1] if k in per_token else v) for k, v in batch.items()}
    out = backbone.model(**pre, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    if cache is None or not _rewind(backbone, cache, p_len - 1):
        return None
    # the tail's per-token entries are cut to its positions, except the mask, which covers the whole sequence
    tail = {k: (v if k == "attention_mask" else v[:, p_len - 1:]) for k, v in batch.items() if k in per_token}

    def score() -> torch.Tensor:
        lp = _opening_logprob(backbone, tail, open_ids, cache)
        _rewind(backbone, cache, p_len - 1)
        return lp

    return score


@torch.inference_mode()
def _target_curve(backbone: Backbone, prompts: Sequence[str], layer: int, mu_minus: torch.Tensor, r: torch.Tensor,
                  levels: Sequence[float], judge: RefusalJudge, max_new_tokens: int, batch_size: int,
                  progress: Callable[[int, int], None] | None, share_prefix: bool = True) -> dict[float, float]:
    """The refusal rate of `prompts` pushed to each level at `layer`'s last prompt position (greedy answers, judged).

    With `share_prefix`, each batch's prompts but their last position are prefilled once for every level, and each
    level runs the last position (where the push acts) and the decode on a copy of that cache; a prefix-LM, whose
    prompt attends both ways, runs its whole prompt at each level. Answers stop once their verdict is settled."""
    settled = getattr(judge, "settled", None)
    refused: dict[float, list[bool]] = {float(t): [] for t in levels}
    steps, step = len(levels) * math.ceil(len(prompts) / batch_size), 0
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        batch = build_batch(backbone, [Query(p) for p in chunk])
        with _no_rope_deltas(backbone.model):  # text only: positions follow this batch, not an earlier input
            prefix = None
            if share_prefix and not backbone.arch.prefix_lm:
                prefix, _ = _prefill_all_but_last(backbone, batch)
            for t in levels:
                edit = push_to_level_edit(mu_minus, r, torch.full((len(chunk),), float(t), dtype=torch.float64))
                with _kept_rope_deltas(backbone.model), edit_position(backbone.layers[layer], edit, position=-1):
                    gen = generate_batch(backbone, batch, max_new_tokens, settled=settled,
                                         prefix=None if prefix is None else copy.deepcopy(prefix))
                refused[float(t)] += judge([txt for _, txt in gen])
                step += 1
                if progress:
                    progress(step, steps)
    return {t: sum(v) / len(v) for t, v in refused.items()}


# ---- what flows between the steps -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitChoices:
    """What the fit would choose by measurement, forced instead (`fit --layer --detect-layer --gate-position --tau`).

    Inputs of one fit, not parameters of the formulation: the fitted state records the outcome (`MarsState.layer`,
    `detect_layer` or `inst.detect_layer`, `gate_position`, `tau_override`) and run-time overrides are
    `SteerOptions`, so none of them is kept in `MarsConfig`.
    """

    layer: int | None = None  # the push (steering) layer; t* is then calibrated there
    detect_layer: int | None = None  # the layer the gate reads, at the gate's position
    gate_position: str | None = None  # where the gate reads: "post" or "inst"
    tau: float | None = None  # the gate threshold (the state keeps it as `tau_override`)

    def __post_init__(self) -> None:
        if self.gate_position is not None and self.gate_position not in GATE_POSITIONS:
            raise ValueError(f"gate_position must be one of {', '.join(GATE_POSITIONS)}, got {self.gate_position!r}")
        if self.tau is not None and not math.isfinite(self.tau):
            raise ValueError(f"tau must be a finite number, got {self.tau}")

    def check(self, num_layers: int) -> None:
        """Raise ValueError for a forced layer outside the model's 0..num_layers - 1."""
        for name, value in (("layer", self.layer), ("detect_layer", self.detect_layer)):
            if value is not None and not 0 <= value < num_layers:
                raise ValueError(f"{name} {value} is out of range 0..{num_layers - 1}")


@dataclass(frozen=True)
class PromptSets:
    """The calibration text (`split_sets`) and the jailbreak prompts, in `ORDER`: the row order of its activations."""

    ORDER: ClassVar[tuple[str, ...]] = ("u_fit", "u_held", "s_fit", "s_held", "la_fit", "la_sel", "jailbreak")
    harmful: list[str]  # the (subsampled) sets the splits come from; their hashes go into the state
    harmless: list[str]
    u_fit: list[str]
    u_held: list[str]
    s_fit: list[str]
    s_held: list[str]
    la_fit: list[str]  # look-alikes on the safe side of the centroids
    la_sel: list[str]  # look-alikes that only rate the gate's sites
    jailbreak: list[str]  # only plotted (the harmfulness x refusal plane)

    @classmethod
    def of(cls, cfg: MarsConfig, harmful: Sequence[str] | None, harmless: Sequence[str] | None) -> PromptSets:
        """Split the given (or built-in) sets as `split_sets` does, and add the jailbreak prompts not in them."""
        sets = split_sets(cfg, harmful, harmless)
        jailbreak = [p for p in builtin_prompts("jailbreak") if p not in set(sets["harmful"])]
        return cls(**{k: sets[k] for k in ("harmful", "harmless", *cls.ORDER[:-1])}, jailbreak=jailbreak)

    def rows(self, first: str, last: str | None = None) -> slice:
        """The rows of the sets `first`..`last` (inclusive, in `ORDER`) in activations of all of them."""
        i, j = self.ORDER.index(first), self.ORDER.index(last or first)
        start = sum(len(getattr(self, n)) for n in self.ORDER[:i])
        return slice(start, start + sum(len(getattr(self, n)) for n in self.ORDER[i:j + 1]))

    def prompts(self) -> list[str]:
        """Every prompt, in `ORDER`."""
        return [p for name in self.ORDER for p in getattr(self, name)]


@dataclass(frozen=True)
class TextActs:
    """The calibration text's residuals at one gate position, `[N, L, d]` float32 in `PromptSets.ORDER`."""

    acts: torch.Tensor  # [N, L, d]
    sets: PromptSets

    def __getitem__(self, name: str) -> torch.Tensor:
        """The rows of one prompt set, `[n, L, d]`."""
        return self.acts[self.sets.rows(name)]


@dataclass(frozen=True)
class Behaviour:
    """Which fit prompts the t_post centroids use (the behaviour filter), and the model's own refusal opening."""

    u_keep: torch.Tensor  # [len(u_fit)] bool: harmful fit prompts in the unsafe centroid
    s_keep: torch.Tensor  # [len(s_fit)] bool: harmless fit prompts in the safe centroid
    opening: str  # the model's most frequent refusal opening (the steerability target)
    record: dict[str, Any]  # counts and notes (`Diagnostics.behaviour`)


@dataclass(frozen=True)
class AxisFit:
    """One gate position's fitted axis (float64) and the held-out text's scores along it."""

    mu_plus: torch.Tensor  # [L, d]
    mu_minus: torch.Tensor  # [L, d]
    r: torch.Tensor  # [L, d]
    taus: torch.Tensor  # [L] balanced-accuracy thresholds on held-out text
    balanced_accuracy: torch.Tensor  # [L]
    s_u_held: torch.Tensor  # [n, L] held-out harmful text
    s_s_held: torch.Tensor  # [n, L] held-out harmless text

    def score(self, acts: torch.Tensor) -> torch.Tensor:
        """Unsafety scores `[n, L]` of residuals `[n, L, d]` along this axis."""
        return R.unsafety_score(acts, self.mu_minus, self.r)


@dataclass(frozen=True)
class NeutralMedia:
    """Neutral inputs paired with safe fit prompts, their residuals, and the modality offsets they measure."""

    prompts: list[str]  # the safe fit prompts paired with neutral inputs
    images: list  # K solid-colour images (prompt i gets image i mod K)
    videos: list | None  # K solid-colour videos; None when the model takes no video
    acts: dict[str, torch.Tensor]  # modality -> [n, L, d] at t_post (plotted)
    offsets: dict[str, dict[str, torch.Tensor]]  # position -> modality -> delta [L, d]


@dataclass(frozen=True)
class GateSite:
    """Where the gate reads: its position, each position's own layer, and what the choice measured."""

    position: str
    layers: dict[str, int]  # position -> the layer the gate reads there
    record: dict[str, Any]  # `Diagnostics.gate_choice`


# ---- the steps ------------------------------------------------------------------------------------------------------
def _text_activations(backbone: Backbone, sets: PromptSets, batch_size: int,
                      progress: CalibrationProgress | None) -> dict[str, TextActs]:
    """Residuals of every calibration prompt at both gate positions (t_post: the last prompt position; t_inst: the
    user's last token), in one pass."""
    sites = collect_sites(backbone, [Query(p) for p in sets.prompts()], batch_size,
                          _stage(progress, "text activations"))
    return {pos: TextActs(acts, sets) for pos, acts in sites.items()}


def _behaviour_filter(backbone: Backbone, cfg: MarsConfig, sets: PromptSets, judge: RefusalJudge,
                      progress: CalibrationProgress | None) -> Behaviour:
    """Keep the harmful fit prompts the model refuses and the harmless ones it answers (short greedy answers)."""
    n_u = len(sets.u_fit)
    # a refusal stops once it is settled, but not before its opening (`_refusal_opening`) is written
    gens = greedy_texts(backbone, [Query(p) for p in sets.u_fit + (sets.s_fit if cfg.behaviour_filter else [])],
                        cfg.filter_tokens, cfg.generate_batch_size, _stage(progress, "behaviour filter"),
                        settled=getattr(judge, "settled", None), min_tokens=OPENING_TOKENS)
    verdicts = judge([t for _, t in gens])
    u_refused = torch.tensor(verdicts[:n_u], dtype=torch.bool)
    opening = _refusal_opening(gens[:n_u], verdicts[:n_u], backbone.tokenizer)
    record: dict[str, Any] = {"enabled": cfg.behaviour_filter, "harmful_total": n_u,
                              "harmful_refused": int(u_refused.sum()), "refusal_opening": opening}
    u_keep = torch.ones(n_u, dtype=torch.bool)
    s_keep = torch.ones(len(sets.s_fit), dtype=torch.bool)
    notes: list[str] = []
    if cfg.behaviour_filter:
        s_answered = ~torch.tensor(verdicts[n_u:], dtype=torch.bool)
        record.update(harmless_total=len(sets.s_fit), harmless_answered=int(s_answered.sum()))
        if int(u_refused.sum()) >= cfg.min_refused:
            u_keep = u_refused
        else:
            notes.append(f"behaviour filter: only {int(u_refused.sum())} of {n_u} harmful fit prompts were refused "
                         f"(< {cfg.min_refused}); the unsafe centroid uses all of them")
        if int(s_answered.sum()) >= 2:
            s_keep = s_answered
        else:
            notes.append("behaviour filter: fewer than 2 harmless prompts were answered; the safe centroid uses all")
    record.update(fallback=bool(notes), notes=notes, unsafe_used=int(u_keep.sum()), safe_used=int(s_keep.sum()),
                  lookalike_used=len(sets.la_fit))
    return Behaviour(u_keep=u_keep, s_keep=s_keep, opening=opening, record=record)


def _fit_axis(acts: TextActs, u_keep: torch.Tensor | None = None, s_keep: torch.Tensor | None = None) -> AxisFit:
    """Centroids, refusal directions and balanced-accuracy thresholds at one position (masks: the behaviour filter).

    Look-alikes (harmless requests with alarming words) join the safe side by intent, whatever the model does with
    them: on the real 0.5B backbone this raised held-out separability at the best layer from 0.972 to 0.987 and cut
    the gate's false positives on plain harmless text from 0.105 to 0.026 (bench/detectors.py).
    """
    u_fit = acts["u_fit"] if u_keep is None else acts["u_fit"][u_keep]
    s_fit = acts["s_fit"] if s_keep is None else acts["s_fit"][s_keep]
    mu_plus = R.mean_activation(u_fit)  # [L, d] float64
    mu_minus = R.mean_activation(torch.cat([s_fit, acts["la_fit"]]))
    r, _ = R.refusal_direction(mu_plus, mu_minus)
    s_u_held, s_s_held = R.unsafety_score(acts["u_held"], mu_minus, r), R.unsafety_score(acts["s_held"], mu_minus, r)
    taus, bacc = S.balanced_accuracy_threshold(s_u_held, s_s_held)  # [L], [L]
    return AxisFit(mu_plus, mu_minus, r, taus, bacc, s_u_held, s_s_held)


def _neutral_media(backbone: Backbone, cfg: MarsConfig, sets: PromptSets, text: dict[str, TextActs],
                   progress: CalibrationProgress | None) -> NeutralMedia:
    """Modality offsets at both positions: safe fit prompts with neutral solid-colour images (and videos) minus the
    same prompts as text."""
    prompts = sets.s_fit[: cfg.neutral_prompts]
    as_text = [sets.s_fit.index(p) for p in prompts]  # the same prompts' rows among the safe fit text
    images = neutral_images(cfg.k_neutral, seed=cfg.seed, size=cfg.neutral_size)
    queries = {"image": [Query(p, images=(images[i % len(images)],)) for i, p in enumerate(prompts)]}
    videos = None
    if "video" in backbone.modalities:
        videos = [neutral_video(cfg.neutral_video_frames, seed=cfg.seed + SEED_NEUTRAL_VIDEOS + k,
                                size=cfg.neutral_size) for k in range(cfg.k_neutral)]
        queries["video"] = [Query(p, video=tuple(videos[i % len(videos)])) for i, p in enumerate(prompts)]
    acts: dict[str, torch.Tensor] = {}
    offsets: dict[str, dict[str, torch.Tensor]] = {pos: {} for pos in text}
    for modality, qs in queries.items():
        sites = collect_sites(backbone, qs, cfg.batch_size, _stage(progress, f"neutral {modality}s"))
        acts[modality] = sites["post"]
        for pos in offsets:
            offsets[pos][modality] = R.modality_offset(sites[pos], text[pos]["s_fit"][as_text])
    return NeutralMedia(prompts=prompts, images=images, videos=videos, acts=acts, offsets=offsets)


def _misalignment(backbone: Backbone, cfg: MarsConfig, sets: PromptSets, neutral: NeutralMedia, post: AxisFit,
                  progress: CalibrationProgress | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per modality: misalignment `[L]` of *held-out* safe prompts with other neutral inputs than the offsets were
    fitted on, (before, after) re-centring at t_post."""
    held = sets.s_held[: cfg.neutral_prompts]
    queries = {"image": [Query(p, images=(neutral.images[(i + HELDOUT_COLOUR_SHIFT) % len(neutral.images)],))
                         for i, p in enumerate(held)]}
    if neutral.videos is not None:
        queries["video"] = [Query(p, video=tuple(neutral_video(cfg.neutral_video_frames, size=cfg.neutral_size,
                                                               seed=cfg.seed + SEED_HELDOUT_VIDEOS + i)))
                            for i, p in enumerate(held)]
    out = {}
    for modality, qs in queries.items():
        acts = collect_activations(backbone, qs, cfg.batch_size,
                                   _stage(progress, "misalignment" + ("" if modality == "image" else f" ({modality})")))
        delta = neutral.offsets["post"][modality]
        out[modality] = (S.misalignment(post.score(acts)), S.misalignment(post.score(R.recentre(acts, delta))))
    return out


def _layer_scores(backbone: Backbone, cfg: MarsConfig, sets: PromptSets, text: TextActs, behaviour: Behaviour,
                  post: AxisFit, misalignment: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  progress: CalibrationProgress | None) -> tuple[S.LayerScores, torch.Tensor]:
    """Per-layer separability, consistency, steerability (and its raw gains `[L]`) and image misalignment."""
    gains = refusal_logprob_gain(backbone, sets.s_held[: cfg.steer_prompts], behaviour.opening, post.mu_minus, post.r,
                                 1.0, cfg.batch_size, _stage(progress, "steerability"))
    steer = S.normalise_steerability(gains)
    u_fit = text["u_fit"][behaviour.u_keep]
    cons = S.consistency(u_fit, post.mu_minus, post.r)
    before, after = misalignment["image"]
    scores = S.LayerScores(separability=S.auroc(post.s_u_held, post.s_s_held),
                           fisher=S.fisher_ratio(post.s_u_held, post.s_s_held), consistency=cons,
                           split_half=S.split_half_cosine(u_fit, text["s_fit"][behaviour.s_keep], seed=cfg.seed),
                           steerability=steer, misalignment_before=before, misalignment_after=after,
                           combined=S.combined_score(cons, steer))
    return scores, gains


def _push_layer(cfg: MarsConfig, choices: FitChoices, scores: S.LayerScores) -> tuple[int, range]:
    """The push layer (best consistency x steerability in the allowed range, unless forced) and that range."""
    allowed = S.allowed_layer_range(scores.separability, cfg.min_sep_frac)
    layer = choices.layer if choices.layer is not None else S.choose_layer(scores.combined, allowed)
    return layer, allowed


def _surface_agreement(backbone: Backbone, cfg: MarsConfig, sets: PromptSets, axes: dict[str, AxisFit],
                       s_select: dict[str, torch.Tensor], progress: CalibrationProgress | None
                       ) -> dict[str, torch.Tensor]:
    """Per position, per layer `[L]`: the share of rated prompts whose gate decision survives surface changes (final
    punctuation flipped, a trailing space, lower case); {} when `cfg.surface_check` is off. A site whose decision
    follows the surface (t_inst is often "?" or ".") is not eligible."""
    if not cfg.surface_check:
        return {}
    rated = sets.u_held + sets.s_held + sets.la_sel
    forms = collect_sites(backbone, [Query(surface_forms(p)[f]) for f in SURFACE_FORMS for p in rated],
                          cfg.batch_size, _stage(progress, "surface forms"))
    out = {}
    for pos, axis in axes.items():
        s_orig = torch.cat([axis.s_u_held, axis.s_s_held, s_select[pos]])  # [N, L]: the rated prompts' scores
        s_forms = axis.score(forms[pos]).view(len(SURFACE_FORMS), len(rated), -1)  # [F, N, L]
        out[pos] = S.surface_agreement(s_orig, s_forms, axis.taus)
    return out


def _gate_site(backbone: Backbone, cfg: MarsConfig, choices: FitChoices, sets: PromptSets, text: dict[str, TextActs],
               axes: dict[str, AxisFit], progress: CalibrationProgress | None) -> GateSite:
    """The (position, layer) with the best held-out detection rate minus false-positive rates (harmless, look-alike
    selection split) among the surface-stable sites, unless forced; and the other position's own best layer."""
    s_select = {pos: axis.score(text[pos]["la_sel"]) for pos, axis in axes.items()}
    rates = {pos: S.gate_rates(axis.s_u_held, axis.s_s_held, s_select[pos], axis.taus) for pos, axis in axes.items()}
    quality = {pos: v["quality"] for pos, v in rates.items()}
    seps = {pos: S.auroc(axis.s_u_held, axis.s_s_held) for pos, axis in axes.items()}
    surface = _surface_agreement(backbone, cfg, sets, axes, s_select, progress)
    eligible = {pos: v >= cfg.min_surface_agreement for pos, v in surface.items()} or None
    position, best = S.choose_gate_site(quality, seps, eligible=eligible)
    if choices.gate_position is not None:
        position, q = choices.gate_position, quality[choices.gate_position]
        best = int(torch.argmax(torch.where(torch.isfinite(q), q, torch.full_like(q, -math.inf))))
    if choices.detect_layer is not None:
        best = choices.detect_layer
    layers = {pos: best if pos == position else S.choose_gate_site(
        {pos: quality[pos]}, seps, (pos,), None if eligible is None else {pos: eligible[pos]})[1] for pos in axes}
    forced = choices.gate_position is not None or choices.detect_layer is not None
    record = {"position": position,
              "chosen_by": "override" if forced else "held-out tpr - fpr harmless - fpr look-alike",
              "n_lookalike_select": len(sets.la_sel),
              "min_surface_agreement": cfg.min_surface_agreement if surface else None,
              "surface_fallback": bool(eligible) and not any(bool(v.any()) for v in eligible.values()),
              **{pos: {"layer": layers[pos], "separability": [float(x) for x in seps[pos]],
                       **({"surface_agreement": [float(x) for x in surface[pos]]} if surface else {}),
                       **{k: [float(x) for x in v] for k, v in rates[pos].items()}} for pos in axes}}
    return GateSite(position=position, layers=layers, record=record)


def _target_level(backbone: Backbone, cfg: MarsConfig, sets: PromptSets, layer: int, post: AxisFit,
                  judge: RefusalJudge, progress: CalibrationProgress | None) -> tuple[dict[float, float], float]:
    """The refusal curve of held-out harmless text pushed to each level at `layer`, and t* chosen on it."""
    curve = _target_curve(backbone, sets.s_held[: cfg.curve_prompts], layer, post.mu_minus[layer], post.r[layer],
                          cfg.levels, judge, cfg.filter_tokens, cfg.generate_batch_size,
                          _stage(progress, "target level"))
    return curve, float(S.choose_target_level(list(curve), list(curve.values()), tol=cfg.level_tol))


def _map_offsets(backbone: Backbone, cfg: MarsConfig, neutral: NeutralMedia, site: GateSite, axes: dict[str, AxisFit],
                 progress: CalibrationProgress | None) -> dict[str, Any]:
    """Per-position offsets of neutral inputs at the gate's site, for the "Where in the input" maps (`Diagnostics`
    fields; {} when `cfg.map_neutral` is 0)."""
    if cfg.map_neutral <= 0:
        return {}
    prompts = neutral.prompts[: cfg.map_neutral]
    queries = {"image": [Query(p, images=(neutral.images[i % len(neutral.images)],)) for i, p in enumerate(prompts)]}
    if neutral.videos is not None:
        queries["video"] = [Query(p, video=tuple(neutral.videos[i % len(neutral.videos)]))
                            for i, p in enumerate(prompts)]
    layer = site.layers[site.position]
    cells, tokens = neutral_position_offsets(backbone, queries, layer, axes[site.position].mu_minus[layer],
                                             _stage(progress, "map offsets"))
    return dict(map_layer=layer, map_position=site.position, map_cells=cells, map_tokens=tokens)


def _plot_points(sets: PromptSets, text: dict[str, TextActs], neutral: NeutralMedia, axes: dict[str, AxisFit],
                 layer: int, inst_layer: int) -> dict[str, Any]:
    """The calibration points the dashboard draws (`Diagnostics` fields): raw at the push layer (for UMAP), 2-D PCA
    and (score, plane PC) at every layer, and the harmfulness x refusal plane (x at t_inst, y at the push layer)."""
    fitted = sets.rows("u_fit", "la_fit")  # the text the centroids and thresholds were fitted on
    all_acts = torch.cat([text["post"].acts[fitted], *neutral.acts.values()])  # [N, L, d]
    n_unsafe = len(sets.u_fit) + len(sets.u_held)
    labels = ["unsafe"] * n_unsafe + ["safe"] * (fitted.stop - n_unsafe)
    for modality, acts in neutral.acts.items():
        labels += [modality] * len(acts)
    post, inst = axes["post"], axes["inst"]
    proj_mean, proj_basis = pca_basis(all_acts)
    plane_pc = plane_basis(all_acts, post.mu_minus, post.r)  # [L, d]
    plane_points = torch.stack([plane_coords(all_acts[:, i], post.mu_minus[i], post.r[i], plane_pc[i])
                                for i in range(all_acts.shape[1])], 1)  # [N, L, 2]
    li = inst_layer  # every prompt set (the look-alike selection split and jailbreak prompts too)
    hr_points = torch.stack([R.unsafety_score(text["inst"].acts[:, li], inst.mu_minus[li], inst.r[li]),
                             R.unsafety_score(text["post"].acts[:, layer], post.mu_minus[layer], post.r[layer])],
                            dim=1).float()  # [N, 2]
    hr_labels = (["harmful"] * n_unsafe + ["harmless"] * (len(sets.s_fit) + len(sets.s_held))
                 + ["look-alike"] * (len(sets.la_fit) + len(sets.la_sel)) + ["jailbreak"] * len(sets.jailbreak))
    return dict(calib_points=all_acts[:, layer].float().clone(), calib_labels=labels, proj_mean=proj_mean,
                proj_basis=proj_basis, proj_points=torch.einsum("nld,lkd->nlk", all_acts - proj_mean, proj_basis),
                plane_pc=plane_pc, plane_points=plane_points, hr_points=hr_points, hr_labels=hr_labels)


def _gate_errors(text: TextActs, behaviour: Behaviour, post: AxisFit) -> dict[str, Any]:
    """Per-layer spreads of the fit scores and the gate's held-out balanced accuracy, FPR and FNR (`Diagnostics`)."""
    s_u_fit = post.score(text["u_fit"][behaviour.u_keep])
    s_s_fit = post.score(text["s_fit"][behaviour.s_keep])
    fpr = (post.s_s_held > post.taus).double().mean(0)  # [L] gate opens on held-out harmless text
    fnr = (post.s_u_held <= post.taus).double().mean(0)  # [L] gate stays closed on held-out harmful text
    return dict(spread_unsafe=s_u_fit.std(dim=0, unbiased=False), spread_safe=s_s_fit.std(dim=0, unbiased=False),
                balanced_accuracy=[float(x) for x in post.balanced_accuracy], gate_fpr=[float(x) for x in fpr],
                gate_fnr=[float(x) for x in fnr])


class _StepClock:
    """Wall time per named step: `with clock("name"): ...` adds to `seconds["name"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def calibrate(backbone: Backbone, config: MarsConfig | None = None, harmful: Sequence[str] | None = None,
              harmless: Sequence[str] | None = None, judge: RefusalJudge | None = None,
              progress: CalibrationProgress | None = None, *, choices: FitChoices | None = None) -> MarsState:
    """Fit MARS on `backbone` from text prompt sets (default: our built-in sets) and neutral media.

    `choices` forces the push layer, the gate's position / layer and its threshold instead of measuring them.
    """
    cfg, choices, judge = config or MarsConfig(), choices or FitChoices(), judge or default_judge()
    choices.check(backbone.num_layers)
    sets = PromptSets.of(cfg, harmful, harmless)
    clock = _StepClock()  # each step's wall time: `Diagnostics.fit_seconds`, in fit's summary and in bench
    with clock("text activations"):
        text = _text_activations(backbone, sets, cfg.batch_size, progress)
    with clock("behaviour filter"):
        behaviour = _behaviour_filter(backbone, cfg, sets, judge, progress)
    post = _fit_axis(text["post"], behaviour.u_keep, behaviour.s_keep)
    with clock("neutral media"):
        neutral = _neutral_media(backbone, cfg, sets, text, progress)
    with clock("misalignment"):
        misalignment = _misalignment(backbone, cfg, sets, neutral, post, progress)
    with clock("layer scores"):
        scores, gains = _layer_scores(backbone, cfg, sets, text["post"], behaviour, post, misalignment, progress)
    layer, allowed = _push_layer(cfg, choices, scores)
    axes = {"post": post, "inst": _fit_axis(text["inst"])}  # t_inst by intent: every harmful fit prompt
    with clock("gate site"):
        site = _gate_site(backbone, cfg, choices, sets, text, axes, progress)
    with clock("target level"):
        curve, t_star = _target_level(backbone, cfg, sets, layer, post, judge, progress)
    with clock("map offsets"):
        maps = _map_offsets(backbone, cfg, neutral, site, axes, progress)
    video = {}
    if "video" in misalignment:
        before, after = misalignment["video"]
        video = {"misalignment_video_before": [float(x) for x in before],
                 "misalignment_video_after": [float(x) for x in after]}
    diagnostics = Diagnostics(
        layer_scores=scores, target_curve=curve, steerability_gain_nats=[float(x) for x in gains],
        allowed_layers=(allowed.start, allowed.stop), refusal_opening=behaviour.opening, behaviour=behaviour.record,
        prompt_hashes={"harmful": prompts_hash(sets.harmful), "harmless": prompts_hash(sets.harmless)},
        gate_choice=site.record, fit_seconds=clock.seconds, **_gate_errors(text["post"], behaviour, post), **video,
        **maps,
        **_plot_points(sets, text, neutral, axes, layer, site.layers["inst"]))
    inst = axes["inst"]
    return MarsState(model_id=backbone.model_id, model_type=backbone.model_type, num_layers=backbone.num_layers,
                     hidden_size=backbone.hidden_size, mu_plus=post.mu_plus, mu_minus=post.mu_minus,
                     offsets=neutral.offsets["post"], taus=post.taus, layer=layer, target_level=t_star, config=cfg,
                     diagnostics=diagnostics, detect_layer=site.layers["post"], gate_position=site.position,
                     inst=GateAxis("inst", inst.mu_plus, inst.mu_minus, inst.taus, neutral.offsets["inst"],
                                   site.layers["inst"]),
                     tau_override=choices.tau)
