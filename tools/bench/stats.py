"""Small numeric helpers shared by the scenarios."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    values_ms.sort()
    return {
        "p50_ms": percentile(values_ms, 50),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": values_ms[-1] if values_ms else math.nan,
    }


def geomean(values: Sequence[float]) -> float:
    good = [v for v in values if v > 0 and math.isfinite(v)]
    if not good:
        return math.nan
    return math.exp(sum(math.log(v) for v in good) / len(good))


def cpu_us_per_op(cpu_seconds: float, ops: int) -> float:
    """CPU microseconds per operation: CPU seconds of all server processes over a window,
    divided by the operations acknowledged in it (nan when none were)."""
    return 1e6 * cpu_seconds / ops if ops > 0 else math.nan
