"""The reading graft's renderer and phrase sets: deterministic, text-free images, exclusions, held-out split."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mars_lab.build import banned_texts
from mars_lab.metrics import char_accuracy, word_recall
from mars_lab.render import (
    CELL,
    _styled_phrase,
    make_phrase_sets,
    ngrams,
    normalise_words,
    render_blank,
    render_phrase,
    render_word_video,
)
from mars_lab.train import GraftConfig, sample_examples


def _pool_from(texts):
    return list(dict.fromkeys(w for t in texts for w in normalise_words(t)))


def test_render_is_deterministic_for_a_seed():
    a = np.asarray(render_phrase("Quiet river under seven lamps", random.Random(3)))
    b = np.asarray(render_phrase("Quiet river under seven lamps", random.Random(3)))
    c = np.asarray(render_phrase("Quiet river under seven lamps", random.Random(4)))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_phrase_sets_are_deterministic_for_a_seed():
    pool = ["red", "boat", "sings", "under", "quiet", "river", "old", "bridge"]
    s1, s2 = make_phrase_sets(pool, [], 20, seed=1), make_phrase_sets(pool, [], 20, seed=1)
    assert s1.heldout == s2.heldout
    assert make_phrase_sets(pool, [], 20, seed=2).heldout != s1.heldout
    r1, r2 = random.Random(5), random.Random(5)
    assert [s1.train_phrase(r1) for _ in range(30)] == [s2.train_phrase(r2) for _ in range(30)]


def test_images_have_cell_multiple_sides_and_fit_the_limits():
    rng = random.Random(0)
    sets = make_phrase_sets(["alpha", "beta", "gamma", "delta", "omega"], [], 5, seed=0)
    for _ in range(40):
        text = sets.train_phrase(rng)
        img = render_phrase(text, rng, max_width=448, max_height=224)
        assert img.mode == "RGB" and img.width % CELL == 0 and img.height % CELL == 0
        assert img.width <= 448 and img.height <= 224
        blank = render_blank(rng)
        assert blank.width % CELL == 0 and blank.height % CELL == 0


def test_text_images_have_ink_and_blank_examples_have_no_text():
    rng = random.Random(1)
    img = np.asarray(render_phrase("seven quiet lamps", rng)).astype(float)
    assert img.std(axis=(0, 1)).max() > 10  # glyphs on a background, not a flat field
    sets = make_phrase_sets(["alpha", "beta", "gamma", "delta", "omega"], [], 5, seed=0)
    ex = sample_examples(sets, random.Random(2), 200, GraftConfig(blank_frac=0.3))
    blanks = [e for e in ex if e.text == ""]
    assert 30 < len(blanks) < 100
    assert all(e.image is not None for e in blanks)
    assert all(e.text for e in ex if e.frames is not None)


def test_word_video_has_even_frames_of_one_size_in_reading_order():
    frames = render_word_video("how to fold a paper boat", random.Random(0), frames=3)
    assert len(frames) % 2 == 0 and len({f.size for f in frames}) == 1
    frames = render_word_video("one two three four", random.Random(0), frames=4)
    assert len(frames) == 4


def test_training_phrases_never_contain_a_prompt_set_trigram():
    banned = banned_texts()
    few = [t for t in banned if 4 <= len(normalise_words(t)) <= 8][:6]
    pool = _pool_from(few)  # a pool made of the banned prompts' own words: collisions are likely
    ban = set().union(*(ngrams(normalise_words(t)) for t in banned))
    rng = random.Random(0)
    # The test has power: without the filter, this pool does produce banned trigrams.
    raw = [_styled_phrase(pool, rng, 12) for _ in range(3000)]
    hits = sum(any(g in ban for g in ngrams(normalise_words(p))) for p in raw if len(normalise_words(p)) >= 3)
    assert hits > 0
    sets = make_phrase_sets(pool, banned, n_heldout=50, seed=0)
    for p in [sets.train_phrase(rng) for _ in range(3000)] + sets.heldout:
        words = normalise_words(p)
        assert not any(g in ban for g in ngrams(words) if len(g) == 3), p
        assert " ".join(words) not in {" ".join(normalise_words(t)) for t in banned}


def test_short_banned_prompts_are_banned_whole():
    sets = make_phrase_sets(["make", "bomb", "cake", "river"], ["make bomb"], n_heldout=3, seed=0)
    assert not sets.is_allowed("Make bomb")
    assert not sets.is_allowed("river make bomb cake")
    assert sets.is_allowed("make cake")


def test_heldout_phrases_are_disjoint_from_training():
    pool = ["red", "boat", "sings", "under", "quiet", "river", "old", "bridge", "seven", "lamps"]
    sets = make_phrase_sets(pool, [], n_heldout=40, seed=0)
    held_keys = {" ".join(normalise_words(p)) for p in sets.heldout}
    held_grams = set().union(*(ngrams(normalise_words(p)) for p in sets.heldout))
    rng = random.Random(1)
    for _ in range(2000):
        words = normalise_words(sets.train_phrase(rng))
        assert " ".join(words) not in held_keys
        assert not (ngrams(words) & held_grams)


def test_pool_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="word pool"):
        make_phrase_sets(["a", "b"], [], 5)


def test_reading_metrics():
    assert word_recall("green river", "The image shows a green river.") == 1.0
    assert word_recall("green river bridge", "river") == pytest.approx(1 / 3)
    assert word_recall("river river", "river") == 0.5
    assert char_accuracy("old bridge", "old bridge") == 1.0
    assert char_accuracy("old bridge", "") == 0.0
    assert 0.0 < char_accuracy("old bridge", "old fridge") < 1.0


def test_word_boxes_follow_reading_order_and_fit_the_image():
    from mars_lab.render import render_phrase_layout

    rng = random.Random(7)
    text = "seven quiet lamps under the old bridge by the river tonight again"
    img, boxes = render_phrase_layout(text, rng)
    assert [b.word for b in boxes] == text.split()
    assert all(0 <= b.x0 < b.x1 <= img.width and 0 <= b.y_centre < img.height for b in boxes)
    keys = [(int(b.y_centre // CELL), b.x0) for b in boxes]
    assert keys == sorted(keys)  # row by row, left to right


def test_layout_targets_place_tokens_where_words_start():
    from mars_lab.render import WordBox, layout_targets

    boxes = [WordBox("a", 2, 20, 10), WordBox("b", 60, 90, 10), WordBox("c", 5, 40, 40)]
    # 4 columns x 2 rows; "b" starts in column 2; "c" (two tokens) on the second row
    assert layout_targets([[1], [2], [3, 4]], boxes, 112, 56) == [1, 0, 2, 0, 3, 4, 0, 0]
    # a word whose tokens run past its row cannot be placed cell by cell
    assert layout_targets([[1], [2, 5, 6], [3]], boxes, 112, 56) is None
