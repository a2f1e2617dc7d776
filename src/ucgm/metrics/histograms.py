"""Exact distances between a sampled histogram of categories and a known probability table.

For ``n`` samples with counts ``n_c`` the empirical distribution is ``p_c = n_c / n``; against the true table
``q``:

* total variation ``TV(p, q) = 1/2 sum_c |p_c - q_c|`` (in [0, 1]);
* Kullback-Leibler ``KL(p || q) = sum_{c: p_c > 0} p_c log(p_c / q_c)`` in nats (infinite when a sampled
  category has ``q_c = 0``). This direction is finite for any sample of a full-support table, unlike
  ``KL(q || p)``, which is infinite whenever a category is missing from the sample.

Both are exact functions of the sample (no estimator); their value for exact samples of the table is the
sample-noise floor (``E[TV] ~ sum_c sqrt(q_c (1 - q_c) / (2 pi n))``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_positive_int


def category_histogram(categories: Tensor, num_categories: int) -> Tensor:
    """Empirical probabilities ``(num_categories,)`` float64 of integer categories in ``0 .. num_categories - 1``."""
    check_positive_int("num_categories", num_categories)
    categories = categories.reshape(-1).long()
    if categories.numel() == 0:
        raise ValueError("a histogram needs at least one sample")
    if categories.min() < 0 or categories.max() >= num_categories:
        raise ValueError(f"categories must lie in [0, {num_categories - 1}]; got [{int(categories.min())}, "
                         f"{int(categories.max())}]")
    counts = torch.bincount(categories.cpu(), minlength=num_categories).to(torch.float64)
    return counts / counts.sum()


def _check_table(table: Tensor, size: int) -> Tensor:
    table = table.reshape(-1).to(torch.float64).cpu()
    if table.numel() != size or (table < 0).any() or abs(float(table.sum()) - 1.0) > 1e-9:
        raise ValueError(f"the table must hold {size} non-negative probabilities summing to 1")
    return table


def total_variation(empirical: Tensor, table: Tensor) -> float:
    """``1/2 sum_c |p_c - q_c|``."""
    empirical = empirical.reshape(-1).to(torch.float64).cpu()
    return float(0.5 * (empirical - _check_table(table, empirical.numel())).abs().sum())


def kl_divergence(empirical: Tensor, table: Tensor) -> float:
    """``KL(p || q) = sum_{p_c > 0} p_c log(p_c / q_c)`` (``inf`` when some ``p_c > 0 = q_c``)."""
    empirical = empirical.reshape(-1).to(torch.float64).cpu()
    table = _check_table(table, empirical.numel())
    support = empirical > 0
    if (table[support] == 0).any():
        return float("inf")
    return float((empirical[support] * (empirical[support] / table[support]).log()).sum())
