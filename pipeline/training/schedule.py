"""The paper's learning-rate schedule: linear warm-up from 0 over the first ``warmup_epochs``,
then cosine decay to ``final_fraction`` of the peak at the end of training. Per step."""

from __future__ import annotations

import math


def learning_rate(
    step: int, peak: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
) -> float:
    if step < warmup_steps:
        return peak * step / warmup_steps
    floor = peak * final_fraction
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
