"""Analog Bits (Chen, Zhang, Hinton, ICLR 2023): integers as signed bits that a continuous model generates.

An integer ``v`` in ``0 .. 2^k - 1`` becomes ``k`` bits, least significant first (``b_j = (v >> j) mod 2``, the
order of pix2seq's ``int2bits``), each mapped to ``(2 b_j - 1) * scale``; a sample is decoded by the sign of each
coordinate, ``b_j = [x_j > 0]`` and ``v = sum_j b_j 2^j``. Before the bits, the integer may pass through a fixed
random permutation of ``0 .. 2^k - 1`` (pix2seq's ``uint8_s``; ``permutation_seed``) and then the Gray code
``g = v xor (v >> 1)`` (``code="gray"``); decoding inverts both, so every value round-trips exactly.

Layout: the values of a batch ``(B, C, *spatial)`` (or vectors ``(B, D)``, one value per coordinate) become
``(B, C * k, *spatial)`` (``(B, D * k)``): value channel ``c`` owns bit channels ``c k .. c k + k - 1``, as
pix2seq's ``rgb2bit`` stacks the bits of each colour channel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..validation import check_choice, check_positive_int

BIT_CODES = ("binary", "gray")


def int_to_bits(values: Tensor, num_bits: int) -> Tensor:
    """``(..., num_bits)`` bits of non-negative integers, least significant first: ``b_j = (v >> j) mod 2``."""
    shifts = torch.arange(num_bits, device=values.device)
    return (values.long().unsqueeze(-1) >> shifts) & 1


def bits_to_int(bits: Tensor) -> Tensor:
    """``sum_j b_j 2^j`` over the last axis (bits least significant first)."""
    weights = 2 ** torch.arange(bits.shape[-1], device=bits.device)
    return (bits.long() * weights).sum(dim=-1)


def gray_code(values: Tensor) -> Tensor:
    """``g = v xor (v >> 1)``: neighbouring integers differ in one bit."""
    values = values.long()
    return values ^ (values >> 1)


def inverse_gray_code(codes: Tensor, num_bits: int) -> Tensor:
    """``v`` with ``gray_code(v) = g``: the prefix xor ``v = g xor (g >> 1) xor (g >> 2) xor ...``."""
    values = codes.long().clone()
    shift = 1
    while shift < num_bits:
        values = values ^ (values >> shift)
        shift *= 2
    return values


class BitEncoding:
    """Integers ``0 .. 2^num_bits - 1`` <-> signed bits ``+-scale`` (see the module docstring)."""

    def __init__(self, num_bits: int, code: str = "binary", permutation_seed: Optional[int] = None,
                 scale: float = 1.0):
        check_positive_int("num_bits", num_bits)
        check_choice("bit code", code, BIT_CODES)
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
            raise ValueError(f"bit scale={scale!r} must be a positive number")
        if permutation_seed is not None:
            check_positive_int("permutation_seed", permutation_seed, minimum=0)
        self.num_bits, self.code, self.permutation_seed, self.scale = num_bits, code, permutation_seed, float(scale)
        self.num_values = 2**num_bits
        self.permutation = self.inverse_permutation = None
        if permutation_seed is not None:
            self.permutation = torch.randperm(self.num_values, generator=torch.Generator().manual_seed(permutation_seed))
            self.inverse_permutation = torch.argsort(self.permutation)

    def _check_values(self, values: Tensor) -> Tensor:
        values = values.long()
        if values.numel() and (values.min() < 0 or values.max() >= self.num_values):
            raise ValueError(f"values must be integers in [0, {self.num_values - 1}] for {self.num_bits} bits; got "
                             f"[{int(values.min())}, {int(values.max())}]")
        return values

    def to_codes(self, values: Tensor) -> Tensor:
        """The integers whose plain binary digits are the bits of ``values`` (permutation, then code)."""
        values = self._check_values(values)
        if self.permutation is not None:
            values = self.permutation.to(values.device)[values]
        return gray_code(values) if self.code == "gray" else values

    def from_codes(self, codes: Tensor) -> Tensor:
        """Inverse of :meth:`to_codes`."""
        values = inverse_gray_code(codes, self.num_bits) if self.code == "gray" else codes.long()
        if self.inverse_permutation is not None:
            values = self.inverse_permutation.to(values.device)[values]
        return values

    def encode(self, values: Tensor) -> Tensor:
        """Values ``(B, C, *spatial)`` -> float32 bits ``(B, C * k, *spatial)`` in ``{-scale, +scale}``."""
        if values.ndim < 2:
            raise ValueError(f"values must be a batch (B, C, ...) or (B, D); got shape {tuple(values.shape)}")
        bits = int_to_bits(self.to_codes(values), self.num_bits)          # (B, C, *spatial, k)
        bits = bits.movedim(-1, 2).flatten(1, 2)                            # (B, C * k, *spatial)
        return ((2 * bits - 1) * self.scale).to(torch.float32)

    def decode(self, x: Tensor) -> Tensor:
        """Bits ``(B, C * k, *spatial)`` -> integers ``(B, C, *spatial)`` by the sign of every coordinate."""
        if x.ndim < 2 or x.shape[1] % self.num_bits:
            raise ValueError(f"bits must have a multiple of {self.num_bits} channels on axis 1; got shape "
                             f"{tuple(x.shape)}")
        bits = (x > 0).long().unflatten(1, (x.shape[1] // self.num_bits, self.num_bits)).movedim(2, -1)
        return self.from_codes(bits_to_int(bits))

    def to_dict(self) -> dict:
        return {"num_bits": self.num_bits, "code": self.code, "permutation_seed": self.permutation_seed,
                "scale": self.scale}


class BitNormalisation:
    """A dataset's map between raw integers and model space: ``normalise`` encodes, ``denormalise`` decodes
    (the integers, as floats); ``display`` maps model-space images to grey levels in [-1, 1] (``v / (2^k - 1)``
    stretched), for PNG grids."""

    kind = "bits"

    def __init__(self, encoding: BitEncoding):
        self.encoding = encoding

    def normalise(self, raw: Tensor) -> Tensor:
        return self.encoding.encode(raw.round().long())

    def denormalise(self, x: Tensor) -> Tensor:
        return self.encoding.decode(x).to(torch.float32)

    def display(self, x: Tensor) -> Tensor:
        return self.denormalise(x) * (2.0 / (self.encoding.num_values - 1)) - 1.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.encoding.to_dict()}

    @classmethod
    def from_dict(cls, description: dict) -> "BitNormalisation":
        return cls(BitEncoding(description["num_bits"], description["code"], description["permutation_seed"],
                               description["scale"]))


def normalisation_from_dict(description: dict):
    """The normalisation a checkpoint records: ``{"kind": "affine", ...}`` (:class:`~ucgm.data.base.
    AffineNormalisation`) or ``{"kind": "bits", ...}`` (:class:`BitNormalisation`)."""
    from .base import AffineNormalisation

    kinds = {"affine": AffineNormalisation, "bits": BitNormalisation}
    kind = description.get("kind")
    if kind not in kinds:
        raise ValueError(f"normalisation kind={kind!r} is not allowed; allowed values: {', '.join(map(repr, kinds))}")
    return kinds[kind].from_dict(description)
