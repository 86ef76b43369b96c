"""DiT network: paper parameter counts, adaLN-Zero identity at init, patch layout, label dropout."""

from __future__ import annotations

import pytest
import torch

from pretrain.models.dit import DiT, build_dit
from pretrain.models.vit import patchify

# DiT paper, Table 4 (their models also output the diffusion variance: 2x the input channels)
PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_parameter_counts_match_the_paper(size):
    with torch.device("meta"):
        model = build_dit(size, input_size=32, patch_size=2, in_channels=4, num_classes=1000)
    trainable = sum(p.numel() for p in model.parameters())
    hidden = model.pos_embed.shape[-1]
    # The paper's count includes the fixed position table (a buffer here) and the variance outputs
    # (p * p * 4 more output features of the final linear) that rectified flow does not need.
    paper_layout = trainable + model.pos_embed.numel() + (hidden + 1) * 2 * 2 * 4
    assert abs(paper_layout - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01
    if size == "XL":
        assert paper_layout == 675_129_632  # the released DiT-XL/2 checkpoint, exactly


def tiny_dit(**kwargs) -> DiT:
    options = dict(input_size=8, patch_size=2, in_channels=3, hidden_dim=32, depth=2, num_heads=2, num_classes=5)
    return DiT(**{**options, **kwargs})


def test_fresh_block_is_identity_and_fresh_dit_outputs_zero():
    torch.manual_seed(0)
    model = tiny_dit()
    x, c = torch.randn(4, 16, 32), torch.randn(4, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    out = model(torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 5]))
    assert out.shape == (4, 3, 8, 8) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_output_layout_inverts_the_patch_layout(patch_size):
    model = tiny_dit(input_size=16, patch_size=patch_size)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.unpatchify(patchify(x, patch_size)), x)
    assert model(x, torch.rand(2), torch.tensor([1, 2])).shape == x.shape


def test_conditioning_changes_the_output_once_trained_away_from_zero():
    torch.manual_seed(0)
    model = tiny_dit().eval()
    for p in model.parameters():  # leave adaLN-Zero's identity: any nonzero regressor
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1])))
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t * 0.5, torch.tensor([0, 0])))


def test_label_dropout_uses_the_null_class_in_training_only():
    torch.manual_seed(0)
    model = tiny_dit(class_dropout=0.25)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = model.drop_labels(labels)
    assert set(dropped.unique().tolist()) == {0, model.null_class}
    assert (dropped == model.null_class).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert model.y_embedder.num_embeddings == model.num_classes + 1
