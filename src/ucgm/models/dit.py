"""DiT/SiT-style diffusion transformer on patches of an image or latent ``(B, C, H, W)``.

The image is cut into ``p x p`` patches, each projected to a token, plus a fixed 2-D sine-cosine position
embedding. Every block applies attention and an MLP, each preceded by a LayerNorm whose shift/scale and
followed by a gate that come from the time + class embedding (adaLN-zero: the modulation starts at zero, so
every block starts as the identity). A final adaLN layer maps tokens back to patches; it starts at zero, so the
model output is exactly 0 at initialisation.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..validation import check_choice, check_positive_int
from .attention import SelfAttention
from .bottleneck import optional_classifier_head
from .conditions import ConditionLayers
from .embeddings import DEFAULT_TIME_SCALE, ConditionEmbedding


class DiTSize(NamedTuple):
    """A DiT size preset: number of blocks, token width and attention heads."""

    depth: int
    hidden_size: int
    num_heads: int


#: Size presets: ``S``, ``B``, ``L``, ``XL`` are the DiT paper's; ``XS`` is a small extra size for quick runs.
DIT_SIZES: dict[str, DiTSize] = {
    "XS": DiTSize(6, 192, 3),
    "S": DiTSize(12, 384, 6),
    "B": DiTSize(12, 768, 12),
    "L": DiTSize(24, 1024, 16),
    "XL": DiTSize(28, 1152, 16),
}

_NAME_PATTERN = re.compile(r"^(?:DiT|SiT)-([A-Za-z]+)/(\d+)$", re.IGNORECASE)


def parse_dit_name(name: str) -> tuple[str, int]:
    """``"DiT-XL/2"`` (or ``"SiT-XL/2"``) -> ``("XL", 2)``: the size preset and the patch size."""
    match = _NAME_PATTERN.match(name)
    if match is None or match.group(1).upper() not in DIT_SIZES:
        allowed = ", ".join(f"DiT-{size}/<patch>" for size in DIT_SIZES)
        raise ValueError(f"unknown DiT name {name!r}; allowed: {allowed} (e.g. DiT-XL/2)")
    return match.group(1).upper(), int(match.group(2))


def sincos_position_embedding(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sine-cosine embedding ``(grid_size^2, dim)`` in row-major patch order.

    Half of the channels encode the row, half the column, each as ``[sin(pos w_k), cos(pos w_k)]`` with
    ``w_k = 10000^(-k / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"the DiT width must be divisible by 4 for the 2-D position embedding, got {dim}")
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    positions = torch.arange(grid_size, dtype=torch.float32)
    angles = positions[:, None] * frequencies[None, :]
    axis = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    rows = axis[:, None, :].expand(grid_size, grid_size, 2 * quarter)
    columns = axis[None, :, :].expand(grid_size, grid_size, 2 * quarter)
    return torch.cat([rows, columns], dim=2).reshape(grid_size * grid_size, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``(B, D)`` shift and scale broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-zero: ``x + gate * f(modulate(LayerNorm(x)))`` for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm_attention = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(hidden_size, num_heads)
        self.norm_mlp = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(condition).chunk(6, dim=1)
        x = x + gate_a[:, None, :] * self.attention(modulate(self.norm_attention(x), shift_a, scale_a))
        return x + gate_m[:, None, :] * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its ``p * p * C`` patch values."""

    def __init__(self, hidden_size: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_values)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer ``model(x, t, labels, **conditions)`` for ``(B, in_channels, input_size, input_size)``
    inputs; scalar conditions are added to the time embedding, input conditions patch-embedded and added to the
    tokens (:mod:`ucgm.models.conditions`).

    ``size`` picks a preset of :data:`DIT_SIZES`; ``depth``, ``hidden_size`` and ``num_heads`` override it
    (useful for tiny test models). ``num_classes = None`` gives an unconditional model. Its bottleneck features
    (:mod:`ucgm.models.bottleneck`) are the middle block's tokens; ``classifier_head=True`` adds a classifier head
    on them.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_classes: Optional[int] = None,
        size: str = "S",
        depth: Optional[int] = None,
        hidden_size: Optional[int] = None,
        num_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        time_scale: float = DEFAULT_TIME_SCALE,
        conditions: Sequence[str] = (),
        classifier_head: bool = False,
    ):
        super().__init__()
        size = size.upper() if isinstance(size, str) else size
        check_choice("size", size, DIT_SIZES)
        preset = DIT_SIZES[size]
        depth = preset.depth if depth is None else depth
        hidden_size = preset.hidden_size if hidden_size is None else hidden_size
        num_heads = preset.num_heads if num_heads is None else num_heads
        for name, value in (
            ("input_size", input_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("depth", depth),
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
        ):
            check_positive_int(name, value)
        if input_size % patch_size:
            divisors = [p for p in range(1, input_size + 1) if input_size % p == 0]
            raise ValueError(
                f"patch_size={patch_size} does not divide input_size={input_size}; allowed patch sizes: {divisors}"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.grid_size = input_size // patch_size

        self.patch_embedding = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("position_embedding", sincos_position_embedding(hidden_size, self.grid_size))
        self.condition = ConditionEmbedding(hidden_size, num_classes, time_scale)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        self._initialise()
        self.conditions = ConditionLayers(
            conditions, hidden_size, time_scale, self.condition.time.frequency_dim,
            lambda: nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=False))
        self.bottleneck_channels = hidden_size
        self.classifier_head = optional_classifier_head(classifier_head, hidden_size)

    def bottleneck_layer(self) -> nn.Module:
        """The middle transformer block (its output tokens are the bottleneck features)."""
        return self.blocks[len(self.blocks) // 2]

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "DiT":
        """Build a preset by name, e.g. ``DiT.from_name("DiT-XL/2", input_size=32, num_classes=1000)``."""
        size, patch_size = parse_dit_name(name)
        return cls(size=size, patch_size=patch_size, **kwargs)

    def _initialise(self) -> None:
        """Xavier-uniform linears, Gaussian time MLP, then zero modulation (adaLN-zero) and zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.patch_embedding.out_channels, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for layer in (self.condition.time.mlp[0], self.condition.time.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero_linears = [block.modulation[-1] for block in self.blocks]
        zero_linears += [self.final.modulation[-1], self.final.linear]
        for layer in zero_linears:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> tokens ``(B, (H/p)(W/p), D)`` with position embedding added."""
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        return tokens + self.position_embedding.to(tokens.dtype)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``(B, N, p * p * C)`` in row-major token order -> ``(B, C, H, W)``."""
        batch, grid, p, channels = patches.shape[0], self.grid_size, self.patch_size, self.in_channels
        patches = patches.reshape(batch, grid, grid, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * p, grid * p)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT expects inputs of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        self.conditions.check(conditions, "DiT")
        condition = self.condition(t, labels, x.shape[0])
        extra = self.conditions.embedding(conditions, x.shape[0], condition.device)
        if extra is not None:
            condition = condition + extra
        tokens = self.patchify(x)
        inputs = self.conditions.input_term(conditions, x.shape)
        if inputs is not None:
            tokens = tokens + inputs.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, condition)
        return self.unpatchify(self.final(tokens, condition))
