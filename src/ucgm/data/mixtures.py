"""Class-conditional isotropic Gaussian mixtures with an exact oracle for their noisy marginals, 2-D toy sets, and
the dataset of fresh draws from a named mixture (:class:`MixtureDataset`; a fixed, indexed set of draws with its
``num_samples`` option).

The data density is ``p(x) = sum_k w_k N(x; mu_k, s_k^2 I)``; class ``c`` is the sub-mixture of the components
labelled ``c`` (weights renormalised), and the null label ``num_classes`` means the whole mixture.

On any ucgm path ``x_t = alpha z + gamma x`` component ``k`` becomes ``N(gamma mu_k, v_k I)`` with
``v_k = gamma^2 s_k^2 + alpha^2``, so every quantity of the noisy marginal is available in closed form. With
responsibilities ``r_k(x_t)`` (posterior component probabilities) and ``d_k = x_t - gamma mu_k``:

* ``E[x | x_t] = sum_k r_k (mu_k + gamma s_k^2 d_k / v_k)``,
* ``E[z | x_t] = sum_k r_k alpha d_k / v_k``,
* ``grad log p_t(x_t) = -sum_k r_k d_k / v_k``,
* ``log p_t(x_t) = logsumexp_k (log w_k + log N(x_t; gamma mu_k, v_k I))``.

All of it is computed in float64 and returned in the dtype of the query points, which may be ``(B, D)`` or any
``(B, *shape)`` with ``prod(shape) = D`` (e.g. ``(B, 2, 1, 1)`` images of 2-D points). Everything stays finite
at ``t = 0`` (``alpha = 0``: ``E[x | x_0] = x_0 / gamma``) and where ``gamma = 0`` (``E[x | x_1]`` is the class
mean); the velocity inherits singular path derivatives (VP: ``alpha'(0)`` is infinite, so query it at ``t > 0``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..transports import Transport
from ..validation import check_batch, check_choice, check_finite, check_positive_int
from .base import AffineNormalisation, Dataset, FiniteDataset


def _as_float64(name: str, value) -> Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()
    check_finite(name, tensor)
    return tensor


class _NoisyComponents(NamedTuple):
    """Everything the oracle needs at one batch of query points (float64, flattened to ``(B, D)``)."""

    alpha: Tensor  # (B, 1)
    gamma: Tensor  # (B, 1)
    offsets: Tensor  # (B, K, D): d_k = x_t - gamma mu_k
    variances: Tensor  # (B, K): v_k = gamma^2 s_k^2 + alpha^2
    log_joint: Tensor  # (B, K): log w_k + log N(x_t; gamma mu_k, v_k I), -inf outside the label's class

    def responsibilities(self) -> Tensor:
        """``r_k = softmax_k(log_joint)``."""
        return torch.softmax(self.log_joint, dim=1)

    def weighted_offsets(self, responsibilities: Tensor) -> Tensor:
        """``r_k d_k / v_k`` ``(B, K, D)``."""
        return (responsibilities / self.variances)[:, :, None] * self.offsets


class GaussianMixture:
    """``p(x | c) = sum_{k: label_k = c} w_k N(x; mu_k, s_k^2 I) / W_c`` with ``W_c = sum_{k: label_k = c} w_k``.

    ``means`` ``(K, D)``; ``stds`` ``(K,)`` (or one float for all); ``weights`` ``(K,)`` (uniform by default,
    normalised to sum 1); ``component_labels`` ``(K,)`` integer class of each component (default ``arange(K)``);
    ``num_classes`` defaults to ``max(component_labels) + 1`` and is also the null (unconditional) label.
    """

    def __init__(
        self,
        means,
        stds,
        weights=None,
        component_labels=None,
        num_classes: Optional[int] = None,
    ):
        self.means = _as_float64("means", means)
        if self.means.ndim != 2 or self.means.shape[0] == 0 or self.means.shape[1] == 0:
            raise ValueError(f"means has shape {tuple(self.means.shape)}; expected a non-empty (K, D) array")
        k = self.means.shape[0]
        stds = _as_float64("stds", stds)
        self.stds = stds.expand(k).clone() if stds.ndim == 0 else stds
        if self.stds.shape != (k,) or not bool((self.stds > 0).all()):
            raise ValueError(
                f"stds must be positive with shape ({k},) (one per component); got {self.stds.tolist()}"
            )
        weights = torch.ones(k, dtype=torch.float64) if weights is None else _as_float64("weights", weights)
        if weights.shape != (k,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(
                f"weights must be non-negative with shape ({k},) and a positive sum; got {weights.tolist()}"
            )
        self.weights = weights / weights.sum()
        labels = torch.arange(k) if component_labels is None else torch.as_tensor(component_labels)
        if labels.shape != (k,) or labels.is_floating_point() or bool((labels < 0).any()):
            raise ValueError(f"component_labels must be non-negative integers with shape ({k},); got {labels.tolist()}")
        self.component_labels = labels.to(torch.int64).cpu()
        smallest = int(self.component_labels.max()) + 1
        self.num_classes = smallest if num_classes is None else num_classes
        check_positive_int("num_classes", self.num_classes, minimum=smallest)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def class_weights(self) -> Tensor:
        """``W_c = sum_{k: label_k = c} w_k`` for ``c = 0 .. num_classes - 1`` (the class marginal)."""
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.component_labels, self.weights)

    # ------------------------------------------------------------------------------------- labels
    def _component_log_weights(self, labels: Optional[Tensor], batch_size: int) -> Tensor:
        """``(B, K)`` ``log(w_k / W_c)`` for components of class ``c = labels[b]``, ``-inf`` elsewhere; all
        components with weights ``w_k`` for the null label or ``labels=None``."""
        log_weights = self.weights.log().expand(batch_size, -1)
        if labels is None:
            return log_weights
        labels = self._check_labels(labels, batch_size)
        unconditional = labels == self.num_classes
        in_class = (self.component_labels[None, :] == labels[:, None]) | unconditional[:, None]
        class_mass = torch.where(in_class, self.weights, torch.zeros(())).sum(dim=1, keepdim=True)
        if bool((class_mass == 0).any()):
            empty = sorted(set(labels[class_mass[:, 0] == 0].tolist()))
            raise ValueError(f"labels {empty} have no mixture component with positive weight")
        return torch.where(in_class, log_weights - class_mass.log(), torch.full((), -math.inf, dtype=torch.float64))

    def _check_labels(self, labels: Tensor, batch_size: int) -> Tensor:
        labels = torch.as_tensor(labels)
        check_batch("labels", labels, batch_size)
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                f"labels must be a 1-D integer tensor; got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        labels = labels.to(torch.int64).cpu()
        if bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null/unconditional); "
                f"got values {sorted(set(labels.tolist()))}"
            )
        return labels

    def _flatten_points(self, name: str, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} has shape {shape}; expected (B, {self.dim}) or (B, *shape) with {self.dim} values per sample"
            )
        check_finite(name, x)
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    # ------------------------------------------------------------------------------------- data
    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(x, labels)``: ``k ~ w`` restricted to the class, ``x = mu_k + s_k eps`` with ``eps ~ N(0, I)``.

        Without ``labels`` the labels are those of the drawn components, i.e. drawn from the class marginal
        ``W_c``; given labels are returned unchanged (the null label draws from the whole mixture).
        ``x`` has the default float dtype.
        """
        check_positive_int("n", n)
        probabilities = self._component_log_weights(labels, n).exp()
        components = torch.multinomial(probabilities, 1, replacement=True, generator=generator)[:, 0]
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[components] + self.stds[components, None] * noise
        out_labels = self.component_labels[components] if labels is None else self._check_labels(labels, n)
        return x.to(torch.get_default_dtype()), out_labels

    def log_prob(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``log p(x | c) = logsumexp_k (log(w_k / W_c) + log N(x; mu_k, s_k^2 I))`` per sample, float64 ``(B,)``."""
        flat = self._flatten_points("x", x)
        log_joint = self._component_log_weights(labels, flat.shape[0]) + _log_normal(
            flat[:, None, :] - self.means[None], self.stds[None] ** 2
        )
        return torch.logsumexp(log_joint, dim=1)

    # ------------------------------------------------------------------------------------- oracle
    def _noisy_components(self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor]) -> _NoisyComponents:
        flat = self._flatten_points("x_t", x_t)
        batch_size = flat.shape[0]
        time = _time_column(t, batch_size, flat.device)
        alpha, gamma = transport.alpha(time), transport.gamma(time)
        means, stds = self.means.to(flat.device), self.stds.to(flat.device)
        offsets = flat[:, None, :] - gamma[:, :, None] * means[None]
        variances = gamma**2 * stds[None] ** 2 + alpha**2
        log_weights = self._component_log_weights(labels, batch_size).to(flat.device)
        return _NoisyComponents(alpha, gamma, offsets, variances, log_weights + _log_normal(offsets, variances))

    def _predictions64(
        self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Flat float64 ``(E[x | x_t], E[z | x_t])``."""
        parts = self._noisy_components(x_t, t, transport, labels)
        responsibilities = parts.responsibilities()
        weighted = parts.weighted_offsets(responsibilities)
        stds = self.stds.to(weighted.device)
        data = responsibilities @ self.means.to(weighted.device) + parts.gamma * (
            stds[None, :, None] ** 2 * weighted
        ).sum(dim=1)
        return data, parts.alpha * weighted.sum(dim=1)

    def predictions(
        self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """``(E[x | x_t], E[z | x_t])`` with ``E[x | x_t] = sum_k r_k (mu_k + gamma s_k^2 d_k / v_k)`` and
        ``E[z | x_t] = sum_k r_k alpha d_k / v_k`` (``d_k = x_t - gamma mu_k``, ``v_k = gamma^2 s_k^2 + alpha^2``)."""
        data, noise = self._predictions64(x_t, t, transport, labels)
        return data.to(x_t.dtype).reshape(x_t.shape), noise.to(x_t.dtype).reshape(x_t.shape)

    def posterior_mean(self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor] = None) -> Tensor:
        """Tweedie's denoiser ``E[x | x_t] = sum_k r_k (mu_k + gamma s_k^2 (x_t - gamma mu_k) / v_k)``."""
        return self.predictions(x_t, t, transport, labels)[0]

    def velocity(self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor] = None) -> Tensor:
        """Probability-flow velocity ``dx_t/dt = alpha'(t) E[z | x_t] + gamma'(t) E[x | x_t]``."""
        data, noise = self._predictions64(x_t, t, transport, labels)
        time = _time_column(t, x_t.shape[0], data.device)
        velocity = transport.alpha_dot(time) * noise + transport.gamma_dot(time) * data
        return velocity.to(x_t.dtype).reshape(x_t.shape)

    def score(self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor] = None) -> Tensor:
        """``grad_{x_t} log p_t(x_t) = -sum_k r_k (x_t - gamma mu_k) / v_k``."""
        parts = self._noisy_components(x_t, t, transport, labels)
        weighted = parts.weighted_offsets(parts.responsibilities())
        return (-weighted.sum(dim=1)).to(x_t.dtype).reshape(x_t.shape)

    def log_density(self, x_t: Tensor, t, transport: Transport, labels: Optional[Tensor] = None) -> Tensor:
        """``log p_t(x_t | c) = logsumexp_k (log(w_k / W_c) + log N(x_t; gamma mu_k, (gamma^2 s_k^2 + alpha^2) I))``,
        float64 ``(B,)`` (differentiable in ``x_t``)."""
        return torch.logsumexp(self._noisy_components(x_t, t, transport, labels).log_joint, dim=1)


def _log_normal(offsets: Tensor, variances: Tensor) -> Tensor:
    """``log N(d; 0, v I) = -D/2 log(2 pi v) - |d|^2 / (2 v)`` for offsets ``(B, K, D)`` and variances ``(B|1, K)``."""
    dim = offsets.shape[-1]
    return -0.5 * dim * torch.log(2 * math.pi * variances) - (offsets**2).sum(dim=-1) / (2 * variances)


def _time_column(t, batch_size: int, device: torch.device) -> Tensor:
    """A scalar or per-sample time as a float64 ``(B, 1)`` column."""
    time = torch.as_tensor(t, dtype=torch.float64, device=device).detach()
    if time.ndim == 0:
        return time.expand(batch_size, 1)
    check_batch("t", time, batch_size)
    if time.ndim != 1:
        raise ValueError(f"t has shape {tuple(time.shape)}; expected a scalar or ({batch_size},)")
    return time[:, None]


class OracleModel(nn.Module):
    """The perfect teacher: the exact network output of a mixture under a transport's parameterisation,
    ``F = alpha_hat(t) E[z | x_t] + gamma_hat(t) E[x | x_t]``.

    ``forward(x, t, labels)`` reads ``t`` as ucgm *internal* time and ``x`` as the unscaled ``x_t``, and returns
    ``F`` with sign +1. Call it through a transport with identity network time, no input scaling and output sign
    +1 and the same path / parameterisation: :attr:`transport` (``Transport(path, parameterisation)``) is one.
    ``num_classes`` is the mixture's, so the null label for guidance is ``oracle.num_classes``.
    """

    def __init__(self, mixture: GaussianMixture, transport: Transport):
        super().__init__()
        self.mixture = mixture
        self.num_classes = mixture.num_classes
        self.transport = Transport(
            transport.path, transport.parameterisation, sigma_data=transport.sigma_data, name=f"oracle-{transport.name}"
        )

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``F = alpha_hat(t) E[z | x_t] + gamma_hat(t) E[x | x_t]`` at internal time ``t``."""
        data, noise = self.mixture._predictions64(x, t, self.transport, labels)
        time = _time_column(t, x.shape[0], data.device)[:, 0]
        return self.transport.output_from_predictions(data, noise, time).to(x.dtype).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- toy sets
def eight_gaussians(radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """Eight modes ``radius (cos 2 pi k / 8, sin 2 pi k / 8)``, ``k = 0..7``, std ``std``; class ``k`` is mode ``k``
    (the parity fixtures' data: radius 1, std 0.05)."""
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    return GaussianMixture(radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1), std)


def checkerboard(squares_per_side: int = 4, half_width: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """One Gaussian (std ``std``) at the centre of each dark square of a ``squares_per_side``-square board covering
    ``[-half_width, half_width]^2``; squares are dark when ``row + column`` is even (row 0 at the bottom, column 0
    on the left, so the bottom-left square is dark). One class per dark square, numbered row by row from the
    bottom-left; the default 4 x 4 board has 8 squares of side 1 centred at ``+-0.5, +-1.5``."""
    check_positive_int("squares_per_side", squares_per_side)
    side = 2 * half_width / squares_per_side
    centres = [
        (-half_width + (column + 0.5) * side, -half_width + (row + 0.5) * side)
        for row in range(squares_per_side)
        for column in range(squares_per_side)
        if (row + column) % 2 == 0
    ]
    return GaussianMixture(centres, std)


def grid(n: int = 5, spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """``n x n`` modes at ``spacing * (column - (n - 1) / 2, row - (n - 1) / 2)`` (centred on the origin), std ``std``;
    one class per mode, numbered row by row (``class = row * n + column``, row 0 at the bottom)."""
    check_positive_int("n", n)
    coordinates = spacing * (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)
    rows, columns = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return GaussianMixture(torch.stack([columns.reshape(-1), rows.reshape(-1)], dim=1), std)


MIXTURES: dict[str, Callable[..., GaussianMixture]] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "grid": grid,
}


def make_mixture(name: str, **kwargs) -> GaussianMixture:
    """Build a named toy mixture: ``"8gaussians"``, ``"checkerboard"`` or ``"grid"`` (keyword arguments go to
    :func:`eight_gaussians`, :func:`checkerboard` or :func:`grid`)."""
    check_choice("name", name, MIXTURES)
    return MIXTURES[name](**kwargs)


class MixtureDataset(Dataset):
    """Samples ``(D,)`` of ``make_mixture(mixture, **mixture_options)``, drawn anew for every batch — or, with
    ``num_samples``, a fixed training set of that many draws (seeded by ``sample_seed``) with dataset indices
    (:class:`FixedMixtureDataset`, a :class:`~ucgm.data.base.FiniteDataset`), for methods that keep per-sample state
    keyed by index (e.g. DDDM's estimate buffer) or that should see a finite set.

    Data stay in the mixture's own units (identity normalisation), so :attr:`mixture` is the exact oracle of the
    model-space data (of the distribution a fixed set is drawn from). ``conditional=True`` returns the component
    class labels (``num_classes`` of the mixture); ``conditional=False`` returns ``None`` labels and
    ``num_classes == 0``.
    """

    def __new__(cls, mixture: str = "8gaussians", mixture_options: Optional[dict] = None, conditional: bool = True,
                num_samples: Optional[int] = None, sample_seed: int = 0):
        chosen = FixedMixtureDataset if num_samples is not None and cls is MixtureDataset else cls
        return super().__new__(chosen)

    def __init__(self, mixture: str = "8gaussians", mixture_options: Optional[dict] = None, conditional: bool = True,
                 num_samples: Optional[int] = None, sample_seed: int = 0):
        self.mixture = make_mixture(mixture, **(mixture_options or {}))
        self.conditional = conditional
        self.num_classes = self.mixture.num_classes if conditional else 0
        self.shape = (self.mixture.dim,)
        self.normaliser = AffineNormalisation(1.0, 0.0)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        check_positive_int("batch_size", batch_size)
        x, labels = self.mixture.sample(batch_size, generator=generator)
        return x.to(torch.float32), labels if self.conditional else None


class FixedMixtureDataset(MixtureDataset, FiniteDataset):
    """``num_samples`` draws of the mixture made once from ``torch.Generator().manual_seed(sample_seed)`` and kept:
    batches draw dataset indices uniformly (with replacement) and carry them (``Batch.indices``)."""

    def __init__(self, mixture: str = "8gaussians", mixture_options: Optional[dict] = None, conditional: bool = True,
                 num_samples: Optional[int] = None, sample_seed: int = 0):
        super().__init__(mixture, mixture_options, conditional)
        check_positive_int("num_samples", num_samples)
        check_positive_int("sample_seed", sample_seed, minimum=0)
        data, labels = self.mixture.sample(num_samples, generator=torch.Generator().manual_seed(sample_seed))
        self.data = data.to(torch.float32)
        self.labels = labels if conditional else None

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, indices: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return self.data[indices], None if self.labels is None else self.labels[indices]

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        return FiniteDataset.sample_batch(self, batch_size, generator)
