"""A residual MLP backbone for vector data (toy 2-D sets, flattened small images)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor, nn

from ..validation import check_positive_int
from .bottleneck import optional_classifier_head
from .conditions import ConditionLayers
from .embeddings import DEFAULT_TIME_SCALE, ConditionEmbedding


class ConditionedResidualBlock(nn.Module):
    """``h + Linear(SiLU(Linear(LayerNorm(h) * (1 + scale) + shift)))`` with ``(shift, scale)`` from the condition."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.branch = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )

    def forward(self, hidden_state: Tensor, condition: Tensor) -> Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=1)
        return hidden_state + self.branch(self.norm(hidden_state) * (1 + scale) + shift)


class MLP(nn.Module):
    """Residual MLP ``model(x, t, labels, **conditions)`` for data of ``data_dim`` features.

    ``x`` may have any shape ``(B, *shape)`` with ``prod(shape) == data_dim``; it is flattened and the output is
    reshaped back. ``depth`` residual blocks of width ``hidden`` are modulated by the time (+ class) embedding.
    The output layer is zero-initialised, so the model starts at 0. ``conditions`` lists the extra model
    conditions it accepts (:mod:`ucgm.models.conditions`). Its bottleneck features
    (:mod:`ucgm.models.bottleneck`) are the last block's ``(B, hidden)`` output; ``classifier_head=True`` adds a
    classifier head on them.
    """

    def __init__(
        self,
        data_dim: int,
        hidden: int = 256,
        depth: int = 4,
        num_classes: Optional[int] = None,
        time_scale: float = DEFAULT_TIME_SCALE,
        dropout: float = 0.0,
        conditions: Sequence[str] = (),
        classifier_head: bool = False,
    ):
        super().__init__()
        for name, value in (("data_dim", data_dim), ("hidden", hidden), ("depth", depth)):
            check_positive_int(name, value)
        self.data_dim = data_dim
        self.num_classes = num_classes
        self.condition = ConditionEmbedding(hidden, num_classes, time_scale)
        self.input = nn.Linear(data_dim, hidden)
        self.conditions = ConditionLayers(conditions, hidden, time_scale, self.condition.time.frequency_dim,
                                          lambda: nn.Sequential(nn.Flatten(), nn.Linear(data_dim, hidden, bias=False)))
        self.blocks = nn.ModuleList(ConditionedResidualBlock(hidden, dropout) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, data_dim))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)
        self.bottleneck_channels = hidden
        self.classifier_head = optional_classifier_head(classifier_head, hidden)

    def bottleneck_layer(self) -> nn.Module:
        """The last residual block (its output is the bottleneck feature vector)."""
        return self.blocks[-1]

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        features = math.prod(x.shape[1:])
        if features != self.data_dim:
            raise ValueError(f"MLP expects {self.data_dim} features per sample, got shape {tuple(x.shape[1:])}")
        self.conditions.check(conditions, "MLP")
        condition = self.condition(t, labels, x.shape[0])
        extra = self.conditions.embedding(conditions, x.shape[0], condition.device)
        if extra is not None:
            condition = condition + extra
        hidden_state = self.input(x.reshape(x.shape[0], features))
        inputs = self.conditions.input_term(conditions, x.shape)
        if inputs is not None:
            hidden_state = hidden_state + inputs
        for block in self.blocks:
            hidden_state = block(hidden_state, condition)
        return self.output(hidden_state).reshape(x.shape)
