"""Copies between host memory and a CUDA device, on a transfer stream of their own.

Quantized payloads are made on the device before they leave it and decoded after they arrive;
what crosses the bus is the encoded bytes. A copy runs on one transfer stream per device, after
the work already queued on the current stream (the kernel that wrote the source), so the compute
stream is never blocked behind it:

- device -> pinned host memory returns at once with an event; readers of the host bytes wait on
  it (Encoded.wait). The device source is kept alive until the copy is done (record_stream).
- host -> device makes the current stream wait for the copy (kernels queued later see the bytes)
  and waits on the host too, so the host source may be reused as soon as the call returns.

Without CUDA these are plain synchronous copies.
"""

from __future__ import annotations

import threading

import torch

_streams: dict[torch.device, torch.cuda.Stream] = {}
_lock = threading.Lock()


def transfer_stream(device: torch.device) -> torch.cuda.Stream:
    """The transfer stream of a CUDA device (one per device, made on first use)."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    with _lock:
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        return _streams[device]


def can_pin() -> bool:
    """Pinned host memory needs a CUDA driver."""
    return torch.cuda.is_available()


def copy_into(source: torch.Tensor, out: torch.Tensor, non_blocking: bool = True) -> torch.cuda.Event | None:
    """Copy `source` into `out` (same shape). Returns an event to wait on before the host reads
    `out` (a device -> pinned host copy with non_blocking), else None: `out` is then ready for
    the host and for work queued on the current stream."""
    if source.device.type != "cuda" and out.device.type != "cuda":
        out.copy_(source)
        return None
    cuda = source.device if source.device.type == "cuda" else out.device
    stream, current = transfer_stream(cuda), torch.cuda.current_stream(cuda)
    stream.wait_stream(current)  # after whatever wrote the source
    with torch.cuda.stream(stream):
        out.copy_(source, non_blocking=True)
    for tensor in (source, out):
        if tensor.device.type == "cuda":
            tensor.record_stream(stream)  # the allocator keeps it until the copy is done
    event = torch.cuda.Event()
    event.record(stream)
    if out.device.type == "cuda":
        current.wait_event(event)
        event.synchronize()  # the host source may be reused once we return
        return None
    if not (non_blocking and out.is_pinned()):
        event.synchronize()
        return None
    return event
