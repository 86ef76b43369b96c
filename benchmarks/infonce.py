"""Time and peak memory of the InfoNCE implementations (formula, tiled PyTorch, Triton) over a grid of sizes.

Each case (implementation, N, D) runs in a fresh process (`--worker`), so one case's allocations do
not hide another's peak: the process first measures memory over one forward + backward, then times
`--repeats` more (median reported). Keys are as many as queries (M = N), both need gradients.
Memory is peak minus the memory held before the call (the inputs): torch.cuda.max_memory_allocated
on CUDA; on CPU the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs).
TFLOP/s counts 6 N M D per forward + backward (logits forward, dq and dk backward), the same count for
every implementation, so recomputation in the tiled paths is not credited.

    python benchmarks/infonce.py                 # CPU: a reduced grid, reference vs tiled, fp32
    python benchmarks/infonce.py --device cuda   # GPU: N 1k..64k, D 128/256, bf16, with Triton
    python benchmarks/infonce.py --case simclr   # SimCLR's NT-Xent: N = 8k and 32k views, D 128

Cases: `moco` (queries against as many keys, query i's positive is key i) and `simclr` (NT-Xent: the N rows
of the 2-view batch are queries and keys at once, each row's positive is its partner view and the row
itself is left out of its softmax); each writes its own JSON (infonce_<device>.json, infonce_simclr_<device>.json).

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
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from machine import device_info, measure_call

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SIMCLR_GRIDS = {
    "cpu": {"sizes": [8192, 32768], "dims": [128], "impls": ["reference", "tiled"], "dtype": "float32"},
    "cuda": {
        "sizes": [8192, 32768, 65536],
        "dims": [128],
        "impls": ["reference", "tiled", "triton"],
        "dtype": "bfloat16",
    },
}
GRIDS = {
    "cpu": {"sizes": [1024, 4096, 8192], "dims": [128, 256], "impls": ["reference", "tiled"], "dtype": "float32"},
    "cuda": {
        "sizes": [1024, 4096, 16384, 32768, 65536],
        "dims": [128, 256],
        "impls": ["reference", "tiled", "triton"],
        "dtype": "bfloat16",
    },
}


def worker(case: dict) -> dict:
    from kernels.infonce import info_nce

    n, d, device = case["n"], case["d"], case["device"]
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(n, d, device=device, dtype=dtype, generator=generator).requires_grad_()
    k = torch.randn(n, d, device=device, dtype=dtype, generator=generator).requires_grad_()
    positives = exclude = None
    if case.get("case") == "simclr":  # one set of 2-view embeddings, queries and keys at once
        from kernels.infonce import nt_xent_indices

        k = q
        positives, exclude = nt_xent_indices(n, 0, q.device)

    def step() -> None:
        q.grad = k.grad = None
        info_nce(q, k, 0.1, positives, impl=case["impl"], exclude=exclude).backward()

    # Initialize thread pools, autograd and kernels on tiny inputs so the measured peak is the call's own.
    tiny = torch.randn(8, d, device=device, dtype=dtype, requires_grad=True)
    info_nce(tiny, tiny, 0.1, impl=case["impl"]).backward()

    try:
        if case["repeats"] == 0:  # the memory call is the one timed (for cases too slow to run twice)
            start = time.perf_counter()
            result = measure_call(step, device, 0)
            result["seconds"] = time.perf_counter() - start
            result["all_seconds"] = [result["seconds"]]
        else:
            result = measure_call(step, device, case["repeats"])
    except torch.OutOfMemoryError:
        return {**case, "error": "out of memory"}
    result["tflops"] = 6 * n * n * d / result["seconds"] / 1e12
    return {**case, **result}


def run_case(case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "worker failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_record(args, sizes, dims, impls, dtype, cases) -> Path:
    """The JSON of the cases run so far (written after every row, so a long grid stopped early keeps them)."""
    device = device_info(args.device)
    result = {
        "benchmark": "infonce",
        "device": device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__ if importlib.util.find_spec("triton") else None,
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "case": args.case,
        "parameters": {"sizes": sizes, "dims": dims, "impls": impls, "dtype": dtype, "repeats": args.repeats},
        "results": cases,
        "note": "one forward + backward per timing, M = N keys, temperature 0.1, normalize=True; peak_bytes is "
        "the first call's peak minus the memory held before it; speed/memory_vs_reference divide by the formula "
        "(info_nce_reference, which materializes the N x N logits) at the same size",
    }
    name = "infonce" if args.case == "moco" else f"infonce_{args.case}"
    if args.case == "simclr":
        result["note"] = result["note"].replace("M = N keys", "NT-Xent: the N rows are the queries and the keys")
    out = Path(args.out) / f"{name}_{device['type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("moco", "simclr"), default="moco", help="the loss's layout (see above)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="N values (default: per device)")
    parser.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], help="D values (default: 128,256)")
    parser.add_argument("--impls", type=lambda s: s.split(","), help="implementations (default: per device)")
    parser.add_argument("--dtype", help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per case (median reported); 0: time the memory call"
    )
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    grid = (SIMCLR_GRIDS if args.case == "simclr" else GRIDS)[args.device]
    sizes, dims = args.sizes or grid["sizes"], args.dims or grid["dims"]
    impls, dtype = args.impls or grid["impls"], args.dtype or grid["dtype"]
    cases = []
    for d in dims:
        for n in sizes:
            row = {}
            for impl in impls:
                case = {"impl": impl, "n": n, "d": d, "device": args.device, "dtype": dtype, "repeats": args.repeats}
                if args.case == "simclr":
                    case["case"] = "simclr"
                row[impl] = run_case(case)
                cases.append(row[impl])
            line = f"N={n:6d} D={d}: " + " | ".join(
                f"{impl} {r['seconds'] * 1e3:8.1f} ms {r['peak_bytes'] / 2**20:8.1f} MiB"
                if "error" not in r
                else f"{impl} {r['error']}"
                for impl, r in row.items()
            )
            reference = row.get("reference", {})
            for impl, r in row.items():
                if impl != "reference" and "error" not in r and "error" not in reference and reference:
                    r["speed_vs_reference"] = reference["seconds"] / r["seconds"]
                    r["memory_vs_reference"] = r["peak_bytes"] / reference["peak_bytes"]
                    line += f" | {impl}: {r['speed_vs_reference']:.2f}x speed, {r['memory_vs_reference']:.3f}x memory"
            print(line, flush=True)
            write_record(args, sizes, dims, impls, dtype, cases)

    out = write_record(args, sizes, dims, impls, dtype, cases)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
