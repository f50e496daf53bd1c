"""`create_app(session) -> gr.Blocks`: the dashboard, one tab per module, nothing launched."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..views.seen import CSS as SEEN_CSS
from . import api, calibrate_tab, evaluate_tab, explore, learn
from .common import busy_banner, credibility_banner, session_key, stale_banner
from .serving import forget_session
from .session import Session

__all__ = ["create_app", "launch_kwargs"]

# Explore's empty drop zones are compact (110 px, words without the big upload icon), so Run stays in view at 900 px;
# only the empty zone is sized: an uploaded file's row keeps Gradio's own layout. `!important`: Gradio 6.31's own rule
# for the zone (`.upload-container.boundedheight`, 240 px) is more specific than an elem_id rule scoped by the app.
CSS = ("#verdict {min-height: 3em} #active textarea {font-weight: 600} "
       "#image .upload-container, #video .upload-container {height: 110px !important; min-height: 0 !important} "
       "#image [data-testid=upload-icon], #video [data-testid=upload-icon] {display: none} " + SEEN_CSS)


def theme() -> gr.themes.Base:
    """Gradio's default theme with fonts that cover every glyph. The default declares Source Sans Pro (and IBM Plex
    Mono) at weights 400 and 600, but the 600 files Gradio ships are subsets of a few glyphs (5 kB against 100 kB):
    bold text, headings first, was drawn partly in that subset and partly in the system's fallback face ("Modality-
    Agnostic" with a foreign "A"). Weights 400 and 700 are both whole files; 600 falls to 700. All served locally."""
    from gradio.themes.utils.fonts import LocalFont

    return gr.themes.Default(
        font=(LocalFont("Source Sans Pro", weights=(400, 700)), "ui-sans-serif", "system-ui", "sans-serif"),
        font_mono=(LocalFont("IBM Plex Mono", weights=(400, 700)), "ui-monospace", "Consolas", "monospace"))
STALE_POLL_S = 2.0  # how often each page asks whether the model or state changed under it, and what it is doing


def create_app(session: Session) -> gr.Blocks:
    """The dashboard for `session`. Per page, results are kept `session.limits.session_ttl_s` after their last update
    and dropped when the page closes (with its runs and files); Gradio's own files (uploads, outputs) older than that
    are deleted too."""
    bb = session.backbone
    ttl = session.limits.session_ttl_s
    with gr.Blocks(title="mars_viz", delete_cache=(int(min(600, max(10, ttl / 2))), int(ttl))) as demo:
        session.files.upload_dir = Path(demo.GRADIO_CACHE)
        gr.Markdown(f"# mars_viz — Modality-Agnostic Refusal Steering\n"
                    f"Model **{bb.display_name}** (`{bb.model_type}`, {bb.num_layers} layers, d={bb.hidden_size}, "
                    f"inputs: {', '.join(bb.modalities)}). A refusal direction from text, re-centred for images and "
                    "video, applied only past a threshold and only inside a trust region.")
        if session.notice:
            gr.Markdown(f"> ⚠️ {session.notice}", elem_id="notice")
        # The model and state are shared by every page: a swap in any page's Calibrate tab is announced on all of them.
        banner = gr.Markdown(visible=False, elem_id="stale_banner")
        credibility = gr.Markdown(visible=False, elem_id="credibility")
        busy = gr.Markdown(visible=False, elem_id="busy_banner")
        # Session.generation of each tab's last results (Explore's set on load and on each run; Evaluate's on its runs)
        explore_gen, evaluate_gen = gr.State(None), gr.State(None)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Explore", id="explore") as explore_tab:
                tab = explore.build(session, explore_gen)
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate_tab.build(session, evaluate_gen, tab, tabs)
            with gr.Tab("Calibrate", id="calibrate"):
                calibrate_tab.build(session)
            with gr.Tab("Learn", id="learn") as learn_tab:
                learn.build(session, tab, tabs, learn_tab)
        api.build(session, demo)
        demo.load(tab.on_load, None, [*tab.plots, tab.shown], api_name=False)
        explore_tab.select(tab.on_select, [tab.analysis, tab.shown], [*tab.plots, tab.shown], api_name=False,
                           queue=False, show_progress="hidden")
        demo.load(lambda: session.generation, None, explore_gen, api_name=False)
        demo.load(lambda: credibility_banner(session), None, credibility, api_name=False)

        def poll(seen_explore, seen_evaluate, request: gr.Request):
            session.files.sweep_now_and_then()
            return (stale_banner(session, seen_explore, seen_evaluate), credibility_banner(session),
                    busy_banner(session, request))

        gr.Timer(STALE_POLL_S).tick(poll, [explore_gen, evaluate_gen], [banner, credibility, busy], queue=False,
                                     api_visibility="private", show_progress="hidden")

        def closed(request: gr.Request):
            """The page closed (or reloaded): end its runs, and drop its files and results now."""
            key = session_key(request)
            session.runs.cancel(key)
            session.files.remove(key)
            forget_session(demo, key)

        demo.unload(closed)
    return demo


def launch_kwargs(host: str = "127.0.0.1", port: int | None = None, max_upload_mb: float = 200.0) -> dict:
    """Safe defaults for `Blocks.launch`: local bind, no share link, an upload cap."""
    from ..data.examples import EXAMPLES_DIR

    # allowed_paths: only the bundled examples (served when a user picks one); uploads live in Gradio's temp dir.
    return dict(server_name=host, server_port=port, share=False, max_file_size=f"{int(max_upload_mb)}mb",
                show_error=True, css=CSS, theme=theme(), allowed_paths=[str(EXAMPLES_DIR)])
