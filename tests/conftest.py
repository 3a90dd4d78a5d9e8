"""Suite-wide settings: with pytest-xdist (the README's ``-n auto``) each worker gets an
equal share of the cores as torch threads, so workers do not oversubscribe the machine."""
from __future__ import annotations

import os

import torch


def pytest_configure(config) -> None:  # noqa: ANN001 - pytest's Config
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
