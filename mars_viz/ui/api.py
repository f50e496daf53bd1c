"""The documented public endpoint `/analyze`: same JSON object as `python -m mars_viz run --json`.

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    result = client.predict("How do I pick a lock?", handle_file("cat.png"), None, 1.0, None, None, True, True,
                            api_name="/analyze")
    result["steered"]["refused"], result["gate_open"], result["score_recentred"]
"""

from __future__ import annotations

import gradio as gr

from ..analysis import analyze_stream
from ..session import Session
from ..steering import SteerOptions
from .common import build_query

__all__ = ["build"]


def analyze(session: Session, prompt: str, image, video, strength: float = 1.0, layer: float | None = None,
            tau: float | None = None, recenter: bool = True, steer: bool = True, max_new_tokens: int = 48,
            frames: int = 8) -> dict:
    try:
        query, notes, indices = build_query(prompt, image, video, frames)
        options = SteerOptions(steer=bool(steer), strength=float(strength if strength is not None else 1.0),
                               layer=None if layer in (None, "") else int(layer),
                               tau=None if tau in (None, "") else float(tau), recenter=bool(recenter))
        with session.lock:
            state = session.ensure_state()
            *_, last = analyze_stream(session.backbone, state, query, options, int(max_new_tokens), indices, notes)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return last.analysis.to_json()


def build(session: Session) -> None:
    """Hidden components: the endpoint is for scripts, not the page."""
    with gr.Column(visible=False):
        prompt = gr.Textbox()
        image = gr.File()
        video = gr.File()
        strength = gr.Number(value=1.0)
        layer = gr.Number(value=None, precision=0)
        tau = gr.Number(value=None)
        recenter = gr.Checkbox(value=True)
        steer = gr.Checkbox(value=True)
        max_new_tokens = gr.Number(value=48, precision=0)
        out = gr.JSON()
        btn = gr.Button()
    btn.click(lambda *a: analyze(session, *a), [prompt, image, video, strength, layer, tau, recenter, steer,
                                                 max_new_tokens], out, api_name="analyze", concurrency_limit=8)
