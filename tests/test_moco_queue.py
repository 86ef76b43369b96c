"""MoCo v1/v2: the queue loss against the paper's equation, the queue's enqueue order and wrap-around, BatchNorm
over fixed groups, shuffle BN against the unshuffled computation, exact resume through the train loop, and
every engine at 2 ranks equal to one process (queue, shuffle and BatchNorm spanning both ranks)."""

from __future__ import annotations

import math

import pytest
import torch
from dist_engine_runs import moco_overrides
from engine_runs import CASES, check_case
from test_pretext import REPO

from pretrain.config import ConfigError
from pretrain.methods.moco_queue import moco_queue_loss
from pretrain.methods.registry import build_method
from pretrain.models.group_batch_norm import GroupBatchNorm
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import assert_equal_states, tiny_overrides


def queue_loss_formula(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Equation (1) of the MoCo paper term by term: L_q = -log exp(q.k+ / tau) / sum_{i=0..K} exp(q.k_i / tau),
    the sum over the positive and the K queue keys; the mean over queries."""
    terms = []
    for i in range(len(q)):
        positive = torch.exp(q[i] @ k[i] / tau)
        negatives = sum(torch.exp(q[i] @ key / tau) for key in queue)
        terms.append(-torch.log(positive / (positive + negatives)))
    return sum(terms) / len(terms)


def unit(*shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_queue_loss_is_the_papers_equation() -> None:
    torch.manual_seed(0)
    q, k, queue = unit(6, 8).requires_grad_(True), unit(6, 8), unit(11, 8)
    q_formula = q.detach().clone().requires_grad_(True)
    loss, expected = moco_queue_loss(q, k, queue, 0.07), queue_loss_formula(q_formula, k, queue, 0.07)
    loss.backward(), expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.grad, q_formula.grad, rtol=1e-10, atol=1e-12)
    # the other keys of the batch are not negatives: a query equal to every key is at chance among 1 + K
    same = torch.ones(4, 8, dtype=torch.float64) / math.sqrt(8)
    assert float(moco_queue_loss(same, same, same.repeat(3, 1), 0.2)) == pytest.approx(math.log(13))


def test_group_batch_norm_is_batch_norm_on_each_group() -> None:
    """Training: each group of 4 normalized as plain BatchNorm would alone; running statistics: the mean of
    what each group's BatchNorm tracks (their unbiased variances); eval: the running statistics."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2 + 1
    grouped = GroupBatchNorm(3, group_size=4).double()
    grouped.weight.data.uniform_(0.5, 1.5), grouped.bias.data.uniform_(-1, 1)
    plain = [torch.nn.BatchNorm2d(3).double() for _ in range(2)]
    for bn in plain:
        bn.load_state_dict(grouped.state_dict())
    out = grouped(x)
    torch.testing.assert_close(out, torch.cat([bn(part) for bn, part in zip(plain, x.chunk(2))]))
    torch.testing.assert_close(grouped.running_mean, (plain[0].running_mean + plain[1].running_mean) / 2)
    torch.testing.assert_close(grouped.running_var, (plain[0].running_var + plain[1].running_var) / 2)
    assert int(grouped.num_batches_tracked) == 1
    grouped.eval(), plain[0].eval()
    plain[0].load_state_dict(grouped.state_dict())
    torch.testing.assert_close(grouped(x), plain[0](x))
    torch.testing.assert_close(grouped(x[:5]), plain[0](x[:5]))  # evaluation batches need not be whole groups
    with pytest.raises(ValueError, match="a batch of 6 is not a whole number of groups of 4"):
        grouped.train()(x[:6])


def tiny_moco(*extra: str):
    cfg = load_config(None, moco_overrides(*extra))
    torch.manual_seed(0)
    return build_method(cfg)


def test_shuffle_bn_keys_are_the_unshuffled_computation() -> None:
    """On one process, shuffled keys are each image's key computed in its shuffled BatchNorm group, put back in
    order; with the key encoder's BatchNorm in eval mode (no batch statistics) they equal the unshuffled keys."""
    moco = tiny_moco()
    images = torch.randn(8, 3, 16, 16)
    order = moco._permutation(8)
    keys = moco.keys(images)
    expected = torch.empty_like(keys)
    with torch.no_grad():
        for group in order.split(2):  # each BatchNorm group of the shuffled batch, encoded on its own
            expected[group] = moco._encode_keys(images[group])
        unshuffled = moco._encode_keys(images)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(keys, unshuffled, atol=1e-3)  # the groups changed: statistics differ
    moco.key_backbone.eval()
    torch.testing.assert_close(moco.keys(images), moco._encode_keys(images), rtol=1e-5, atol=1e-6)
    # the permutation follows the number of key batches encoded, the same on every rank
    assert torch.equal(moco._permutation(8), order)
    moco.key_batches.add_(1)
    assert not torch.equal(moco._permutation(8), order)


def test_keys_enter_the_queue_in_batch_order_and_wrap_around() -> None:
    moco = tiny_moco()
    moco.queue_ptr.fill_(16)  # 4 slots before the end of the 20
    before = moco.queue.clone()
    images = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    loss = moco({"image": images})["loss"]
    # the loss saw the queue as it was before this batch's keys entered it
    moco.key_batches.sub_(1)
    keys = moco.keys(images[1])
    torch.testing.assert_close(moco.queue[16:], keys[:4])
    torch.testing.assert_close(moco.queue[:4], keys[4:])
    assert torch.equal(moco.queue[4:16], before[4:16])
    assert int(moco.queue_ptr) == 4
    query = moco.query(images[0])
    torch.testing.assert_close(loss, moco_queue_loss(query, keys, before, moco.temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=vit", "model.patch_size=8"], "method.moco_v2.shuffle_bn: a ViT has no BatchNorm"),
        (["method.moco_v2.bn_group_size=0"], "method.moco_v2.shuffle_bn: BatchNorm is global"),
        (["method.moco_v2.bn_group_size=3"], "method.moco_v2.bn_group_size: data.batch_size 4 per process"),
        (["method.moco_v2.pool=cls"], "method.moco_v2.pool: a ResNet's pooled feature"),
        (["data.local_crops=2"], "data.local_crops: MoCo uses exactly two views"),
        (["optim.lr_milestones=[0.5]"], "optim.lr_milestones: [0.5] are read only by optim.schedule='step'"),
        (["optim.schedule=step", "optim.lr_milestones=[0.8, 0.6]"], "optim.lr_milestones: optim.schedule='step' needs"),
        (["optim.schedule=step", "optim.lr_milestones=[1]"], "optim.lr_milestones: optim.schedule='step' needs"),
        (["optim.name=lars", "optim.decay_biases_and_norms=true"], "optim.decay_biases_and_norms: LARS"),
    ],
)
def test_bad_moco_configs_fail_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, moco_overrides(*overrides))


def test_the_recipes_are_the_released_settings() -> None:
    v1, v2 = (load_config(REPO / "configs" / f"moco_v{v}_resnet50.toml") for v in (1, 2))
    assert (v1.method.moco_v1.temperature, v1.method.moco_v1.mlp, v1.optim.schedule) == (0.07, False, "step")
    assert (v2.method.moco_v2.temperature, v2.method.moco_v2.mlp, v2.optim.schedule) == (0.2, True, "cosine")
    assert [round(f * v1.train.steps) for f in v1.optim.lr_milestones] == [120 * 5004, 160 * 5004]
    for cfg in (v1, v2):
        moco = getattr(cfg.method, cfg.method.name)
        assert (moco.queue_size, moco.momentum, moco.bn_group_size) == (65536, 0.999, 32)
        assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay) == ("sgd", 0.03, 1e-4)
    assert v2.data.blur_prob == (0.5, 0.5) and v1.data.blur_prob == (0.0, 0.0)


def resnet_run(out, shards, *extra: str) -> list[str]:
    """The tiny run's data and schedule with the test's ResNet-18 MoCo v2 (BN groups of 2, a queue of 20)."""
    run = [s for s in tiny_overrides(out, shards) if not s.startswith("model.")]
    return [*run, *moco_overrides("optim.name=sgd", "optim.schedule=step"), *extra]


def test_a_queue_run_resumes_bit_identically(tmp_path, digit_shards) -> None:
    """Stopped after 3 steps and resumed, the run equals a straight one: losses, weights, running statistics,
    the queue, its pointer and the shuffle counter. Its encoder is the ResNet kNN and the probe read."""
    sets = ["tracking.enabled=false", "train.steps=5", "optim.lr_milestones=[0.6]", "data.batch_size=6"]
    first = Trainer(load_config(None, resnet_run(tmp_path / "a", digit_shards, *sets)))
    straight = first.fit()
    again = resnet_run(tmp_path / "b", digit_shards, *sets)
    Trainer(load_config(None, again)).fit(until=3)
    resumed = Trainer(load_config(None, again))
    result = resumed.fit()
    assert result.losses == straight.losses[3:] and all(math.isfinite(x) for x in straight.losses)
    state = resumed.method.state_dict()
    assert_equal_states(state, first.method.state_dict())
    assert int(state["queue_ptr"]) == 5 * 6 % 20 and int(state["key_batches"]) == 5
    encoder = resumed.method.inference_network()
    assert type(encoder).__name__ == "ResNet" and encoder.forward_features(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
    picture = resumed.method.visuals({"image": [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]})
    assert picture["queries_and_nearest_keys"].dtype == torch.uint8


@pytest.mark.slow
@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("moco_v2-")])
def test_two_ranks_match_one_process_with_the_queue_and_shuffle_bn(engine_runs, case) -> None:
    """Same global batch, same steps: losses, parameters, BN running statistics and the queue agree, so
    keys enter the queue in global-batch order and the shuffle and BN groups are the same at any world size."""
    state = check_case(engine_runs, case)
    assert int(state["queue_ptr"]) == 3 * 8 % 20  # wrapped around once
    assert {"queue", "queue_ptr", "key_batches"} <= engine_runs[CASES[case][0]]["state"].keys()
