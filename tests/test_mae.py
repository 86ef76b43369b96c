"""MAE: masking as in the reference, a loss that sees only hidden patches, training signal, pictures, determinism."""

import pytest
import torch

from pretrain.methods.mae import MaskedAutoencoder, masked_patch_loss, random_masking
from pretrain.models.vit import VisionTransformer, patchify, unpatchify
from pretrain.visualize import denormalize, image_grid


def _tiny_mae(norm_pix_loss: bool = True, mask_ratio: float = 0.75) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    return MaskedAutoencoder(
        encoder, decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss
    )


def _batch(size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(size, 3, 32, 32, generator=generator), "label": torch.zeros(size, dtype=torch.long)}


@pytest.mark.parametrize(("num_patches", "ratio"), [(196, 0.75), (196, 0.9), (16, 0.75), (49, 0.6), (10, 0.0)])
def test_visible_count_is_the_reference_round_down(num_patches: int, ratio: float) -> None:
    masking = random_masking(3, num_patches, ratio, torch.device("cpu"))
    num_keep = int(num_patches * (1 - ratio))
    assert masking.keep_indices.shape == (3, num_keep)
    assert torch.equal(masking.mask.sum(dim=1), torch.full((3,), float(num_patches - num_keep)))
    # The kept patches are exactly the unmasked ones.
    for keep, mask in zip(masking.keep_indices, masking.mask):
        assert set(keep.tolist()) == set((mask == 0).nonzero().flatten().tolist())


def test_masks_differ_per_sample() -> None:
    masking = random_masking(8, 196, 0.75, torch.device("cpu"))
    assert len({tuple(mask.tolist()) for mask in masking.mask}) == 8


def test_loss_depends_only_on_hidden_patches() -> None:
    generator = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 16, 12, generator=generator, requires_grad=True)
    target = torch.randn(2, 16, 12, generator=generator)
    mask = random_masking(2, 16, 0.75, torch.device("cpu"), generator).mask
    for norm_pix in (False, True):
        loss = masked_patch_loss(pred, target, mask, norm_pix)
        visible_changed = target + 5 * torch.randn_like(target) * (1 - mask).unsqueeze(-1)
        assert torch.equal(masked_patch_loss(pred, visible_changed, mask, norm_pix), loss)
        hidden_changed = target.clone()
        hidden_changed[mask.bool()] += torch.linspace(-1, 1, 12) ** 2  # alters both pixels and per-patch stats
        assert masked_patch_loss(pred, hidden_changed, mask, norm_pix) != loss
        (grad,) = torch.autograd.grad(loss, pred)
        assert grad[mask == 0].abs().sum() == 0 and grad[mask == 1].abs().sum() > 0


def test_norm_pix_target_matches_direct_computation() -> None:
    generator = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 4, 6, generator=generator)
    target = torch.randn(2, 4, 6, generator=generator) * 3 + 1
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            if mask[b, i]:
                patch = target[b, i].tolist()
                mean = sum(patch) / 6
                var = sum((x - mean) ** 2 for x in patch) / 5  # unbiased, as the reference's Tensor.var
                normalized = [(x - mean) / (var + 1e-6) ** 0.5 for x in patch]
                total += sum((p - t) ** 2 for p, t in zip(pred[b, i].tolist(), normalized)) / 6
                count += 1
    torch.testing.assert_close(masked_patch_loss(pred, target, mask, norm_pix=True), torch.tensor(total / count))


def test_encoder_never_sees_hidden_patches() -> None:
    mae = _tiny_mae()
    images = _batch()["image"]
    torch.manual_seed(5)
    pred, mask = mae.predict(images)
    changed_images = unpatchify(patchify(images, 8) + 10 * mask.unsqueeze(-1), 8, 3)
    assert not torch.equal(changed_images, images)
    torch.manual_seed(5)
    pred_changed, mask_changed = mae.predict(changed_images)
    assert torch.equal(mask_changed, mask)
    torch.testing.assert_close(pred_changed, pred)


def test_training_reduces_loss_on_a_fixed_batch() -> None:
    mae = _tiny_mae()
    batch = _batch(8)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # same masks each step: the loss can only fall by learning
        loss = mae(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    torch.manual_seed(0)
    _, mask = mae.predict(batch["image"])
    target = patchify(batch["image"], 8)
    predict_zero = masked_patch_loss(torch.zeros_like(target), target, mask, norm_pix=True).item()
    print(f"MAE loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps (predicting zeros: {predict_zero:.3f})")
    assert losses[-1] < 0.8 * losses[0], losses
    assert losses[-1] < predict_zero, "no better than predicting the mean of each normalized patch"


def test_same_seed_same_loss() -> None:
    mae, batch = _tiny_mae(), _batch()
    torch.manual_seed(123)
    first = mae(batch)
    torch.manual_seed(123)
    second = mae(batch)
    assert set(first) == {"loss"} and first["loss"].ndim == 0
    assert torch.equal(first["loss"], second["loss"])
    assert not torch.equal(mae(batch)["loss"], first["loss"])  # the RNG moved on: a new mask


def test_visuals_shape_and_training_rng_untouched() -> None:
    mae = _tiny_mae(norm_pix_loss=True)
    batch = _batch(3)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    pictures = mae.visuals(batch)
    assert torch.equal(torch.get_rng_state(), state)
    grid = pictures["reconstruction"]
    assert grid.dtype == torch.uint8
    assert grid.shape == (2 + 3 * 34, 2 + 3 * 34, 3)  # 3 rows x 3 images of 32 px, 2 px padding
    assert torch.equal(mae.visuals(batch)["reconstruction"], grid)  # fixed masks: comparable across steps


def test_reconstruction_keeps_visible_pixels_when_pasted() -> None:
    mae = _tiny_mae(norm_pix_loss=False)
    images = _batch(2)["image"]
    pred, mask = mae.reconstruct(images, torch.Generator().manual_seed(0))
    assert pred.shape == images.shape and mask.shape == (2, 1, 32, 32)
    assert mask.mean() == 0.75
    # Whole 8x8 patches are hidden or shown.
    assert torch.equal(mask, mask[:, :, ::8, ::8].repeat_interleave(8, 2).repeat_interleave(8, 3))


def test_image_grid_and_denormalize() -> None:
    images = torch.rand(5, 1, 4, 6)
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (1 + 3 * 5, 1 + 2 * 7, 3) and grid.dtype == torch.uint8
    assert torch.equal(grid[1:5, 8:14, 0], (images[1, 0] * 255).round().to(torch.uint8))
    normalized = (images - 0.5) / 0.25
    torch.testing.assert_close(denormalize(normalized, [0.5], [0.25]), images)


def test_method_interface() -> None:
    mae = _tiny_mae()
    assert mae.inference_network() is mae.backbone
    assert [len(blocks) for blocks in mae.transformer_blocks()] == [2, 1]
    names = dict(mae.named_parameters())
    assert mae.no_weight_decay() == {"backbone.cls_token", "mask_token"} and mae.no_weight_decay() <= set(names)
    assert "decoder_pos_embed" not in mae.state_dict()
    mae.on_step_end(1, 10)
