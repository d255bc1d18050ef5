"""Shared test set-up.

One intra-op thread: the tests use tiny tensors, where extra threads only add scheduling cost, and on a
shared 2-core machine several torch processes with 2 threads each oversubscribe the cores badly
(a 13 s file took 95 s). Subprocesses the tests start inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
