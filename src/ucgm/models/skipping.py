"""Skipping backbone blocks (AutoDiffusion's layer skipping, Li et al. ICCV 2023): a skipped block returns its
skip path instead of running.

The skippable blocks of a backbone, in forward order (:func:`skippable_blocks`):

* MLP: every residual block ``h + branch(h)`` -> ``h``;
* UNet: every residual stage of the down, middle and up paths (a residual block optionally followed by
  attention) -> the block's skip connection ``skip(x)`` (identity, or the 1x1 convolution that matches the
  channels; AutoDiffusion's skipped ResBlock), attention included (a skipped attention is the identity);
  resampling layers are never skipped;
* DiT: every transformer block ``x + attention + MLP`` -> ``x``.

:class:`StepSkipping` skips a different set at every sampling step: the step is found from the network time of
the call (the schedule's times are known), so it works with any sampler that evaluates at the grid times.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .dit import DiT, DiTBlock
from .fixed_conditions import WRAPPED_ATTRIBUTES
from .mlp import MLP, ConditionedResidualBlock
from .unet import ConditionedStage, UNet

#: How far a call's network time may be from a schedule time to count as that step.
TIME_TOLERANCE = 1e-6


def _skip_path(block: nn.Module) -> Callable[..., Tensor]:
    if isinstance(block, ConditionedStage):
        return lambda x, *args, **kwargs: block.residual.skip(x)
    if isinstance(block, (ConditionedResidualBlock, DiTBlock)):
        return lambda x, *args, **kwargs: x
    raise ValueError(f"{type(block).__name__} has no skip path")


def skippable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of an MLP, UNet or DiT that can be skipped, in forward order (module docstring)."""
    if isinstance(model, MLP):
        return list(model.blocks)
    if isinstance(model, UNet):
        return [layer for layer in (*model.down, *model.middle, *model.up) if isinstance(layer, ConditionedStage)]
    if isinstance(model, DiT):
        return list(model.blocks)
    raise ValueError(f"cannot skip blocks of {type(model).__name__}; block skipping works on mlp, unet and dit "
                     "backbones")


def find_backbone(model: nn.Module) -> nn.Module:
    """The MLP, UNet or DiT inside ``model`` (a backbone, or wrappers keeping one as ``module`` / ``model``)."""
    seen = model
    while not isinstance(seen, (MLP, UNet, DiT)):
        inner = next((getattr(seen, name) for name in WRAPPED_ATTRIBUTES
                      if isinstance(getattr(seen, name, None), nn.Module)), None)
        if inner is None:
            raise ValueError(f"found no mlp, unet or dit backbone inside {type(model).__name__} to skip blocks of")
        seen = inner
    return seen


@contextmanager
def skipping(blocks: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[None]:
    """Within the block, ``blocks[i]`` for ``i`` in ``indices`` return their skip path."""
    chosen = [blocks[index] for index in sorted(set(indices))]
    try:
        for block in chosen:
            block.forward = _skip_path(block)
        yield
    finally:
        for block in chosen:
            block.__dict__.pop("forward", None)


class StepSkipping(nn.Module):
    """``model`` with the blocks ``skip_blocks[i]`` skipped at sampling step ``i``, the step whose network time is
    ``network_times[i]`` (calls at any other time run the whole model)."""

    def __init__(self, model: nn.Module, backbone: nn.Module, network_times: Tensor,
                 skip_blocks: Sequence[Sequence[int]]):
        super().__init__()
        self.model = model
        self.blocks = skippable_blocks(backbone)
        if len(skip_blocks) != network_times.numel():
            raise ValueError(f"skip_blocks lists {len(skip_blocks)} steps but the schedule has "
                             f"{network_times.numel()}")
        for step in skip_blocks:
            bad = [index for index in step if not 0 <= int(index) < len(self.blocks)]
            if bad:
                raise ValueError(f"skip_blocks names blocks {bad}; the backbone has {len(self.blocks)} "
                                 f"(0 .. {len(self.blocks) - 1})")
        self.network_times = network_times.detach().to(torch.float64).cpu()
        self.skip_blocks = [tuple(int(index) for index in step) for step in skip_blocks]
        self.num_classes = getattr(model, "num_classes", None)

    def step_of(self, t: Tensor) -> Optional[int]:
        """The schedule step of network time ``t[0]``, or ``None``."""
        distance = (self.network_times - float(t.reshape(-1)[0])).abs()
        step = int(distance.argmin())
        return step if float(distance[step]) <= TIME_TOLERANCE else None

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        step = self.step_of(t)
        skipped = () if step is None else self.skip_blocks[step]
        with skipping(self.blocks, skipped):
            return self.model(x, t, labels, **conditions)
