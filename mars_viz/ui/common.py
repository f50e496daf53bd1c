"""Small wiring helpers shared by the tabs: inputs -> Query, controls -> SteerOptions, progress, exports, the
one-line handling of rejected inputs, and the banner that says the model or state changed under a page."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import zipfile
from pathlib import Path

import gradio as gr

from ..model.inputs import GATE_POSITIONS, Query, clean_prompt
from ..model.media import load_image, read_video
from ..model.memory import as_out_of_memory, is_out_of_memory, release_memory
from ..steer.cancel import Cancelled, raise_if_cancelled
from ..steer.steering import SteerOptions
from ..views.export import PLOTLY_JS, figure_csv, figure_html, plotly_js
from .session import Session

__all__ = ["GATE_POSITION_CHOICES", "MODEL_QUEUE", "build_query", "busy_banner", "credibility_banner", "export_zip",
           "gr_progress", "out_of_memory", "parse_gate_position", "parse_layer", "parse_tau", "rejected", "session_key",
           "showcase_to_explore", "stale_banner", "steer_options", "user_errors"]

log = logging.getLogger("mars_viz")

# Every event that runs the model is in one queue of one: a waiting page sees its place and an estimate on the
# panels, instead of a spinner behind a lock. The session's lock stays, for scripts that share the model.
MODEL_QUEUE = {"concurrency_id": "model", "concurrency_limit": 1}


def rejected(endpoint: str, e: ValueError) -> gr.Error:
    message = " ".join(str(e).split())
    log.warning("input rejected on /%s: %s", endpoint, message)
    return gr.Error(str(e), print_exception=False)


def out_of_memory(endpoint: str, e: BaseException) -> gr.Error:
    """The page's error for a request that ran out of memory: what did not fit, the free memory, what to change.
    Logged as one ERROR line (not a bug: no traceback), after releasing what the failed request still held, so the
    server keeps serving."""
    oom = as_out_of_memory(e)
    release_memory(e)
    log.error("out of memory on /%s: %s", endpoint, " ".join(str(oom).split()))
    return gr.Error(str(oom), print_exception=False)


def session_key(request: gr.Request | None) -> str | None:
    """The browser session a request comes from (one per open page or `gradio_client.Client`): what its runs, files
    and results are kept under, and what a Stop button or a closed tab ends."""
    return getattr(request, "session_hash", None) if request is not None else None


def _shown(endpoint: str, e: Exception) -> gr.Error | None:
    """The `gr.Error` that shows `e` on the page, or None for a bug (re-raised with its traceback)."""
    if isinstance(e, Cancelled):  # a Stop button, a closed tab or a gone client: not an error of the server's
        log.info("run stopped on /%s", endpoint)
        return gr.Error(f"Stopped: {e}", print_exception=False)
    if is_out_of_memory(e):
        return out_of_memory(endpoint, e)
    if isinstance(e, ValueError):
        return rejected(endpoint, e)
    return None


def user_errors(endpoint: str):
    """Decorate a handler: a ValueError (the library's "what to do next" message for a bad input) is shown on the
    page as a `gr.Error` and logged as one WARNING line on logger "mars_viz", without a traceback. Running out of
    memory (`OutOfMemory`, or torch's own errors) is shown as out of memory, with the free memory and what to change,
    and logged as one ERROR line. Work stopped by its user (`Cancelled`) is logged as one INFO line. Anything else
    is a bug and keeps Gradio's traceback. The signature is kept, so the endpoint's API parameters keep their names.

        @user_errors("explore")
        def run(prompt, image): ...
    """

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):  # streaming handlers must stay generator functions for Gradio
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    if (shown := _shown(endpoint, e)) is None:
                        raise
                    raise shown from None

            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if (shown := _shown(endpoint, e)) is None:
                    raise
                raise shown from None

        return call

    return wrap


def credibility_banner(session: Session):
    """Update for the page's persistent warning: shown while the loaded model is a random demo model or the fitted
    state is degenerate, so nobody reads a random model's verdicts as meaningful."""
    reasons = []
    backbone = session.backbone  # None for the moment another model loads (`Session.switch_model`)
    if backbone is not None and backbone.is_demo:
        reasons.append("this is a built-in tiny model with random weights (no real model could be loaded)")
    if session.state is not None:
        reasons += session.state.credibility_warnings()
    if not reasons:
        return gr.update(visible=False, value="")
    return gr.update(visible=True, value=(
        "⚠️ **Scores, gates and answers on this page are not meaningful**: " + "; ".join(reasons) + ". The mechanics "
        "(hooks, re-centring, the gate) still run, but read nothing into the verdicts. Load a real safety-tuned MLLM "
        "in the Calibrate tab, or start with `./run.sh app --model Qwen/Qwen2-VL-2B-Instruct` (or a local folder)."))


def stale_banner(session: Session, seen: int | None, seen_evaluate: int | None = None):
    """Update for the page's banner: visible when the model or state changed since the page's results were made.

    `seen` is the `Session.generation` of Explore's last run (or of the page's first load), `seen_evaluate` that of
    Evaluate's (None: no results there, or not asked); None hides the banner for that tab."""
    stale = [tab for tab, g in (("Explore", seen), ("Evaluate", seen_evaluate))
             if g is not None and g != session.generation]
    if not stale:
        return gr.update(visible=False)
    return gr.update(visible=True, value=f"⚠️ The model/state was changed in the Calibrate tab ({session.change}): "
                                         f"results in {' and '.join(stale)} came from the previous one; run again.")


def busy_banner(session: Session, request: gr.Request | None = None):
    """Update for the page's line on the shared model while another page holds it ("The shared model is being
    calibrated in the Calibrate tab (step 3/9: …)"), so a waiting page says why; its queued runs show their place in
    the queue on their panels."""
    activity, holder = session.runs.activity, session.runs.holder
    if not activity or (holder is not None and holder == session_key(request)):
        return gr.update(visible=False, value="")
    return gr.update(visible=True, value=f"⏳ The shared model is {activity}. Runs from this page wait their turn in "
                                         "the queue (their place is shown on the panels).")


def _path(f) -> str | None:
    if f is None or f == "":
        return None
    if isinstance(f, dict):
        return f.get("path")
    return getattr(f, "name", f)


def build_query(prompt: str, image_file, video_file, frames: int) -> tuple[Query, list[str], list[int] | None]:
    """Validated Query + notes (caps applied) + sampled frame indices. Raises ValueError with a clear message."""
    text = clean_prompt(prompt or "")
    image_path, video_path = _path(image_file), _path(video_file)
    if image_path and video_path:
        raise ValueError("upload an image or a video, not both")
    if image_path:
        return Query(text, images=(load_image(image_path),)), [], None
    if video_path:
        video = read_video(video_path, num_frames=int(frames))
        return Query(text, video=tuple(video.frames)), video.notes, video.indices
    return Query(text), [], None


def parse_layer(choice) -> int | None:
    if choice in (None, "", "auto") or str(choice).startswith("auto"):
        return None
    try:
        return int(choice)
    except (TypeError, ValueError):
        raise ValueError(f"layer must be 'auto' or a number, got {choice!r}") from None


def parse_tau(text) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"tau must be a number (or empty for the fitted value), got {text!r}") from None


# the "Gate reads at" dropdown: (shown, value); the value is what `/explore` takes
GATE_POSITION_CHOICES = [("auto (the fitted position)", "auto"), ("post: t_post, the prompt's last position", "post"),
                         ("inst: t_inst, the instruction's last token", "inst")]


def parse_gate_position(choice) -> str | None:
    """"auto" (or empty) -> None (the state's fitted position); "post" / "inst" (also "t_post", "t_inst")."""
    text = "" if choice is None else str(choice).strip().lower()
    if text in ("", "auto") or text.startswith("auto"):
        return None
    text = text.removeprefix("t_")
    if text in GATE_POSITIONS:
        return text
    raise ValueError(f"gate position must be auto, post (t_post, the prompt's last position) or inst (t_inst, the "
                     f"instruction's last token), got {choice!r}")


def steer_options(steer: bool, strength: float, layer, tau, recenter: bool, detect_layer="auto",
                  gate_position="auto") -> SteerOptions:
    return SteerOptions(steer=bool(steer), strength=float(strength), layer=parse_layer(layer), tau=parse_tau(tau),
                        detect_layer=parse_layer(detect_layer), recenter=bool(recenter),
                        gate_position=parse_gate_position(gate_position))


def gr_progress(progress: gr.Progress, session: Session | None = None, what: str = "calibrating MARS"):
    """Adapt a gr.Progress to the library's (stage, done, total) callback. With `session`, each step is also the
    server's activity ("calibrating MARS (step k/n: stage)"), shown to the other pages that wait for the model."""

    def cb(stage: str, done: int, total: int) -> None:
        progress((done, max(total, 1)), desc=f"Calibrating: {stage}")
        if session is not None:
            session.runs.say(f"{what} (step {done}/{max(total, 1)}: {stage})")
        raise_if_cancelled()  # a Stop between the fit's forwards

    return cb


def export_zip(figures: dict, result: dict | None, session: Session, files: dict[str, bytes] | None = None,
               folder: Path | None = None) -> str:
    """A zip of every figure (interactive HTML + CSV data) and the result JSON, written in `folder` (a page's
    `SessionFiles.folder`; default one of an anonymous session); returns its path. `files` (name -> bytes) go in as
    they are (the maps' PNGs and per-position CSV: `views.map_files`).

    plotly.js is written once (`plotly.min.js`) and every page loads it from beside itself, so the zip stays ~1 MB
    instead of embedding 4.6 MB per figure, and the pages still open offline once unpacked."""
    path = (folder or session.files.folder(None)) / "mars_viz_export.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr(PLOTLY_JS, plotly_js())
        for name, fig in figures.items():
            z.writestr(f"{name}.html", figure_html(fig, shared_js=True))
            z.writestr(f"{name}.csv", figure_csv(fig))
        for name, data in (files or {}).items():
            z.writestr(name, data)
        backbone = session.backbone
        meta = {"model": backbone.describe() if backbone is not None else None, "state": session.state_source}
        if result is not None:
            meta["result"] = result
        z.writestr("result.json", json.dumps(meta, indent=2, ensure_ascii=False))
    return str(path)


def showcase_to_explore(label: str | None, entries: list, folder: Path) -> tuple:
    """Explore's (prompt, image, video) for the showcase entry labelled `label`, its media written to files in
    `folder` (the page's `SessionFiles.folder`), and the update that switches the page to Explore. Evaluate and Learn
    both load items through this."""
    from ..analysis.showcase import save_media

    chosen = [e for e in entries if e.label() == label]
    if not chosen:
        raise ValueError("run an evaluation first (Evaluate tab), then pick a showcase item")
    image, video = save_media(chosen[0], folder)
    gr.Info(f"Loaded into Explore: {chosen[0].label()}")
    return chosen[0].prompt, image, video, gr.Tabs(selected="explore")
