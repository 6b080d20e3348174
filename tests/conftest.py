"""Test-wide settings: one torch thread per xdist worker, a headless matplotlib."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

# `make test` runs two xdist workers on two cores; more threads per worker only thrash.
torch.set_num_threads(int(os.environ.get("XNN_TEST_THREADS", "1")))
