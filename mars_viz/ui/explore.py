"""Explore tab: an image or video + a prompt in; both answers streamed side by side, the geometry, live toggles.

Only the Run button touches the model (under the session lock). The answer toggle, the layer inspector and the
projection switch re-render from the per-user `gr.State`, so they are instant and never run the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..analysis import Analysis, analyze_stream, build_figures
from ..examples import EXAMPLES, example_by_name
from ..session import Session
from .common import build_query, export_zip, gr_progress, steer_options

__all__ = ["ExploreTab", "build"]

PLOTS = ["centroids", "modality_offset", "trust_region", "plane", "target_curve", "layer_scores", "frames"]
ANSWERS = ["Unsteered", "MARS-steered"]


@dataclass
class ExploreTab:
    """The components other tabs wire to (the Learn tab loads examples into these)."""

    prompt: gr.Textbox
    image: gr.File
    video: gr.File
    example: gr.Dropdown
    plots: list
    on_load: object  # callable returning the figures for `plots`


def verdict_markdown(a: Analysis) -> str:
    r = a.result
    verdict = lambda refused: "**refused**" if refused else "answered"  # noqa: E731
    if r.gate_open and r.displacement_norm == 0 and r.steer and r.strength > 0:
        gate = (f"Gate **open** (s = {r.score_recentred:.3f} > τ = {r.tau:.3f}), but the input already lies at or "
                f"beyond t* = {r.t_star:g}, the trust region's outer wall: no push.")
    elif r.gate_open:
        gate = (f"Gate **open**: s = {r.score_recentred:.3f} > τ = {r.tau:.3f} → pushed toward t* = {r.t_star:g} "
                f"with λ = {r.strength:g} (‖Δh‖ = {r.displacement_norm:.3g}).")
    else:
        gate = f"Gate **closed**: s = {r.score_recentred:.3f} ≤ τ = {r.tau:.3f} → no displacement, identical output."
    shift = ("" if r.modality == "text" or not r.recenter else
             f" Raw score {r.score_raw:.3f}; the {r.modality} offset accounts for "
             f"{r.score_raw - r.score_recentred:+.3f} of it (removed by re-centring).")
    steer = "" if r.steer else " (steering is off: scores only)"
    notes = "".join(f"\n\n> {n}" for n in a.notes)
    return (f"**Layer {r.layer}** · {r.modality} input{steer}. {gate}{shift}\n\n"
            f"Unsteered: {verdict(r.unsteered.refused)} · MARS: {verdict(r.steered.refused)}"
            f"{' · answers identical' if r.steered.text == r.unsteered.text else ''}{notes}")


def _figures(session: Session, analysis: Analysis | None, layer, method: str) -> list:
    state = session.state
    if state is None:
        return [None] * len(PLOTS)
    figs, _ = build_figures(state, analysis, None if layer is None else int(layer), method.lower())
    return [figs.get(name) for name in PLOTS]


def build(session: Session) -> ExploreTab:
    st_analysis = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            example = gr.Dropdown(["(none)"] + [e.name for e in EXAMPLES], value="(none)", label="Bundled example",
                                  elem_id="example")
            prompt = gr.Textbox(label="Prompt", value="What colour is this image?", lines=3, elem_id="prompt")
            # gr.File, not gr.Image/gr.Video: those decode uploads themselves and fail before our checks run.
            image = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)", file_types=["image"], elem_id="image")
            video = gr.File(label="Video (MP4, WebM, AVI, MKV, MOV)", file_types=["video"], elem_id="video")
            with gr.Accordion("Steering controls", open=True):
                steer = gr.Checkbox(value=True, label="Steering on", elem_id="steer")
                strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="Strength λ", elem_id="strength")
                recenter = gr.Checkbox(value=True, label="Re-centre (remove the modality offset)", elem_id="recenter")
                layer = gr.Dropdown(["auto"] + [str(i) for i in range(session.backbone.num_layers)], value="auto",
                                    label="Layer (auto = chosen by calibration)", elem_id="layer")
                tau = gr.Textbox(label="τ override (empty = fitted)", value="", elem_id="tau")
                frames = gr.Slider(1, 32, value=8, step=1, label="Frames sampled from a video")
                max_tokens = gr.Slider(4, 256, value=48, step=4, label="Max new tokens")
            run = gr.Button("Run", variant="primary", elem_id="run")
        with gr.Column(scale=5):
            seen = gr.Gallery(label="What the model sees", columns=8, height=120, elem_id="seen")
            verdict = gr.Markdown("Run an input to see the gate decision.", elem_id="verdict")
            with gr.Row():
                unsteered_box = gr.Textbox(label="Unsteered answer", lines=4, interactive=False, elem_id="unsteered")
                steered_box = gr.Textbox(label="MARS-steered answer", lines=4, interactive=False, elem_id="steered")
            with gr.Row():
                toggle = gr.Radio(ANSWERS, value="MARS-steered", label="Active answer (instant, no re-run)",
                                  elem_id="toggle")
            active = gr.Textbox(label="Active answer", lines=3, interactive=False, elem_id="active")
            with gr.Tabs():
                with gr.Tab("Centroids"):
                    method = gr.Radio(["PCA", "UMAP"], value="PCA", label="Projection (UMAP: chosen layer only)",
                                      elem_id="method")
                    p_centroids = gr.Plot(label="Calibration activations at the layer", elem_id="plot_centroids")
                with gr.Tab("Modality offset"):
                    p_offset = gr.Plot(label="Offset norm and spurious score shift", elem_id="plot_modality_offset")
                with gr.Tab("Trust region"):
                    p_trust = gr.Plot(label="The unsafety axis", elem_id="plot_trust_region")
                    with gr.Row():
                        p_plane = gr.Plot(label="Plane of r̂ and the top residual PC", elem_id="plot_plane")
                        p_curve = gr.Plot(label="Refusal rate against level", elem_id="plot_target_curve")
                with gr.Tab("Layer scores"):
                    inspect = gr.Slider(0, session.backbone.num_layers - 1, step=1, value=0,
                                        label="Inspect layer (re-scores the current input, no re-run)",
                                        elem_id="inspect")
                    p_layers = gr.Plot(label="Layer scores", elem_id="plot_layer_scores")
                with gr.Tab("Video frames"):
                    p_frames = gr.Plot(label="Per-frame unsafety score", elem_id="plot_frames")
            with gr.Accordion("Result JSON and export", open=False):
                result_json = gr.JSON(label="Result (same object as `run --json` and the /analyze API)",
                                      elem_id="result_json")
                export_btn = gr.Button("Export plots (HTML + CSV) and result (JSON) as a zip", elem_id="export")
                export_file = gr.File(label="Export", elem_id="export_file")
    plots = [p_centroids, p_offset, p_trust, p_plane, p_curve, p_layers, p_frames]

    def pick_example(name: str):
        if not name or name == "(none)":
            return gr.update(), gr.update(), gr.update()
        e = example_by_name(name)
        return e.prompt, e.path() if e.image else None, e.path() if e.video else None

    example.change(pick_example, example, [prompt, image, video], api_name="example")

    def do_run(prompt_v, image_v, video_v, frames_v, steer_v, strength_v, layer_v, tau_v, recenter_v, max_tok_v,
               toggle_v, method_v, progress=gr.Progress()):
        try:
            query, notes, indices = build_query(prompt_v, image_v, video_v, frames_v)
            options = steer_options(steer_v, strength_v, layer_v, tau_v, recenter_v)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        for n in notes:
            gr.Info(n)
        shown = list(query.images) + list(query.video or ())
        try:
            with session.lock:
                if session.state is None:
                    progress(0, desc="Calibrating MARS for this model (cached afterwards)")
                    session.ensure_state(gr_progress(progress))
                    gr.Info(f"MARS state {session.state_source}")
                updates = analyze_stream(session.backbone, session.state, query, options, int(max_tok_v),
                                         frame_indices=indices, notes=notes)
                for upd in updates:
                    if upd.analysis is None:
                        yield {unsteered_box: upd.unsteered, steered_box: upd.steered, seen: shown}
                        continue
                    a = upd.analysis
        except ValueError as e:
            raise gr.Error(str(e)) from None
        figs = _figures(session, a, a.result.layer, method_v)
        chosen = a.result.steered.text if toggle_v == "MARS-steered" else a.result.unsteered.text
        yield {unsteered_box: a.result.unsteered.text, steered_box: a.result.steered.text, seen: shown,
               verdict: verdict_markdown(a), active: chosen, result_json: a.to_json(), st_analysis: a,
               inspect: gr.update(value=a.result.layer), **dict(zip(plots, figs, strict=True))}

    run.click(do_run, [prompt, image, video, frames, steer, strength, layer, tau, recenter, max_tokens, toggle,
                       method],
              [unsteered_box, steered_box, seen, verdict, active, result_json, st_analysis, inspect, *plots],
              api_name="explore", concurrency_limit=4)

    def do_toggle(choice: str, a: Analysis | None):
        if a is None:
            return ""
        return a.result.steered.text if choice == "MARS-steered" else a.result.unsteered.text

    toggle.change(do_toggle, [toggle, st_analysis], active, api_name="toggle", queue=False)

    def do_inspect(layer_v, method_v, a: Analysis | None):
        return _figures(session, a, layer_v, method_v)

    inspect.release(do_inspect, [inspect, method, st_analysis], plots, api_name="inspect_layer")
    method.change(do_inspect, [inspect, method, st_analysis], plots, api_name="projection")

    def do_export(a: Analysis | None, layer_v, method_v):
        if session.state is None:
            raise gr.Error("nothing to export yet: run an input first")
        figs, _ = build_figures(session.state, a, int(layer_v) if a is not None else None, method_v.lower())
        return export_zip(figs, a.to_json() if a is not None else None, session)

    export_btn.click(do_export, [st_analysis, inspect, method], export_file, api_name="export")

    def show_state_plots():
        """On page load: the state's own figures (no input yet), if a state is fitted or cached."""
        state = session.cached_state()
        return _figures(session, None, None if state is None else state.layer, "PCA")

    return ExploreTab(prompt=prompt, image=image, video=video, example=example, plots=plots,
                      on_load=show_state_plots)
