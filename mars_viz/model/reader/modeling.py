"""`mars_reader`: a Qwen2-VL-style MLLM whose vision tower is a frozen text recognizer plus a trained projector.

LLaVA's recipe at a CPU's scale: a pretrained encoder (EasyOCR's English CRNN, `recognizer.Recognizer`) is kept
frozen, and only a small projector maps its features into the LLM's input-embedding space. Everything else is
Qwen2-VL's: the processor (14-px patches, 2x2 merge, temporal pairs), the chat template, the M-RoPE grid and the
language model. So one visual token per merged 28x28 cell comes out, in the same raster order, and every part of
mars_viz that knows Qwen2-VL (maps, pair strategies, video) works unchanged.

How the tower reads: the processor's patches are put back into frames, each row of merged cells (a 28-px band) is
a text line, resized to the recognizer's 64-px height (so every cell is 64 px wide there and owns 16 recognizer
steps), and each cell gets its 16 steps' BiLSTM features and character probabilities, pooled to 4 sub-steps.
The projector mixes neighbouring cells of the row (a word that starts late in a cell is mostly in the next one) and
writes one LLM-space vector per cell. A video's temporal pair of frames is read as one line, its two frames side by
side (two frames per cell), so a word-per-frame clip reads in order.

Registered with the Auto classes on `import mars_viz` (`register()`), so `AutoModelForImageTextToText` and
`load_backbone` load a saved folder without `trust_remote_code`; `save_pretrained` writes the recognizer's weights
too, so a folder stands alone.

Example (random weights):
    >>> import torch
    >>> from mars_viz.model.reader.modeling import MarsReaderVisionConfig, ReaderVisionModel
    >>> tower = ReaderVisionModel(MarsReaderVisionConfig(hidden_size=32)).eval()
    >>> grid = torch.tensor([[1, 2, 8]])                 # one 28 x 112 image: 1 row of 4 merged cells
    >>> out = tower(torch.zeros(16, 3 * 2 * 14 * 14), grid_thw=grid)
    >>> tuple(out.pooler_output.shape)
    (4, 32)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, Qwen2VLConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
    Qwen2VLTextModel,
)

from .recognizer import CHARACTERS, HEIGHT, Recognizer

__all__ = [
    "MODEL_TYPE",
    "MarsReaderConfig",
    "MarsReaderForConditionalGeneration",
    "MarsReaderModel",
    "MarsReaderVisionConfig",
    "ReaderVisionModel",
    "cell_features",
    "cell_features_many",
    "patches_to_frames",
    "register",
    "spell_codes",
]

MODEL_TYPE = "mars_reader"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's image normalisation (OpenAI CLIP's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MarsReaderVisionConfig(PreTrainedConfig):
    """The reading tower: Qwen2-VL's patch grid, EasyOCR's recognizer sizes, the projector's size."""

    model_type = "mars_reader_vision"
    base_config_key = "vision_config"

    def __init__(self, hidden_size: int = 896, patch_size: int = 14, spatial_merge_size: int = 2,
                 temporal_patch_size: int = 2, in_channels: int = 3, image_mean: list | tuple = CLIP_MEAN,
                 image_std: list | tuple = CLIP_STD, recognizer_channels: int = 256, recognizer_hidden: int = 256,
                 recognizer_classes: int = len(CHARACTERS) + 1, sub_steps: int = 4, proj_dim: int = 256,
                 proj_layers: int = 2, proj_kernel: int = 3, read_token_ids: list | tuple = (),
                 initializer_range: float = 0.02, **kwargs) -> None:
        self.hidden_size = hidden_size  # the LLM's width: the projector's output
        self.out_hidden_size = hidden_size
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        self.in_channels = in_channels
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.recognizer_channels = recognizer_channels
        self.recognizer_hidden = recognizer_hidden
        self.recognizer_classes = recognizer_classes
        self.sub_steps = sub_steps  # recognizer steps per cell are pooled to this many
        self.proj_dim = proj_dim
        self.proj_layers = proj_layers
        self.proj_kernel = proj_kernel
        # the reading vocabulary: the LLM token id of each class (class 0, the blank, is the space token); the
        # projector's `embeddings` buffer holds those tokens' input-embedding rows
        self.read_token_ids = [int(t) for t in read_token_ids]
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def read_classes(self) -> int:
        return max(2, len(self.read_token_ids))

    @property
    def cell(self) -> int:
        return self.patch_size * self.spatial_merge_size


class MarsReaderConfig(Qwen2VLConfig):
    """Qwen2-VL's config with the reading tower's vision config."""

    model_type = MODEL_TYPE
    sub_configs = {"vision_config": MarsReaderVisionConfig, "text_config": Qwen2VLTextConfig}
    sub_configs_defaults = {"vision_config": MarsReaderVisionConfig, "text_config": Qwen2VLTextConfig}

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = MarsReaderVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = MarsReaderVisionConfig(**{k: v for k, v in self.vision_config.items()
                                                           if k != "model_type"})
        super().__post_init__(**kwargs)


def patches_to_frames(pixel_values: torch.Tensor, grid_thw: torch.Tensor, cfg: MarsReaderVisionConfig
                      ) -> list[torch.Tensor]:
    """Undo the Qwen2-VL processor's patchify: per input, grayscale frames [t, T, H, W] in [0, 1] (t temporal
    groups of T = temporal_patch_size frames; an image is one group of T identical copies; H, W multiples of the
    28-px cell).

    The processor lays patches out as (t, block row, block column, row in block, column in block) with features
    (channel, temporal, pixel row, pixel column); this is its inverse, checked against real processor output in the
    tests.
    """
    p, m, tp, c = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size, cfg.in_channels
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=pixel_values.device)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=pixel_values.device)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=pixel_values.device)
    out, offset = [], 0
    for t, gh, gw in grid_thw.tolist():
        n = t * gh * gw
        x = pixel_values[offset:offset + n].float().reshape(t, gh // m, gw // m, m, m, c, tp, p, p)
        offset += n
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, tp, c, gh * p, gw * p)  # [t, T, C, H, W]
        rgb = x * std[:, None, None] + mean[:, None, None]
        out.append((rgb * luma[:, None, None]).sum(2).clamp(0.0, 1.0))  # [t, T, H, W]
    return out


def _read_lines(recognizer: Recognizer, bands: torch.Tensor, cells: int, k: int, sub_steps: int) -> torch.Tensor:
    """bands [N, 1, 28, k * cells * 28] -> [N, cells, sub_steps * (hidden + classes)]: each band resized to 64 px
    high and k * cells * 64 px wide, read, and its steps pooled evenly onto `cells` x `sub_steps` positions."""
    width = cells * HEIGHT * k
    lines = F.interpolate(bands, size=(HEIGHT, width), mode="bilinear", align_corners=False)
    param = next(recognizer.parameters())
    feats, logits = recognizer(((lines - 0.5) / 0.5).to(param.dtype))  # [N, L, hidden], [N, L, classes]
    steps = width // 4  # the VGG gives width / 4 - 1 steps: the last one is repeated
    x = torch.cat([feats.float(), logits.float().softmax(-1)], dim=-1)  # [N, L, D]
    x = torch.cat([x, x[:, -1:].expand(-1, steps - x.shape[1], -1)], dim=1) if x.shape[1] < steps else x[:, :steps]
    x = x.reshape(x.shape[0], cells, sub_steps, steps // (cells * sub_steps), -1)  # [N, cells, sub, per, D]
    hidden = feats.shape[-1]
    # BiLSTM features are averaged over a sub-step; character probabilities keep their peak (CTC emits a character
    # on one step and the blank around it, so a mean would drown every character in blank)
    x = torch.cat([x[..., :hidden].mean(3), x[..., hidden:].amax(3)], dim=-1)  # [N, cells, sub, D]
    return x.flatten(2)


def cell_features_many(recognizer: Recognizer, frames: list[torch.Tensor], cfg: MarsReaderVisionConfig
                       ) -> list[torch.Tensor]:
    """Read every 28-px row band of each `frames[i]` [t, T, H, W] as a text line: -> per input [t * rows, cells,
    sub_steps * (hidden + classes)], the recognizer's BiLSTM features (mean) and character probabilities (peak),
    `sub_steps` per cell.

    A band is resized to 64 px high (the recognizer's height) and each cell to 64 px wide, so cell k owns recognizer
    steps 16k .. 16k + 15. A temporal group whose frames differ (a video's pair of frames) is read as one line with
    its frames side by side, each cell then owning 32 steps (two frames' worth); identical frames (an image, a still
    video) are read once. Lines of one width are read in one batch, and a uniform band (an empty row) is read once
    per value and width: every line is read independently, so this changes nothing beyond float rounding.
    """
    cell, d = cfg.cell, cfg.sub_steps * (cfg.recognizer_hidden + cfg.recognizer_classes)
    jobs: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}  # (cells, frames per line) -> bands
    outs = []
    for i, fr in enumerate(frames):
        t, tp, h, w = fr.shape
        rows, cells = h // cell, w // cell
        outs.append(torch.empty(t * rows, cells, d))
        same = (fr == fr[:, :1]).flatten(1).all(1)  # [t]
        for g in range(t):
            k = 1 if bool(same[g]) else tp
            line = fr[g, 0] if k == 1 else fr[g].reshape(tp, rows, cell, w).permute(1, 2, 0, 3).reshape(h, tp * w)
            for r in range(rows):
                jobs.setdefault((cells, k), []).append((i, g * rows + r, line[r * cell:(r + 1) * cell]))
    for (cells, k), items in jobs.items():
        uniq: dict[object, int] = {}
        bands, slot = [], []
        for _, _, band in items:
            lo, hi = band.min(), band.max()
            key = ("flat", float(lo)) if bool(lo == hi) else len(bands)
            if key not in uniq:
                uniq[key] = len(bands)
                bands.append(band)
            slot.append(uniq[key])
        feats = _read_lines(recognizer, torch.stack(bands)[:, None], cells, k, cfg.sub_steps)  # [n, cells, d]
        for (i, row, _), j in zip(items, slot, strict=True):
            outs[i][row] = feats[j]
    return outs


def cell_features(recognizer: Recognizer, frames: torch.Tensor, cfg: MarsReaderVisionConfig) -> torch.Tensor:
    """`cell_features_many` for one input."""
    return cell_features_many(recognizer, [frames], cfg)[0]


SPELL = 16  # characters of a reading-vocabulary token that its spelling code sees


def spell_codes(tokens: list[str]) -> torch.Tensor:
    """[len(tokens), SPELL] character codes (0 = none, k = CHARACTERS[k - 1]; other characters are none) of each
    token's text without its leading space, lower case; what the projector's spelling-aware head compares
    against.

    >>> spell_codes([" ab"]).tolist()[0][:3] == [CHARACTERS.index("a") + 1, CHARACTERS.index("b") + 1, 0]
    True
    """
    out = torch.zeros(len(tokens), SPELL, dtype=torch.long)
    for i, t in enumerate(tokens):
        for j, ch in enumerate(t.strip().lower()[:SPELL]):
            k = CHARACTERS.find(ch)
            out[i, j] = k + 1 if k >= 0 else 0
    return out


class _Projector(nn.Module):
    """Per-cell recognizer features -> the LLM's input-embedding space, through the reading vocabulary.

    A layer-normed linear layer and residual 1-D convolutions along the row (a word that starts late in a cell is
    read mostly from the next ones) give each cell a code `g`. The head is *spelling-aware*: the logit of reading
    token k is <g, s_k> + b_k, where s_k sums learned (position, character) vectors over the token's spelling
    (`spell`, [classes, 16] character codes; class 0, the blank, has its own vector). Learning to see a character
    at a position then helps every word that has it there, so rare words need few examples. The output is
    softmax(logits) @ `embeddings`, the LLM's own input-embedding rows of those tokens (copied from the LLM when
    the graft is built, saved with the tower, never trained): every visual token is a convex combination of
    embeddings the LLM knows, and a confident read *is* the word's embedding.

    Measured on 800 rendered strips (issue 19): a free linear output trained onto fixed embedding rows (cosine
    logits) stayed at "blank everywhere" for 250 steps; a plain classifier over the vocabulary memorised the
    training strips but read 8% of held-out words.
    """

    def __init__(self, cfg: MarsReaderVisionConfig) -> None:
        super().__init__()
        d_in = cfg.sub_steps * (cfg.recognizer_hidden + cfg.recognizer_classes)
        self.inp_norm = nn.LayerNorm(d_in)  # BiLSTM features and character probabilities live on different scales
        self.inp = nn.Linear(d_in, cfg.proj_dim)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.proj_dim, cfg.proj_dim, cfg.proj_kernel, padding=cfg.proj_kernel // 2)
                                   for _ in range(cfg.proj_layers))
        self.norm = nn.LayerNorm(cfg.proj_dim)
        self.out = nn.Linear(cfg.proj_dim, cfg.proj_dim)
        self.chars = nn.Parameter(torch.zeros(SPELL, cfg.recognizer_classes, cfg.proj_dim))  # [pos, char, D]
        self.blank = nn.Parameter(torch.zeros(cfg.proj_dim))
        self.free = nn.Parameter(torch.zeros(cfg.read_classes, cfg.proj_dim))  # [classes, D]: what spelling misses
        self.bias = nn.Parameter(torch.zeros(cfg.read_classes))
        self.register_buffer("spell", torch.zeros(cfg.read_classes, SPELL, dtype=torch.long))  # [classes, 16]
        self.register_buffer("embeddings", torch.zeros(cfg.read_classes, cfg.hidden_size))  # [classes, hidden]

    def spelling(self) -> torch.Tensor:
        """s [classes, D]: the sum of (position, character) vectors of each token's spelling (the blank's own vector)
        plus a free vector per token."""
        pos = torch.arange(SPELL, device=self.spell.device).expand_as(self.spell)
        s = (self.chars[pos, self.spell] * (self.spell > 0)[..., None]).sum(1)  # [classes, D]
        return torch.cat([self.blank[None], s[1:]]) + self.free

    def logits(self, x: torch.Tensor, spelling: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, cells, d_in] -> reading-vocabulary logits [rows, cells, classes]; pass `spelling()` when calling
        this for many inputs with the same weights."""
        h = F.gelu(self.inp(self.inp_norm(x)))
        for conv in self.convs:
            h = h + F.gelu(conv(h.transpose(1, 2)).transpose(1, 2))
        g = self.out(self.norm(h))  # [rows, cells, D]
        return g @ (self.spelling() if spelling is None else spelling).T + self.bias

    def forward(self, x: torch.Tensor, spelling: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, cells, d_in] -> [rows, cells, hidden_size]: softmax(logits) @ embeddings."""
        return self.logits(x, spelling).softmax(-1).to(self.embeddings.dtype) @ self.embeddings


class ReaderVisionModel(PreTrainedModel):
    """The reading tower: frozen `recognizer`, trained `projector`. Called like Qwen2-VL's tower:
    `tower(pixel_values, grid_thw=...)` -> `pooler_output` [sum of merged cells, hidden_size] in the processor's
    order."""

    config_class = MarsReaderVisionConfig
    config: MarsReaderVisionConfig
    base_model_prefix = "visual"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    _no_split_modules = ["ReaderVisionModel"]
    _keep_in_fp32_modules_strict = ["recognizer"]  # LSTMs and BatchNorm: the pretrained numbers, in float32

    def __init__(self, config: MarsReaderVisionConfig) -> None:
        super().__init__(config)
        self.spatial_merge_size = config.spatial_merge_size
        self.recognizer = Recognizer(config.recognizer_channels, config.recognizer_hidden, config.recognizer_classes)
        self.projector = _Projector(config)
        self.merged = nn.Identity()  # [sum of cells, hidden_size]: one hook site for the tower's output (like `merger`)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Conv1d) and any(module is m for m in self.projector.modules()):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if module is self.projector:  # a random model's stand-ins; a built graft holds the LLM's rows and spellings
            nn.init.normal_(module.embeddings, std=self.config.initializer_range)
            nn.init.normal_(module.chars, std=self.config.initializer_range)
            nn.init.normal_(module.blank, std=self.config.initializer_range)
            nn.init.normal_(module.free, std=self.config.initializer_range)
            module.spell.copy_(torch.randint(0, self.config.recognizer_classes, module.spell.shape,
                                             generator=torch.Generator().manual_seed(0)))

    def cell_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The projector's inputs per image / video: [t * rows, cells, d_in] each (the frozen part, no gradient).
        Training extracts these once per rendered image and reuses them."""
        with torch.no_grad():
            return cell_features_many(self.recognizer, patches_to_frames(pixel_values, grid_thw, self.config),
                                      self.config)

    def project(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Projector over `cell_inputs` -> [sum of cells, hidden_size], inputs concatenated in order."""
        dtype = self.projector.out.weight.dtype
        spelling = self.projector.spelling()
        return self.merged(torch.cat([self.projector(x.to(dtype), spelling).flatten(0, 1) for x in inputs]))

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """hidden_states: the processor's `pixel_values` [patches, C * T * 14 * 14]; grid_thw [n, 3]."""
        inputs = self.cell_inputs(hidden_states, grid_thw)
        merged = self.project(inputs)
        return BaseModelOutputWithPooling(last_hidden_state=torch.cat([x.flatten(0, 1) for x in inputs]),
                                          pooler_output=merged)


class MarsReaderPreTrainedModel(Qwen2VLPreTrainedModel):
    config_class = MarsReaderConfig
    config: MarsReaderConfig
    _no_split_modules = ["Qwen2VLDecoderLayer", "ReaderVisionModel"]
    _keep_in_fp32_modules_strict = ["recognizer"]


class MarsReaderModel(MarsReaderPreTrainedModel, Qwen2VLModel):
    """Qwen2VLModel with the reading tower as `visual` (image / video features, M-RoPE and the LM are Qwen2-VL's)."""

    def __init__(self, config: MarsReaderConfig) -> None:
        MarsReaderPreTrainedModel.__init__(self, config)
        self.visual = ReaderVisionModel._from_config(config.vision_config)
        self.language_model = Qwen2VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()


class MarsReaderForConditionalGeneration(MarsReaderPreTrainedModel, Qwen2VLForConditionalGeneration):
    """The generation head over `MarsReaderModel`; loads with `AutoModelForImageTextToText` once registered."""

    def __init__(self, config: MarsReaderConfig) -> None:
        MarsReaderPreTrainedModel.__init__(self, config)
        self.model = MarsReaderModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


_REGISTERED = False


def register() -> None:
    """Make `mars_reader` known to AutoConfig, AutoModel, AutoModelForImageTextToText and AutoProcessor (the
    processor is Qwen2-VL's own). Idempotent; `import mars_viz` calls it."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
        Qwen2VLProcessor,
    )

    AutoConfig.register(MODEL_TYPE, MarsReaderConfig, exist_ok=True)
    AutoConfig.register("mars_reader_vision", MarsReaderVisionConfig, exist_ok=True)
    AutoModel.register(MarsReaderConfig, MarsReaderModel, exist_ok=True)
    AutoModelForImageTextToText.register(MarsReaderConfig, MarsReaderForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MarsReaderConfig, Qwen2VLProcessor, exist_ok=True)
    _REGISTERED = True
