"""What every benchmark result records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def device_info(device_type: str = "cpu") -> dict[str, object]:
    info: dict[str, object] = {"type": device_type, "cpu_model": cpu_model(), "cores": os.cpu_count()}
    if device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure_call(step, device: str, repeats: int) -> dict:
    """Peak extra memory of the first call of `step`, then the median time of `repeats` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _rss_kib("VmRSS")
        step()
        peak = (_rss_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "seconds": statistics.median(times) if times else None, "all_seconds": times}
