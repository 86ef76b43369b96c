"""CPC v2: the prediction loss against the paper's formula term by term, the context's masking through gradients,
config validation, the ResNet's layer-norm option, and a few training steps through the Trainer."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.methods.cpc import CPC, cut_patch_grid
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.models.resnet import build_resnet
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import tiny_overrides

# A ResNet-18 (small stem, layer norm) on a 4 x 4 grid of 8 px patches, 4 px apart, over a 20 px image.
TINY = [
    "method.name=cpc",
    "model.arch=resnet18",
    "model.resnet_stem=small",
    "model.resnet_norm=layer",
    "data.image_size=20",
    "method.cpc.grid=4",
    "method.cpc.patch_size=8",
    "method.cpc.patch_stride=4",
    "method.cpc.context_blocks=2",
    "method.cpc.context_dim=8",
    "method.cpc.target_dim=6",
    "method.cpc.first_offset=1",
    "method.cpc.last_offset=2",
    "method.cpc.color_drop=false",
]


def tiny_cpc(*extra: str):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, *extra]))


class TinyEncoder(torch.nn.Module):
    """A stand-in for the ResNet where only the loss is under test: one conv, ReLU, global mean (8-d)."""

    embed_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def init_weights(self) -> None:
        self.conv.reset_parameters()

    def forward_features(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def cpc_formula(context, z, predictors, offsets, emb_scale) -> torch.Tensor:
    """Appendix A.2 term by term, on a grid already turned so that it runs top-down: for each offset k and each
    query (b, i, j) with i + k inside the grid, p = W_k c[b, i, j], l_m = emb_scale * p . z_m over every target m
    of the batch, loss = -log(exp(l_positive) / sum_m exp(l_m)) with z[b, i + k, j] the positive; the mean over
    queries, summed over offsets. context [B, G, G, D], z [B, G, G, T] (already projected)."""
    batch, grid = z.shape[:2]
    keys = [(b, i, j) for b in range(batch) for i in range(grid) for j in range(grid)]
    total = 0.0
    for k, predictor in zip(offsets, predictors):
        terms = []
        for b in range(batch):
            for i in range(grid - k):
                for j in range(grid):
                    p = predictor(context[b, i, j])
                    logits = {m: emb_scale * (p @ z[m]) for m in keys}
                    denominator = sum(torch.exp(v) for v in logits.values())
                    terms.append(-torch.log(torch.exp(logits[(b, i + k, j)]) / denominator))
        total = total + sum(terms) / len(terms)
    return total


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_cpc_loss_is_the_papers_formula(impl) -> None:
    """The method's loss (encoder, both directions, both offsets, through kernels.infonce) equals the formula
    applied to the same latent grid read top-down and bottom-up (the grid flipped in both axes); so do the
    gradients into the encoder."""
    torch.manual_seed(0)
    method = CPC(TinyEncoder(), 8, 4, 8, 4, 2, 6, 5, offsets=(1, 2), directions=2, color_drop=False, infonce_impl=impl)
    method = method.double()
    images = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    loss = method({"image": images})["loss"]
    grads = torch.autograd.grad(loss, list(method.encoder.parameters()))

    latents = method.encoder.encode_patches(cut_patch_grid(images, 4, 8, 4))
    expected = 0.0
    for flip, predictor in zip([(), (2, 3)], method.predictors):
        grid = torch.flip(latents, flip) if flip else latents
        context = predictor.context(grid).permute(0, 2, 3, 1)
        z = predictor.targets(grid.permute(0, 2, 3, 1))
        expected = expected + cpc_formula(context, z, predictor.predictors, [1, 2], 0.1)
    expected_grads = torch.autograd.grad(expected, list(method.encoder.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    # chance: all 2 x 16 targets alike, log(32) per offset and direction
    same = {"image": torch.zeros(2, 3, 20, 20, dtype=torch.float64)}
    assert float(method(same)["loss"].detach()) == pytest.approx(4 * math.log(32), rel=1e-6)


def test_the_negatives_are_every_ranks_patches(monkeypatch) -> None:
    """As rank 1 of 2 (the gather faked in one process): the keys are both ranks' targets, rank 0's first, and
    each query's positive is its own target in rank 1's half."""
    from pretrain.methods import cpc

    torch.manual_seed(1)
    other, mine = torch.randn(2, 2, 3, 3, 4, dtype=torch.float64)
    predictions = [torch.randn(2, 3 - k, 3, 4, dtype=torch.float64) for k in (1, 2)]
    monkeypatch.setattr(cpc, "rank", lambda: 1)
    monkeypatch.setattr(cpc, "all_gather_cat_grad", lambda t: torch.cat([other.flatten(0, 2), t]))
    losses = cpc.cpc_losses(predictions, mine, [1, 2], 0.1, "tiled")
    z = torch.cat([other, mine])
    for k, p, loss in zip((1, 2), predictions, losses):
        terms = []
        for b in range(2):
            for i in range(3 - k):
                for j in range(3):
                    logits = 0.1 * (z @ p[b, i, j])  # [4, 3, 3]: every patch of both ranks
                    terms.append(torch.logsumexp(logits.flatten(), 0) - logits[2 + b, i + k, j])
        torch.testing.assert_close(loss, sum(terms) / len(terms), rtol=1e-10, atol=1e-12)


def test_the_context_at_row_i_never_sees_lower_rows() -> None:
    """Through the gradients, from the patches' pixels through the ResNet (layer norm): the context at row i
    (top-down) depends on rows i - 2..i (2 blocks) and on no row > i, exactly; the bottom-up direction the
    other way round."""
    method = tiny_cpc("method.cpc.directions=2")
    patches = cut_patch_grid(torch.randn(1, 3, 20, 20), 4, 8, 4).clone().requires_grad_(True)
    latents = method.encoder.encode_patches(patches)
    top_down = method.predictors[0].context(latents)
    bottom_up = torch.rot90(method.predictors[1].context(torch.rot90(latents, 2, dims=(2, 3))), -2, dims=(2, 3))
    for i in range(4):
        (down,) = torch.autograd.grad(top_down[:, :, i].sum(), patches, retain_graph=True)
        (up,) = torch.autograd.grad(bottom_up[:, :, i].sum(), patches, retain_graph=True)
        rows_down, rows_up = down.abs().sum(dim=(0, 2, 3, 4, 5)), up.abs().sum(dim=(0, 2, 3, 4, 5))
        assert torch.all(rows_down[i + 1 :] == 0) and torch.all(rows_down[max(0, i - 2) : i + 1] > 0), (i, rows_down)
        assert torch.all(rows_up[:i] == 0) and torch.all(rows_up[i : i + 3] > 0), (i, rows_up)


def test_batch_norm_in_the_encoder_lets_the_top_row_see_the_rest() -> None:
    """Why CPC v2 uses layer norm: with batch norm (training mode) every patch is normalized by statistics
    over all of them, so the context of row 0 has a gradient from every lower row."""
    method = tiny_cpc("model.resnet_norm=batch", "method.cpc.directions=1")
    patches = cut_patch_grid(torch.randn(1, 3, 20, 20), 4, 8, 4).clone().requires_grad_(True)
    context = method.predictors[0].context(method.encoder.encode_patches(patches))
    (grad,) = torch.autograd.grad(context[:, :, 0].sum(), patches)
    assert torch.all(grad.abs().sum(dim=(0, 2, 3, 4, 5))[1:] > 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.image_size=224"],
            "method.cpc.grid: a 7x7 grid of 64 px patches with method.cpc.patch_stride 32 spans 256 px, more than data.image_size 224",
        ),
        (["data.image_size=20", "method.cpc.grid=5"], "method.cpc.grid: a 5x5 grid of 8 px patches"),
        (["method.cpc.patch_stride=9"], "method.cpc.patch_stride: 9 px is more than method.cpc.patch_size 8"),
        (["model.resnet_stem=imagenet", "data.image_size=32"], "method.cpc.patch_size: 8 px is smaller than the 32 px"),
        (
            ["model.arch=vit", "model.patch_size=3", "data.image_size=21"],
            "method.cpc.patch_size: 8 px is not a multiple of model.patch_size 3",
        ),
        (["method.cpc.last_offset=4"], "method.cpc.last_offset: 4 rows ahead"),
        (["method.cpc.first_offset=3", "method.cpc.last_offset=2"], "method.cpc.first_offset: 3 is after"),
        (["method.cpc.directions=3"], "method.cpc.directions"),
        (["method.cpc.pool=cls"], "method.cpc.pool: a ResNet's pooled feature"),
        (["model.resnet_norm=group"], "model.resnet_norm"),
        (["method.cpc.color_drop=true", "model.in_chans=1"], "method.cpc.color_drop"),
        (["method.cpc.emb_scale=0"], "method.cpc.emb_scale"),
    ],
)
def test_bad_cpc_configs_fail_naming_the_key(overrides, message) -> None:
    base = TINY if overrides[0] != "data.image_size=224" else ["method.name=cpc"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [*base, *overrides])


def test_the_paper_grid_fits_a_256_px_image_and_counts_its_flops() -> None:
    cfg = load_config(
        None, ["method.name=cpc", "model.arch=resnet50", "data.image_size=256", "model.resnet_norm=layer"]
    )
    assert flops_per_sample(cfg)["train"] == pytest.approx(3 * flops_per_sample(cfg)["forward"])
    # the encoder on 49 patches of 64 px dominates: a ResNet-50 at 64 px is about 0.34 GFLOPs (x2 for MACs)
    assert 49 * 0.6e9 < flops_per_sample(cfg)["forward"] < 49 * 0.8e9 + 5e9


def test_layer_norm_keeps_torchvisions_parameter_names() -> None:
    batch, layer = build_resnet(18, stem="small"), build_resnet(18, stem="small", norm="layer")
    assert [n for n, _ in batch.named_parameters()] == [n for n, _ in layer.named_parameters()]
    assert not list(layer.buffers())
    assert type(layer.layer2[0].downsample[1]).__name__ == "GroupNorm"
    # the layer norm normalizes each sample on its own: a sample's features do not depend on the batch
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(layer.forward_features(x)[:1], layer.forward_features(x[:1]))


def test_cpc_trains_a_resnet_and_shows_its_pictures(tmp_path, digit_shards) -> None:
    run = [s for s in tiny_overrides(tmp_path, digit_shards) if not s.startswith("model.")]
    sets = [s for s in TINY if not s.startswith("data.image_size") and "grid" not in s and "stride" not in s]
    sets += ["method.cpc.grid=3", "method.cpc.patch_stride=4", "method.cpc.color_drop=true"]
    cfg = load_config(None, [*run, *sets, "method.cpc.directions=4", "train.steps=3", "tracking.enabled=false"])
    trainer = Trainer(cfg)
    encoder = trainer.method.inference_network()
    assert type(encoder).__name__ == "PatchGridEncoder" and encoder.embed_dim == 512
    before = encoder.backbone.layer1[0].conv1.weight.detach().clone()
    result = trainer.fit()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert not torch.equal(encoder.backbone.layer1[0].conv1.weight, before)
    assert encoder.forward_features(torch.randn(2, 3, 16, 16), pool="mean").shape == (2, 512)
    pictures = trainer.method.visuals({"image": torch.randn(8, 3, 16, 16)})
    assert set(pictures) == {"patch_grid", "prediction_accuracy_per_offset"}
    for picture in pictures.values():
        assert picture.dtype == torch.uint8 and picture.ndim == 3 and picture.shape[-1] == 3


def test_cpc_on_a_vit_encoder() -> None:
    method = build_method(
        load_config(None, [*TINY, "model.arch=vit", "model.size=tiny", "model.patch_size=4", "method.cpc.pool=cls"])
    )
    loss = method({"image": torch.randn(2, 3, 20, 20)})["loss"]
    loss.backward()
    assert math.isfinite(float(loss.detach())) and next(method.encoder.backbone.blocks.parameters()).grad is not None
