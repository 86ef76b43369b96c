"""The periodic progress line: step, loss, learning rate, throughput and time to go."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Throughput over the last reporting window; ETA from the rate since this process started."""

    def __init__(self, total_steps: int, start_step: int, samples_per_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.samples_per_step = samples_per_step
        self.started = self.window_start = time.perf_counter()
        self.window_step = start_step

    def report(self, step: int) -> dict[str, float]:
        """Rates for the window since the previous report (resets the window)."""
        now = time.perf_counter()
        steps = max(1, step - self.window_step)
        elapsed = max(1e-9, now - self.window_start)
        self.window_start, self.window_step = now, step
        done = max(1, step - self.start_step)
        eta = (now - self.started) / done * (self.total - step)
        return {
            "step_time": elapsed / steps,
            "samples_per_sec": steps * self.samples_per_step / elapsed,
            "eta_sec": eta,
        }

    def line(
        self, step: int, loss: float, lr: float, rates: dict[str, float], skipped: tuple[float, float] = (0, 0)
    ) -> str:
        """`skipped`: (samples, shards) of bad data skipped so far; shown once there is any."""
        width = len(str(self.total))
        bad = f" | skipped {int(skipped[0])} samples, {int(skipped[1])} shards" if any(skipped) else ""
        flops = f"{rates['tflops_per_device']:.3g} TFLOP/s | " if "tflops_per_device" in rates else ""
        flops += f"MFU {100 * rates['mfu']:.1f}% | " if "mfu" in rates else ""
        return (
            f"step {step:>{width}}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{rates['samples_per_sec']:.1f} samples/s | {rates['step_time']:.3f} s/step | {flops}"
            f"eta {format_duration(rates['eta_sec'])}{bad}"
        )
