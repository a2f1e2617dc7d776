"""A small ADM/EDM-style UNet for images ``(B, C, H, W)``.

Levels ``i = 0 .. len(channel_mults) - 1`` work at resolution ``input_size / 2^i`` with
``base_channels * channel_mults[i]`` channels. Every level has ``num_res_blocks`` residual blocks on the way down
and ``num_res_blocks + 1`` on the way up (each consuming one skip connection), self-attention after the blocks
of the levels whose resolution is listed in ``attention_resolutions``, and a middle stage
(residual block, attention, residual block) at the lowest resolution.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_positive_int
from .attention import SelfAttention
from .bottleneck import optional_classifier_head
from .conditions import ConditionLayers
from .embeddings import DEFAULT_TIME_SCALE, ConditionEmbedding


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups ``<= max_groups`` that divides ``channels``."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm modulated by ``(1 + scale, shift)`` from the embedding, SiLU, dropout,
    zero-initialised conv; a 1x1 conv matches the skip path when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, max_groups: int):
        super().__init__()
        self.norm_in = group_norm(in_channels, max_groups)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, 2 * out_channels))
        self.norm_out = group_norm(out_channels, max_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        scale, shift = self.modulation(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual self-attention over the ``H * W`` positions of a feature map; the output projection starts at 0."""

    def __init__(self, channels: int, head_channels: int, max_groups: int):
        super().__init__()
        self.norm = group_norm(channels, max_groups)
        self.attention = SelfAttention(channels, max(1, channels // head_channels))
        zero_init(self.attention.out)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).reshape(batch, channels, height * width).transpose(1, 2)
        attended = self.attention(tokens).transpose(1, 2).reshape(batch, channels, height, width)
        return x + attended


class ConditionedStage(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, residual: ResidualBlock, attention: Optional[AttentionBlock]):
        super().__init__()
        self.residual = residual
        self.attention = attention

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        x = self.residual(x, embedding)
        return self.attention(x) if self.attention is not None else x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour) and apply a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Image UNet ``model(x, t, labels, **conditions)`` with time (+ class, + scalar conditions) embedding applied
    as scale-shift in every block; input conditions (:mod:`ucgm.models.conditions`) enter through their own
    zero-initialised input convolutions.

    ``input_size`` is the image side the attention resolutions refer to; other sizes divisible by
    ``2^(len(channel_mults) - 1)`` also run. Output convolution and residual branches start at zero, so the
    model output is 0 at initialisation. Its bottleneck features (:mod:`ucgm.models.bottleneck`) are the last encoder
    stage's output; ``classifier_head=True`` adds a classifier head on them.
    """

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        attention_head_channels: int = 64,
        dropout: float = 0.0,
        num_classes: Optional[int] = None,
        time_scale: float = DEFAULT_TIME_SCALE,
        max_groups: int = 32,
        conditions: Sequence[str] = (),
        classifier_head: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("in_channels", in_channels),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
            ("attention_head_channels", attention_head_channels),
            ("max_groups", max_groups),
        ):
            check_positive_int(name, value)
        if not channel_mults:
            raise ValueError("channel_mults must list at least one channel multiplier, e.g. (1, 2, 2)")
        for mult in channel_mults:
            check_positive_int("each of channel_mults", mult)
        self.downsampling = 2 ** (len(channel_mults) - 1)
        if input_size % self.downsampling:
            raise ValueError(
                f"input_size={input_size} must be divisible by 2^(len(channel_mults) - 1) = {self.downsampling}"
            )
        resolutions = [input_size // 2**level for level in range(len(channel_mults))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not UNet resolutions; allowed: {resolutions}")

        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        embedding_dim = 4 * base_channels
        self.condition = ConditionEmbedding(embedding_dim, num_classes, time_scale, frequency_dim=base_channels)

        def stage(in_ch: int, out_ch: int, with_attention: bool) -> ConditionedStage:
            residual = ResidualBlock(in_ch, out_ch, embedding_dim, dropout, max_groups)
            attention = AttentionBlock(out_ch, attention_head_channels, max_groups) if with_attention else None
            return ConditionedStage(residual, attention)

        self.input = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.conditions = ConditionLayers(conditions, embedding_dim, time_scale, base_channels,
                                          lambda: nn.Conv2d(in_channels, base_channels, 3, padding=1, bias=False))
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels = base_channels
        for level, (mult, resolution) in enumerate(zip(channel_mults, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(stage(channels, base_channels * mult, resolution in attention_resolutions))
                channels = base_channels * mult
                skip_channels.append(channels)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)

        self.bottleneck_channels = channels
        self.classifier_head = optional_classifier_head(classifier_head, channels)
        self.middle = nn.ModuleList([stage(channels, channels, True), stage(channels, channels, False)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out_ch = base_channels * channel_mults[level]
                with_attention = resolutions[level] in attention_resolutions
                self.up.append(stage(channels + skip_channels.pop(), out_ch, with_attention))
                channels = out_ch
            if level > 0:
                self.up.append(Upsample(channels))

        self.output = nn.Sequential(
            group_norm(channels, max_groups), nn.SiLU(), zero_init(nn.Conv2d(channels, in_channels, 3, padding=1))
        )

    def bottleneck_layer(self) -> nn.Module:
        """The last encoder stage (its output, before the middle blocks, is the bottleneck feature map)."""
        return self.down[-1]

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % self.downsampling or x.shape[3] % self.downsampling:
            raise ValueError(
                f"image height and width must be divisible by {self.downsampling}, got {tuple(x.shape[2:])}"
            )
        self.conditions.check(conditions, "UNet")
        embedding = self.condition(t, labels, x.shape[0])
        extra = self.conditions.embedding(conditions, x.shape[0], embedding.device)
        if extra is not None:
            embedding = embedding + extra
        h = self.input(x)
        inputs = self.conditions.input_term(conditions, x.shape)
        if inputs is not None:
            h = h + inputs
        skips = [h]
        for layer in self.down:
            h = layer(h, embedding) if isinstance(layer, ConditionedStage) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedding)
        for layer in self.up:
            if isinstance(layer, ConditionedStage):
                h = layer(torch.cat([h, skips.pop()], dim=1), embedding)
            else:
                h = layer(h)
        return self.output(h)
