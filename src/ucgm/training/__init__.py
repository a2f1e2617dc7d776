"""The trainer that knows no method: networks by role, update schedules, checkpoints, EMA, distribution.

| module | responsibility |
|---|---|
| ``loop`` | :class:`~.loop.Trainer`: any :class:`~ucgm.methods.base.Method`, phase by phase |
| ``networks`` | the networks a method declares, built (scratch, copies, oracles, checkpoints) and kept per role |
| ``settings`` | typed ``optimizer`` / ``training`` settings and their validation |
| ``batches`` | deterministic per-update, per-shard batches, generators and sample indices |
| ``optim`` | AdamW / RAdam, warm-up, gradient norms |
| ``ema`` | evaluation EMA (constant, EDM2 power) |
| ``distributed`` | torchrun jobs: DDP (gloo / NCCL), FSDP, fail-fast teardown |
| ``checkpoint`` | atomic checkpoint directories, safe loading |
| ``loading`` | a checkpoint's method and sampling model, rebuilt from its metadata alone |
"""

from .loading import LoadedCheckpoint, load_checkpoint_model
from .loop import Hook, Trainer, TrainingDiverged
from .networks import NetworkSetup, build_networks

__all__ = ["Hook", "LoadedCheckpoint", "NetworkSetup", "Trainer", "TrainingDiverged", "build_networks",
           "load_checkpoint_model"]
