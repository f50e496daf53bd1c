"""Refusal judges: a substring list by default, plus an interface for plugging in a classifier model.

A judge is any callable `list[str] -> list[bool]` (True = refused).

Example:
    >>> judge = SubstringJudge()
    >>> judge(["I'm sorry, but I can't help with that.", "Sure! Preheat the oven to 220C."])
    [True, False]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ..paths import ASSETS

__all__ = ["ClassifierJudge", "RefusalJudge", "SubstringJudge", "default_judge"]

_PHRASES = ASSETS / "refusal_phrases.txt"


class RefusalJudge(Protocol):
    """`judge(texts) -> refused?` per text. A judge may also have `settled(texts) -> list[bool]` (see
    `SubstringJudge.settled`), which lets a generation stop as soon as its verdict cannot change; one that reads the
    whole answer (`ClassifierJudge`) has none, and its generations run to their length."""

    def __call__(self, texts: Sequence[str]) -> list[bool]: ...


class SubstringJudge:
    """Refused if a known refusal phrase (English or Chinese) occurs in the first `window` characters.

    Refusals come first; looking only at the opening avoids counting "I cannot stress enough..." deep in an answer.
    """

    def __init__(self, phrases: Sequence[str] | None = None, window: int = 160):
        if phrases is None:
            phrases = [p.strip() for p in _PHRASES.read_text(encoding="utf-8").splitlines() if p.strip()]
        self.phrases = tuple(p.lower() for p in phrases)
        self.window = window

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        return [any(p in t[: self.window].lower().replace("\u2019", "'") or p in t[: self.window].lower()
                    for p in self.phrases) for t in texts]

    def settled(self, texts: Sequence[str]) -> list[bool]:
        """Per text (an answer so far): whether more of it cannot change the verdict. A refusal is settled once its
        phrase is in the window (the window of a longer text holds it too); an answer is not, as the next tokens may
        still refuse. Generations stop there (`greedy_texts(settled=...)`): the fit's verdicts come sooner, the same."""
        return self(texts)


class ClassifierJudge:
    """Wrap any text classifier: `classify(texts) -> list[label]`, refused when the label is in `refusal_labels`.

    Example with a transformers pipeline (load it yourself; nothing is downloaded here):
        pipe = transformers.pipeline("text-classification", model="path/to/refusal-classifier")
        judge = ClassifierJudge(lambda ts: [o["label"] for o in pipe(list(ts))], refusal_labels={"REFUSAL"})
    """

    def __init__(self, classify: Callable[[Sequence[str]], Sequence[str]], refusal_labels: set[str]):
        self.classify = classify
        self.refusal_labels = set(refusal_labels)

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        labels = list(self.classify(texts))
        if len(labels) != len(texts):
            raise ValueError(f"the classifier returned {len(labels)} labels for {len(texts)} texts")
        return [lab in self.refusal_labels for lab in labels]


def default_judge() -> SubstringJudge:
    return SubstringJudge()
