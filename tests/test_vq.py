"""Vector quantizer and VQ autoencoder: nearest-code lookup, the straight-through estimator, the codebook
losses and EMA update against their formulas, dead-code restarts, usage/perplexity, two ranks equal to one
process, and the autoencoder's shapes, token decoding and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.vq import VectorQuantizer, nearest_codes
from pretrain.models.vqvae import build_vq_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def flat_rows(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def brute_force_nearest(rows: torch.Tensor, codes: torch.Tensor) -> list[int]:
    nearest = []
    for row in rows:
        distances = [float(((row - code) ** 2).sum()) for code in codes]
        nearest.append(min(range(len(codes)), key=lambda k: (distances[k], k)))
    return nearest


def quantizer_with(codes: torch.Tensor, **kwargs) -> VectorQuantizer:
    quantizer = VectorQuantizer(codes.shape[0], codes.shape[1], **kwargs)
    with torch.no_grad():
        quantizer.embedding.copy_(codes)
        if quantizer.update == "ema":
            quantizer.ema_sum.copy_(codes)
    return quantizer


@pytest.mark.parametrize("update", ["ema", "straight_through"])
def test_nearest_code_assignment_matches_brute_force(update):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(7, 4, generator=generator)
    z = torch.randn(2, 4, 3, 3, generator=generator)
    quantizer = quantizer_with(codes, update=update).eval()
    out = quantizer(z)
    assert out.indices.shape == (2, 3, 3)
    assert out.indices.flatten().tolist() == brute_force_nearest(flat_rows(z), codes)
    assert out.quantized.shape == z.shape
    assert torch.equal(flat_rows(out.quantized), codes[out.indices.flatten()])
    # [N, D] inputs give [N] indices; row chunking (here one row per chunk) changes nothing.
    assert quantizer(flat_rows(z)).indices.tolist() == out.indices.flatten().tolist()
    assert torch.equal(nearest_codes(flat_rows(z), codes, max_elements=7), out.indices.flatten())


def test_ties_go_to_the_lowest_index():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])  # the last one is equally far from all four
    assert quantizer_with(codes).eval()(z).indices.tolist() == [1, 0, 0]


@pytest.mark.parametrize("update", ["ema", "straight_through"])
def test_straight_through_gradient_is_the_identity(update):
    generator = torch.Generator().manual_seed(1)
    quantizer = quantizer_with(torch.randn(5, 3, generator=generator), update=update).eval()
    z = torch.randn(2, 3, 2, 2, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 3, 2, 2, generator=generator)
    out = quantizer(z)
    out.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)
    if update == "straight_through":  # the output's gradient does not reach the codes; only the loss does
        assert quantizer.embedding.grad is None or not quantizer.embedding.grad.any()


def test_straight_through_loss_is_codebook_plus_beta_commitment_with_split_gradients():
    generator = torch.Generator().manual_seed(2)
    codes = torch.randn(4, 3, generator=generator)
    quantizer = quantizer_with(codes, update="straight_through", beta=0.3, dead_code_threshold=0.0).train()
    z = torch.randn(6, 3, generator=generator, requires_grad=True)
    out = quantizer(z)
    chosen = codes[out.indices]
    elements = z.numel()
    expected = ((z.detach() - chosen) ** 2).sum() / elements * (1 + 0.3)  # both terms have the same value
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    # Codebook term ||sg[z] - e||^2 -> codes only; commitment beta ||z - sg[e]||^2 -> the encoder output only.
    code_grad = torch.zeros_like(codes)
    code_grad.index_add_(0, out.indices, 2 * (chosen - z.detach()) / elements)
    torch.testing.assert_close(quantizer.embedding.grad, code_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(z.grad, 0.3 * 2 * (z.detach() - chosen) / elements, rtol=1e-6, atol=1e-7)


def test_ema_loss_is_only_the_commitment_and_codes_are_buffers():
    generator = torch.Generator().manual_seed(3)
    quantizer = quantizer_with(torch.randn(4, 3, generator=generator), beta=0.25).eval()
    assert [name for name, _ in quantizer.named_parameters()] == []
    z = torch.randn(5, 3, generator=generator)
    out = quantizer(z)
    assert out.loss.item() == pytest.approx(0.25 * F.mse_loss(z, quantizer.embedding[out.indices]).item(), rel=1e-6)


def test_one_ema_update_follows_the_formula_and_eval_does_not_update():
    generator = torch.Generator().manual_seed(4)
    K, D, decay, eps = 5, 3, 0.9, 1e-3
    codes = torch.randn(K, D, generator=generator)
    quantizer = quantizer_with(codes, ema_decay=decay, eps=eps, dead_code_threshold=0.0)
    counts0 = torch.rand(K, generator=generator) + 0.5
    sums0 = torch.randn(K, D, generator=generator)
    with torch.no_grad():
        quantizer.ema_count.copy_(counts0)
        quantizer.ema_sum.copy_(sums0)
    z = torch.randn(2, D, 2, 3, generator=generator)
    rows = flat_rows(z)
    assigned = brute_force_nearest(rows, codes)

    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    quantizer.eval()(z)
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), name

    out = quantizer.train()(z)
    assert out.indices.flatten().tolist() == assigned
    assert torch.equal(flat_rows(out.quantized), codes[assigned])  # the pre-update codes
    n = torch.tensor([assigned.count(k) for k in range(K)], dtype=torch.float32)
    s = torch.stack([sum((rows[j] for j in range(len(rows)) if assigned[j] == k), torch.zeros(D)) for k in range(K)])
    N = decay * counts0 + (1 - decay) * n
    m = decay * sums0 + (1 - decay) * s
    smoothed = (N + eps) / (N.sum() + K * eps) * N.sum()
    torch.testing.assert_close(quantizer.ema_count, N)
    torch.testing.assert_close(quantizer.ema_sum, m)
    torch.testing.assert_close(quantizer.embedding, m / smoothed[:, None])
    assert not torch.allclose(quantizer.embedding, m / N[:, None], rtol=0, atol=1e-6)  # the smoothing matters


def near_and_far_codes(generator: torch.Generator) -> torch.Tensor:
    codes = torch.randn(8, 3, generator=generator)
    codes[4:] += 100.0  # codes 4..7 are far from every input
    return codes


def in_rows(vector: torch.Tensor, rows: torch.Tensor) -> bool:
    return bool((rows == vector).all(dim=1).any())


def test_restart_moves_dead_codes_onto_batch_vectors_and_resets_their_statistics():
    generator = torch.Generator().manual_seed(5)
    codes = near_and_far_codes(generator)
    quantizer = quantizer_with(codes, dead_code_threshold=1.0).train()
    with torch.no_grad():
        quantizer.ema_count[4:] = 0.5  # below the threshold: dead
    rows = torch.randn(12, 3, generator=generator)
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    assert quantizer.restart_dead_codes(rows, torch.Generator().manual_seed(0)) == 4
    for k in range(4):  # live codes untouched
        assert torch.equal(quantizer.embedding[k], before["embedding"][k])
        assert quantizer.ema_count[k] == before["ema_count"][k]
        assert torch.equal(quantizer.ema_sum[k], before["ema_sum"][k])
    for k in range(4, 8):
        assert in_rows(quantizer.embedding[k], rows), k
        assert quantizer.ema_count[k] == 1.0  # reset to the threshold, m = N e
        assert torch.equal(quantizer.ema_sum[k], quantizer.embedding[k])
    assert quantizer.restart_dead_codes(rows) == 0  # nothing is dead any more


def test_training_call_restarts_dead_codes_before_the_lookup():
    generator = torch.Generator().manual_seed(6)
    codes = near_and_far_codes(generator)
    decay, threshold = 0.9, 2.0
    quantizer = quantizer_with(codes, update="straight_through", ema_decay=decay, dead_code_threshold=threshold)
    with torch.no_grad():
        quantizer.usage[:4] = 5.0
        quantizer.usage[4:] = 0.1
    z = torch.randn(3, 3, 2, 2, generator=generator, requires_grad=True)
    rows = flat_rows(z.detach())
    out = quantizer.train()(z, torch.Generator().manual_seed(0))
    assert out.restarted == 4
    assert torch.equal(quantizer.embedding[:4], codes[:4])  # live codes untouched
    assert all(in_rows(quantizer.embedding[k], rows) for k in range(4, 8))
    # The restarted codes take part in this call: each is the nearest code of the vector it copied.
    n = torch.bincount(out.indices.flatten(), minlength=8).float()
    assert (n[4:] >= 1).all()
    torch.testing.assert_close(quantizer.usage[4:], decay * threshold + (1 - decay) * n[4:])
    torch.testing.assert_close(quantizer.usage[:4], decay * 5.0 + (1 - decay) * n[:4])
    out.loss.backward()  # the in-place restart happened before the graph was built, which uses the new codes
    chosen = quantizer.embedding.detach()[out.indices.flatten()]
    code_grad = torch.zeros(8, 3).index_add_(0, out.indices.flatten(), 2 * (chosen - rows) / rows.numel())
    torch.testing.assert_close(quantizer.embedding.grad, code_grad, rtol=1e-6, atol=1e-7)


def test_ema_restart_then_update_keeps_the_code_on_its_vectors():
    generator = torch.Generator().manual_seed(7)
    quantizer = quantizer_with(near_and_far_codes(generator), dead_code_threshold=1.0).train()
    z = torch.randn(4, 3, 2, 2, generator=generator)
    assert quantizer(z).restarted == 0  # all codes start as used once: N = 1 is not below 1
    dead = quantizer.ema_count < 1.0  # unused for a step: the far codes, and any near one no vector chose
    assert dead[4:].all()
    assert quantizer(z, torch.Generator().manual_seed(0)).restarted == int(dead.sum())
    assert (quantizer.ema_count[dead] >= 1.0).all()  # each restarted code was assigned at least its own vector
    assert (quantizer.embedding[4:].abs() < 10).all()  # now among the data


def test_usage_and_perplexity_of_the_code_histogram():
    K = 4
    codes = torch.eye(K) * 3
    quantizer = quantizer_with(codes).eval()
    uniform = quantizer(codes.repeat(3, 1))
    assert uniform.usage.item() == 1.0 and uniform.perplexity.item() == pytest.approx(K, rel=1e-6)
    single = quantizer(codes[2:3].repeat(5, 1))
    assert single.usage.item() == 1 / K and single.perplexity.item() == pytest.approx(1.0, abs=1e-6)
    counts = [3, 1, 0, 4]
    skewed = quantizer(torch.cat([codes[k : k + 1].repeat(c, 1) for k, c in enumerate(counts)]))
    p = [c / sum(counts) for c in counts if c]
    assert skewed.usage.item() == 3 / K
    assert skewed.perplexity.item() == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-6)


def test_l2_normalized_codes_and_outputs_are_unit_vectors():
    generator = torch.Generator().manual_seed(8)
    quantizer = quantizer_with(torch.randn(6, 4, generator=generator) * 5, l2_normalize=True).eval()
    z = torch.randn(2, 4, 3, 3, generator=generator)
    out = quantizer(z)
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 3, 3))
    unit_codes = F.normalize(quantizer.embedding, dim=1)
    assert out.indices.flatten().tolist() == brute_force_nearest(F.normalize(flat_rows(z), dim=1), unit_codes)
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    from dist_vq import CASES, GLOBAL_SEED, SPLIT, fixed_batches, run

    from test_engines import REPO, torchrun

    out = tmp_path / "vq.pt"
    torchrun(2, [str(REPO / "tests/dist_vq.py"), str(out)], timeout=180)
    ranks = torch.load(out)
    for case in CASES:
        torch.manual_seed(GLOBAL_SEED)
        single = run(case, fixed_batches())
        assert sum(single["restarted"]) > 0, case
        for rank in ranks:
            assert rank[case]["restarted"] == single["restarted"], case
            for name, value in single["state"].items():
                torch.testing.assert_close(rank[case]["state"][name], value, rtol=0, atol=1e-6, msg=name)
            for key in ("usage", "perplexity"):
                torch.testing.assert_close(torch.stack(rank[case][key]), torch.stack(single[key]), rtol=0, atol=1e-6)
        for step, indices in enumerate(single["indices"]):
            assert ranks[0][case]["indices"][step].shape[0] == SPLIT
            assert torch.equal(torch.cat([ranks[0][case]["indices"][step], ranks[1][case]["indices"][step]]), indices)


def tiny_vq_autoencoder(**kwargs):
    return build_vq_autoencoder(
        16, 3, latent_channels=4, downsample=4, base_channels=8, layers_per_block=1, norm_groups=4, **kwargs
    )


def test_vq_autoencoder_shapes_token_decoding_and_gradients():
    torch.manual_seed(0)
    model = tiny_vq_autoencoder()
    assert model.downsample_factor == 4
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    quantized, indices, vq_loss, metrics = model.eval().encode(images)
    assert quantized.shape == (2, 3, 4, 4) and indices.shape == (2, 4, 4) and vq_loss.shape == ()
    assert set(metrics) == {"usage", "perplexity", "restarted"}
    decoded = model.decode(quantized)
    assert decoded.shape == images.shape
    assert torch.equal(model.decode_indices(indices), decoded)

    out = model.train()(images)
    assert out["reconstruction"].shape == images.shape and out["indices"].shape == (2, 4, 4)
    (F.mse_loss(out["reconstruction"], images) + out["vq_loss"]).backward()
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_vq_autoencoder_straight_through_trains_its_codebook_by_gradient():
    torch.manual_seed(1)
    model = tiny_vq_autoencoder(update="straight_through", dead_code_threshold=0.0).train()
    out = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    out["vq_loss"].backward()
    assert model.quantizer.embedding.grad.abs().sum() > 0
    model.init_weights()  # reaches the codebook too
    assert (model.quantizer.usage == 1).all()
