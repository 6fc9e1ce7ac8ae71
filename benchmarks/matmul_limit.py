"""The machine's limit, measured in the same run as a benchmark: `torch.matmul` GFLOP/s, and a kernel's rate beside it.

`matmul_limits` times `torch.matmul` on two square matrices in float32 and bfloat16 (the rate a dense kernel
could reach here, measured now, so a busy machine lowers both alike); `rate` formats a kernel's achieved GFLOP/s
with its share of the limit in its precision.
(The same names as the training benchmarks' `machine_limit` helper, written before that one was on main.)
"""
from __future__ import annotations

import time

import torch

DTYPES = (torch.float32, torch.bfloat16)


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


def rate(flops: float, seconds: float, limits: dict[str, float], dtype: str = "float32") -> str:
    """'X GFLOP/s (Y% of the <dtype> matmul limit)'."""
    gflops = flops / max(seconds, 1e-12) / 1e9
    return f"{gflops:,.0f} GFLOP/s ({100 * gflops / limits[dtype]:.0f}% of {dtype} matmul)"
