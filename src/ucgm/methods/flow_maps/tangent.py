"""Directional derivatives of a flow map for MeanFlow and Align Your Flow: forward-mode AD or central differences.

``estimator(function, module, primals, tangents)`` returns ``d/de function(module, primals + e tangents)`` at
``e = 0``; ``function(network, *points)`` calls the network it is given (``module`` or a stand-in for it):

* ``"jvp"``: forward-mode AD (exact; MeanFlow's official code differentiates ``u(z, t, r)`` along ``(v, 1, 0)``),
  with ``torch.autograd.forward_ad``: the points are dual tensors and so are the module's parameters, with zero
  tangents (a parameter without a tangent makes PyTorch route every operation it meets through a slow generic
  path; dense zeros halve the cost of a small network's derivative), called through
  ``torch.func.functional_call``; attention runs in its ``math`` kernel, which has a forward derivative (the fused
  CPU / flash kernels have none, pytorch#165517; FastGen does the same);
* ``"finite_difference"``: ``(f(p + d tangents) - f(p - d tangents)) / (2 d)`` with ``d = step`` (error ``O(d^2)``),
  for models without forward-mode AD;
* ``"auto"``: the first call tries the JVP; when forward-mode AD is not supported by the model (on any process of
  the job) every process switches to finite differences for the rest of the run, with a warning. The decision is
  state (:meth:`TangentEstimator.state_dict`), checkpointed by the method so a resumed run keeps it.

The derivative is always taken without gradient, on the plain module (forward-mode AD cannot pass through a DDP
wrapper, pytorch#182661); the method's gradient pass is a separate call of the training wrapper.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...validation import check_choice, check_range
from ..consistency.scm import agreed_by_every_rank, jvp_unsupported

TANGENT_METHODS = ("auto", "jvp", "finite_difference")


@torch.no_grad()
def forward_derivative(function: Callable[..., Tensor], module: nn.Module, primals: Sequence[Tensor],
                       tangents: Sequence[Tensor]) -> Tensor:
    """``d/de function(module, primals + e tangents)`` by forward-mode AD (module docstring): dual points, dual
    parameters with zero tangents, math attention."""
    with forward_ad.dual_level(), sdpa_kernel([SDPBackend.MATH]):
        parameters = {name: forward_ad.make_dual(parameter.detach(), torch.zeros_like(parameter))
                      for name, parameter in module.named_parameters()}

        def network(*args, **kwargs):
            return torch.func.functional_call(module, parameters, args, kwargs)

        output = function(network, *(forward_ad.make_dual(point, direction)
                                     for point, direction in zip(primals, tangents)))
        return forward_ad.unpack_dual(output).tangent


class TangentEstimator:
    """The derivative method of a run (module docstring)."""

    def __init__(self, method: str = "auto", step: float = 1e-3, owner: str = "flow map"):
        check_choice("tangent_method", method, TANGENT_METHODS)
        check_range("finite_difference_step", step, 1e-8, 0.1)
        self.method, self.step, self.owner = method, float(step), owner
        #: ``method``, or for ``"auto"`` the decision once the first derivative has been taken.
        self.in_use = method

    @torch.no_grad()
    def __call__(self, function: Callable[..., Tensor], module: nn.Module, primals: Sequence[Tensor],
                 tangents: Sequence[Tensor]) -> Tensor:
        primals, tangents = tuple(primals), tuple(tangents)
        if self.in_use == "auto":
            return self._decide(function, module, primals, tangents)
        if self.in_use == "jvp":
            return forward_derivative(function, module, primals, tangents)
        return self.finite_difference(function, module, primals, tangents)

    def finite_difference(self, function: Callable[..., Tensor], module: nn.Module, primals: tuple, tangents: tuple
                          ) -> Tensor:
        """The central difference along ``tangents``."""
        forward = function(module, *(p + self.step * d for p, d in zip(primals, tangents)))
        backward = function(module, *(p - self.step * d for p, d in zip(primals, tangents)))
        return (forward - backward) / (2 * self.step)

    def _decide(self, function: Callable[..., Tensor], module: nn.Module, primals: tuple, tangents: tuple
                ) -> Tensor:
        derivative, failure = None, None
        try:
            derivative = forward_derivative(function, module, primals, tangents)
        except (RuntimeError, NotImplementedError) as error:
            if not jvp_unsupported(error):
                raise
            failure = error
        supported = agreed_by_every_rank(failure is None, primals[0].device)
        self.in_use = "jvp" if supported else "finite_difference"
        if supported:
            return derivative
        reason = "on another process" if failure is None else f"{type(failure).__name__}: {failure}".splitlines()[0]
        warnings.warn(f"{self.owner}: forward-mode AD is not supported by this model ({reason}); using the "
                      f"finite-difference tangent for the rest of the run", RuntimeWarning, stacklevel=3)
        return self.finite_difference(function, module, primals, tangents)

    def state_dict(self) -> dict:
        return {"tangent_method_in_use": self.in_use}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        in_use = state.get("tangent_method_in_use")
        check_choice("tangent_method_in_use", in_use, TANGENT_METHODS)
        if self.method != "auto" and in_use != self.method:
            raise ValueError(f"the checkpoint used tangent_method={in_use!r}; this run sets {self.method!r}")
        self.in_use = in_use
