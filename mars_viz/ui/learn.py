"""Learn tab: a short guided walkthrough of MARS on the bundled examples, for teaching."""

from __future__ import annotations

import gradio as gr

from ..data.examples import EXAMPLES
from ..model.archs import arch_spec
from .common import session_key, showcase_to_explore, user_errors
from .evaluate_tab import SCROLL_TO_RUN, showcase_summary
from .explore import ExploreTab
from .session import Session

__all__ = ["build"]

INTRO = """
### MARS in four steps

1. **A refusal direction from text alone.** Harmful and harmless *text* instructions give two centroids in the
   residual stream at layer *l*: μ₊ (unsafe) and μ₋ (safe). r = μ₊ − μ₋ points toward "refuse".
2. **Re-centre the modality offset.** Images and videos shift every activation by roughly the same vector δ (often
   toward "refuse", so benign pictures get refused). δ is measured with *neutral* inputs — random solid-colour
   images or videos with safe prompts — and subtracted before judging: h̃ = h − δ.
3. **Score, gate, push inside the trust region.** s = ⟨h̃ − μ₋, r̂⟩ / ‖r‖ is 0 at the safe centroid and 1 at the
   unsafe one. Only when s > τ does the ReLU gate open; the input is then moved along r to the target level t*
   (where the model refuses), never beyond: h′ = h + λ · w · ReLU(t* − s) · r, with w = clip((s − τ)/m, 0, 1).
   With s ≤ τ the displacement is exactly zero, so benign inputs give bit-identical answers.
4. **Two layers, act once.** The layer that *detects* best need not be the one that *steers* best. The gate reads
   its score where held-out harmful prompts are caught with the fewest false alarms on harmless ones and on
   look-alikes (often one of the last layers, and at one of two prompt positions: see below); the push goes where
   moving along r changes the answer most (steerability × consistency), among layers where r already separates
   well. When the gate's layer comes after the push layer, the prompt is run once unsteered to read the gate
   first. Either way the edit touches only the last prompt position during prefill, i.e. the first generated token.

Pick an example below: it is loaded into **Explore**; press **Run** there and read the plots in this order:
*Trust region* (where the input lands), *Harmfulness × refusal* (what the model judges and what it does),
*Modality offset* (what re-centring removed), *Centroids*, *Layer scores*.
"""

POSITIONS = """
### Two places to read: harmfulness at t_inst, refusal at t_post

A chat prompt ends with the user's text, then the template's closing tokens. Two positions matter
(Zhao et al. 2025, *LLMs Encode Harmfulness and Refusal Separately*):

- **t_inst**, the last token of the user's text, encodes **whether the request is harmful**;
- **t_post**, the prompt's last position, encodes **whether the model will refuse**: the decision itself.

The two can disagree: a jailbreak is often still judged harmful at t_inst, yet answered at t_post. MARS fits an axis at
both positions and its gate reads at the one chosen at fit time by measurement: on held-out prompts, detection of
harmful requests against false positives on harmless ones and on harmless *look-alikes* (requests that merely sound
dangerous). The push always stays at t_post, where the refusal is decided. In **Explore**, *Gate reads at* overrides
the choice for one run; the verdict says where the gate read.

**Reading the Harmfulness × refusal plane** (Explore): x is the harmfulness score at t_inst, y the refusal score at
t_post; the dashed lines are the two thresholds, and they cut the plane into four quadrants:

| | harmless (left) | harmful (right) |
|---|---|---|
| **refused** (top) | refused · harmless: over-refusal | refused · harmful: what safety wants |
| **answered** (bottom) | answered · harmless: what helpfulness wants | answered · harmful: jailbreaks sit here |

MARS only ever moves a point **up** (toward refusal), and only when its gate opens; a closed gate leaves the point,
and the answer, exactly as they were (with the gate at t_inst: only points right of the x threshold can move). The
input is drawn raw → re-centred → steered; the push at t_post never changes t_inst, so its last step is straight up.
"""


NO_SHOWCASE = ("### Where MARS changed this model's answer\n"
               "*No evaluation of this model yet.* Run one in the **Evaluate** tab (a few prompts per condition is "
               "enough): the inputs where MARS changed **this model's** answer then appear here, the best demo of the "
               "method, drawn from the model's real behaviour rather than from bundled examples.")


def reading_graft_note(model_type: str, built: list[str]) -> str:
    """A pointer to the reading graft: the one model here on which typography carries meaning (empty when it is
    the loaded model, or none is built). The reading graft is the model type whose registry record reads typography
    on token rows (`archs.ArchSpec.typography`)."""
    if arch_spec(model_type).typography == "rows":
        return ("**This is the reading graft** (a lab MLLM whose tower reads text). Its typographic examples below "
                "(*on token rows*) carry the request into the LLM: the text-only refusal direction scores them.")
    if not built:
        return ""
    return (f"**A reading graft is built on this machine** (`{built[-1]}`): a lab MLLM whose vision tower reads "
            "text. Load it in **Calibrate** (it is the first preset) to see a text-only refusal direction score "
            "typographic images; this model's vision tower does not read.")


def _showcase_view(session: Session):
    """The walkthrough's first section: this model's own showcase (Evaluate's last run), harmful answered -> refused
    first, or a pointer to Evaluate when there is none."""
    entries = session.showcase
    if not entries:
        return gr.update(value=NO_SHOWCASE), gr.update(choices=[], value=None), gr.update(interactive=False)
    flipped = sum(e.category == "mars_refused" for e in entries)
    heading, summary = showcase_summary(entries)  # the heading names what is listed; the text says why, from numbers
    text = (f"### {heading}\nFrom this model's last evaluation: **{flipped}** harmful input(s) it answered and MARS "
            "turned into a refusal, listed first. Load one and compare the two answers; then read the *Trust region* "
            "plot: the gate opened, and the push stopped at t*." if flipped else
            f"### {heading}\nThis model's last evaluation: {summary}")
    labels = [e.label() for e in entries]
    return gr.update(value=text), gr.update(choices=labels, value=labels[0]), gr.update(interactive=True)


def build(session: Session, explore: ExploreTab, tabs: gr.Tabs, tab: gr.Tab | None = None) -> None:
    """`tabs`: the app's tab container; a Load button switches it to Explore with the example in place. `tab`: the
    Learn tab itself; selecting it refreshes the showcase section from the session."""
    gr.Markdown(INTRO)
    gr.Markdown(POSITIONS, elem_id="learn_positions")
    from ..model.reader import built_grafts

    gr.Markdown(reading_graft_note(session.backbone.model_type, built_grafts()), elem_id="learn_reading_graft")
    note = gr.Markdown(NO_SHOWCASE, elem_id="learn_showcase_note")  # its own heading: what the showcase lists
    with gr.Row():
        pick = gr.Dropdown([], label="Showcase item", elem_id="learn_showcase_pick", scale=4)
        load = gr.Button("Load in Explore and run", elem_id="learn_showcase_load", scale=1, interactive=False)
    if tab is not None:
        tab.select(lambda: _showcase_view(session), None, [note, pick, load], api_name=False)
    @user_errors("learn_showcase")
    def load_item(label: str | None, request: gr.Request = None):
        return showcase_to_explore(label, session.showcase, session.files.folder(session_key(request)))

    loaded = load.click(load_item,
                        pick, [explore.prompt, explore.image, explore.video, tabs], api_name=False)
    loaded.success(None, None, None, js=SCROLL_TO_RUN, api_name=False)  # Run in view, not the Learn scroll position
    loaded.success(explore.run, explore.run_inputs, explore.run_outputs, api_name=False)
    gr.Markdown("### Bundled examples")
    for e in EXAMPLES:
        with gr.Row():
            btn = gr.Button(f"Load: {e.name}", scale=1, elem_id=f"learn_{EXAMPLES.index(e)}")
            gr.Markdown(f"*{e.kind}* — {e.lesson or e.prompt}")

        def load(name: str = e.name):
            gr.Info(f"Loaded “{name}” into Explore: press Run there.")
            return name, gr.Tabs(selected="explore")

        btn.click(load, None, [explore.example, tabs], api_name=False).then(None, None, None, js=SCROLL_TO_RUN,
                                                                            api_name=False)
