"""Zero-shot editing with any consistency or few-step model (CM's iterative editor, Song et al. 2023, Alg. 4).

The observation ``y`` fixes the *known part* of the sample: in an orthonormal basis ``Q`` (coordinates
``c = Q^T x``) the coordinates marked ``known``. ``replace(y, x)`` keeps the known coordinates of ``y`` and the
other coordinates of ``x``: ``x' = Q (m * Q^T y + (1 - m) * Q^T x)``. The editor, in ucgm coordinates
(``x_t = gamma (x + sigma z)``, ``sigma = alpha / gamma``), with evaluation times ``tau_0 > ... > tau_{n-1}``:

    ``x = gamma(tau_0) (replace(y, 0) + sigma_0 eps)``;
    for each ``i``: ``x0 = replace(y, clamp(f(x, tau_i)))``;
    before the next time: ``x = gamma(tau_{i+1}) (x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) eps)``;

and returns the last ``x0``. ``f`` is the data prediction ``transport.predict(model, x_t, t).data``. The known
part of the result equals the observation's: bitwise for a pixel mask (``Q = I``), to rounding otherwise (the
image is rebuilt from coordinates). Cases:

* inpainting: :class:`PixelMask` (``Q = I``, known = the given pixels);
* colorization: :func:`colorization_subspace` (per pixel, ``Q``'s first vector is the luma direction
  ``(0.2989, 0.5870, 0.1140) / norm``; the luma coordinate is known);
* super-resolution: :func:`super_resolution_subspace` (per ``p x p`` patch and channel, ``Q``'s first vector is
  ``1 / p`` everywhere, i.e. the patch mean is known).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..transports import Transport
from ..validation import check_batch, check_choice, check_finite, check_positive_int
from .consistency_sampler import consistency_times
from .noise import normal_noise
from .result import SampleResult

LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
BLOCK_LAYOUTS = ("flat", "channels", "patches")
"""How a sample ``(C, H, W)`` is cut into the blocks a ``k x k`` basis acts on: ``flat`` (the whole sample, ``k``
= number of values), ``channels`` (the ``C`` values of each pixel) or ``patches`` (each ``p x p`` patch of each
channel, ``k = p^2``)."""


def basis_with_first_vector(vector: Sequence[float] | Tensor) -> Tensor:
    """A ``k x k`` orthonormal float64 matrix whose first column is ``vector / ||vector||``: the Householder
    reflection ``H = I - 2 u u^T / ||u||^2`` with ``u = e_1 - v`` (``H e_1 = v``), or ``I`` when ``v = e_1``."""
    v = torch.as_tensor(vector, dtype=torch.float64).reshape(-1)
    if v.numel() == 0 or not bool(torch.isfinite(v).all()) or float(v.norm()) == 0:
        raise ValueError(f"vector={v.tolist()} must be a non-empty finite non-zero vector")
    v = v / v.norm()
    u = -v
    u[0] += 1
    squared = float(u @ u)
    identity = torch.eye(v.numel(), dtype=torch.float64)
    return identity if squared == 0 else identity - 2 * torch.outer(u, u) / squared


class PixelMask:
    """Known part = the pixels where ``mask`` is true (``Q = I``); ``mask`` broadcasts against ``(B, *shape)``."""

    def __init__(self, mask: Tensor):
        self.mask = torch.as_tensor(mask).to(torch.bool)

    def replace(self, observation: Tensor, sample: Tensor) -> Tensor:
        """``where(mask, y, x)``: the observed pixels exactly, generated ones elsewhere."""
        return torch.where(self.mask.to(sample.device), observation, sample)


class BlockSubspace:
    """Known part = the ``known`` coordinates of every block in the orthonormal ``basis`` (:data:`BLOCK_LAYOUTS`)."""

    def __init__(self, basis: Tensor, known: Sequence[bool] | Tensor, layout: str = "flat", patch: int = 1):
        check_choice("layout", layout, BLOCK_LAYOUTS)
        check_positive_int("patch", patch)
        basis = torch.as_tensor(basis, dtype=torch.float64)
        size = basis.shape[0]
        if basis.ndim != 2 or basis.shape != (size, size) or not torch.allclose(
                basis.T @ basis, torch.eye(size, dtype=torch.float64), atol=1e-10):
            raise ValueError(f"basis has shape {tuple(basis.shape)}; expected an orthonormal (k, k) matrix")
        self.known = torch.as_tensor(known, dtype=torch.bool).reshape(-1)
        if self.known.numel() != size:
            raise ValueError(f"known has {self.known.numel()} entries; expected one per basis vector ({size})")
        self.basis, self.layout, self.patch = basis, layout, patch

    def _blocks(self, x: Tensor) -> Tensor:
        """``(B, *shape)`` -> ``(..., k)`` blocks."""
        if self.layout == "flat":
            return x.reshape(x.shape[0], -1)
        if x.ndim != 4:
            raise ValueError(f"layout {self.layout!r} needs images (B, C, H, W); got shape {tuple(x.shape)}")
        if self.layout == "channels":
            return x.permute(0, 2, 3, 1)
        batch, channels, height, width = x.shape
        p = self.patch
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
        patches = x.reshape(batch, channels, height // p, p, width // p, p)
        return patches.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height // p, width // p, p * p)

    def _unblocks(self, blocks: Tensor, like: Tensor) -> Tensor:
        if self.layout == "flat":
            return blocks.reshape(like.shape)
        if self.layout == "channels":
            return blocks.permute(0, 3, 1, 2)
        batch, channels, height, width = like.shape
        p = self.patch
        patches = blocks.reshape(batch, channels, height // p, width // p, p, p).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(like.shape)

    def coordinates(self, x: Tensor) -> Tensor:
        """``Q^T`` applied to every block (``(..., k)``)."""
        blocks = self._blocks(x)
        if blocks.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"blocks have {blocks.shape[-1]} values but the basis is "
                             f"{self.basis.shape[0]}-dimensional")
        return blocks @ self.basis.to(blocks.device, blocks.dtype)

    def replace(self, observation: Tensor, sample: Tensor) -> Tensor:
        """``Q (m * Q^T y + (1 - m) * Q^T x)`` blockwise."""
        known = self.known.to(sample.device)
        mixed = torch.where(known, self.coordinates(observation), self.coordinates(sample))
        return self._unblocks(mixed @ self.basis.to(sample.device, sample.dtype).T, sample).contiguous()


def colorization_subspace(weights: Sequence[float] = LUMA_WEIGHTS) -> BlockSubspace:
    """Per pixel, a basis of R^C whose first vector is the normalised ``weights`` (luma); only it is known."""
    basis = basis_with_first_vector(weights)
    return BlockSubspace(basis, [True] + [False] * (basis.shape[0] - 1), "channels")


def super_resolution_subspace(factor: int) -> BlockSubspace:
    """Per ``factor x factor`` patch of each channel, a basis whose first vector is constant (``1 / factor``):
    the patch mean is known (the low-resolution image), the rest is generated."""
    check_positive_int("factor", factor)
    basis = basis_with_first_vector(torch.ones(factor * factor))
    return BlockSubspace(basis, [True] + [False] * (factor * factor - 1), "patches", factor)


def edit(
    model: Callable,
    transport: Transport,
    observation: Tensor,
    subspace: PixelMask | BlockSubspace,
    labels: Optional[Tensor] = None,
    steps: int = 20,
    times: Optional[Sequence[float] | Tensor] = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    clamp: Optional[tuple[float, float]] = None,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Fill in the unknown part of ``observation`` ``(B, *shape)`` (module docstring).

    ``times``: decreasing evaluation times (default: :func:`~.consistency_sampler.consistency_times`
    ``(steps)``); ``clamp``: ``(low, high)`` applied to ``f`` before the replacement (CM uses ``(-1, 1)``);
    ``generator`` draws the noise. NFE = number of evaluation times; the trajectory holds the state at each
    time followed by the result.
    """
    if not isinstance(observation, Tensor) or not observation.is_floating_point() or observation.ndim < 2:
        raise ValueError("observation must be a floating tensor of shape (B, *sample_shape)")
    check_finite("observation", observation)
    check_batch("labels", labels, observation.shape[0])
    if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
        raise ValueError(f"clamp={clamp!r} must be None or (low, high) with low < high")
    path = transport.path
    grid = consistency_times(path, steps, sigma_min, sigma_max, rho) if times is None else \
        torch.as_tensor(times, dtype=torch.float64).detach().clone().reshape(-1)
    if grid.numel() < 1 or bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError(f"times={grid.tolist()} must be a non-empty strictly decreasing sequence")
    grid = grid.to(observation.device)
    sigmas = path.alpha(grid) / path.gamma(grid)
    if bool((sigmas < sigma_min * (1 - 1e-9)).any()) or not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"times={grid.tolist()} must have finite noise levels sigma >= sigma_min={sigma_min}")
    dtype, device = observation.dtype, observation.device

    def fresh_noise() -> Tensor:
        return normal_noise(observation.shape, generator, dtype, device)

    known = subspace.replace(observation, torch.zeros_like(observation))
    state = path.gamma(grid[0]).to(dtype) * (known + sigmas[0].to(dtype) * fresh_noise())
    states = [] if return_trajectory else None
    result = known
    for i in range(grid.numel()):
        if states is not None:
            states.append(state)
        prediction = transport.predict(model, state, grid[i].to(dtype).expand(observation.shape[0]), labels).data
        if clamp is not None:
            prediction = prediction.clamp(*clamp)
        result = subspace.replace(observation, prediction)
        if i + 1 < grid.numel():
            scale = math.sqrt(max(float(sigmas[i + 1]) ** 2 - sigma_min**2, 0.0))
            state = path.gamma(grid[i + 1]).to(dtype) * (result + scale * fresh_noise())
    trajectory = torch.stack(states + [result]) if states is not None else None
    return SampleResult(result, trajectory, grid.numel())
