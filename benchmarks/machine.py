"""What every benchmark result records about the machine it ran on."""

from __future__ import annotations

import os
import platform

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
