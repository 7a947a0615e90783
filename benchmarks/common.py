"""What the benchmarks share: the machine description, interleaved timing, peak memory, JSON output.

Peak memory of a training step is "what the step needs beyond the model's weights": the
optimizer state, plus the highest point that live tensors (activations kept for backward,
gradients, temporaries) reach during one step, counted from its start with the gradients freed.
On a GPU that is ``torch.cuda.max_memory_allocated`` around the step. On the CPU it is the running
sum of every allocation and free that torch's profiler records during the step (its
``profile_memory`` events, in order): exact bytes of torch tensors, unlike RSS deltas, which the C
allocator's caching and returning of pages blur, or tracemalloc, which sees only Python's own
allocations and none of torch's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loramoe.fileio import atomic_write_text

Step = Callable[[], None]


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "processor": platform.processor() or _cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict[str, Step], warmup: int, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call. Variants run round-robin, starting one later each round, so drifting
    machine load and cache state after a given neighbour hit every variant alike."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def step_peak_bytes(step: Step, device: torch.device) -> int:
    """Peak bytes of live tensors above those alive when the step starts (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def summarize(times: dict[str, list[float]], reference: str) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds per variant, and each variant's ratio to ``reference``: the median over
    rounds of the two times in the same round. On a shared machine whose speed drifts by 10-20 %
    over minutes, pairing cancels the drift that a ratio of two medians keeps (see
    :func:`ratio_spread` for how much the rounds disagree)."""
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return median_ms, {name: paired_ratio(times, name, reference) for name in times}


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """The median over rounds of ``name``'s time over ``reference``'s in the same round."""
    return statistics.median(round_ratios(times, name, reference))


def round_ratios(times: dict[str, list[float]], name: str, reference: str) -> list[float]:
    """``name``'s time over ``reference``'s, round by round (:func:`measure` runs one of each per round)."""
    return [t / r for t, r in zip(times[name], times[reference], strict=True)]


def ratio_spread(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Per variant, the first and third quartiles of its round-by-round ratios to ``reference``."""
    spread = {}
    for name in times:
        ratios = round_ratios(times, name, reference)
        spread[name] = statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2
    return spread


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
