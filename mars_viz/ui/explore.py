"""Explore tab: an image or video + a prompt in; both answers streamed side by side, the geometry, live toggles.

Only Run and the occlusion check touch the model (in the app's one model queue, under the session lock); Stop ends
this page's run at its next decode step. The answer toggle, the layer inspector and the projection switch re-render
from the per-page `gr.State`, so they are instant and never run the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..analysis.analyze import Analysis, analyze_stream, gate_scorer
from ..analysis.occlusion import neutral_fill, occlusion
from ..core.state import MarsState
from ..data.examples import EXAMPLES, example_by_name
from ..steer.cancel import cancellable
from ..steer.steering import plan
from ..views.figures import placeholder_figure
from ..views.panels import (
    DEFAULT_PROJECTION,
    PROJECTIONS,
    LayerView,
    build_figures,
    map_figures,
    map_files,
    occlusion_figure,
    rescore,
)
from ..views.seen import seen_html
from .common import (
    GATE_POSITION_CHOICES,
    MODEL_QUEUE,
    build_query,
    export_zip,
    gr_progress,
    rejected,
    session_key,
    steer_options,
    user_errors,
)
from .session import Session

__all__ = ["ExploreTab", "build"]

PLOTS = ["centroids", "modality_offset", "trust_region", "plane", "target_curve", "layer_scores", "hr_plane", "frames",
         "map_image", "map_tokens"]
# where the gate reads, in words: the verdict names the site
SITES = {"post": "t_post (the prompt's last position)", "inst": "t_inst (the instruction's last token)"}
ANSWERS = ["Unsteered", "MARS-steered"]


@dataclass
class ExploreTab:
    """The components other tabs wire to (the Learn tab loads examples into these)."""

    prompt: gr.Textbox
    image: gr.File
    video: gr.File
    example: gr.Dropdown
    plots: list
    on_load: object  # callable returning the figures for `plots`, then the fingerprint for `shown`
    on_select: object  # callable (analysis, shown) -> the same, or skips where the plots are current
    analysis: gr.State  # the page's last Analysis (None before its first run)
    shown: gr.State  # the fingerprint of the state whose own figures the plots show (None: placeholders or a run's)
    run: object = None  # the Run handler, for other tabs to chain after loading an input (`.then(run, ...)`)
    run_inputs: list | None = None
    run_outputs: list | None = None


def verdict_markdown(a: Analysis, view: LayerView | None = None, first_run: str = "") -> str:
    """The verdict under the input. Every score it prints is the gate's, at the gate's own layer and position (the
    numbers the Trust region's gate marker, the JSON's `score_gate` and the map's gate position show); `view` (the
    result re-scored at the push layer, `panels.rescore`) adds how much of it the modality offset accounts for."""
    r = a.result
    verdict = lambda refused: "**refused**" if refused else "answered"  # noqa: E731
    s, where = r.gate_score, f"layer {r.gate_layer} at {SITES[r.gate_position]}"
    same_site = r.gate_layer == r.layer and r.gate_position == "post"
    push = "" if same_site else f" at layer {r.layer}, t_post"
    if r.gate_open and r.displacement_norm == 0 and r.steer and r.strength > 0:
        gate = (f"Gate **open** at {where} (s = {s:.3f} > τ = {r.tau:.3f}), but at the push layer ({r.layer}, t_post) "
                f"the input already lies at or beyond t* = {r.t_star:g}, the trust region's outer wall: no push.")
    elif r.gate_open and not r.steer:
        gate = (f"Gate **open** at {where}: s = {s:.3f} > τ = {r.tau:.3f} → would be pushed{push} toward "
                f"t* = {r.t_star:g} with λ = {r.strength:g} (steering is off, so nothing was changed).")
    elif r.gate_open:
        gate = (f"Gate **open** at {where}: s = {s:.3f} > τ = {r.tau:.3f} → pushed{push} toward t* = {r.t_star:g} "
                f"with λ = {r.strength:g} (‖Δh‖ = {r.displacement_norm:.3g}).")
    else:
        gate = (f"Gate **closed** at {where}: s = {s:.3f} ≤ τ = {r.tau:.3f} → no displacement, identical "
                "output.")
    shift = ""
    if r.modality != "text" and r.recenter and view is not None:
        shift = (f" Before re-centring the gate read s = {view.s_gate_raw:.3f} there: the {r.modality} offset "
                 f"accounts for {view.s_gate_raw - view.s_gate:+.3f} of it (removed by re-centring).")
    steer = "" if r.steer else " (steering is off: scores only)"
    extra = a.notes + ([r.t_star_note] if r.t_star_note else []) + ([first_run] if first_run else [])
    notes = "".join(f"\n\n> {n}" for n in extra)
    layers = (f"Layer {r.layer}, t_post" if same_site else
              f"Gate read at layer {r.gate_layer}, t_{r.gate_position}; push at layer {r.layer}, t_post")
    return (f"**{layers}** · {r.modality} input{steer}. {gate}{shift}\n\n"
            f"Unsteered: {verdict(r.unsteered.refused)} · MARS: {verdict(r.steered.refused)}"
            f"{' · answers identical' if r.steered.text == r.unsteered.text else ''}{notes}")


def _stale(state: MarsState | None, analysis: Analysis) -> str | None:
    """Why `analysis` must not be re-used with `state` (computed with another model or state), else None."""
    try:
        analysis.check_state(state)
    except ValueError as e:
        return str(e)
    return None


FIRST_RUN = ("Press Run in Explore. The first run calibrates MARS for this model (about 30 s on the tiny demo "
             "model, about 10 min for a 0.5B model on a 2-core CPU) and caches it; after that these plots are instant.")
NO_VIDEO = "Per-frame scores appear for a video input."
NO_MAP = "Run an image or a video: each patch's unsafety score is drawn over it here."


def _figures(state: MarsState | None, analysis: Analysis | None, layer, method: str) -> list:
    if state is None:
        return [placeholder_figure(FIRST_RUN, "No MARS state yet")] * len(PLOTS)
    figs, _ = build_figures(state, analysis, None if layer is None else int(layer), method.lower())
    if "frames" not in figs:
        figs["frames"] = placeholder_figure(NO_VIDEO, "Video frames")
    figs.update(map_figures(analysis))
    figs.setdefault("map_image", placeholder_figure(NO_MAP, "Where in the image or video"))
    figs.setdefault("map_tokens", placeholder_figure("Run an input to colour its tokens by score.", "The prompt"))
    return [figs.get(name) for name in PLOTS]


@dataclass
class _Controls:
    """The "Steering controls" accordion."""

    steer: gr.Checkbox
    strength: gr.Slider
    recenter: gr.Checkbox
    layer: gr.Dropdown
    detect_layer: gr.Dropdown
    gate_position: gr.Dropdown
    tau: gr.Textbox
    frames: gr.Slider
    max_tokens: gr.Slider


@dataclass
class _Inputs:
    """The left column: the input, the steering controls and the Run button."""

    example: gr.Dropdown
    prompt: gr.Textbox
    image: gr.File
    video: gr.File
    controls: _Controls
    run: gr.Button
    stop: gr.Button


@dataclass
class _Answers:
    """What the model sees, the verdict and both answers, with the instant answer toggle."""

    seen: gr.HTML
    verdict: gr.Markdown
    unsteered: gr.Textbox
    steered: gr.Textbox
    toggle: gr.Radio
    active: gr.Textbox


@dataclass
class _MapTab:
    """The "Where in the input" tab: the maps, their re-scoring buttons and the occlusion check."""

    image: gr.Plot
    tokens: gr.Plot
    recentred: gr.Button
    raw: gr.Button
    push: gr.Button
    occlusion: gr.Button
    occlusion_plot: gr.Plot


@dataclass
class _Plots:
    """The plot tabs. `figures`: the plots `_figures` fills, in `PLOTS` order."""

    method: gr.Radio
    inspect: gr.Slider
    figures: list
    maps: _MapTab


@dataclass
class _Export:
    """The "Result JSON and export" accordion."""

    result_json: gr.JSON
    button: gr.Button
    file: gr.File


@dataclass
class _Page:
    """Every component of the tab the handlers read or write, plus the per-page states."""

    analysis: gr.State  # the page's last Analysis
    generation: gr.State  # the page's `Session.generation` of its last results
    inputs: _Inputs
    answers: _Answers
    plots: _Plots
    export: _Export


def _layer_choices(num_layers: int) -> list[str]:
    return ["auto"] + [str(i) for i in range(num_layers)]


def _steering_controls(num_layers: int, max_new_tokens: int) -> _Controls:
    with gr.Accordion("Steering controls", open=True):
        steer = gr.Checkbox(value=True, label="Steering on", elem_id="steer")
        strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="Strength λ", elem_id="strength")
        recenter = gr.Checkbox(value=True, label="Re-centre (remove the modality offset)", elem_id="recenter")
        layer = gr.Dropdown(_layer_choices(num_layers), value="auto",
                            label="Push layer (auto = chosen by calibration)", elem_id="layer")
        detect_layer = gr.Dropdown(_layer_choices(num_layers), value="auto",
                                   label="Gate (detection) layer (auto = calibrated)", elem_id="detect_layer")
        gate_position = gr.Dropdown(GATE_POSITION_CHOICES, value="auto", elem_id="gate_position",
                                    label="Gate reads at (the push is always at t_post)")
        tau = gr.Textbox(label="τ override (empty = fitted)", value="", elem_id="tau")
        frames = gr.Slider(1, 32, value=8, step=1, label="Frames sampled from a video")
        # up to the server's limit (`--max-new-tokens-limit`, default 512)
        max_tokens = gr.Slider(4, max(4, max_new_tokens), value=min(48, max_new_tokens), step=4,
                               label="Max new tokens")
    return _Controls(steer, strength, recenter, layer, detect_layer, gate_position, tau, frames, max_tokens)


def _input_column(num_layers: int, max_new_tokens: int) -> _Inputs:
    with gr.Column(scale=2, min_width=320):
        example = gr.Dropdown(["(none)"] + [e.name for e in EXAMPLES], value="(none)", label="Bundled example",
                              elem_id="example")
        prompt = gr.Textbox(label="Prompt", value="What colour is this image?", lines=3, elem_id="prompt")
        # gr.File, not gr.Image/gr.Video: those decode uploads themselves and fail before our checks run.
        # compact drop zones (the app's CSS), so that Run stays in view at 900 px, beside where the verdict appears
        image = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)", file_types=["image"], elem_id="image")
        video = gr.File(label="Video (MP4, WebM, AVI, MKV, MOV)", file_types=["video"], elem_id="video")
        # Run right under the input, above the controls: in view at 900 px, next to where the verdict appears
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id="run", scale=3)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
        controls = _steering_controls(num_layers, max_new_tokens)
    return _Inputs(example, prompt, image, video, controls, run, stop)


def _answer_panel() -> _Answers:
    seen = gr.HTML(seen_html(), label="What the model sees", show_label=True, container=True, elem_id="seen")
    verdict = gr.Markdown("Run an input to see the gate decision.", elem_id="verdict")
    with gr.Row():
        unsteered = gr.Textbox(label="Unsteered answer", lines=4, interactive=False, elem_id="unsteered")
        steered = gr.Textbox(label="MARS-steered answer", lines=4, interactive=False, elem_id="steered")
    with gr.Row():
        toggle = gr.Radio(ANSWERS, value="MARS-steered", label="Active answer (instant, no re-run)", elem_id="toggle")
    active = gr.Textbox(label="Active answer", lines=3, interactive=False, elem_id="active")
    return _Answers(seen, verdict, unsteered, steered, toggle, active)


def _centroids_tab() -> tuple[gr.Radio, gr.Plot]:
    with gr.Tab("Centroids"):
        method = gr.Radio(list(PROJECTIONS), value=DEFAULT_PROJECTION, elem_id="method",
                          label="Projection (r̂ × top PC: x is the axis MARS reads; UMAP: chosen layer only)")
        plot = gr.Plot(label="Calibration activations at the layer", elem_id="plot_centroids")
    return method, plot


def _single_plot_tab(tab: str, label: str, elem_id: str) -> gr.Plot:
    with gr.Tab(tab):
        return gr.Plot(label=label, elem_id=elem_id)


def _trust_region_tab() -> tuple[gr.Plot, gr.Plot, gr.Plot]:
    with gr.Tab("Trust region"):
        trust = gr.Plot(label="The unsafety axis", elem_id="plot_trust_region")
        with gr.Row():
            plane = gr.Plot(label="Plane of r̂ and the top residual PC", elem_id="plot_plane")
            curve = gr.Plot(label="Refusal rate against level", elem_id="plot_target_curve")
    return trust, plane, curve


def _layer_scores_tab(num_layers: int) -> tuple[gr.Slider, gr.Plot]:
    with gr.Tab("Layer scores"):
        inspect = gr.Slider(0, num_layers - 1, step=1, value=0,
                            label="Inspect layer (re-scores the current input, no re-run)", elem_id="inspect")
        plot = gr.Plot(label="Layer scores", elem_id="plot_layer_scores")
    return inspect, plot


def _map_tab() -> _MapTab:
    with gr.Tab("Where in the input"):
        image = gr.Plot(label="Each patch's score over the image / each sampled frame", elem_id="plot_map_image")
        tokens = gr.Plot(label="The prompt's tokens coloured by score", elem_id="plot_map_tokens")
        with gr.Row():  # re-score the kept residuals (no re-run)
            recentred = gr.Button("Map: re-centred", size="sm", elem_id="map_recentred")
            raw = gr.Button("Map: raw (no offsets)", size="sm", elem_id="map_raw")
            push = gr.Button("Map at the push layer", size="sm", elem_id="map_push")
        occl = gr.Button("Occlusion check: cover each region with the neutral colour and re-score "
                         "(slower: one forward per region)", size="sm", elem_id="occlusion")
        occl_plot = gr.Plot(placeholder_figure("Run an image or a video, then press the occlusion check "
                                               "above: it re-scores the input once per covered region"),
                            label="Occlusion: how much each region raises the gate's score", elem_id="plot_occlusion")
    return _MapTab(image, tokens, recentred, raw, push, occl, occl_plot)


def _plot_tabs(num_layers: int) -> _Plots:
    with gr.Tabs():
        method, centroids = _centroids_tab()
        offset = _single_plot_tab("Modality offset", "Offset norm and spurious score shift", "plot_modality_offset")
        trust, plane, curve = _trust_region_tab()
        hr = _single_plot_tab("Harmfulness × refusal", "Harmfulness at t_inst against refusal at t_post",
                              "plot_hr_plane")
        inspect, layers = _layer_scores_tab(num_layers)
        frames = _single_plot_tab("Video frames", "Per-frame unsafety score", "plot_frames")
        maps = _map_tab()
    figures = [centroids, offset, trust, plane, curve, layers, hr, frames, maps.image, maps.tokens]
    return _Plots(method, inspect, figures, maps)


def _export_row() -> _Export:
    with gr.Accordion("Result JSON and export", open=False):
        result_json = gr.JSON(label="Result (same object as `run --json` and the /analyze API)",
                              elem_id="result_json")
        button = gr.Button("Export plots (HTML + CSV) and result (JSON) as a zip", elem_id="export")
        file = gr.File(label="Export", elem_id="export_file")
    return _Export(result_json, button, file)


def _layout(session: Session, generation: gr.State) -> _Page:
    # kept `session_ttl_s` after the last run (input media and per-position residuals), and dropped with the page
    analysis = gr.State(None, time_to_live=session.limits.session_ttl_s)
    num_layers = session.backbone.num_layers
    with gr.Row():
        inputs = _input_column(num_layers, session.limits.max_new_tokens)
        with gr.Column(scale=5):
            answers = _answer_panel()
            plots = _plot_tabs(num_layers)
            export = _export_row()
    return _Page(analysis, generation, inputs, answers, plots, export)


def _wire_example(inputs: _Inputs) -> None:
    def pick_example(example: str):
        if not example or example == "(none)":
            return gr.update(), None, None  # keep the prompt, drop the previous example's file
        e = example_by_name(example)
        return e.prompt, e.path() if e.image else None, e.path() if e.video else None

    inputs.example.change(pick_example, inputs.example, [inputs.prompt, inputs.image, inputs.video],
                          api_name="example")


def _run_handler(session: Session, page: _Page):
    """The Run handler (`/explore`): streams both answers, then the verdict, the figures and the page's state."""
    ans, plots = page.answers, page.plots

    # Parameter names are the API's: client.predict(prompt=..., image=handle_file(...), api_name="/explore").
    @user_errors("explore")
    def do_run(prompt: str, image=None, video=None, frames: int = 8, steer: bool = True, strength: float = 1.0,
               layer: str = "auto", tau: str = "", recenter: bool = True, max_new_tokens: int = 48,
               toggle: str = "MARS-steered", method: str = DEFAULT_PROJECTION, detect_layer: str = "auto",
               gate_position: str = "auto", request: gr.Request = None, progress=gr.Progress()):
        max_new_tokens = session.limits.check_new_tokens(max_new_tokens)
        query, notes, indices = build_query(prompt, image, video, frames)
        options = steer_options(steer, strength, layer, tau, recenter, detect_layer, gate_position)
        for n in notes:
            gr.Info(n)
        shown = seen_html(query.images, query.video or (), indices if query.video else None)
        # sent once, not with every streamed token
        waiting = "the first run calibrates MARS for this model, then it is cached" if session.state is None else ""
        yield {ans.seen: shown, ans.verdict: f"Running…{' (' + waiting + ')' if waiting else ''}"}
        first = ""
        # the event goes to the stream explicitly: a context binding does not survive this generator's yields
        with session.work(session_key(request), "answering a question in Explore") as stop:
            if session.state is None:
                progress(0, desc="Calibrating MARS for this model (cached afterwards)")
                with cancellable(stop):
                    session.ensure_state(gr_progress(progress, session, "calibrating MARS on a first run"))
                session.runs.say("answering a question in Explore")
                s = session.state
                # said in the verdict, not in a pop-up (one covered the steered answer)
                first = (f"MARS was calibrated for {session.backbone.display_name} on this first run: push at layer "
                         f"{s.layer}, gate at layer {s.gate_layer}, {SITES[s.gate_position]}. It is cached for the "
                         "next run; details in Calibrate.")
            state, gen = session.state, session.generation  # what this result is computed with
            updates = analyze_stream(session.backbone, state, query, options, int(max_new_tokens),
                                     frame_indices=indices, notes=notes, strategy=session.pair_strategy,
                                     cancel=stop)
            for upd in updates:
                if upd.analysis is None:
                    yield {ans.unsteered: upd.unsteered, ans.steered: upd.steered}
                    continue
                a = upd.analysis
        figs = _figures(state, a, a.result.layer, method)
        view = rescore(state, a.acts, a.query.modality, a.options, a.result.layer, a.acts_inst)
        chosen = a.result.steered.text if toggle == "MARS-steered" else a.result.unsteered.text
        yield {ans.unsteered: a.result.unsteered.text, ans.steered: a.result.steered.text,
               ans.verdict: verdict_markdown(a, view, first), ans.active: chosen, page.export.result_json: a.to_json(),
               page.analysis: a, page.generation: gen, plots.inspect: gr.update(value=a.result.layer),
               **dict(zip(plots.figures, figs, strict=True))}

    return do_run


def _check_handler(session: Session):
    def check_inputs(prompt: str, image=None, video=None, frames: int = 8, steer: bool = True, strength: float = 1.0,
                     layer: str = "auto", tau: str = "", recenter: bool = True, max_new_tokens: int = 48,
                     toggle: str = "", method: str = "", detect_layer: str = "auto", gate_position: str = "auto"):
        """The Run button's first step: a rejected input replaces the verdict with the reason and marks only the
        verdict (an error in `do_run` itself would badge every panel while the last verdict stayed on screen).
        Options the loaded state cannot honour (a gate at t_inst without its fit) are rejected here too."""
        try:
            build_query(prompt, image, video, frames)
            options = steer_options(steer, strength, layer, tau, recenter, detect_layer, gate_position)
            if session.state is not None:
                plan(session.state, options)
        except ValueError as e:
            yield f"⚠️ **Not run**: {e}. The answers and plots below are from the previous run, if any."
            # the verdict says why, in place: no pop-up (two in a row stacked, the older one first), and no status
            # badge (the event's progress is hidden, so none is drawn over the verdict's text)
            err = rejected("explore", e)
            err.visible = False
            raise err from None
        yield gr.update()

    return check_inputs


def _wire_run(session: Session, page: _Page) -> tuple[object, list, list]:
    """Wire the Run button; returns the Run handler with its inputs and outputs (for other tabs to chain)."""
    i, c, ans = page.inputs, page.inputs.controls, page.answers
    run_inputs = [i.prompt, i.image, i.video, c.frames, c.steer, c.strength, c.layer, c.tau, c.recenter,
                  c.max_tokens, ans.toggle, page.plots.method, c.detect_layer, c.gate_position]
    run_outputs = [ans.unsteered, ans.steered, ans.seen, ans.verdict, ans.active, page.export.result_json,
                   page.analysis, page.generation, page.plots.inspect, *page.plots.figures]
    do_run = _run_handler(session, page)
    # the button checks the input first, then runs; `/explore` (the same run, for API clients) checks it itself
    running = i.run.click(_check_handler(session), run_inputs, ans.verdict, api_name=False,
                          show_progress="hidden").success(do_run, run_inputs, run_outputs, api_name="explore",
                          **MODEL_QUEUE)

    def do_stop(request: gr.Request):
        """End this page's run at its next decode step (or drop it from the queue); the partial answers stay."""
        if session.runs.cancel(session_key(request)):
            return ("⏹ **Stopped.** The answers above are cut short where the run ended; the model is free. Run "
                    "again for the whole answer.")
        return gr.update()

    # not in the model queue (it must not wait behind the run it stops)
    i.stop.click(do_stop, None, ans.verdict, cancels=[running], api_name="stop", concurrency_limit=None,
                 show_progress="hidden")
    return do_run, run_inputs, run_outputs


# The handlers below re-use the page's last analysis. Against another model or state it would be re-scored into a
# figure that mixes two fits, so the instant ones keep what the page shows and say to run again instead.

def _wire_toggle(session: Session, page: _Page) -> None:
    # The toggle is queued (gr.Warning reaches only queued events' pages) without a concurrency limit: never waits.
    def do_toggle(toggle: str, analysis: Analysis | None):
        if analysis is None:
            return ""
        if (stale := _stale(session.state, analysis)) is not None:
            gr.Warning(stale)
            return gr.update()
        return analysis.result.steered.text if toggle == "MARS-steered" else analysis.result.unsteered.text

    page.answers.toggle.change(do_toggle, [page.answers.toggle, page.analysis], page.answers.active,
                               api_name="toggle", concurrency_limit=None)


def _wire_inspector(session: Session, page: _Page) -> None:
    """The layer inspector and the projection switch: the figures re-drawn from the page's analysis."""
    plots = page.plots

    def do_inspect(layer: int, method: str, analysis: Analysis | None):
        state = session.state
        if analysis is not None and (stale := _stale(state, analysis)) is not None:
            gr.Warning(stale)
            return [gr.update()] * len(plots.figures)
        return _figures(state, analysis, layer, method)

    inputs = [plots.inspect, plots.method, page.analysis]
    plots.inspect.release(user_errors("inspect_layer")(do_inspect), inputs, plots.figures, api_name="inspect_layer")
    # a number typed into the slider's box fires `input`, not `release`; only the last of a burst is drawn
    plots.inspect.input(user_errors("inspect_layer")(do_inspect), inputs, plots.figures, api_name=False,
                        trigger_mode="always_last")
    plots.method.change(user_errors("projection")(do_inspect), inputs, plots.figures, api_name="projection")


def _wire_export(session: Session, page: _Page) -> None:
    @user_errors("export")
    def do_export(analysis: Analysis | None, layer: int, method: str, request: gr.Request = None):
        state = session.state
        if state is None:
            raise ValueError("nothing to export yet: run an input first")
        if analysis is not None:
            analysis.check_state(state)
        figs, _ = build_figures(state, analysis, int(layer) if analysis is not None else None, method.lower())
        return export_zip(figs, analysis.to_json() if analysis is not None else None, session, map_files(analysis),
                          session.files.folder(session_key(request)))

    page.export.button.click(do_export, [page.analysis, page.plots.inspect, page.plots.method], page.export.file,
                             api_name="export")


def _wire_occlusion(session: Session, page: _Page) -> None:
    @user_errors("occlusion")
    def do_occlusion(analysis: Analysis | None, request: gr.Request = None, progress=gr.Progress()):
        """Cover each region of the last input in the neutral colour and re-score it (one forward per region)."""
        if analysis is None:
            raise ValueError("run an image or a video first: the occlusion check re-scores the last input")
        with session.work(session_key(request), "re-scoring covered regions (occlusion check)"):
            state = session.state
            analysis.check_state(state)
            res = occlusion(analysis.query, gate_scorer(session.backbone, state, analysis.options), cells=4,
                            fill=neutral_fill(state.config.seed, state.config.k_neutral),
                            progress=lambda d, t: progress((d, t), desc="Occlusion: re-scoring covered regions"))
        return occlusion_figure(analysis, res)

    maps = page.plots.maps
    maps.occlusion.click(do_occlusion, [page.analysis], maps.occlusion_plot, api_name="occlusion", **MODEL_QUEUE)


def _wire_maps(session: Session, page: _Page) -> None:
    def map_view(recenter: bool | None, at_push: bool = False):
        """The map re-scored (re-centring on / off, or at the push layer) from the kept residuals: no model call."""

        @user_errors("map")
        def show(analysis: Analysis | None):
            if analysis is None or analysis.input_map is None:
                raise ValueError("run an input first: the map is computed from its prefill")
            analysis.check_state(session.state)
            figs = map_figures(analysis, session.state, recenter, at_push)
            return figs.get("map_image", placeholder_figure(NO_MAP, "Where in the image or video")), figs["map_tokens"]

        return show

    maps = page.plots.maps
    outputs = [maps.image, maps.tokens]
    maps.recentred.click(map_view(True), [page.analysis], outputs, api_name="map_recentred")
    maps.raw.click(map_view(False), [page.analysis], outputs, api_name="map_raw")
    maps.push.click(map_view(None, True), [page.analysis], outputs, api_name="map_push")


def _state_plots(session: Session):
    def show_state_plots():
        """On page load: the state's own figures (no input yet), if a state is fitted or cached; and which state."""
        state = session.cached_state()
        figs = _figures(state, None, None if state is None else state.layer, DEFAULT_PROJECTION)
        return [*figs, None if state is None else state.fingerprint()]

    def on_select(analysis, shown):
        """On opening the tab: a page without a run of its own shows the state fitted or loaded since its plots were
        drawn (a first run in Evaluate calibrates, Calibrate loads another), instead of the old figures."""
        state = session.cached_state()
        if analysis is not None or state is None or state.fingerprint() == shown:
            return [gr.skip()] * (len(PLOTS) + 1)
        return show_state_plots()

    return show_state_plots, on_select


def _wire(session: Session, page: _Page) -> ExploreTab:
    """Every event of the tab, in the order the API lists them."""
    _wire_example(page.inputs)
    run, run_inputs, run_outputs = _wire_run(session, page)
    _wire_toggle(session, page)
    _wire_inspector(session, page)
    _wire_export(session, page)
    _wire_occlusion(session, page)
    _wire_maps(session, page)
    i = page.inputs
    on_load, on_select = _state_plots(session)
    return ExploreTab(prompt=i.prompt, image=i.image, video=i.video, example=i.example, plots=page.plots.figures,
                      on_load=on_load, on_select=on_select, analysis=page.analysis, shown=gr.State(None), run=run,
                      run_inputs=run_inputs, run_outputs=run_outputs)


def build(session: Session, generation: gr.State) -> ExploreTab:
    """`generation`: the page's `Session.generation` of its last results (the app's stale-results banner reads it)."""
    return _wire(session, _layout(session, generation))
