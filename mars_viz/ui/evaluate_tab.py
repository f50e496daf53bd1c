"""Evaluate tab: the same code as `python -m mars_viz eval`, with progress, a results table and the charts."""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..analysis.evaluate import SETS, build_items, evaluate, summarise
from ..analysis.showcase import showcase
from ..model.backbone import typographic_layout
from ..views.figures import eval_conditions_figure, strength_sweep_figure
from ..views.report import write_report
from .common import gr_progress, showcase_to_explore, user_errors
from .explore import ExploreTab
from .session import Session

__all__ = ["build"]

SHOWCASE_COLUMNS = ["what MARS did", "condition", "request", "unsteered answer", "MARS answer"]
COLUMNS = ["condition", "n", "refusal_unsteered", "refusal_steered", "refusal_no_recenter", "refusal_ungated",
           "unchanged", "gate_open_rate", "score_raw_mean", "score_recentred_mean"]


COLUMN_HELP = """
**Columns.** *n*: prompts in the condition. *refusal_unsteered*: share refused by the plain model.
*refusal_steered*: with MARS (gate + trust region, re-centred). *refusal_no_recenter*: MARS without removing the
modality offset. *refusal_ungated*: always pushed to t* (no gate): the baseline the gate improves on.
*unchanged*: share whose MARS answer is identical to the unsteered one. *gate_open_rate*: share where the gate
opened. *score_raw_mean* / *score_recentred_mean*: mean unsafety score s before / after re-centring. On harmful
conditions higher refusal is safer; on harmless ones any rise over *refusal_unsteered* is over-refusal.
"""


@dataclass
class _Controls:
    sets: gr.CheckboxGroup
    limit: gr.Number
    strengths: gr.Textbox
    max_tokens: gr.Number
    go: gr.Button


@dataclass
class _Results:
    table: gr.Dataframe
    conditions: gr.Plot
    sweep: gr.Plot
    report: gr.File


@dataclass
class _Showcase:
    entries: gr.State  # the ShowcaseEntry list behind the table
    table: gr.Dataframe
    pick: gr.Dropdown
    load: gr.Button


def _controls() -> _Controls:
    with gr.Row():
        sets = gr.CheckboxGroup(list(SETS), value=list(SETS[:5]), label="Evaluation sets", elem_id="eval_sets")
        limit = gr.Number(value=8, precision=0, label="Prompts per condition", elem_id="eval_limit")
        strengths = gr.Textbox(value="0,0.5,1,2", label="Strength sweep λ", elem_id="eval_strengths")
        max_tokens = gr.Number(value=24, precision=0, label="Max new tokens")
    go = gr.Button("Run evaluation", variant="primary", elem_id="eval_run")
    gr.Markdown("Every prompt runs unsteered, with MARS, MARS without re-centring and the ungated push, in one batch "
                "per chunk. On a CPU the default (5 sets × 8 prompts) takes about 1 min on the tiny demo model and "
                "6-7 min on a 0.5B model; the progress bar counts prompts and moves with every generated token.")
    return _Controls(sets, limit, strengths, max_tokens, go)


def _results() -> _Results:
    table = gr.Dataframe(headers=COLUMNS, label="Results per condition", elem_id="eval_table", interactive=False,
                         wrap=True)
    gr.Markdown(COLUMN_HELP, elem_id="eval_columns")
    with gr.Row():
        conditions = gr.Plot(label="Refusal by condition", elem_id="plot_eval_conditions")
        sweep = gr.Plot(label="Strength sweep", elem_id="plot_eval_sweep")
    report = gr.File(label="Report (JSON, CSV, items, HTML charts)", elem_id="eval_report")
    return _Results(table, conditions, sweep, report)


def _showcase_panel() -> _Showcase:
    gr.Markdown("### Showcase: where MARS changed the outcome\nHarmful inputs MARS turned from an answer into a "
                "refusal, harmless ones it over-refused, and a few it left alone, from the run above. Load one to "
                "replay it in Explore.")
    entries = gr.State([])
    table = gr.Dataframe(headers=SHOWCASE_COLUMNS, label="Showcase", elem_id="showcase_table", interactive=False,
                         wrap=True)
    with gr.Row():
        pick = gr.Dropdown([], label="Showcase item", elem_id="showcase_pick", scale=4)
        load = gr.Button("Load in Explore and run", elem_id="showcase_load", scale=1)
    return _Showcase(entries, table, pick, load)


def _strengths(sets: list[str], strengths: str) -> tuple[float, ...]:
    """The strength sweep λ from its text, once the run's inputs are checked (ValueError says what to fix)."""
    try:
        lam = tuple(float(x) for x in str(strengths).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"strengths must be numbers separated by commas, got {strengths!r}") from None
    if not sets:
        raise ValueError("choose at least one evaluation set")
    if any(x < 0 for x in lam):
        raise ValueError("strengths must be >= 0")
    return lam


def _zip_report(report: dict, rows: list) -> Path:
    """The report's files (JSON, CSV, items, HTML charts) in one zip, in a fresh temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="mars_eval_"))
    paths = write_report(report, rows, tmp / "report.json")
    zpath = tmp / "mars_eval_report.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, p.name)
    return zpath


def _run_handler(session: Session):
    """The `/evaluate` handler: the table, both charts, the report zip, the page's generation and the showcase."""

    @user_errors("evaluate")
    def run(sets: list[str], limit: int = 8, strengths: str = "0,0.5,1,2", max_new_tokens: int = 24,
            progress=gr.Progress()):
        lam = _strengths(sets, strengths)
        with session.lock:
            state = session.ensure_state(gr_progress(progress))
            gen = session.generation
            chosen = [s for s in sets if not s.startswith("video") or "video" in session.backbone.modalities]
            items = build_items(state, chosen, limit=int(limit), layout=typographic_layout(session.backbone))
            rows = evaluate(session.backbone, state, items, lam, int(max_new_tokens),
                            progress=lambda d, n: progress((d, n), desc="Evaluating"))
        report = summarise(rows, lam)
        zpath = _zip_report(report, rows)
        data = [[cond] + [vals.get(c) for c in COLUMNS[1:]] for cond, vals in report["conditions"].items()]
        entries = showcase(items, rows)
        with session.lock:
            if session.generation == gen:  # the Learn tab's walkthrough draws on this model's own behaviour
                session.showcase = entries
        labels = [e.label() for e in entries]
        if not any(e.category == "mars_refused" for e in entries):
            gr.Info("MARS changed no harmful answer into a refusal in this run: try more prompts per condition.")
        return (data, eval_conditions_figure(report["conditions"]), strength_sweep_figure(report["strength_sweep"]),
                str(zpath), gen, entries, [e.row() for e in entries],
                gr.update(choices=labels, value=labels[0] if labels else None))

    return run


def _wire_showcase_load(showcase: _Showcase, explore: ExploreTab, tabs: gr.Tabs) -> None:
    @user_errors("showcase_load")
    def load_item(label: str | None, entries: list):
        return showcase_to_explore(label, entries)

    showcase.load.click(load_item, [showcase.pick, showcase.entries],
                        [explore.prompt, explore.image, explore.video, tabs], api_name="showcase_load").success(
        explore.run, explore.run_inputs, explore.run_outputs, api_name=False)


def build(session: Session, generation: gr.State, explore: ExploreTab | None = None, tabs: gr.Tabs | None = None
          ) -> None:
    """`generation`: the page's `Session.generation` of its last results (see `app.create_app`). With `explore` and
    `tabs`, the showcase's Load button replays an item there."""
    c, res, sc = _controls(), _results(), _showcase_panel()
    c.go.click(_run_handler(session), [c.sets, c.limit, c.strengths, c.max_tokens],
               [res.table, res.conditions, res.sweep, res.report, generation, sc.entries, sc.table, sc.pick],
               api_name="evaluate")
    if explore is not None and tabs is not None:
        _wire_showcase_load(sc, explore, tabs)
