"""Learn tab: a short guided walkthrough of MARS on the bundled examples, for teaching."""

from __future__ import annotations

import gradio as gr

from ..examples import EXAMPLES
from .explore import ExploreTab

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
   its score at the layer where held-out harmful and harmless text separate best (often one of the last layers,
   where the model has already decided); the push goes where moving along r changes the answer most (steerability
   × consistency), among layers where r already separates well. When the gate's layer comes after the push layer,
   the last prompt position is run once unsteered to read the gate first. Either way the edit touches only the last
   prompt position during prefill, i.e. the first generated token.

Pick an example below: it is loaded into **Explore**; press **Run** there and read the plots in this order:
*Trust region* (where the input lands), *Modality offset* (what re-centring removed), *Centroids*, *Layer scores*.
"""


def build(explore: ExploreTab, tabs: gr.Tabs) -> None:
    """`tabs`: the app's tab container; a Load button switches it to Explore with the example in place."""
    gr.Markdown(INTRO)
    for e in EXAMPLES:
        with gr.Row():
            btn = gr.Button(f"Load: {e.name}", scale=1, elem_id=f"learn_{EXAMPLES.index(e)}")
            gr.Markdown(f"*{e.kind}* — {e.lesson or e.prompt}")

        def load(name: str = e.name):
            gr.Info(f"Loaded “{name}” into Explore: press Run there.")
            return name, gr.Tabs(selected="explore")

        btn.click(load, None, [explore.example, tabs], api_name=False)
