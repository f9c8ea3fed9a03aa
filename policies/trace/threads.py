"""Replay and generation run many tiny tensor operations, for which torch's thread pool costs far
more than it saves (a [8, 1000] softmax: ~10 µs on one thread, milliseconds on a busy machine's
pool). They run on one thread and give the caller's setting back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
