"""Explore tab: an image or video + a prompt in; where the input sits in the residual stream out."""

from __future__ import annotations

import gradio as gr

from ..activations import collect_activations
from ..inputs import Query, clean_prompt
from ..media import load_image, read_video
from ..plots import residual_norm_figure
from ..session import Session

__all__ = ["build"]


def _query(prompt: str, image_path: str | None, video_path: str | None, frames: int) -> tuple[Query, list[str]]:
    notes: list[str] = []
    text = clean_prompt(prompt or "")
    if image_path and video_path:
        raise ValueError("upload an image or a video, not both")
    if image_path:
        return Query(text, images=(load_image(image_path),)), notes
    if video_path:
        video = read_video(video_path, num_frames=int(frames))
        notes += video.notes
        return Query(text, video=tuple(video.frames)), notes
    return Query(text), notes


def analyse(session: Session, prompt: str, image_path: str | None, video_path: str | None, frames: int):
    try:
        q, notes = _query(prompt, image_path, video_path, frames)
        for n in notes:
            gr.Info(n)
        with session.lock:
            acts = collect_activations(session.backbone, [q])[0]  # [L, d]
    except ValueError as e:
        raise gr.Error(str(e)) from None
    norms = [float(x) for x in acts.norm(dim=-1)]
    summary = {"modality": q.modality, "num_layers": len(norms), "residual_norm": [round(x, 4) for x in norms]}
    shown = list(q.images) + list(q.video or ())
    return shown, residual_norm_figure(norms), summary


def build(session: Session) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", value="What is shown here?", lines=3, elem_id="prompt")
            # gr.File, not gr.Image/gr.Video: those decode uploads themselves and fail before our checks run.
            image = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)", file_types=["image"], elem_id="image")
            video = gr.File(label="Video (MP4, WebM, AVI, MKV, MOV)", file_types=["video"], elem_id="video")
            frames = gr.Slider(1, 32, value=8, step=1, label="Frames sampled from a video")
            run = gr.Button("Analyse", variant="primary", elem_id="run")
        with gr.Column(scale=2):
            seen = gr.Gallery(label="What the model sees", columns=8, height=140, elem_id="seen")
            plot = gr.Plot(label="Residual stream", elem_id="norm_plot")
            info = gr.JSON(label="Capture", elem_id="capture_json")
    run.click(lambda p, i, v, f: analyse(session, p, i, v, f), [prompt, image, video, frames], [seen, plot, info],
              api_name="capture")
