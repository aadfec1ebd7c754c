"""Prefill / decode timing of a generation, and a per-step callback, from the LM head's calls.

Both `dyrate_ext.llava.generate` and Hugging Face's `model.generate` call the model's LM head
exactly once per step (step 0: the prefill's last position; step t: the token fed at step t).
`StepClock` hooks the LM head, so it times either loop without changing it:

    with StepClock(model, on_step=bar.update) as clock:
        out = generate(model, ...)
    clock.prefill_seconds, clock.decode_seconds, clock.decode_steps

On a CUDA model every hook call synchronises the device first, so the times are the GPU's.
`median_ms` is the one timer of the benchmarks (CUDA events on a GPU, the host clock on the
CPU) and `copy_bandwidth` the one bandwidth probe they compare against; `describe_machine` and
`git_commit` say where and from what a measurement came.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["StepClock", "copy_bandwidth", "describe_machine", "git_commit", "median_ms"]


class StepClock:
    """Context manager recording the time of each LM-head call of `model`.

    Args:
        model: a model with `get_output_embeddings()` (or an `lm_head`) module.
        on_step: called with no argument after each step (e.g. a progress bar's update).

    Attributes:
        start: time.perf_counter() on entering.
        end: time.perf_counter() on leaving.
        times: perf_counter() after each LM-head call: times[0] ends the prefill.
    """

    def __init__(self, model: nn.Module, on_step: Callable[[], Any] | None = None) -> None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        head = head if head is not None else getattr(model, "lm_head", None)
        if not isinstance(head, nn.Module):
            raise TypeError(f"{type(model).__name__} has no LM head to hook")
        self.head = head
        weight = next(head.parameters())
        self.device = weight.device
        self.on_step = on_step
        self.start = 0.0
        self.end = 0.0
        self.times: list[float] = []
        self._handle: Any = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()

    def __enter__(self) -> StepClock:
        self._sync()
        self.times = []
        self._handle = self.head.register_forward_hook(self._hook)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.end = time.perf_counter()
        self._handle.remove()
        self._handle = None

    @property
    def prefill_seconds(self) -> float:
        """From entering to the end of the first LM-head call (vision tower, embedding, prompt
        through the decoder, first logits)."""
        return self.times[0] - self.start if self.times else 0.0

    @property
    def decode_seconds(self) -> float:
        """From the first LM-head call to the last: the decoding steps that fed a token."""
        return self.times[-1] - self.times[0] if self.times else 0.0

    @property
    def decode_steps(self) -> int:
        """Decoding steps timed (LM-head calls after the prefill's)."""
        return max(len(self.times) - 1, 0)


def median_ms(
    fn: Callable[[], object],
    setup: Callable[[], object] | None = None,
    warmup: int = 1,
    iters: int = 7,
    device: torch.device | str = "cpu",
) -> float:
    """Median milliseconds of `fn` over `iters` timed runs after `warmup` untimed ones; each
    run is preceded by an untimed `setup()` (e.g. undoing an in-place op). On a CUDA device the
    time is the GPU's, between two CUDA events; elsewhere the host's perf_counter."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {iters} and {warmup}")
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + iters):
        if setup is not None:
            setup()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20) -> float:
    """The device's copy bandwidth in bytes/s, read + written, of a `nbytes` float32 copy_
    (median of 7 runs): the yardstick for the bytes a memory-bound op moves."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=2, iters=7, device=device)
    return 2 * n * 4 / (ms * 1e-3)


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line: the CPU model and thread count, plus the GPU name for a CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads ({os.cpu_count()} cores), torch {torch.__version__}"
    device = torch.device(device)
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def git_commit(path: str | os.PathLike[str] = ".") -> str:
    """The short commit hash of the git checkout holding `path`, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
