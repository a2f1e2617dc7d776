"""The smallest NFE at which a sampler is at least as good as a reference sampler at a large budget.

UCGM's claim for a pretrained model (the paper's 250 -> 40 steps): UCGM-S matches the quality of a standard
sampler at many steps with far fewer. :func:`smallest_matching_nfe` scores the sampler at increasing budgets
and stops at the first whose value is at least as good as the reference value (``<=``, or ``>=`` for metrics
where higher is better); ``None`` when no scanned budget matches.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

#: The reference: Euler at 250 NFE (the paper's baseline budget).
REFERENCE_SAMPLER, REFERENCE_NFE = "euler", 250
#: Budgets scanned by default, in increasing order.
DEFAULT_SCAN = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 250)


def smallest_matching_nfe(score: Callable[[int], float], reference_value: float, nfes: Sequence[int] = DEFAULT_SCAN,
                          higher_is_better: bool = False) -> dict:
    """``{"smallest_nfe": n or None, "values": {nfe: value}, "reference_value": v}``: ``score(nfe)`` at the budgets
    ``nfes`` in increasing order until one is at least as good as ``reference_value``."""
    budgets = sorted(set(int(nfe) for nfe in nfes))
    if not budgets or budgets[0] < 1:
        raise ValueError(f"nfes={list(nfes)!r} must be positive budgets")
    values: dict[int, float] = {}
    found: Optional[int] = None
    for nfe in budgets:
        values[nfe] = float(score(nfe))
        if (values[nfe] >= reference_value) if higher_is_better else (values[nfe] <= reference_value):
            found = nfe
            break
    return {"smallest_nfe": found, "values": values, "reference_value": float(reference_value)}


def match_reference(score: Callable[[str, int], float], sampler: str = "ucgm", nfes: Sequence[int] = DEFAULT_SCAN,
                    higher_is_better: bool = False) -> dict:
    """:func:`smallest_matching_nfe` of ``sampler`` against :data:`REFERENCE_SAMPLER` at :data:`REFERENCE_NFE`,
    with ``score(sampler_name, nfe)`` the metric of that sampler's samples; the result also names both samplers."""
    reference = score(REFERENCE_SAMPLER, REFERENCE_NFE)
    found = smallest_matching_nfe(lambda nfe: score(sampler, nfe), reference, nfes, higher_is_better)
    return {**found, "sampler": sampler, "reference_sampler": REFERENCE_SAMPLER, "reference_nfe": REFERENCE_NFE}
