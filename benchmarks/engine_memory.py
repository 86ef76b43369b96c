"""Per-rank peak memory of the ddp, fsdp and deepspeed (ZeRO-3) engines for the same model and batch.

One run launches, for each engine in turn, `torchrun --standalone --nproc-per-node N` on this file
with `--worker`. Each rank builds config, engine, method (MAE with a ViT encoder) and AdamW exactly as
the train loop does, records a memory baseline after the process group exists and before the model is
built, runs a few full training steps (forward, backward, clip, optimizer step; Adam's state appears at
the first step) on random batches, and writes its peak memory, peak minus baseline and step times to a
file the parent collects. The defaults (ViT-base, 64px images, patch 16: 16 patches, 4 visible after
masking) keep compute cheap so memory is dominated by parameters, gradients and AdamW state, which is
what the engines shard: DDP holds 16 bytes/param on every rank (4 param + 4 grad + 8 Adam), FSDP and
ZeRO-3 16/N.

Memory is torch.cuda.max_memory_allocated on CUDA and the process's max resident set size
(ru_maxrss, a high-water mark) on CPU; CPU numbers therefore include the allocator's behaviour,
the process-group buffers and everything else the process touches.

    python benchmarks/engine_memory.py                      # ddp, fsdp, deepspeed at 2 processes
    python benchmarks/engine_memory.py --nproc 4 --size large --engines ddp,fsdp

(with the project installed, `pip install -e .`, or PYTHONPATH set to the repository root)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from machine import device_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("ddp", "fsdp", "deepspeed")
GIB = 2**30


# ---------------------------------------------------------------------- the worker (one per rank)


def rss_now_gb() -> float:
    """Current resident set size (not the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError, IndexError):
        return float("nan")


def worker_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"engine.kind={args.engine}",
        *(["engine.deepspeed.zero_stage=3"] if args.engine == "deepspeed" else []),
        f"run.device={args.device}",
        f"train.precision={args.precision}",
        f"model.size={args.size}",
        f"model.patch_size={args.patch_size}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"method.mae.decoder_dim={args.decoder_dim}",
        f"method.mae.decoder_depth={args.decoder_depth}",
        f"method.mae.decoder_heads={args.decoder_heads}",
        # DeepSpeed clips inside its step at optim.grad_clip and insists on being asked with that value
        f"optim.grad_clip={args.grad_clip}",
        "tracking.enabled=false",
        *args.overrides,
    ]


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    # Import everything the model and the engine will need before the baseline, so library code
    # (and DeepSpeed's import-time work) is not counted as the engine's memory.
    import pretrain.methods.mae  # noqa: F401
    import pretrain.models.vit  # noqa: F401
    from pretrain.distributed import barrier, destroy_distributed
    from pretrain.engines import build_engine
    from pretrain.engines.base import resolve_device
    from pretrain.memory import peak_memory_gb
    from pretrain.methods.registry import build_method
    from pretrain.optim import build_optimizer
    from pretrain.recipes import load_config
    from pretrain.runtime.world import world_from_env

    cfg = load_config(None, worker_overrides(args))
    world = world_from_env()
    if not world.distributed:
        # One process: DDP and FSDP still need a process group (the engines only create one for N > 1).
        device = resolve_device(cfg.run.device, world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    engine = build_engine(cfg, world)  # creates the process group for N > 1
    device = engine.device
    if cfg.engine.kind == "deepspeed":
        from pretrain.engines.deepspeed import import_deepspeed

        import_deepspeed(device)
    torch.manual_seed(1234 + world.rank)
    barrier()
    gc.collect()
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_memory_gb(device)
    rss_baseline = rss_now_gb()

    with engine.init_context():
        method = build_method(cfg)
    params = sum(p.numel() for p in method.parameters())  # before any engine partitions them
    no_decay = method.no_weight_decay()
    model, optimizer = engine.setup(method, lambda m: build_optimizer(m, cfg.optim, cfg.optim.base_lr, no_decay))
    sync()
    peak_after_setup = peak_memory_gb(device)

    batch_size, size = cfg.data.batch_size, cfg.data.image_size
    step_seconds: list[float] = []
    peaks_after_step: list[float] = []
    loss_value = float("nan")
    for _ in range(args.steps):
        batch = {
            "image": torch.randn(batch_size, cfg.model.in_chans, size, size),
            "label": torch.zeros(batch_size, dtype=torch.long),
        }
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync()
        started = time.perf_counter()
        model.train()
        with engine.accumulate(model, True), engine.autocast():
            out = model(batch)
            engine.backward(out["loss"])
        engine.clip_grad_norm(model, cfg.optim.grad_clip)
        engine.optimizer_step(optimizer)
        loss_value = out["loss"].detach().float().item()  # a host sync, like the loop's per-step one
        sync()
        step_seconds.append(time.perf_counter() - started)
        peaks_after_step.append(peak_memory_gb(device))

    peak = peak_memory_gb(device)
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds  # the first step allocates state
    mean_step = statistics.mean(timed)
    result = {
        "rank": world.rank,
        "world_size": world.world_size,
        "device": str(device),
        "precision": engine.precision,
        "params": params,
        "baseline_gb": baseline,
        "peak_after_setup_gb": peak_after_setup,
        "peak_after_step_gb": peaks_after_step,
        "peak_gb": peak,
        "peak_minus_baseline_gb": peak - baseline,
        "step_seconds": step_seconds,
        "mean_step_seconds": mean_step,
        "samples_per_sec": batch_size / mean_step,
        "final_loss": loss_value,
    }
    if cfg.engine.kind == "deepspeed" and world.rank == 0:
        result["deepspeed_config"] = engine.config(params)  # what ZeRO ran with: bucket sizes decide much of its memory
    if cuda:
        result["reserved_peak_gb"] = torch.cuda.max_memory_reserved(device) / GIB
    else:
        result["rss_baseline_gb"] = rss_baseline
        result["rss_end_gb"] = rss_now_gb()
    Path(args.result_dir, f"rank{world.rank}.json").write_text(json.dumps(result) + "\n")
    barrier()
    destroy_distributed()


# ---------------------------------------------------------------------- the parent


def worker_env(args: argparse.Namespace, device_type: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(args.threads),
        "DS_ACCELERATOR": device_type,
    }
    if device_type == "cpu":
        # glibc raises its mmap threshold dynamically each time a large mmapped block is freed, so after
        # the first few all-gathers FSDP's freed unsharded-parameter buffers would land in the brk heap,
        # which never shrinks: RSS would stay at the unsharded size and hide FSDP's savings. A fixed
        # 1 MiB threshold keeps every large tensor in its own mapping, returned to the OS when freed.
        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    return env


def deepspeed_available(env: dict[str, str]) -> tuple[str | None, str | None]:
    """(deepspeed version, None) if the engine can be tried, else (version or None, why not)."""
    if not (REPO / "pretrain" / "engines" / "deepspeed.py").is_file():
        return None, "pretrain/engines/deepspeed.py does not exist"
    probe = "import deepspeed, pretrain.engines.deepspeed; print(deepspeed.__version__)"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
        )
    except subprocess.TimeoutExpired:
        return None, "importing deepspeed timed out"
    if out.returncode != 0:
        return None, f"import failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    return out.stdout.strip().splitlines()[-1], None


def worker_argv(args: argparse.Namespace, engine: str, result_dir: str) -> list[str]:
    argv = [
        "--worker",
        "--engine", engine,
        "--result-dir", result_dir,
        "--device", args.device,
        "--precision", args.precision,
        "--size", args.size,
        "--image-size", str(args.image_size),
        "--patch-size", str(args.patch_size),
        "--batch-size", str(args.batch_size),
        "--decoder-dim", str(args.decoder_dim),
        "--decoder-depth", str(args.decoder_depth),
        "--decoder-heads", str(args.decoder_heads),
        "--grad-clip", str(args.grad_clip),
        "--steps", str(args.steps),
    ]  # fmt: skip
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def run_engine(args: argparse.Namespace, engine: str, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"engine_memory_{engine}_") as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            str(Path(__file__).resolve()), *worker_argv(args, engine, tmp),
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
            code, stderr = out.returncode, out.stderr
        except subprocess.TimeoutExpired as error:
            err = error.stderr or ""
            code, stderr = "timeout", err.decode(errors="replace") if isinstance(err, bytes) else err
        wall = time.perf_counter() - started
        files = sorted(Path(tmp).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        ranks = [json.loads(p.read_text()) for p in files]
    if code != 0 or len(ranks) != args.nproc:
        tail = "\n".join(stderr.strip().splitlines()[-25:])
        return {
            "status": "failed",
            "reason": f"exit code {code}, {len(ranks)}/{args.nproc} rank results",
            "stderr_tail": tail,
            "wall_seconds": wall,
        }
    deltas = [r["peak_minus_baseline_gb"] for r in ranks]
    slowest = max(r["mean_step_seconds"] for r in ranks)
    return {
        "status": "ok",
        "wall_seconds": wall,
        "params": ranks[0]["params"],
        "precision": ranks[0]["precision"],
        "mean_peak_gb": statistics.mean(r["peak_gb"] for r in ranks),
        "mean_peak_minus_baseline_gb": statistics.mean(deltas),
        "max_peak_minus_baseline_gb": max(deltas),
        # every rank steps together, so the global rate is set by the slowest rank
        "mean_step_seconds": slowest,
        "samples_per_sec": args.nproc * args.batch_size / slowest,
        **({"deepspeed_config": ranks[0].pop("deepspeed_config")} if "deepspeed_config" in ranks[0] else {}),
        "ranks": ranks,
    }


def analytic(engine: str, params: int, nproc: int) -> dict[str, float]:
    """Parameters + gradients + AdamW state (fp32: 4 + 4 + 8 bytes/param) per rank."""
    shards = 1 if engine == "ddp" else nproc
    per_param = {"params": 4, "grads": 4, "adam": 8}
    out = {f"{k}_gb": params * v / shards / GIB for k, v in per_param.items()}
    out["total_gb"] = sum(out.values())
    out["bytes_per_param"] = 16 / shards
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) per engine run")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of ddp,fsdp,deepspeed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="train.precision (auto: bf16 autocast on CUDA, fp32 on CPU)")  # fmt: skip
    parser.add_argument("--size", default="base", help="ViT size: tiny | small | base | large | huge")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=4, help="training steps per engine (the first is not timed)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS per rank (default: cores / nproc)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per engine run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override key=value for every engine, e.g. engine.activation_checkpointing=true")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device_type = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device_type == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(
            f"--nproc {args.nproc} needs as many GPUs, torch sees {torch.cuda.device_count()} (NCCL cannot put two "
            "ranks on one GPU); use --nproc 1 to compare the engines' overheads, or --device cpu"
        )
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    env = worker_env(args, device_type)

    ds_version, ds_reason = (None, "not requested")
    if "deepspeed" in engines:
        ds_version, ds_reason = deepspeed_available(env)

    results: dict[str, dict] = {}
    started = time.perf_counter()
    for engine in engines:
        if engine == "deepspeed" and ds_reason is not None:
            results[engine] = {"status": "skipped", "reason": ds_reason}
            continue
        result = run_engine(args, engine, env)
        if engine == "deepspeed" and result["status"] != "ok":
            result["status"] = "skipped"  # an optional engine: recorded, never fatal
        results[engine] = result
    total_wall = time.perf_counter() - started

    ddp = results.get("ddp", {})
    for engine, result in results.items():
        if result["status"] != "ok":
            continue
        result["analytic_per_rank"] = analytic(engine, result["params"], args.nproc)
        if ddp.get("status") == "ok":
            result["ratio_to_ddp"] = result["mean_peak_minus_baseline_gb"] / ddp["mean_peak_minus_baseline_gb"]
            result["analytic_ratio_to_ddp"] = 1.0 if engine == "ddp" else 1.0 / args.nproc

    memory_note = (
        "torch.cuda.max_memory_allocated per rank (caching-allocator reserve not included; see reserved_peak_gb)"
        if device_type == "cuda"
        else "CPU: ru_maxrss per rank, a high-water mark of resident memory; the baseline is taken after imports "
        "and process-group creation, before the model is built. Numbers include the allocator's behaviour "
        "(glibc, MALLOC_MMAP_THRESHOLD_=1048576 so freed large tensors return to the OS), gloo buffers and "
        "transient copies, so they are an upper bound on what the engine itself holds"
    )
    result_json = {
        "benchmark": "engine_memory",
        "device": device_info(device_type),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": ds_version,
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "parameters": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "worker", "engine", "result_dir")},
            "engines": engines,
            "method": "mae",
            "zero_stage": 3,
            "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
        },
        "wall_seconds": total_wall,
        "results": results,
        "notes": {
            "memory": memory_note,
            "peak_minus_baseline": "peak memory over model build, engine setup and all steps, minus the baseline",
            "analytic": "fp32 parameters + gradients + AdamW exp_avg/exp_avg_sq: DDP 16 bytes/param on every "
            "rank, FSDP and ZeRO-3 16/N. Not included: activations; DDP's gradient buckets (another 4 bytes/"
            "param, gradient_as_bucket_view is off); FSDP's all-gathered parameters of the block(s) being "
            "computed and their unsharded gradients before reduce-scatter; the full model each rank builds "
            "before sharding (FSDP without engine.fsdp.meta_init, ZeRO-3 without zero.Init); ZeRO-3's fp32 master "
            "partition, a separate copy of the parameter partition even in fp32 (20/N bytes/param in all), and "
            "its gradient reduce bucket: DeepSpeed's reduce_bucket_size (default 5e8 elements, see "
            "deepspeed_config) holds up to that many unsharded gradient elements before each reduce-scatter, so "
            "a model smaller than the bucket keeps a full unsharded gradient copy (4 bytes/param) as DDP does; "
            "on CPU only its written pages count. Under bf16 (CUDA) the engines keep fp32 "
            "master weights, so the analytic totals are a lower bound there",
            "step_time": "mean over steps after the first, slowest rank; samples_per_sec = nproc * batch / that",
        },
    }
    out = Path(args.out) / f"engine_memory_{device_type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_json, indent=2) + "\n")

    where = result_json["device"].get("gpu") or result_json["device"]["cpu_model"]
    for engine, r in results.items():
        head = f"engine_memory [{engine}, {args.nproc} rank{'s' if args.nproc > 1 else ''}, {device_type}]"
        if r["status"] != "ok":
            print(f"{head}: {r['status']}: {r['reason']}")
            continue
        ratio = (
            f", {r['ratio_to_ddp']:.2f}x DDP (analytic {r['analytic_ratio_to_ddp']:.2f}x)"
            if "ratio_to_ddp" in r
            else ""
        )
        print(
            f"{head}: MAE ViT-{args.size} {args.image_size}px/{args.patch_size}, {r['params'] / 1e6:.1f}M params, "
            f"batch {args.batch_size}/rank, {r['precision']} on {where}: peak {r['mean_peak_gb']:.2f} GiB/rank, "
            f"peak-baseline {r['mean_peak_minus_baseline_gb']:.2f} GiB (analytic params+grads+Adam "
            f"{r['analytic_per_rank']['total_gb']:.2f} GiB){ratio}, step {r['mean_step_seconds']:.2f} s "
            f"({r['samples_per_sec']:.1f} samples/s)"
        )
    print(f"-> {out} ({total_wall:.0f} s)")
    return 0 if all(results[e]["status"] == "ok" for e in engines if e != "deepspeed") else 1


if __name__ == "__main__":
    sys.exit(main())
