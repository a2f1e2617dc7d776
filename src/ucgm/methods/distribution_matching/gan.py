"""DMD2's diffusion GAN: realism logits from the fake score network's bottleneck, non-saturating losses.

Both real data and generator samples are noised at levels drawn from the Karras index grid (``U{0 .. 999}``,
``diffusion_gan_max_timestep`` 1000: any level) with independent noise, and the logit is
``head(fake_encoder(x_t, t, y))`` (:mod:`ucgm.models.bottleneck`). Losses (``edm_guidance.py``):
discriminator ``softplus(l_fake) + softplus(-l_real)`` (it trains the fake network's encoder and the head, with
the fake-score loss, in DMD2's "guidance" update), generator ``softplus(-l_fake)`` (through the frozen fake network
into the generator sample).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.bottleneck import capture_bottleneck, classifier_head
from ...transports import Transport


def network_output_and_logits(network: Callable, module: nn.Module, transport: Transport, x_t: Tensor, t: Tensor,
                              labels: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One pass of ``network`` (``module`` itself or its training wrapper): the raw outputs ``F(x_t, t)`` and the
    realism logits of the same rows, read from ``module``'s bottleneck by its classifier head."""
    with capture_bottleneck(module) as captured:
        output = transport.network_output(network, x_t, t, labels)
    return output, classifier_head(module)(captured.require())


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Per-sample ``softplus(l_fake) + softplus(-l_real)``."""
    return F.softplus(fake_logits) + F.softplus(-real_logits)


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """Per-sample non-saturating ``softplus(-l_fake)``."""
    return F.softplus(-fake_logits)


def concatenate_labels(*labels: Optional[Tensor]) -> Optional[Tensor]:
    """The labels of row blocks stacked in order (``None`` for unconditional blocks)."""
    if all(label is None for label in labels):
        return None
    if any(label is None for label in labels):
        raise ValueError("either every block has labels or none has")
    return torch.cat(labels)
