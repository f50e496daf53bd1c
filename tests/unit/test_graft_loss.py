"""The reading graft's objective: planted CTC cases, posteriors, and where gradients go."""

from __future__ import annotations

import pytest
import torch

from mars_lab.train import (
    ReadingVocab,
    ctc_posteriors,
    greedy_ctc,
    prototype_log_probs,
    reading_loss,
)


def _planted(seed: int = 0, d: int = 16, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, d, generator=g) * 0.5  # class 0 = blank
    path = [2, 0, 4, 4, 0, 1, 0, 3]  # emits 2 4 1 3
    h = protos[path][None] + 0.05 * torch.randn(1, len(path), d, generator=g)  # [B=1, T, d]
    return protos, h, [2, 4, 1, 3]


def test_ctc_loss_is_lower_for_the_planted_labels():
    protos, h, labels = _planted()
    right, _ = reading_loss(h, [h.shape[1]], [labels], protos, temperature=0.1, pull_weight=0.0)
    for wrong in ([4, 2, 1, 3], [2, 4, 1], [5, 5, 5, 5], [2, 4, 1, 3, 3]):
        w, _ = reading_loss(h, [h.shape[1]], [wrong], protos, temperature=0.1, pull_weight=0.0)
        assert float(right) < float(w) - 1.0, wrong


def test_greedy_decoding_recovers_the_planted_labels():
    protos, h, labels = _planted(1)
    lp = prototype_log_probs(h, protos, temperature=0.1)
    assert greedy_ctc(lp[0]) == labels


def test_posteriors_sum_to_one_and_align_to_the_plant():
    protos, h, labels = _planted(2)
    lp = prototype_log_probs(h, protos, temperature=0.1)
    gamma = ctc_posteriors(lp, [labels], [h.shape[1]])
    assert torch.allclose(gamma.sum(-1), torch.ones(1, h.shape[1]), atol=1e-4)
    assert gamma[0].argmax(-1).tolist() == [2, 0, 4, 4, 0, 1, 0, 3]


def test_padding_positions_are_ignored():
    protos, h, labels = _planted(3)
    padded = torch.cat([h, 100 * torch.randn(1, 3, h.shape[-1])], dim=1)
    a, pa = reading_loss(h, [h.shape[1]], [labels], protos, 0.1, 1.0)
    b, pb = reading_loss(padded, [h.shape[1]], [labels], protos, 0.1, 1.0)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_pull_is_small_on_the_prototypes_and_large_off_them():
    protos, h, labels = _planted(4)
    _, near = reading_loss(h, [h.shape[1]], [labels], protos, 0.1, 1.0)
    _, far = reading_loss(h + 1.0, [h.shape[1]], [labels], protos, 0.1, 1.0)
    assert near["pull"] < 0.05 < far["pull"]


def test_gradient_reaches_the_tower_not_the_llm_embedding():
    from transformers import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from mars_lab.train import tower_outputs

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 32)  # stands in for the LLM's input embeddings; trainable on purpose
    tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(depth=1, embed_dim=16, num_heads=2,
                                                                      mlp_ratio=2, hidden_size=32))
    vocab = ReadingVocab(token_ids=[3, 7, 9, 11], blank_id=1)
    protos = vocab.prototypes(embedding.weight)
    grid = torch.tensor([[1, 2, 4], [1, 4, 4]])  # two images: 2 and 4 merged tokens
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    h, lengths = tower_outputs(tower, pix, grid)
    assert lengths == [2, 4] and h.shape == (2, 4, 32)
    loss, _ = reading_loss(h, lengths, [[1], [2, 3]], protos, 0.05, 1.0)
    loss.backward()
    assert embedding.weight.grad is None
    grads = [p.grad for p in tower.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert tower.patch_embed.proj.weight.grad.abs().sum() > 0
    assert tower.merger.mlp[2].weight.grad.abs().sum() > 0


def test_vocab_labels_and_prototypes():
    emb = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    v = ReadingVocab(token_ids=[2, 5, 7], blank_id=0)
    assert v.num_classes == 4
    assert v.labels([5, 7, 2]) == [2, 3, 1]
    assert v.labels([5, 8]) is None
    p = v.prototypes(emb)
    assert torch.equal(p[0], emb[0]) and torch.equal(p[1:], emb[[2, 5, 7]])
    assert torch.equal(ReadingVocab([1], None).prototypes(emb)[0], torch.zeros(4))


def test_cell_targets_are_learned_where_the_layout_is_known():
    protos, h, labels = _planted(5)
    cells = [2, 0, 4, 0, 0, 1, 0, 3]
    good, pg = reading_loss(h, [h.shape[1]], [labels], protos, 0.1, 1.0, [cells], 1.0)
    shifted = cells[1:] + cells[:1]
    bad, pb = reading_loss(h, [h.shape[1]], [labels], protos, 0.1, 1.0, [shifted], 1.0)
    assert pg["cell"] < pb["cell"] and pg["pull"] < pb["pull"]
    # a target list of the wrong length is ignored, not misapplied
    _, pn = reading_loss(h, [h.shape[1]], [labels], protos, 0.1, 1.0, [cells[:-1]], 1.0)
    assert pn["cell"] == 0.0


def test_letter_targets_mark_each_letter_centre():
    from mars_lab.render import WordBox
    from mars_lab.train import letter_class, letter_targets

    boxes = [WordBox("Ab", 0, 14, 14, (3.0, 10.0)), WordBox("c7?", 20, 40, 14, (22.0, 30.0, 36.0))]
    got = letter_targets(boxes, 56)  # 8 bins of 7 px
    assert got == [letter_class("a"), letter_class("b"), 0, letter_class("c"), letter_class("7"), letter_class("?"),
                   0, 0]
    assert letter_class("A") == letter_class("a") == 1 and letter_class("9") == 36 and letter_class("-") == 37


def test_letter_loss_reads_bins_of_patch_columns_in_merge_order():
    """A strip of 2 merged tokens has 4 patch columns (8 bins); each patch column's features name its two bins'
    letters. The right labels give a low loss, shifted ones a high loss, and rows are averaged (swapping them is
    free)."""
    from mars_lab.train import LETTER_CLASSES, letter_loss

    c = LETTER_CLASSES
    labels = [1, 0, 5, 9, 0, 0, 3, 2]  # 8 bins
    cols = torch.zeros(4, 2 * c)  # per patch column: one-hot of bin 0's class, then of bin 1's class
    for j in range(4):
        cols[j, labels[2 * j]] = 1.0
        cols[j, c + labels[2 * j + 1]] = 1.0
    # merge-window order: cell k, row r, col j -> patch k*4 + r*2 + j holds column 2k + j
    patches = torch.stack([cols[2 * k + j] for k in range(2) for r in range(2) for j in range(2)])
    head = torch.nn.Linear(2 * c, 2 * c, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(20 * torch.eye(2 * c))
    grid = torch.tensor([[1, 2, 4]])
    good = letter_loss(head, patches, grid, [labels])
    bad = letter_loss(head, patches, grid, [labels[1:] + labels[:1]])
    assert float(good) < 0.01 < 1.0 < float(bad)
    swapped = torch.stack([cols[2 * k + j] * (1 + r) / (1 + r) for k in range(2) for r in (1, 0) for j in range(2)])
    assert float(letter_loss(head, swapped, grid, [labels])) == pytest.approx(float(good))
    assert float(letter_loss(head, patches, grid, [None])) == 0.0  # no letters known (a video, a blank image)


class _Tok:
    """Whole-word ids from a table: enough to check which text the graft asks ids for."""

    def __init__(self):
        self.table = {" bring": [11], " me": [12], " lake": [13]}
        self.asked: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        self.asked.append(text)
        return {"input_ids": [i for w in text.split() for i in self.table.get(" " + w, [99])]}


def test_every_printed_form_of_a_word_is_one_canonical_class():
    from mars_lab.train import phrase_labels, word_ids

    tok = _Tok()
    assert word_ids("Bring", tok) == word_ids("bring,", tok) == word_ids("BRING", tok) == [11]
    assert tok.asked == [" bring"]  # asked once, then cached
    vocab = ReadingVocab(token_ids=[11, 12, 13], blank_id=0)
    assert phrase_labels("Bring me the lake?", tok, vocab) is None  # "the" is outside this vocabulary
    assert phrase_labels("Bring me, lake!", tok, vocab) == [1, 2, 3]
    assert phrase_labels("", tok, vocab) == []
