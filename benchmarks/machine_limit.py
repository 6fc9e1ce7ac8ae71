"""The machine's limit, measured in the same run as a benchmark, and how close a kernel comes to it.

`matmul_limits` times `torch.matmul` on square matrices in float32 and bfloat16 (the rate a dense kernel could
reach here); `count_flops` counts the FLOPs a function does (torch's FlopCounterMode: matmuls and convolutions,
forward and backward); `rate` formats achieved GFLOP/s beside the limit in its precision; `time_breakdown` profiles a
function and says where its time goes (matrix products, random numbers, optimizer, gathers, other tensor ops,
Python and dispatch).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

DTYPES = (torch.float32, torch.bfloat16)
# aten kernels by what they do (self time, so composite ops that only dispatch count nothing)
KERNEL_GROUPS = {
    "matrix products and convolutions": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                         "aten::mkldnn_convolution", "aten::convolution_backward",
                                         "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"),
    "random numbers (masks, shuffles)": ("aten::uniform_", "aten::random_", "aten::randperm", "aten::normal_",
                                         "aten::bernoulli_"),
    "optimizer": ("aten::_fused_sgd_", "aten::_fused_adam_", "aten::_fused_adamw_"),
    "batch gathers": ("aten::index", "aten::index_select", "aten::gather"),
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of `torch.matmul` on two n x n matrices of `dtype` (best of repeated timings over ~`seconds`)."""
    a = torch.rand(n, n, device=device).to(dtype)
    b = torch.rand(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    _synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * n ** 3 / best / 1e9


def matmul_limits(device: torch.device) -> dict[str, float]:
    """`torch.matmul` GFLOP/s in float32 and bfloat16 on `device`, measured now."""
    return {str(dtype).removeprefix("torch."): matmul_gflops(dtype, device) for dtype in DTYPES}


def limit_line(limits: dict[str, float]) -> str:
    """One line: the measured matmul rates."""
    rates = ", ".join(f"{name} {gflops:,.0f}" for name, gflops in limits.items())
    return f"machine limit (torch.matmul 2048 x 2048, measured now): {rates} GFLOP/s"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions `fn` runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rate(flops: float, seconds: float, limits: dict[str, float], dtype: str = "float32") -> str:
    """'X GFLOP/s (Y% of the <dtype> matmul limit)'."""
    gflops = flops / max(seconds, 1e-12) / 1e9
    return f"{gflops:,.1f} GFLOP/s ({100 * gflops / limits[dtype]:.0f}% of {dtype} matmul)"


def time_breakdown(fn: Callable[[], object], flops: float, limits: dict[str, float]) -> list[str]:
    """Profile one call of `fn` (which does `flops` of matrix work) and return lines saying where its time went:
    each kernel group's self time (matrix products with their GFLOP/s), the other tensor ops, and the rest
    (Python, dispatch, autograd bookkeeping). The profiler itself adds some overhead."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    self_s: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            self_s[event.key] = self_s.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
    lines, accounted = [], 0.0
    for group, names in KERNEL_GROUPS.items():
        seconds = sum(self_s.pop(name, 0.0) for name in names)
        accounted += seconds
        extra = f", {rate(flops, seconds, limits)}" if group.startswith("matrix") and seconds > 0 else ""
        lines.append(f"  {group:34s} {seconds:7.2f} s  {100 * seconds / wall:3.0f}%{extra}")
    other = sum(self_s.values())
    top = ", ".join(f"{name.removeprefix('aten::')} {s:.2f}" for name, s in
                    sorted(self_s.items(), key=lambda kv: -kv[1])[:4])
    lines.append(f"  {'other tensor ops':34s} {other:7.2f} s  {100 * other / wall:3.0f}% (largest: {top})")
    rest = max(wall - accounted - other, 0.0)
    lines.append(f"  {'Python, dispatch, autograd':34s} {rest:7.2f} s  {100 * rest / wall:3.0f}%")
    return [f"where the time goes ({wall:.2f} s profiled):"] + lines
