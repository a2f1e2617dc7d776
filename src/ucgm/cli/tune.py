"""``ucgm tune``: the few-step tuning recipe applied to a trained multi-step checkpoint.

The source checkpoint's config carries a ``tune:`` section (see the presets: consistency ratio 1, enhanced
target, frozen reference, pseudo-Huber loss, RAdam, gradient clipping, fast evaluation EMA, a few hundred
steps). It is merged over the source config; the run starts from the source's EMA weights, which become the
model, its evaluation EMA and the frozen reference.

The best learning rate and EMA depend on the tuning length, so a preset may also carry named recipes for other
lengths, ``tune_recipes: {NAME: {SECTION: {...}}}``; ``ucgm tune RUN --recipe NAME`` merges ``tune_recipes.NAME``
over ``tune:`` (each recipe states its own ``training.steps``). Overrides still apply last.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from ..training.checkpoint import read_checkpoint_info
from ..validation import ConfigError
from .components import accepted_keys
from .config import merge_configs, resolve_config

#: The config section of named tuning recipes, each merged over the ``tune:`` section.
TUNE_RECIPES = "tune_recipes"


def tune_recipe(config: dict, recipe: Optional[str] = None) -> dict:
    """The tuning recipe of ``config``: its ``tune:`` section, with ``tune_recipes.RECIPE`` merged over it when
    ``recipe`` is named."""
    tune = config.get("tune") or {}
    if recipe is None:
        return merge_configs(tune, {})
    recipes = config.get(TUNE_RECIPES) or {}
    if recipe not in recipes:
        names = ", ".join(sorted(recipes)) or "none"
        raise ConfigError(f"tune recipe {recipe!r} is not in the config's {TUNE_RECIPES} section (recipes: {names})")
    return merge_configs(tune, recipes[recipe])


def recipe_for_steps(config: dict, steps: int) -> Optional[str]:
    """The recipe of ``config`` stated for the tuning length nearest to ``steps`` (by ratio, ``|log(n / steps)|``):
    a name of its ``tune_recipes``, or ``None`` for the ``tune:`` section itself (also when no recipe states
    ``training.steps``)."""
    candidates = {None: tune_recipe(config)}
    candidates.update({name: tune_recipe(config, name) for name in config.get(TUNE_RECIPES) or {}})
    lengths = {name: recipe.get("training", {}).get("steps") for name, recipe in candidates.items()}
    stated = {name: length for name, length in lengths.items() if length}
    if not stated:
        return None
    return min(stated, key=lambda name: abs(math.log(stated[name] / steps)))


def tune_config(source: Path | str, overrides: Sequence[str] = (), recipe: Optional[str] = None) -> dict:
    """The resolved config of a tuning run from checkpoint (or run directory) ``source`` with the source config's
    ``tune:`` recipe, or its ``tune_recipes.RECIPE``."""
    info = read_checkpoint_info(source)
    tune = tune_recipe(info.config, recipe)
    config = merge_configs(info.config, tune)
    tuned_training = tune.get("training", {})
    if "steps" in tuned_training:
        config["training"]["kimg"] = None
    elif "kimg" in tuned_training:
        config["training"]["steps"] = None
    config["init"] = {"checkpoint": str(Path(info.path).resolve()), "weights": "ema"}
    return resolve_config(config, overrides, accepted_keys)
