"""The reading graft's objective: planted CTC cases, posteriors, and where gradients go."""

from __future__ import annotations

import pytest
import torch

from mars_viz.graft.train import (
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

    from mars_viz.graft.train import tower_outputs

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
