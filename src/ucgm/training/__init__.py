"""The training system behind ``ucgm train`` / ``tune`` / ``sample``.

| module | responsibility |
|---|---|
| ``schema`` | typed config sections (dataclasses) and their validation, :class:`~.schema.ConfigError` |
| ``config`` | presets, YAML files, merging, ``key=value`` overrides, resolving a run config |
| ``components`` | dataset / transport / model / objective from config sections |
| ``loop`` | :class:`~.loop.Trainer`, the method-agnostic trainer |
| ``batches`` | deterministic per-step, per-shard batches and generators |
| ``seeding`` | seeds derived from ``(seed, step, shard, ...)`` |
| ``optim`` | AdamW / RAdam, warm-up, NaN-free clipped gradients |
| ``ema`` / ``reference`` | evaluation EMA (constant, EDM2 power) / the objective's reference network |
| ``distributed`` | torchrun jobs: DDP (gloo / NCCL), FSDP, fail-fast teardown |
| ``checkpoint`` | atomic checkpoint directories, safe loading |
| ``run`` / ``run_log`` | a run directory: resume-or-start, hooks, ``stats.jsonl``, progress bar, TensorBoard |
| ``tune`` | ``ucgm tune``: the few-step tuning recipe over a source checkpoint |
| ``generate`` / ``sampling_run`` / ``artifacts`` | seeded sampling, ``ucgm sample``, PNG / npz / safetensors writers |
| ``minimal`` | the hand-written reference loop for throughput comparisons |
| ``atomic`` / ``yaml_io`` | temp-file-and-rename writes / YAML with ``1e-4`` floats |
"""
