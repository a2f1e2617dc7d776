"""Discrete datasets for Analog Bits: a 2-D categorical toy with a known probability table, and the digits
quantised to ``2^k`` grey levels. Both yield bit-encoded samples (:mod:`ucgm.data.bits`, ``encoding: bits``)
and decode generated samples back to integers (``dataset.denormalise``).

* :class:`CategoricalGridDataset`: a category is a cell ``(i, j)`` of a ``grid x grid`` board (``grid = 2^m``),
  drawn from the probability table :attr:`~CategoricalGridDataset.table`; a sample is the two integers ``(i, j)``,
  each as ``m`` bits, so ``2 m`` coordinates. Tables: ``"stripes"`` (``p(i, j) ∝ 1 + 9 [(i + j) mod 4 = 0]``,
  diagonal stripes whose low bits are correlated across the two coordinates through the carry of ``i + j``),
  ``"uniform"``, or a nested list of ``grid x grid`` non-negative weights. The table is exact, so the total
  variation and KL of a sampled histogram are exact too (:mod:`ucgm.metrics.histograms`).
* :class:`QuantisedDigitsDataset`: scikit-learn's 8x8 digits (values 0..16) quantised to ``levels = 2^k`` grey
  levels, ``q = round(v (levels - 1) / 16)``; a sample is ``(k, 8, 8)`` bit channels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..validation import check_choice, check_positive_int
from .base import Dataset, TensorDataset
from .bits import BitEncoding, BitNormalisation
from .digits import DIGITS_MAX_VALUE, load_digits_split

ENCODINGS = ("bits",)
NAMED_TABLES = ("stripes", "uniform")


def _bits_for(count: int, what: str) -> int:
    """``m`` with ``2^m = count`` (a power of two >= 2), else ``ValueError``."""
    check_positive_int(what, count, minimum=2)
    bits = int(math.log2(count))
    if 2**bits != count:
        raise ValueError(f"{what}={count} must be a power of two (2, 4, 8, ...) so that every value has a bit code")
    return bits


def _bit_encoding(encoding: str, num_bits: int, bit_code: str, bit_permutation: Optional[int],
                  bit_scale: float) -> BitEncoding:
    check_choice("encoding", encoding, ENCODINGS)
    return BitEncoding(num_bits, bit_code, bit_permutation, bit_scale)


def grid_table(grid: int, table: Union[str, Sequence[Sequence[float]]] = "stripes") -> Tensor:
    """The ``(grid, grid)`` float64 probability table of a named pattern or of given weights (normalised)."""
    if isinstance(table, str):
        check_choice("table", table, NAMED_TABLES)
        rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        weights = (1 + 9 * ((rows + columns) % 4 == 0)) if table == "stripes" else torch.ones(grid, grid)
    else:
        weights = torch.as_tensor(table, dtype=torch.float64)
        if weights.shape != (grid, grid):
            raise ValueError(f"table must be {grid} x {grid} weights (grid={grid}); got shape {tuple(weights.shape)}")
    weights = weights.to(torch.float64)
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("table weights must be finite, non-negative and not all zero")
    return weights / weights.sum()


class CategoricalGridDataset(Dataset):
    """The categorical toy (module docstring): unconditional, drawn afresh (no indices)."""

    def __init__(self, grid: int = 8, table: Union[str, list] = "stripes", encoding: str = "bits",
                 bit_code: str = "binary", bit_permutation: Optional[int] = None, bit_scale: float = 1.0):
        bits_per_axis = _bits_for(grid, "grid")
        self.grid = grid
        self.table = grid_table(grid, table)
        self.encoding = _bit_encoding(encoding, bits_per_axis, bit_code, bit_permutation, bit_scale)
        self.normaliser = BitNormalisation(self.encoding)
        self.shape = (2 * bits_per_axis,)
        self.num_classes = 0

    @property
    def num_categories(self) -> int:
        return self.grid * self.grid

    def categories(self, cells: Tensor) -> Tensor:
        """Category ``i * grid + j`` of integer cells ``(B, 2)``."""
        return cells[:, 0].long() * self.grid + cells[:, 1].long()

    def sample_cells(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """``(B, 2)`` integer cells drawn from the table."""
        check_positive_int("batch_size", batch_size)
        flat = torch.multinomial(self.table.flatten(), batch_size, replacement=True, generator=generator)
        return torch.stack([flat // self.grid, flat % self.grid], dim=1)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        return self.normaliser.normalise(self.sample_cells(batch_size, generator)), None


def quantise_digits(images: Tensor, levels: int) -> Tensor:
    """Raw digits (0..16) -> integer grey levels ``round(v (levels - 1) / 16)`` in ``0 .. levels - 1``."""
    return torch.round(images * (levels - 1) / DIGITS_MAX_VALUE).long()


class QuantisedDigitsDataset(TensorDataset):
    """The 8x8 digits at ``levels`` grey levels as ``(log2 levels, 8, 8)`` bits, 10 classes (module docstring)."""

    def __init__(self, levels: int = 8, split: str = "train", encoding: str = "bits", bit_code: str = "binary",
                 bit_permutation: Optional[int] = None, bit_scale: float = 1.0):
        encoding_ = _bit_encoding(encoding, _bits_for(levels, "levels"), bit_code, bit_permutation, bit_scale)
        images, labels = load_digits_split(split)
        normaliser = BitNormalisation(encoding_)
        super().__init__(normaliser.normalise(quantise_digits(images, levels)), labels, 10, normaliser)
        self.levels, self.split, self.encoding = levels, split, encoding_

    def grey_images(self, split: Optional[str] = None) -> Tensor:
        """The quantised digits of ``split`` (default: this dataset's) as grey images in [-1, 1], the space
        decoded samples are scored in."""
        images, _ = load_digits_split(split or self.split)
        return quantise_digits(images, self.levels).float() * (2.0 / (self.levels - 1)) - 1.0
