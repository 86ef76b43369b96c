"""Time and peak memory of the attention backends at ViT and DiT shapes, against the reference and PyTorch SDPA.

Each case (backend, shape) runs in a fresh process (`--worker`), so one case's allocations do not hide
another's peak: the process first measures memory over one forward + backward, then times `--repeats`
forward + backward calls and `--repeats` forward-only calls (medians reported). Memory is peak minus the
memory held before the call (q, k, v): torch.cuda.max_memory_allocated on CUDA; on CPU the resident
set's high-water mark (VmHWM, reset through /proc/self/clear_refs). TFLOP/s counts the matmuls without
recomputation: 4 B H N^2 D forward, 12 B H N^2 D forward + backward.

Shapes (heads H, tokens N, head dim D): ViT-B/16 at 224 px (12, 197, 64), ViT-L/16 (16, 197, 64),
ViT-L/14 (16, 257, 64), ViT-H/14 (16, 257, 80), DiT-XL/2 on 32x32 latents (16, 256, 72). The triton
kernel pads D = 72 and 80 to 128 with masks (correct, with the padded lanes' compute wasted).

    python benchmarks/attention.py                 # CPU: reference vs sdpa, fp32, batch 4
    python benchmarks/attention.py --device cuda   # GPU: reference, sdpa, triton (+ xformers if installed), bf16

(with the project installed, `pip install -e .`, or PYTHONPATH set to the repository root)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from machine import device_info, measure_call

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (heads, tokens, head_dim)
    "vit_b16_224": (12, 197, 64),
    "vit_l16_224": (16, 197, 64),
    "vit_l14_224": (16, 257, 64),
    "vit_h14_224": (16, 257, 80),
    "dit_xl2_256": (16, 256, 72),
}
DEFAULTS = {
    "cpu": {"batch": 4, "backends": ["reference", "sdpa"], "dtype": "float32"},
    "cuda": {"batch": 64, "backends": ["reference", "sdpa", "triton", "xformers"], "dtype": "bfloat16"},
}


def worker(case: dict) -> dict:
    from kernels.attention import attention

    batch, heads, tokens, dim = case["batch"], *SHAPES[case["shape"]]
    device, backend = case["device"], case["backend"]
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    q, k, v, upstream = (
        torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, generator=generator) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_()

    def train_step() -> None:
        q.grad = k.grad = v.grad = None
        attention(q, k, v, backend=backend).backward(upstream)

    def forward() -> None:
        with torch.no_grad():
            attention(q, k, v, backend=backend)

    # Initialize thread pools, autograd and kernels on tiny inputs so the measured peak is the call's own.
    tiny = torch.randn(1, 1, 8, dim, device=device, dtype=dtype, requires_grad=True)
    attention(tiny, tiny, tiny, backend=backend).sum().backward()
    try:
        train = measure_call(train_step, device, case["repeats"])
        fwd = measure_call(forward, device, case["repeats"])
    except torch.OutOfMemoryError:
        return {**case, "error": "out of memory"}
    flops = 4 * batch * heads * tokens**2 * dim
    return {
        **case,
        "heads": heads,
        "tokens": tokens,
        "head_dim": dim,
        "train_seconds": train["seconds"],
        "train_peak_bytes": train["peak_bytes"],
        "train_tflops": 3 * flops / train["seconds"] / 1e12,
        "forward_seconds": fwd["seconds"],
        "forward_peak_bytes": fwd["peak_bytes"],
        "forward_tflops": flops / fwd["seconds"] / 1e12,
    }


def run_case(case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "worker failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="batch size (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES), help="names from SHAPES")
    parser.add_argument("--backends", type=lambda s: s.split(","), help="backends (default: per device)")
    parser.add_argument("--dtype", help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    defaults = DEFAULTS[args.device]
    batch, dtype = args.batch or defaults["batch"], args.dtype or defaults["dtype"]
    backends = args.backends or defaults["backends"]
    if args.backends is None and importlib.util.find_spec("xformers") is None and "xformers" in backends:
        backends = [b for b in backends if b != "xformers"]
        print("xformers is not installed (pip install xformers): not measured")
    cases = []
    for shape in args.shapes:
        row = {}
        for backend in backends:
            case = {"backend": backend, "shape": shape, "batch": batch, "device": args.device, "dtype": dtype}
            row[backend] = run_case({**case, "repeats": args.repeats})
            cases.append(row[backend])
        for base in ("reference", "sdpa"):
            if base in row and "error" not in row[base]:
                for r in row.values():
                    if "error" not in r:
                        r[f"train_speed_vs_{base}"] = row[base]["train_seconds"] / r["train_seconds"]
                        r[f"train_memory_vs_{base}"] = r["train_peak_bytes"] / row[base]["train_peak_bytes"]
        print(
            f"{shape} (B={batch}, H, N, D={SHAPES[shape]}): "
            + " | ".join(
                f"{b} {r['train_seconds'] * 1e3:.1f} ms fwd+bwd ({r['train_tflops']:.3f} TFLOP/s, "
                f"{r['train_peak_bytes'] / 2**20:.1f} MiB), fwd {r['forward_seconds'] * 1e3:.1f} ms"
                if "error" not in r
                else f"{b} {r['error']}"
                for b, r in row.items()
            ),
            flush=True,
        )

    device = device_info(args.device)
    result = {
        "benchmark": "attention",
        "device": device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__ if importlib.util.find_spec("triton") else None,
            "xformers": __import__("xformers").__version__ if importlib.util.find_spec("xformers") else None,
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "parameters": {
            "batch": batch,
            "shapes": args.shapes,
            "backends": backends,
            "dtype": dtype,
            "repeats": args.repeats,
        },
        "results": cases,
        "note": "non-causal self-attention on [B, H, N, D]; train = forward + backward with a random upstream "
        "gradient; peak bytes are the first call's peak minus the memory held before it (q, k, v); on CPU the "
        "triton backend computes with SDPA and is therefore not measured there",
    }
    out = Path(args.out) / f"attention_{device['type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
