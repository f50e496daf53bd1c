"""Training images for the reading graft, rendered in-process: one-line text strips, and text-free images.

Everything here is a pure function of its arguments and a seed (a `random.Random` passed in), so a seed gives the
same images on every machine. Fonts come from installed packages (Pillow's built-in Aileron, and `font-roboto` /
`font-source-serif-pro` when present); nothing is downloaded.

What the graft is taught to read, and therefore what these images are: one line of text in a strip one merged
token (28 px) high and up to 1 400 px wide, in three upright regular faces at 16–20 px, dark ink on a light tint
(solid or a gentle gradient), at a random horizontal and vertical position, with light noise or blur. Wider
variety (13 faces, 14–22 px, any colours) kept a from-scratch tower at chance on 2 CPU cores (measured, issue 13).

The phrase generator never emits a 3-word sequence (n-gram) that occurs in the project's harmful, harmless,
look-alike or jailbreak prompt sets, nor any whole prompt shorter than three words, so the transfer test (typographic
harmful vs harmless prompts) reads phrases the tower has never seen. A held-out set of phrases is kept apart the
same way: no training phrase shares a 3-gram with it.

Example:
    >>> import random
    >>> sets = make_phrase_sets(["red", "boat", "sings", "under", "quiet", "river"], banned=[], n_heldout=4, seed=0)
    >>> len(sets.heldout)
    4
    >>> img = render_phrase(sets.train_phrase(random.Random(0)), random.Random(1))
    >>> img.width % 28 == 0 and img.height % 28 == 0
    True
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "CELL",
    "MAX_STRIP",
    "STRIP_FONTS",
    "PhraseSets",
    "WordBox",
    "font_files",
    "make_phrase_sets",
    "ngrams",
    "normalise_words",
    "render_blank",
    "layout_targets",
    "render_phrase",
    "render_phrase_layout",
    "render_word_video",
    "word_chunks",
]

CELL = 28  # one merged Qwen2-VL token covers 28x28 pixels (patch 14, spatial merge 2)
MAX_WORDS = 12
NGRAM = 3
_FONT_PACKAGES = ("font_roboto", "font_source_serif_pro")
_WORD_RE = re.compile(r"[a-z0-9']+")


def normalise_words(text: str) -> list[str]:
    """Lower-case word sequence with punctuation dropped: what n-gram exclusion compares."""
    return _WORD_RE.findall(text.lower().replace("-", " "))


def ngrams(words: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """All contiguous n-word tuples; a sequence shorter than n gives itself (so short prompts are banned whole)."""
    if 0 < len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _contains(words: Sequence[str], banned: set[tuple[str, ...]]) -> bool:
    for k in {len(b) for b in banned} or {NGRAM}:
        for i in range(len(words) - k + 1):
            if tuple(words[i:i + k]) in banned:
                return True
    return False


@dataclass
class PhraseSets:
    """A word pool, the banned n-grams, and a fixed held-out phrase list; `train_phrase` draws fresh training ones."""

    words: list[str]
    heldout: list[str]
    banned: set[tuple[str, ...]] = field(repr=False)  # prompt-set n-grams and held-out n-grams

    def train_phrase(self, rng: random.Random, max_words: int = MAX_WORDS) -> str:
        """A random phrase of 1..max_words words that contains no banned n-gram (rejection sampling)."""
        for _ in range(1000):
            phrase = _styled_phrase(self.words, rng, max_words)
            if not _contains(normalise_words(phrase), self.banned):
                return phrase
        raise ValueError("could not draw a phrase free of banned n-grams: the word pool is too small")

    def is_allowed(self, phrase: str) -> bool:
        return not _contains(normalise_words(phrase), self.banned)


def _styled_phrase(words: Sequence[str], rng: random.Random, max_words: int) -> str:
    n = rng.randint(1, max_words)
    ws = [rng.choice(words) for _ in range(n)]
    style = rng.random()
    if style < 0.45:  # sentence case, like an instruction
        ws[0] = ws[0][:1].upper() + ws[0][1:]
    elif style < 0.52:
        ws = [w[:1].upper() + w[1:] for w in ws]
    text = " ".join(ws)
    if n > 1 and rng.random() < 0.15:  # an inner comma
        i = rng.randint(0, n - 2)
        parts = text.split(" ")
        parts[i] += ","
        text = " ".join(parts)
    end = rng.random()
    if end < 0.15:
        text += "?"
    elif end < 0.3:
        text += "."
    elif end < 0.33:
        text += "!"
    return text


def make_phrase_sets(words: Iterable[str], banned: Iterable[str], n_heldout: int = 200, seed: int = 0,
                     max_words: int = MAX_WORDS) -> PhraseSets:
    """The word pool (deduplicated, order kept), n-grams of `banned` texts, and `n_heldout` held-out phrases.

    Held-out phrases obey the same ban; their own n-grams are then banned for training, so a training phrase never
    repeats three consecutive held-out words (or a whole held-out phrase shorter than three words).
    """
    pool = list(dict.fromkeys(w for w in words if w))
    if len(pool) < 4:
        raise ValueError(f"the word pool has {len(pool)} words; need at least 4")
    ban: set[tuple[str, ...]] = set()
    for text in banned:
        ban |= ngrams(normalise_words(text))
    rng = random.Random(f"heldout-{seed}")
    held: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(held) < n_heldout:
        tries += 1
        if tries > 100 * max(n_heldout, 1):
            raise ValueError("could not draw enough distinct held-out phrases: the word pool is too small")
        p = _styled_phrase(pool, rng, max_words)
        key = " ".join(normalise_words(p))
        if key in seen or _contains(normalise_words(p), ban):
            continue
        seen.add(key)
        held.append(p)
    held_ban = set()
    for p in held:
        held_ban |= ngrams(normalise_words(p))
    return PhraseSets(words=pool, heldout=held, banned=ban | held_ban)


# --------------------------------------------------------------------------------------------------------------------
# Fonts and colours


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """Regular / italic / bold faces of the installed font packages (empty if none is installed)."""
    out: list[str] = []
    for pkg in _FONT_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(next(iter(spec.submodule_search_locations))) / "files"
        for f in sorted(folder.glob("*.ttf")):
            if re.search(r"(Regular|Italic|Bold|Medium|It|Semibold)\.ttf$", f.name) and "Black" not in f.name \
                    and "Thin" not in f.name and "Light" not in f.name:
                out.append(str(f))
    return tuple(out)


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if path == "default":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size=size)


_TAUGHT_FACES = ("Roboto-Regular.ttf", "SourceSerifPro-Regular.ttf")


def _pick_font(rng: random.Random) -> str:
    """One of the three upright regular faces the graft is taught: Pillow's Aileron, Roboto, Source Serif.

    Measured (issue 13 note): a from-scratch tower on 2 CPU cores stayed at chance on 20 words over 800 steps with
    all 13 faces and any colours, and learned them with these three faces and dark-on-light colours.
    """
    faces = [f for f in font_files() if f.endswith(_TAUGHT_FACES)]
    return rng.choice(["default"] + faces)


def _luma(c: tuple[int, int, int]) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


def _colour_pair(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, ink): a light tint and a dark ink (luminance difference at least 0.55), as printed text is."""
    for _ in range(100):
        bg = tuple(rng.randint(190, 255) for _ in range(3))
        ink = tuple(rng.randint(0, 90) for _ in range(3))
        if abs(_luma(bg) - _luma(ink)) >= 0.55:  # type: ignore[arg-type]
            return bg, ink  # type: ignore[return-value]
    return (255, 255, 255), (0, 0, 0)


def _background(rng: random.Random, w: int, h: int, base: tuple[int, int, int]) -> Image.Image:
    """Solid, or a gentle gradient around `base` (so ink contrast is kept)."""
    if rng.random() < 0.6:
        return Image.new("RGB", (w, h), base)
    other = np.array([min(255, max(0, c + rng.randint(-40, 40))) for c in base], dtype=np.float32)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
    grad = np.array(base, dtype=np.float32)[None] * (1 - t[:, None]) + other[None] * t[:, None]  # [n, 3]
    arr = np.broadcast_to(grad[None], (h, w, 3)) if len(t) == w else np.broadcast_to(grad[:, None], (h, w, 3))
    return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8))


def _noise(img: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.5:
        return img
    arr = np.asarray(img, dtype=np.float32)
    sigma = rng.uniform(2.0, 8.0)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, sigma, arr.shape)
    out = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.7)))
    return out


def _round_up(x: float, k: int = CELL) -> int:
    return max(2 * k, int(-(-int(np.ceil(x)) // k) * k))  # at least 2 cells: the processor's minimum is 56x56


_MEASURE = ImageDraw.Draw(Image.new("RGB", (8, 8)))


@dataclass(frozen=True)
class WordBox:
    """Where one word was drawn: its horizontal extent and the vertical centre of its line, in pixels."""

    word: str
    x0: float
    x1: float
    y_centre: float
    centres: tuple[float, ...] = ()  # the horizontal centre of each of its characters


STRIP_FONTS = (16, 20)  # font sizes whose line fits one 28-px row of merged tokens (the taught range)
MAX_STRIP = 1400  # widest strip (50 merged tokens): a 25-word prompt at 16 px still fits on one line


def render_phrase(text: str, rng: random.Random, max_width: int = MAX_STRIP, max_height: int = CELL,
                  font_range: tuple[int, int] = STRIP_FONTS) -> Image.Image:
    """`text` on one line in a strip one merged token (28 px) high: random font, size, colours, horizontal and
    vertical position, light noise; the width is a multiple of 28 (at least 112 px, the processor's minimum area).

    One line on one row of merged tokens is what the graft reads: its tokens follow the text's reading order, and the
    graft's M-RoPE gives the width axis every rotary frequency, so the LLM sees them at consecutive 1-D positions, as
    it sees text. A phrase too long for `max_width` shrinks its font (down to 9 px). The strip is always 28 px high;
    `max_height` is only a bound (any value of at least 28 gives the same strip).
    """
    return render_phrase_layout(text, rng, max_width, max_height, font_range)[0]


def render_phrase_layout(text: str, rng: random.Random, max_width: int = MAX_STRIP, max_height: int = CELL,
                         font_range: tuple[int, int] = STRIP_FONTS) -> tuple[Image.Image, list[WordBox]]:
    """`render_phrase` plus the box of every word, in reading order (what layout supervision needs)."""
    line = " ".join(text.split())
    size = rng.randint(*font_range)
    fkey = _pick_font(rng)
    font = _font(fkey, size)
    while _MEASURE.textlength(line, font=font) > max_width - 8 and size > 9:
        size -= 1
        font = _font(fkey, size)
    text_w = _MEASURE.textlength(line, font=font)
    w = min(max(4 * CELL, max_width // CELL * CELL), max(4 * CELL, _round_up(text_w + rng.randint(4, 40))))
    h = CELL
    bg, ink = _colour_pair(rng)
    img = _background(rng, w, h, bg)
    draw = ImageDraw.Draw(img)
    _, top, _, bottom = font.getbbox(line)
    x0 = rng.randint(1, max(1, int(w - text_w) - 1))
    lo, hi = -top, h - bottom  # keep the inked part inside the strip
    y0 = rng.randint(int(min(lo, hi)), int(max(lo, hi)))
    draw.text((x0, y0), line, fill=ink, font=font)
    yc = y0 + (top + bottom) / 2
    boxes: list[WordBox] = []
    words = line.split(" ")
    for k, word in enumerate(words):
        x = x0 + (_MEASURE.textlength(" ".join(words[:k]) + " ", font=font) if k else 0.0)
        ends = [_MEASURE.textlength(word[:i + 1], font=font) for i in range(len(word))]
        centres = tuple(x + (a + b) / 2 for a, b in zip([0.0] + ends[:-1], ends, strict=True))
        boxes.append(WordBox(word, x, x + ends[-1] if ends else x, yc, centres))
    return _noise(img, rng), boxes


def layout_targets(word_tokens: Sequence[Sequence[int]], boxes: Sequence[WordBox], width: int, height: int,
                   blank: int = 0, cell: int = CELL) -> list[int] | None:
    """Per-cell targets in raster order (the order of merged Qwen2-VL tokens): each word's tokens start at the cell
    where the word starts (or the next free one) and run right; every other cell is `blank`.

    None when a word's tokens would run past the end of its row (the layout cannot be told cell by cell; CTC alone
    then supervises that image).

    >>> b = [WordBox("red", 30, 60, 14), WordBox("boat", 70, 100, 14)]
    >>> layout_targets([[5], [7, 8]], b, 140, 28)
    [0, 5, 7, 8, 0]
    """
    gw, gh = width // cell, height // cell
    out = [blank] * (gw * gh)
    last = -1
    for toks, box in zip(word_tokens, boxes, strict=True):
        row = min(gh - 1, max(0, int(box.y_centre // cell)))
        col = min(gw - 1, max(0, int(box.x0 // cell)))
        start = max(row * gw + col, last + 1)
        end = start + len(toks) - 1
        if end >= (row + 1) * gw:
            return None
        out[start:end + 1] = list(toks)
        last = end if toks else last
    return out


def render_blank(rng: random.Random, max_width: int = 448, max_height: int = 224) -> Image.Image:
    """A text-free image: a solid colour, a gradient, a few shapes or noise (reads as 'no text'); mostly strips one
    token high, like the text images, sometimes taller."""
    w = rng.choice(range(4 * CELL, max_width + 1, CELL))
    h = CELL if rng.random() < 0.7 else rng.choice(range(2 * CELL, max(2 * CELL, max_height) + 1, CELL))
    kind = rng.random()
    base = tuple(rng.randint(0, 255) for _ in range(3))
    if kind < 0.3:
        img = Image.new("RGB", (w, h), base)
    elif kind < 0.55:
        img = _background(random.Random(rng.getrandbits(32)), w, h, base)  # type: ignore[arg-type]
        if rng.random() < 0.5:  # a strong gradient too
            a = np.array(base, dtype=np.float32)
            b = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
            t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
            img = Image.fromarray(np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8))
    elif kind < 0.9:
        img = Image.new("RGB", (w, h), base)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 6)):
            x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
            x1, y1 = rng.randint(x0, w), rng.randint(y0, h)
            fill = tuple(rng.randint(0, 255) for _ in range(3))
            shape = rng.random()
            if shape < 0.4:
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            elif shape < 0.8:
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            else:
                draw.line((x0, y0, x1, y1), fill=fill, width=rng.randint(1, 6))
    else:
        arr = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
    return _noise(img, rng)


def word_chunks(text: str, frames: int) -> list[str]:
    """`text` split into at most `frames` consecutive chunks of words (the way a word-per-frame video shows it)."""
    words = text.split()
    per = max(1, -(-len(words) // max(1, frames)))
    return [" ".join(words[i:i + per]) for i in range(0, len(words), per)]


def render_word_video(text: str, rng: random.Random, frames: int | None = None,
                      size: tuple[int, int] | None = None) -> list[Image.Image]:
    """A word-per-frame clip of `text`: one word (or chunk) per frame, one frame size, an even frame count.

    Qwen2-VL embeds frames in temporal pairs (temporal_patch_size 2), so an odd count gets a blank last frame of the
    same background; the text still reads in order, frame pair by frame pair.
    """
    n = frames or min(len(text.split()), rng.choice([2, 4, 4, 6, 8]))
    chunks = word_chunks(text, n)
    w, h = size or (rng.choice([112, 168, 224]), CELL)
    bg, ink = _colour_pair(rng)
    fsize = rng.randint(*STRIP_FONTS)
    fkey = _pick_font(rng)
    font = _font(fkey, fsize)
    out = []
    for c in chunks:
        f = fsize
        while _MEASURE.textlength(c, font=font) > w - 8 and f > 10:
            f -= 1
            font = _font(fkey, f)
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        tw = _MEASURE.textlength(c, font=font)
        _, top, _, bottom = font.getbbox(c)
        draw.text((rng.randint(2, max(2, int(w - tw) - 2)), rng.randint(int(min(-top, h - bottom)),
                                                                          int(max(-top, h - bottom)))), c,
                  fill=ink, font=font)
        out.append(img)
    if len(out) % 2 == 1:
        out.append(Image.new("RGB", (w, h), bg))
    return out
