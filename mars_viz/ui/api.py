"""The documented public endpoint `/analyze`: same JSON object as `python -m mars_viz run --json`.

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    result = client.predict(prompt="How do I pick a lock?", image=handle_file("cat.png"), api_name="/analyze")
    result["steered"]["refused"], result["gate_open"], result["score_recentred"]

Parameters, in this order (positional calls work too), each with a default except `prompt`: prompt, image, video,
strength=1.0, layer=None (the fitted one), tau=None (the fitted one), recenter=True, steer=True, max_new_tokens=48,
frames=8 (sampled from a video), detect_layer=None (the fitted layer the gate reads), gate_position=None (where the
gate reads: "post" = t_post, the prompt's last position; "inst" = t_inst, the instruction's last token; None or
"auto" = the fitted one; the result's "gate_position" says where it read). A bad input raises an error whose message
says what to change; so does a max_new_tokens above the server's limit (`--max-new-tokens-limit`, default 512).

Calls wait their turn in the app's one model queue. A client that disconnects (`client.close()`, or its process
ends) has its run ended at the next decode step. `/health` (no parameters) reports what the server holds: memory,
threads, hooks on the model, the lock, runs in flight and temporary files (`serving.health`).
"""

from __future__ import annotations

import gradio as gr

from ..analysis.analyze import analyze_stream
from ..steer.steering import SteerOptions
from .common import MODEL_QUEUE, build_query, parse_gate_position, session_key, user_errors
from .serving import health
from .session import Session

__all__ = ["build"]


def analyze(session: Session, prompt: str, image=None, video=None, strength: float = 1.0, layer: float | None = None,
            tau: float | None = None, recenter: bool = True, steer: bool = True, max_new_tokens: int = 48,
            frames: int = 8, detect_layer: float | None = None, gate_position: str | None = None,
            key: str | None = None) -> dict:
    """The run JSON for one input. Raises ValueError (with what to change) for a bad input. `key`: the browser session
    asking (`Session.work`), whose runs a Stop or a disconnect ends."""
    max_new_tokens = session.limits.check_new_tokens(max_new_tokens)
    query, notes, indices = build_query(prompt, image, video, 8 if frames is None else frames)
    options = SteerOptions(steer=bool(steer), strength=float(strength if strength is not None else 1.0),
                           layer=None if layer in (None, "") else int(layer),
                           tau=None if tau in (None, "") else float(tau), recenter=bool(recenter),
                           detect_layer=None if detect_layer in (None, "") else int(detect_layer),
                           gate_position=parse_gate_position(gate_position))
    with session.work(key, "answering an /analyze API call"):
        state = session.ensure_state()
        *_, last = analyze_stream(session.backbone, state, query, options, int(max_new_tokens), indices, notes,
                                  strategy=session.pair_strategy)
    return last.analysis.to_json()


def build(session: Session, demo: gr.Blocks | None = None) -> None:
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
        frames = gr.Number(value=8, precision=0)
        detect_layer = gr.Number(value=None, precision=0)
        gate_position = gr.Textbox(value=None)
        out = gr.JSON()
        btn = gr.Button()
        health_out = gr.JSON()
        health_btn = gr.Button()

    # A named signature, not `*args`: Gradio takes the API's parameter names (and None defaults) from it.
    @user_errors("analyze")
    def endpoint(prompt: str, image=None, video=None, strength: float = 1.0, layer: float | None = None,
                 tau: float | None = None, recenter: bool = True, steer: bool = True, max_new_tokens: int = 48,
                 frames: int = 8, detect_layer: float | None = None, gate_position: str | None = None,
                 request: gr.Request = None) -> dict:
        return analyze(session, prompt, image, video, strength, layer, tau, recenter, steer, max_new_tokens, frames,
                       detect_layer, gate_position, key=session_key(request))

    btn.click(endpoint, [prompt, image, video, strength, layer, tau, recenter, steer, max_new_tokens, frames,
                         detect_layer, gate_position], out, api_name="analyze", **MODEL_QUEUE)

    def report() -> dict:
        return health(session, demo)

    # outside the queue: it answers while the model is busy
    health_btn.click(report, None, health_out, api_name="health", queue=False)
