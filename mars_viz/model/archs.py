"""What mars_viz knows about each architecture: one `ArchSpec` record per `model_type`, in one registry (`ARCHS`).

Every per-architecture fact lives here and nowhere else: where the language model's decoder layers are (and which
of them a text-only forward skips), how a video reaches the model, whether its frame count must be even, how a batch
of images is passed, how a text-only prompt is tokenized when the processor refuses one, whether the prompt is a
bidirectional prefix, which map layout its media tokens follow, where M-RoPE models keep their `rope_deltas`, how its
typographic images are laid out, and whether a tiny fixture tests it. Other modules ask `arch_spec(model_type)`
instead of testing names, so adding an architecture is one record (and, to test it, a builder in `demo_models`).
The README's "Supported models" table is generated from the registry (`markdown_table`; a test checks the two
agree).

Pure data and a lookup: no model code. Facts checked against transformers 5.24.

Example:
    >>> arch_spec("qwen2_vl").layers, arch_spec("qwen2_vl").temporal_patch, arch_spec("qwen2_vl").rope_deltas
    ('model.language_model.layers', 2, ('model',))
    >>> arch_spec("some_new_vlm").known, arch_spec("some_new_vlm").video
    (False, 'frames')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ARCHS", "ArchSpec", "arch_spec", "at_path", "markdown_table"]

VideoMode = Literal["native", "frames", "none"]
MapsFamily = Literal["qwen", "llava", "onevision", "idefics3", "gemma3", "internvl", "pixtral", ""]


@dataclass(frozen=True)
class ArchSpec:
    """The facts about one `model_type` that the rest of mars_viz needs (see the module docstring)."""

    model_type: str
    family: str  # the models' name, as the README lists them
    # dotted path from the loaded model (the *ForConditionalGeneration / *ForCausalLM) to the language model's decoder
    # layers, tried when `get_decoder().layers` is not there ("" = none known: pass --layers-path)
    layers: str
    # the text config's attribute listing decoder layers that a text-only forward skips (Mllama's
    # `cross_attention_layers`: they attend to the image tiles, and run only when there are some). They are left
    # out of `Backbone.layers`, so nothing is read or steered there: Backbone layer i is the i-th decoder layer that
    # is not skipped (`skipped_layers`; with Mllama's [3, 8, 13, ...] layer 3 of the Backbone is decoder layer 4)
    skip_layers: str = ""
    # how a video reaches the model: "native" through the processor's `videos=` (when it has a video processor),
    # "frames" as sampled frames given as images, "none" for a text-only LLM
    video: VideoMode = "frames"
    temporal_patch: int = 1  # sampled frames per video token (Qwen-VL video processors: 2)
    # the frame count must be a multiple of `temporal_patch` (even, for Qwen-VL): `inputs` repeats the last frame
    # (transformers 5.24's Qwen-VL video processors pad the same way themselves; older ones raise on an odd count)
    even_frames: bool = False
    nested_images: bool = False  # the processor wants a batch's images nested per sample: [[img, ...], [img, ...]]
    # the processor refuses a prompt without an image (PaliGemma): a text-only prompt is tokenized directly, as this
    # format of the templated text ({bos}: the tokenizer's BOS, {text}: the prompt) -- what the processor itself
    # makes of a prompt around its images ("" = the processor takes text alone)
    text_format: str = ""
    # the prompt is a bidirectional prefix (PaliGemma's prefix-LM: token_type_ids 0 attend both ways), so a prefill
    # of prompt[:-1] is not the full prompt's prefill: every pair strategy runs as `doubled` (`pair.resolve_strategy`)
    prefix_lm: bool = False
    maps: MapsFamily = ""  # the `maps.layout` family placing its media tokens ("" = in sequence order, flagged)
    # dotted paths (from the loaded model; "" = the model itself) of the modules that keep M-RoPE `rope_deltas`
    # between calls, which a shared prefill must save and restore (transformers 5.24: the inner `model`)
    rope_deltas: tuple[str, ...] = ()
    # the layout of its typographic images (`media.typographic_image(layout=...)`): "rows" for a model that reads
    # each row of merged tokens as a text line (the reading graft), "free" otherwise
    typography: Literal["rows", "free"] = "free"
    tiny: bool = False  # a tiny random fixture (`demo_models.ARCHITECTURES`) runs it in every architecture test
    note: str = ""  # one short line for the README table
    known: bool = True  # False: not in the registry, `arch_spec`'s conservative default

    @property
    def frame_multiple(self) -> int:
        """The frame count a video must be padded to a multiple of (1: any count)."""
        return self.temporal_patch if self.even_frames else 1

    def skipped_layers(self, text_config: Any) -> frozenset[int]:
        """The decoder layer indices a text-only forward skips (`skip_layers`), read off the model's text config."""
        if not self.skip_layers:
            return frozenset()
        return frozenset(int(i) for i in (getattr(text_config, self.skip_layers, None) or ()))


_LM = "model.language_model.layers"  # most VLMs in transformers 5: <Arch>ForConditionalGeneration.model.language_model
_QWEN = dict(layers=_LM, video="native", temporal_patch=2, even_frames=True, rope_deltas=("model",))

_SPECS = [
    ArchSpec("llava", "LLaVA-1.5", _LM, maps="llava", tiny=True,
             note="real 0.5B graft (opt-in `real` tests)"),
    ArchSpec("llava_next", "LLaVA-NeXT", _LM, maps="onevision", tiny=True),
    ArchSpec("llava_next_video", "LLaVA-NeXT-Video", _LM, video="native", maps="onevision", tiny=True),
    ArchSpec("llava_onevision", "LLaVA-OneVision", _LM, video="native", maps="onevision", tiny=True),
    ArchSpec("qwen2_vl", "Qwen2-VL", maps="qwen", tiny=True, note="real 0.5B graft (opt-in `real` tests)", **_QWEN),
    ArchSpec("qwen2_5_vl", "Qwen2.5-VL", maps="qwen", tiny=True, **_QWEN),
    ArchSpec("mars_reader", "mars_viz reading graft (lab)", maps="qwen", typography="rows", tiny=True,
             note="Qwen2-VL with a tower that reads text (typography on token rows); real 0.5B graft", **_QWEN),
    ArchSpec("qwen3_vl", "Qwen3-VL", maps="qwen", tiny=True, **_QWEN),
    ArchSpec("idefics3", "Idefics3", "model.text_model.layers", nested_images=True, maps="idefics3", tiny=True),
    ArchSpec("smolvlm", "SmolVLM", "model.text_model.layers", video="native", nested_images=True, maps="idefics3",
             tiny=True, note=("a video is frames of image tokens; batch image and video queries apart (the "
                              "processor keeps only the video's pixels)")),
    ArchSpec("gemma3", "Gemma 3", _LM, nested_images=True, maps="gemma3", tiny=True),
    ArchSpec("mistral3", "Mistral 3", _LM, nested_images=True, maps="pixtral", tiny=True),
    ArchSpec("internvl", "InternVL", _LM, video="native", maps="internvl", tiny=True,
             note="a video is frames of image tokens"),
    ArchSpec("paligemma", "PaliGemma", _LM, text_format="{bos}{text}\n", prefix_lm=True, maps="llava", tiny=True),
    ArchSpec("mllama", "Llama 3.2 Vision", _LM, skip_layers="cross_attention_layers", nested_images=True, tiny=True,
             note="images enter through cross-attention layers; one image token per image in the prompt"),
    ArchSpec("qwen2", "Qwen2 (chat LLM)", "model.layers", video="none",
             note="loads through `AutoModelForCausalLM`; a tiny one is loaded in `test_backbone`"),
    ArchSpec("llama", "Llama (chat LLM)", "model.layers", video="none", note="loads through `AutoModelForCausalLM`"),
]

ARCHS: dict[str, ArchSpec] = {s.model_type: s for s in _SPECS}


def arch_spec(model_type: str) -> ArchSpec:
    """The registry's record for `model_type`, or a conservative one for a type it does not know: decoder layers
    only through `get_decoder()` (else --layers-path), video as frames, flat image batches, no frame padding, maps in
    sequence order, no M-RoPE state to keep, "free" typography."""
    spec = ARCHS.get(model_type)
    if spec is not None:
        return spec
    return ArchSpec(model_type, model_type or "unknown", "", known=False,
                    note="not in the registry: generic defaults (pass --layers-path if the layers are not found)")


def at_path(root: Any, dotted: str) -> Any:
    """`root.a.b.0.c` for `dotted` "a.b.0.c" (integers index a list); "" is `root` itself. Raises AttributeError
    or IndexError when a step is missing."""
    obj = root
    for part in dotted.split(".") if dotted else ():
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


_VIDEO_TEXT = {"native": "native", "frames": "frames as images", "none": "none (text only)"}


def markdown_table(specs: dict[str, ArchSpec] | None = None) -> str:
    """The README's "Supported models" table, one row per registered `model_type`.

    Regenerate after editing the registry: `python -m mars_viz.model.archs`, and paste between the README's
    `ARCHS:BEGIN` / `ARCHS:END` markers (`tests/unit/test_archs.py` fails while they differ)."""
    rows = ["| `model_type` | family | decoder layers | video | maps | tested | note |",
            "|---|---|---|---|---|---|---|"]
    for s in (specs or ARCHS).values():
        notes = [s.note] if s.note else []
        if s.skip_layers:
            notes.append(f"its `{s.skip_layers}` are left out of the steered layers (a text-only forward skips them)")
        if s.text_format:
            notes.append("the processor needs an image: a text-only prompt is tokenized as it would be")
        if s.prefix_lm:
            notes.append("prefix-LM (bidirectional prompt): every pair strategy runs as `doubled`")
        video = _VIDEO_TEXT[s.video]
        if s.frame_multiple > 1:
            video += f" ({s.temporal_patch} frames per token; even count)"
        maps = f"`{s.maps}`" if s.maps else "sequence order" if s.video != "none" else "—"
        rows.append(f"| `{s.model_type}` | {s.family} | `{s.layers}` | {video} | {maps} | "
                    f"{'tiny fixture' if s.tiny else 'not tested'} | {'; '.join(notes)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
