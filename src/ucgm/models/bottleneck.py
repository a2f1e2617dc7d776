"""Bottleneck features of a backbone and the classifier head that reads them (DMD2's GAN discriminator).

DMD2 (Yin et al. 2024) puts its discriminator on the **fake score network's encoder output**: the official code calls
the fake UNet with ``return_bottleneck=True`` (the feature map after the last encoder block) and feeds it to a small
convolutional head ``cls_pred_branch`` that returns one realism logit per sample. ucgm exposes the same features
through one documented protocol that every backbone implements:

* ``backbone.bottleneck_layer()`` — the sub-module whose output is the bottleneck feature map:

  | backbone | bottleneck | features |
  |---|---|---|
  | :class:`~ucgm.models.MLP` | the last residual block | ``(B, hidden)`` |
  | :class:`~ucgm.models.UNet` | the last encoder stage (before the middle blocks, as DMD2's ``return_bottleneck``) | ``(B, C, h, w)`` |
  | :class:`~ucgm.models.DiT` | the middle transformer block (a DiT has no encoder) | ``(B, N, hidden)`` |

* ``backbone.bottleneck_channels`` — the channel count ``C`` of those features;
* the constructor option ``classifier_head=True`` adds ``backbone.classifier_head``, a
  :class:`BottleneckClassifier` sized for them. The head is part of the backbone's weights, so it is optimised
  with the network (DMD2's one "guidance" optimizer for the fake UNet and its head) and checkpointed with it.

:func:`capture_bottleneck` records the features of every forward pass in a block (a forward hook, so it also
works through a DDP wrapper and costs no extra pass): the network output and the logits come from one call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor, nn


class BottleneckClassifier(nn.Module):
    """One logit per sample from bottleneck features ``(B, C)``, ``(B, C, H, W)`` or tokens ``(B, N, C)``:
    ``logit = w2 . mean_positions SiLU(W1 f_position + b1) + b2`` (a position-wise linear layer, mean pooling over
    the spatial positions or tokens, a linear read-out).

    DMD2's ImageNet-64 head is Conv4x4/2 -> GN -> SiLU -> Conv4x4/4 -> GN -> SiLU -> Conv1x1 on an 8x8x768 map; the
    position-wise layer with mean pooling is ucgm's size-agnostic stand-in (the toy bottlenecks are a vector or a
    4x4 map, too small for strided convolutions).
    """

    def __init__(self, channels: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = channels if hidden is None else hidden
        self.channels = channels
        self.mix = nn.Linear(channels, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim == 2:
            positions = features[:, None, :]
        elif features.ndim == 4:
            positions = features.flatten(2).transpose(1, 2)
        elif features.ndim == 3:
            positions = features
        else:
            raise ValueError(f"bottleneck features must be (B, C), (B, C, H, W) or (B, N, C); got shape "
                             f"{tuple(features.shape)}")
        if positions.shape[-1] != self.channels:
            raise ValueError(f"the classifier head reads {self.channels} channels; the features have "
                             f"{positions.shape[-1]} (shape {tuple(features.shape)})")
        return self.readout(nn.functional.silu(self.mix(positions)).mean(dim=1))[:, 0]


def optional_classifier_head(enabled: bool, channels: int) -> Optional[BottleneckClassifier]:
    """A :class:`BottleneckClassifier` of ``channels`` when ``enabled`` (a backbone's ``classifier_head`` option)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"classifier_head={enabled!r} must be true or false")
    return BottleneckClassifier(channels) if enabled else None


class CapturedFeatures:
    """The bottleneck features of the forward passes run inside :func:`capture_bottleneck` (the latest pass in
    :attr:`features`)."""

    def __init__(self) -> None:
        self.features: Optional[Tensor] = None

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> None:
        self.features = output

    def require(self) -> Tensor:
        if self.features is None:
            raise RuntimeError("no forward pass ran inside capture_bottleneck(); call the network in the block")
        return self.features


def bottleneck_layer(model: nn.Module) -> nn.Module:
    """``model.bottleneck_layer()`` (``model`` may be wrapped, e.g. by DDP), or ``ValueError`` for a backbone
    without the protocol."""
    module = getattr(model, "module", model)
    layer = getattr(module, "bottleneck_layer", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} does not expose bottleneck features (bottleneck_layer()); "
                         f"backbones that do: MLP, UNet, DiT")
    return layer()


def classifier_head(model: nn.Module) -> BottleneckClassifier:
    """The classifier head of a backbone built with ``classifier_head=True``."""
    module = getattr(model, "module", model)
    head = getattr(module, "classifier_head", None)
    if head is None:
        raise ValueError(f"{type(module).__name__} has no classifier head: build it with classifier_head=true")
    return head


@contextlib.contextmanager
def capture_bottleneck(model: nn.Module) -> Iterator[CapturedFeatures]:
    """Within the block, every forward pass of ``model`` stores its bottleneck features in the yielded
    :class:`CapturedFeatures` (with their autograd graph)."""
    captured = CapturedFeatures()
    handle = bottleneck_layer(model).register_forward_hook(captured)
    try:
        yield captured
    finally:
        handle.remove()
