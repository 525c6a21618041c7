"""Across-seed statistics: mean and a two-sided 95% Student-t interval (no SciPy needed)."""

from __future__ import annotations

import math
from typing import Iterable, Optional

__all__ = ["t_quantile_975", "mean_ci"]

# t_{0.975, df} for df = 1..30 (standard tables, 4 decimals)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, Cornish–Fisher beyond)."""
    df = int(df)
    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Iterable[Optional[float]]) -> tuple:
    """``(mean, half_width, n)`` of the finite values: ``half_width = t_{0.975, n−1} · s / √n`` with the sample
    standard deviation ``s``; ``half_width`` is None for ``n < 2`` and ``mean`` is None for ``n = 0``."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, 1
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n
