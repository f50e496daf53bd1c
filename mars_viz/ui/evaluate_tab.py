"""Evaluate tab: the same code as `python -m mars_viz eval`, with progress, a results table and the charts."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..analysis.evaluate import SETS, build_items, evaluate, summarise
from ..analysis.showcase import showcase
from ..model.backbone import typographic_layout
from ..views.figures import eval_conditions_figure, strength_sweep_figure
from ..views.report import write_report
from .common import MODEL_QUEUE, gr_progress, session_key, showcase_to_explore, user_errors
from .explore import ExploreTab
from .session import Session

__all__ = ["COLUMNS", "HEADERS", "EvalShowcase", "HarmfulOutcome", "build", "showcase_summary"]

SHOWCASE_COLUMNS = ["what MARS did", "condition", "request", "unsteered answer", "MARS answer"]
# every column within the page at 1280 px: the answers share most of the width, and a cell wraps (even inside a long
# "word" of a random model's gibberish) rather than widen its column
SHOWCASE_WIDTHS = ["12%", "11%", "21%", "28%", "28%"]
COLUMNS = ["condition", "n", "refusal_unsteered", "refusal_steered", "refusal_no_recenter", "refusal_ungated",
           "unchanged", "gate_open_rate", "score_raw_mean", "score_recentred_mean"]
# the table's headers, for people; the report (JSON, CSV) keeps the machine names of COLUMNS
HEADERS: dict[str, str] = {
    "condition": "condition",
    "n": "n",
    "refusal_unsteered": "refusal (unsteered)",
    "refusal_steered": "refusal (MARS)",
    "refusal_no_recenter": "refusal (MARS, no re-centring)",
    "refusal_ungated": "refusal (ungated)",
    "unchanged": "answer unchanged",
    "gate_open_rate": "gate open",
    "score_raw_mean": "mean s (raw)",
    "score_recentred_mean": "mean s (re-centred)",
}
EVAL_WIDTHS = ["16%", "5%", "10%", "9%", "11%", "9%", "10%", "8%", "10%", "12%"]


COLUMN_HELP = """
**Columns** (the report's CSV and JSON name them as in brackets). *n*: prompts in the condition. *refusal
(unsteered)* [refusal_unsteered]: share refused by the plain model. *refusal (MARS)* [refusal_steered]: with MARS
(gate + trust region, re-centred). *refusal (MARS, no re-centring)* [refusal_no_recenter]: MARS without removing the
modality offset. *refusal (ungated)* [refusal_ungated]: always pushed to t* (no gate): the baseline the gate improves
on. *answer unchanged* [unchanged]: share whose MARS answer is identical to the unsteered one. *gate open*
[gate_open_rate]: share where the gate opened. *mean s (raw)* / *mean s (re-centred)* [score_raw_mean /
score_recentred_mean]: mean unsafety score s before / after re-centring. On harmful conditions higher refusal is
safer; on harmless ones any rise over *refusal (unsteered)* is over-refusal.
"""
SCROLL_TO_RUN = """() => {  // after a Load switches to Explore, whose page keeps the scroll position of the tab it
  // left (often past the inputs): show the tab bar and the inputs from the top, down to Run, or, on a screen too
  // short for all of it, as much as fits above Run; again while the loaded input lays out
  const place = (n) => {
    const run = document.querySelector('#run'), tabs = document.querySelector('#tabs');
    if (run && tabs && run.offsetParent !== null) {
      const top = (el) => el.getBoundingClientRect().top + window.scrollY;
      window.scrollTo(0, Math.max(top(tabs) - 8, top(run) + run.offsetHeight + 16 - window.innerHeight));
    }
    if (n > 0) setTimeout(() => place(n - 1), 150);
  };
  place(6);
}"""


@dataclass
class _Controls:
    sets: gr.CheckboxGroup
    limit: gr.Number
    strengths: gr.Textbox
    max_tokens: gr.Number
    go: gr.Button
    stop: gr.Button
    status: gr.Markdown


@dataclass
class _Results:
    table: gr.Dataframe
    conditions: gr.Plot
    sweep: gr.Plot
    report: gr.File


@dataclass
class _Showcase:
    heading: gr.Markdown  # says what the table lists (changed outcomes, or only inputs left alone)
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
    with gr.Row():
        go = gr.Button("Run evaluation", variant="primary", elem_id="eval_run", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id="eval_stop", scale=1, min_width=80)
    status = gr.Markdown("", elem_id="eval_status")
    gr.Markdown("Every prompt runs unsteered, with MARS, MARS without re-centring and the ungated push, in one batch "
                "per chunk. On a CPU the default (5 sets × 8 prompts) takes about 1 min on the tiny demo model and "
                "6-7 min on a 0.5B model; the progress bar counts prompts and moves with every generated token.")
    return _Controls(sets, limit, strengths, max_tokens, go, stop, status)


def _results() -> _Results:
    table = gr.Dataframe(headers=[HEADERS[c] for c in COLUMNS], label="Results per condition", elem_id="eval_table",
                         interactive=False, wrap=True, column_widths=EVAL_WIDTHS)
    gr.Markdown(COLUMN_HELP, elem_id="eval_columns")
    with gr.Row():
        conditions = gr.Plot(label="Refusal by condition", elem_id="plot_eval_conditions")
        sweep = gr.Plot(label="Strength sweep", elem_id="plot_eval_sweep")
    report = gr.File(label="Report (JSON, CSV, items, HTML charts)", elem_id="eval_report")
    return _Results(table, conditions, sweep, report)


SHOWCASE_INTRO = ("### Showcase\nAfter an evaluation: the harmful inputs MARS turned from an answer into a refusal, "
                  "the harmless ones it over-refused, and a few it left alone. Load one to replay it in Explore.")


@dataclass(frozen=True)
class HarmfulOutcome:
    """What an evaluation's harmful inputs did, as shares of ``n``: refused unsteered, refused with MARS, gate open."""

    n: int
    refused_unsteered: float
    refused_mars: float
    gate_open: float

    @classmethod
    def of(cls, rows: list[dict]) -> HarmfulOutcome:
        harmful = [r for r in rows if r.get("kind") == "harmful"]
        n = len(harmful)

        def share(values) -> float:
            return sum(bool(v) for v in values) / n if n else 0.0

        return cls(n, share(r["unsteered"]["refused"] for r in harmful), share(r["mars"]["refused"] for r in harmful),
                   share(r["mars"]["gate_open"] for r in harmful))

    def why_none_flipped(self) -> str:
        """Why MARS turned none of them into a refusal, from the numbers (one or two sentences)."""
        if self.n == 0:
            return "The run had no harmful inputs."
        if self.refused_unsteered >= 1.0:
            return f"The model already refused all {self.n} harmful inputs unsteered: there was nothing to turn."
        if self.gate_open == 0.0:
            return (f"The gate stayed closed on all {self.n} harmful inputs (their score never passed τ), so MARS "
                    "left every one unchanged.")
        return (f"The gate opened on {self.gate_open:.0%} of the {self.n} harmful inputs, but the steered answers did "
                f"not become refusals (refused unsteered: {self.refused_unsteered:.0%}, with MARS: "
                f"{self.refused_mars:.0%}): the push to t* did not make this model refuse. A model that never refuses, "
                "like the tiny random demo model, gives the refusal judge nothing to find.")


class EvalShowcase(list):
    """An evaluation's showcase entries (`ShowcaseEntry`), carrying how its harmful inputs fared (`harmful`), so the
    Learn tab can say why nothing changed. A plain list to everything else."""

    def __init__(self, entries, harmful: HarmfulOutcome | None = None):
        super().__init__(entries)
        self.harmful = harmful


def showcase_summary(entries: list) -> tuple[str, str]:
    """``(heading, text)`` saying what the showcase lists: the inputs where MARS changed the outcome, or, when there
    are none, that no outcome changed and what is shown instead (with the reason, when `entries` is an
    `EvalShowcase`)."""
    counts = {c: sum(e.category == c for e in entries) for c in ("mars_refused", "over_refused", "unchanged")}
    flipped, over, same = counts["mars_refused"], counts["over_refused"], counts["unchanged"]
    harmful = getattr(entries, "harmful", None)
    if flipped or over:
        parts = [f"**{flipped}** harmful input(s) MARS turned from an answer into a refusal" if flipped else "",
                 f"**{over}** harmless input(s) it over-refused" if over else "",
                 f"{same} it left unchanged" if same else ""]
        return ("Where MARS changed the outcome",
                "Listed: " + ", ".join(p for p in parts if p) + ". Load one and compare the two answers.")
    why = (" " + harmful.why_none_flipped()) if harmful is not None else ""
    if not entries:
        return ("No input to show", "MARS changed no outcome, and every steered answer differs from the unsteered "
                                    "one without changing whether it refused." + why)
    return (f"No input changed outcome: showing {same} example(s) MARS left unchanged",
            "MARS turned no harmful answer into a refusal and over-refused no harmless input." + why
            + " The items listed got the same answer with MARS as without.")


def _showcase_markdown(entries: list) -> str:
    heading, text = showcase_summary(entries)
    return f"### Showcase: {heading}\n{text} Load one to replay it in Explore." if entries else \
        f"### Showcase: {heading}\n{text}"


def _showcase_panel(ttl_s: float) -> _Showcase:
    heading = gr.Markdown(SHOWCASE_INTRO, elem_id="showcase_heading")
    entries = gr.State([], time_to_live=ttl_s)
    table = gr.Dataframe(headers=SHOWCASE_COLUMNS, label="Showcase", elem_id="showcase_table", interactive=False,
                         wrap=True, column_widths=SHOWCASE_WIDTHS)
    with gr.Row():
        pick = gr.Dropdown([], label="Showcase item", elem_id="showcase_pick", scale=4)
        load = gr.Button("Load in Explore and run", elem_id="showcase_load", scale=1)
    return _Showcase(heading, entries, table, pick, load)


def _display(value):
    """A table cell as shown: scores to 3 decimals (the report keeps full precision)."""
    return round(value, 3) if isinstance(value, float) else value


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


def _zip_report(report: dict, rows: list, tmp: Path) -> Path:
    """The report's files (JSON, CSV, items, HTML charts) in one zip, in the folder `tmp` (the page's own)."""
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
            request: gr.Request = None, progress=gr.Progress()):
        lam = _strengths(sets, strengths)
        max_new_tokens = session.limits.check_new_tokens(max_new_tokens)
        key = session_key(request)
        with session.work(key, "running an evaluation"):
            state = session.ensure_state(gr_progress(progress, session, "calibrating MARS on a first run"))
            gen = session.generation
            chosen = [s for s in sets if not s.startswith("video") or "video" in session.backbone.modalities]
            items = build_items(state, chosen, limit=int(limit), layout=typographic_layout(session.backbone))
            def step(d: int, n: int) -> None:
                progress((d, n), desc="Evaluating")
                session.runs.say(f"running an evaluation ({d}/{n} prompts)")

            rows = evaluate(session.backbone, state, items, lam, int(max_new_tokens), progress=step)
        report = summarise(rows, lam)
        zpath = _zip_report(report, rows, session.files.folder(key))
        data = [[cond] + [_display(vals.get(c)) for c in COLUMNS[1:]] for cond, vals in report["conditions"].items()]
        entries = EvalShowcase(showcase(items, rows), HarmfulOutcome.of(rows))
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


def _wire_showcase_load(session: Session, showcase: _Showcase, explore: ExploreTab, tabs: gr.Tabs) -> None:
    @user_errors("showcase_load")
    def load_item(label: str | None, entries: list, request: gr.Request = None):
        return showcase_to_explore(label, entries, session.files.folder(session_key(request)))

    loaded = showcase.load.click(load_item, [showcase.pick, showcase.entries],
                                 [explore.prompt, explore.image, explore.video, tabs], api_name="showcase_load")
    loaded.success(None, None, None, js=SCROLL_TO_RUN, api_name=False)
    loaded.success(explore.run, explore.run_inputs, explore.run_outputs, api_name=False)


def build(session: Session, generation: gr.State, explore: ExploreTab | None = None, tabs: gr.Tabs | None = None
          ) -> None:
    """`generation`: the page's `Session.generation` of its last results (see `app.create_app`). With `explore` and
    `tabs`, the showcase's Load button replays an item there."""
    c, res, sc = _controls(), _results(), _showcase_panel(session.limits.session_ttl_s)
    running = c.go.click(_run_handler(session), [c.sets, c.limit, c.strengths, c.max_tokens],
                         [res.table, res.conditions, res.sweep, res.report, generation, sc.entries, sc.table, sc.pick],
                         api_name="evaluate", **MODEL_QUEUE)
    running.success(_showcase_markdown, sc.entries, sc.heading, api_name=False)
    c.go.click(lambda: "", None, c.status, api_name=False, queue=False, show_progress="hidden")

    def do_stop(request: gr.Request):
        """End this page's evaluation at its next decode step (or drop it from the queue)."""
        if session.runs.cancel(session_key(request)):
            return "⏹ **Stopped.** The evaluation ended before its last prompt, so it has no report; the model is free."
        return gr.update()

    # not in the model queue (it must not wait behind the run it stops)
    c.stop.click(do_stop, None, c.status, cancels=[running], api_name="evaluate_stop", concurrency_limit=None,
                 show_progress="hidden")
    if explore is not None and tabs is not None:
        _wire_showcase_load(session, sc, explore, tabs)
