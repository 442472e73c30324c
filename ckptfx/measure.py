"""Measuring what a training step really keeps: saved-tensor bytes and peak memory.

* :func:`saved_tensor_bytes`: bytes autograd keeps for the backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` over unique storages, parameters excluded.
  This counts what the compiled forward returns as saved values as well as eager's saves.
* :func:`peak_rss_delta`: peak resident memory of a call above the memory resident before it
  (Linux: the ``VmHWM`` high-water mark, reset through ``/proc/self/clear_refs``). glibc's
  allocator is set to return large blocks to the system (``mallopt``), so frees are visible.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Runs ``fn()`` and counts the bytes autograd saves for the backward during it.

    Args:
        fn: runs a forward pass (returns e.g. the loss); the graph must stay alive until the
            caller's backward, so keep the returned value.
        exclude: tensors whose storages are not counted: the model's parameters and buffers,
            which are alive anyway and which the plan counts as 0 bytes.

    Returns:
        (fn's result, bytes): bytes over unique storages (``untyped_storage().nbytes()``).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@functools.lru_cache(maxsize=1)
def release_large_blocks() -> bool:
    """Makes glibc return blocks >= 64 KiB to the system on free (``mallopt``), so that RSS
    follows live tensor memory. Call once before the first measured step; returns whether it
    could (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)
    return True


def _status(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def peak_rss_supported() -> bool:
    """Whether :func:`peak_rss_delta` can measure on this system (Linux with clear_refs)."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        _status("VmHWM")
        return True
    except OSError:
        return False


def peak_rss_delta(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Runs ``fn()`` and returns (result, peak resident bytes above the start).

    Raises:
        OSError: not supported here (see :func:`peak_rss_supported`).
    """
    release_large_blocks()
    base = _status("VmRSS")
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return out, max(0, _status("VmHWM") - base)
