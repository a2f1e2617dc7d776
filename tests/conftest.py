"""Test-session settings: one intra-op thread (tiny models run fastest so, and timings do not collapse when
other processes share the cores); subprocesses inherit the same through OMP_NUM_THREADS."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
