"""Evaluate tab: the same code as `python -m mars_viz eval`, with progress, a results table and the charts."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import gradio as gr

from ..evaluate import SETS, build_items, evaluate, summarise, write_report
from ..plots import eval_conditions_figure, strength_sweep_figure
from ..session import Session
from .common import gr_progress, user_errors

__all__ = ["build"]

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


def build(session: Session, generation: gr.State) -> None:
    """`generation`: the page's `Session.generation` of its last results (see `app.create_app`)."""
    with gr.Row():
        sets = gr.CheckboxGroup(list(SETS), value=list(SETS[:5]), label="Evaluation sets", elem_id="eval_sets")
        limit = gr.Number(value=8, precision=0, label="Prompts per condition", elem_id="eval_limit")
        strengths = gr.Textbox(value="0,0.5,1,2", label="Strength sweep λ", elem_id="eval_strengths")
        max_tokens = gr.Number(value=24, precision=0, label="Max new tokens")
    go = gr.Button("Run evaluation", variant="primary", elem_id="eval_run")
    gr.Markdown("Every prompt runs unsteered, with MARS, MARS without re-centring and the ungated push, in one batch "
                "per chunk. On a CPU the default (5 sets × 8 prompts) takes about 1 min on the tiny demo model and "
                "6-7 min on a 0.5B model; progress is per chunk of prompts.")
    table = gr.Dataframe(headers=COLUMNS, label="Results per condition", elem_id="eval_table", interactive=False,
                         wrap=True)
    gr.Markdown(COLUMN_HELP, elem_id="eval_columns")
    with gr.Row():
        p_cond = gr.Plot(label="Refusal by condition", elem_id="plot_eval_conditions")
        p_sweep = gr.Plot(label="Strength sweep", elem_id="plot_eval_sweep")
    report_file = gr.File(label="Report (JSON, CSV, items, HTML charts)", elem_id="eval_report")

    @user_errors("evaluate")
    def run(sets: list[str], limit: int = 8, strengths: str = "0,0.5,1,2", max_new_tokens: int = 24,
            progress=gr.Progress()):
        try:
            lam = tuple(float(x) for x in str(strengths).split(",") if x.strip())
        except ValueError:
            raise ValueError(f"strengths must be numbers separated by commas, got {strengths!r}") from None
        if not sets:
            raise ValueError("choose at least one evaluation set")
        if any(x < 0 for x in lam):
            raise ValueError("strengths must be >= 0")
        with session.lock:
            state = session.ensure_state(gr_progress(progress))
            gen = session.generation
            chosen = [s for s in sets if not s.startswith("video") or "video" in session.backbone.modalities]
            items = build_items(state, chosen, limit=int(limit))
            rows = evaluate(session.backbone, state, items, lam, int(max_new_tokens),
                            progress=lambda d, n: progress((d, n), desc="Evaluating"))
        report = summarise(rows, lam)
        tmp = Path(tempfile.mkdtemp(prefix="mars_eval_"))
        paths = write_report(report, rows, tmp / "report.json")
        zpath = tmp / "mars_eval_report.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
            for p in paths:
                z.write(p, p.name)
        data = [[cond] + [vals.get(c) for c in COLUMNS[1:]] for cond, vals in report["conditions"].items()]
        return (data, eval_conditions_figure(report["conditions"]), strength_sweep_figure(report["strength_sweep"]),
                str(zpath), gen)

    go.click(run, [sets, limit, strengths, max_tokens], [table, p_cond, p_sweep, report_file, generation],
             api_name="evaluate")
