"""The value every sampler returns."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class SampleResult(NamedTuple):
    """``sample``: the final sample; ``trajectory``: ``(steps + 1, *sample.shape)`` states when requested;
    ``nfe``: network evaluations made (a guided call that evaluates a doubled batch counts once)."""

    sample: Tensor
    trajectory: Optional[Tensor]
    nfe: int
