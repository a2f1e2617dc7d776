"""``ucgm tune``: the few-step tuning recipe applied to a trained multi-step checkpoint.

The source checkpoint's config carries a ``tune:`` section (see the presets: consistency ratio 1, enhanced
target, frozen reference, pseudo-Huber loss, RAdam, gradient clipping, fast evaluation EMA, a few hundred
steps). It is merged over the source config; the run starts from the source's EMA weights, which become the
model, its evaluation EMA and the frozen reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..training.checkpoint import read_checkpoint_info
from .components import accepted_keys
from .config import merge_configs, resolve_config


def tune_config(source: Path | str, overrides: Sequence[str] = ()) -> dict:
    """The resolved config of a tuning run from checkpoint (or run directory) ``source``."""
    info = read_checkpoint_info(source)
    tune = info.config.get("tune") or {}
    config = merge_configs(info.config, tune)
    tuned_training = tune.get("training", {})
    if "steps" in tuned_training:
        config["training"]["kimg"] = None
    elif "kimg" in tuned_training:
        config["training"]["steps"] = None
    config["init"] = {"checkpoint": str(Path(info.path).resolve()), "weights": "ema"}
    return resolve_config(config, overrides, accepted_keys)
