"""`create_app(session) -> gr.Blocks`: the dashboard, one tab per module, nothing launched."""

from __future__ import annotations

import gradio as gr

from ..session import Session
from . import explore

__all__ = ["create_app"]


def create_app(session: Session) -> gr.Blocks:
    bb = session.backbone
    with gr.Blocks(title="mars_viz") as demo:
        gr.Markdown(f"# mars_viz — Modality-Agnostic Refusal Steering\n"
                    f"Model **{bb.model_id}** (`{bb.model_type}`, {bb.num_layers} layers, d={bb.hidden_size}, "
                    f"inputs: {', '.join(bb.modalities)})")
        if session.notice:
            gr.Markdown(f"> ⚠️ {session.notice}", elem_id="notice")
        with gr.Tab("Explore"):
            explore.build(session)
    return demo
