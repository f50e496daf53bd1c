"""How well a reading was read: word recall and character accuracy (pure functions on strings).

Both compare normalised text (lower case, punctuation dropped, words joined by one space), so "Green river." and
"green river" match.

Example:
    >>> word_recall("the old stone bridge", "The image shows an old bridge.")
    0.75
    >>> round(char_accuracy("old bridge", "old bridges"), 2)
    0.9
"""

from __future__ import annotations

from collections import Counter

from .render import normalise_words

__all__ = ["char_accuracy", "levenshtein", "word_recall"]


def word_recall(reference: str, prediction: str) -> float:
    """Share of the reference's words found in the prediction (as multisets; order ignored). 1.0 for no reference words
    only when the prediction has none either."""
    ref, pred = Counter(normalise_words(reference)), Counter(normalise_words(prediction))
    total = sum(ref.values())
    if total == 0:
        return 1.0 if not pred else 0.0
    return sum(min(n, pred[w]) for w, n in ref.items()) / total


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(reference: str, prediction: str) -> float:
    """1 - character error rate on normalised text, clipped at 0."""
    ref = " ".join(normalise_words(reference))
    pred = " ".join(normalise_words(prediction))
    if not ref:
        return 1.0 if not pred else 0.0
    return max(0.0, 1.0 - levenshtein(ref, pred) / len(ref))
