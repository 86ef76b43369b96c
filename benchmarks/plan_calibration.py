"""`pretrain plan` against real runs: per-rank bytes of a training step measured on CPU with gloo.

For each world size, one `torchrun --standalone --nproc-per-node N` of this file with `--worker`. Each
rank builds the engine, method and AdamW as the train loop does and runs one training step (forward,
backward, optimizer step) of a tiny MAE on random images, for each engine in turn, and records:

- parameters, gradients and optimizer state: the bytes of the distinct storages behind this rank's
  parameters (FSDP2: their local shards), their gradients after backward and the optimizer's state
  tensors after the step: what the engine really allocated, padding included;
- activations: the distinct storages autograd saved for backward during forward
  (torch.autograd.graph.saved_tensors_hooks), parameters and views of them excluded;
- peak resident memory above the baseline (context only: it includes the allocator and gloo).

The parent plans the same config at the same world size with `pretrain.plan.build.make_plan` and writes
both side by side to benchmarks/results/plan_calibration_cpu.json. It also measures the saved activations
of every method's forward (MAE, MoCo v3, DINO, DiT; tiny digits configs, one process) against the
planner's closed forms.

    python benchmarks/plan_calibration.py                        # world sizes 1-4, fsdp, ddp, ZeRO-1/2/3
    python benchmarks/plan_calibration.py --world-sizes 2 --engines fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = "configs/mae_vit_tiny_digits.toml"
ENGINES = ("fsdp", "ddp", "zero1", "zero2", "zero3")
STATE = ("params", "grads", "optimizer")


def overrides(engine: str, batch_size: int) -> list[str]:
    """Config overrides of one engine name: fsdp, ddp, or zero1/zero2/zero3 (DeepSpeed)."""
    kind = (
        ["engine.kind=deepspeed", f"engine.deepspeed.zero_stage={engine[-1]}"]
        if engine.startswith("zero")
        else [f"engine.kind={engine}"]
    )
    return [
        *kind,
        "run.device=cpu",
        "train.precision=fp32",
        f"data.batch_size={batch_size}",
        "tracking.enabled=false",
    ]


# ---------------------------------------------------------------------- the worker (one per rank)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def saved_activation_bytes(model, batch, parameter_storages: set[int]):
    """Run forward; return (its output, bytes of the distinct non-parameter storages saved for backward)."""
    seen: dict[int, int] = {}

    def pack(t):
        # Parameters, and views of them (a linear saves its weight transposed): FSDP2's all-gathered
        # weights live outside the sharded storages, so test the tensor, not only the storage.
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameter_storages:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    return out, sum(seen.values())


def zero_state_bytes(engine, optimizer, params) -> dict:
    """DeepSpeed after its step: parameters (stage 1/2: the module's weights, views into its flat
    buffers; stage 3: each rank's partitions plus the small parameters it keeps gathered) and optimizer
    state (the fp32 master partitions and torch AdamW's state over them). Gradients are not compared:
    DeepSpeed reduces them into its own buckets and partitions and frees them in the step."""
    engine.optimizer_step(optimizer)
    zero = engine.ds.optimizer
    if engine.stage == 3:
        weights = [p.ds_tensor for p in params] + [p.data for p in params if p.data.numel() > 0]
        master = zero.fp32_partitioned_groups_flat
    else:
        weights, master = params, zero.single_partition_of_fp32_groups
    adam = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"params": storage_bytes(weights), "optimizer": storage_bytes([*master, *adam])}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from pretrain.engines import build_engine
    from pretrain.methods.registry import build_method
    from pretrain.optim import build_optimizer
    from pretrain.recipes import load_config
    from pretrain.runtime.world import world_from_env

    world = world_from_env()
    if not world.distributed:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    results = []
    for engine_name in args.engines.split(","):
        cfg = load_config(REPO / CONFIG, overrides(engine_name, args.batch_size))
        engine = build_engine(cfg, world)
        torch.manual_seed(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = rss_kib("VmRSS")
        with engine.init_context():
            method = build_method(cfg)
        model, optimizer = engine.setup(
            method, lambda m, optim=cfg.optim: build_optimizer(m, optim, optim.base_lr, m.no_weight_decay())
        )
        params = [p for p in method.parameters()]
        param_storages = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr() for p in params}
        size = cfg.data.image_size
        batch = {
            "image": torch.randn(cfg.data.batch_size, 3, size, size),
            "label": torch.zeros(cfg.data.batch_size, dtype=torch.long),
        }
        model.train()
        with engine.accumulate(model, True), engine.autocast():
            out, activations = saved_activation_bytes(model, batch, param_storages)
            engine.backward(out["loss"])
        if engine_name.startswith("zero"):
            measured = zero_state_bytes(engine, optimizer, params)
        else:
            grads = storage_bytes(p.grad for p in params)
            engine.clip_grad_norm(model, cfg.optim.grad_clip)
            optimizer.step()
            state = storage_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
            measured = {"params": storage_bytes(params), "grads": grads, "optimizer": state}
        results.append(
            {
                "engine": engine_name,
                "rank": world.rank,
                "world_size": world.world_size,
                **measured,
                "activations": activations,
                "peak_rss_above_baseline": (rss_kib("VmHWM") - baseline) * 1024,
            }
        )
        optimizer.zero_grad(set_to_none=True)
        del model, optimizer, method, params, out
    Path(args.result_dir, f"rank{world.rank}.json").write_text(json.dumps(results) + "\n")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the parent


def measure(world_size: int, engines: str, batch_size: int, timeout: float) -> list[dict]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "1048576",
        "DS_ACCELERATOR": "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="plan_calibration_") as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            str(Path(__file__).resolve()), "--worker", "--result-dir", tmp, "--engines", engines,
            "--batch-size", str(batch_size),
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
        return [row for p in sorted(Path(tmp).glob("rank*.json")) for row in json.loads(p.read_text())]


def planned(engine: str, world_size: int, batch_size: int) -> dict:
    """The plan of the same config at this world size: every rank's state, and activations."""
    from pretrain.plan.build import PlanOptions, make_plan
    from pretrain.recipes import load_config

    cfg = load_config(REPO / CONFIG, overrides(engine, batch_size))
    return make_plan(cfg, PlanOptions(nodes=1, gpus_per_node=world_size, load_world_sizes=(1,)))


def plan_for_rank(plan: dict, rank: int) -> dict:
    return next(r for r in plan["memory"]["ranks"] if r["ranks"][0] <= rank <= r["ranks"][1])


def compare(world_sizes: list[int], engines: str, batch_size: int, timeout: float) -> list[dict]:
    rows = []
    for world_size in world_sizes:
        measured = measure(world_size, engines, batch_size, timeout)
        plans = {e: planned(e, world_size, batch_size) for e in engines.split(",")}
        for m in measured:
            p = plan_for_rank(plans[m["engine"]], m["rank"])
            rows.append(
                {
                    **m,
                    "compared": [k for k in STATE if k in m],
                    "planned": {k: p[k] for k in ("params", "grads", "optimizer", "activations", "buffers")},
                    "activations_measured_over_planned": m["activations"] / p["activations"],
                }
            )
    return rows


# The ResNet cases shrink a recipe to a ResNet-18 (small stem) on 32 px.
RESNET = ["model.arch=resnet18", "model.resnet_stem=small", "data.image_size=32", "eval.pool=mean"]
METHOD_CONFIGS = (
    "configs/mae_vit_tiny_digits.toml",
    "configs/moco_v3_vit_tiny_digits.toml",
    "configs/dino_vit_tiny_digits.toml",
    "configs/dit_digits.toml",
    "configs/simclr_vit_tiny_digits.toml",
    "configs/rotation_vit_tiny_digits.toml",
    "configs/jigsaw_vit_tiny_digits.toml",
    "configs/relative_patch_vit_tiny_digits.toml",
    "configs/inpainting_vit_tiny_digits.toml",
    "configs/colorization_vit_tiny_digits.toml",
    "configs/moco_v2_vit_tiny_digits.toml",
    ("configs/simclr_resnet50.toml", [*RESNET, "method.simclr.proj_hidden_dim=256"]),
    ("configs/moco_v2_resnet50.toml", [*RESNET, "method.moco_v2.queue_size=4096", "method.moco_v2.bn_group_size=2"]),
    ("configs/rotation_vit_tiny_digits.toml", [*RESNET, "method.rotation.pool=mean"]),
)


def random_batch(cfg, batch_size: int) -> dict:
    """What the method's train transform would hand it: images, or a list of views (the crops its spec names),
    or DiT's latents."""
    from pretrain.methods.registry import METHODS

    labels = torch.zeros(batch_size, dtype=torch.long)
    crop_views = METHODS[cfg.method.name].crop_views
    if crop_views is None:  # DiT: latents of the input size
        dit = cfg.method.dit
        return {"image": torch.randn(batch_size, dit.in_channels, dit.input_size, dit.input_size), "label": labels}
    crops = crop_views(cfg)
    image = lambda size: torch.randn(batch_size, cfg.model.in_chans, size, size)  # noqa: E731
    views = [image(size) for size, _ in crops.views]
    return {"image": views[0] if crops.single else views, "label": labels}


def method_activations(batch_size: int) -> list[dict]:
    """Saved activations of each method's forward in one process, against the plan's closed forms."""
    from pretrain.engines.batch_norm import convert_to_global_batch_norm
    from pretrain.methods.registry import METHODS, build_method
    from pretrain.plan.method_models import activations_per_sample
    from pretrain.recipes import load_config

    rows = []
    for entry in METHOD_CONFIGS:
        config, extra = entry if isinstance(entry, tuple) else (entry, [])
        settings = ["run.device=cpu", "train.precision=fp32", f"data.batch_size={batch_size}", *extra]
        cfg = load_config(REPO / config, settings)
        synthetic = METHODS[cfg.method.name].synthetic_overrides  # random images: no shards to count on
        if synthetic is not None and synthetic(cfg):
            cfg = load_config(REPO / config, [*settings, *synthetic(cfg)])
        torch.manual_seed(0)
        method = build_method(cfg).train()
        convert_to_global_batch_norm(method)  # as every engine does
        storages = {p.untyped_storage().data_ptr() for p in method.parameters()}
        _, measured = saved_activation_bytes(method, random_batch(cfg, batch_size), storages)
        planned = sum(activations_per_sample(cfg, 4, False).values()) * batch_size
        rows.append(
            {"config": config, "overrides": extra, "method": cfg.method.name, "arch": cfg.model.arch,
             "batch_size": batch_size, "activations": measured,
             "planned": planned, "measured_over_planned": measured / planned}
        )  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2,3,4")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, str(REPO))
    from machine import device_info

    rows = compare([int(w) for w in args.world_sizes.split(",")], args.engines, args.batch_size, args.timeout)
    methods = method_activations(args.batch_size)
    exact = all(r[k] == r["planned"][k] for r in rows for k in r["compared"])
    ratios = [r["activations_measured_over_planned"] for r in rows]
    result = {
        "benchmark": "plan_calibration",
        "device": device_info("cpu"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.executable).name, *[os.path.relpath(a, REPO) if a == sys.argv[0] else a for a in sys.argv]]
        ),
        "config": CONFIG,
        "overrides": overrides("<engine>", args.batch_size),
        "state_exact": exact,
        "activations_measured_over_planned": {"min": min(ratios), "max": max(ratios)},
        "rows": rows,
        "method_activations": methods,
        "notes": "params/grads/optimizer: distinct storages of this rank's parameters, gradients after backward and "
        "optimizer state after the step; activations: distinct non-parameter storages saved for backward in forward; "
        "peak_rss_above_baseline includes the allocator, gloo and transient copies (not compared)",
    }
    out = Path(args.out) / "plan_calibration_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        p = r["planned"]
        state = ", ".join(f"{k} {r[k]}/{p[k]}" for k in r["compared"])
        print(
            f"W={r['world_size']} rank {r['rank']} {r['engine']}: {state} (measured/planned bytes); activations "
            f"{r['activations']}/{p['activations']} = {r['activations_measured_over_planned']:.3f}"
        )
    for m in methods:
        print(
            f"{m['config']} ({m['method']}, batch {m['batch_size']}, one process): activations "
            f"{m['activations']}/{m['planned']} = {m['measured_over_planned']:.3f}"
        )
    print(f"state exact: {exact}; activations measured/planned {min(ratios):.3f}-{max(ratios):.3f} -> {out}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
