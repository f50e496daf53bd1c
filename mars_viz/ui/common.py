"""Small wiring helpers shared by the tabs: inputs -> Query, controls -> SteerOptions, progress, exports."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import gradio as gr

from ..inputs import Query, clean_prompt
from ..media import load_image, read_video
from ..plots import figure_csv, figure_html
from ..session import Session
from ..steering import SteerOptions

__all__ = ["build_query", "export_zip", "gr_progress", "parse_layer", "parse_tau", "steer_options"]


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


def steer_options(steer: bool, strength: float, layer, tau, recenter: bool) -> SteerOptions:
    return SteerOptions(steer=bool(steer), strength=float(strength), layer=parse_layer(layer), tau=parse_tau(tau),
                        recenter=bool(recenter))


def gr_progress(progress: gr.Progress):
    """Adapt a gr.Progress to the library's (stage, done, total) callback."""

    def cb(stage: str, done: int, total: int) -> None:
        progress((done, max(total, 1)), desc=f"Calibrating: {stage}")

    return cb


def export_zip(figures: dict, result: dict | None, session: Session) -> str:
    """A zip of every figure (interactive HTML + CSV data) and the result JSON; returns its path."""
    tmp = Path(tempfile.mkdtemp(prefix="mars_viz_export_"))
    path = tmp / "mars_viz_export.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, fig in figures.items():
            z.writestr(f"{name}.html", figure_html(fig))
            z.writestr(f"{name}.csv", figure_csv(fig))
        meta = {"model": session.backbone.describe(), "state": session.state_source}
        if result is not None:
            meta["result"] = result
        z.writestr("result.json", json.dumps(meta, indent=2, ensure_ascii=False))
    return str(path)
