"""Keep a rank's resident memory at what its tensors need: a fixed glibc mmap threshold (issue 16, item 7).

glibc serves allocations of at least M_MMAP_THRESHOLD bytes with their own mmap and returns them to
the system on free. By default that threshold is dynamic: the first freed mmap chunk raises it to
its own size, up to 32 MiB, so from the second training step on every activation and gradient
tensor below 32 MiB comes from the heap instead. A freed heap chunk goes back to the system only
when it is at the top of the heap, so each step leaves behind freed memory that the next step's
different allocation order cannot fully reuse. On SmolLM2-135M (2 CPU ranks, 4 x 256 tokens) an SSH rank
peaked at 4.84-4.89 GiB with glibc's default and 3.35 GiB with a fixed threshold; HF Trainer + peft,
3.83-3.87 and 3.11 GiB (`python launch/bench.py host_memory`, BENCHMARKS.md). Setting the threshold once, before
training, switches the dynamic adjustment off.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc malloc.h
DEFAULT_THRESHOLD = 128 * 1024  # glibc's own starting value, now fixed
ENV = "MEGASPEC_MMAP_THRESHOLD"


def threshold_from_env() -> int | None:
    """Bytes from $MEGASPEC_MMAP_THRESHOLD (default 128 KiB); None for 0/off: keep glibc's dynamic threshold."""
    text = os.environ.get(ENV, "").strip().lower()
    if not text:
        return DEFAULT_THRESHOLD
    if text in ("0", "off", "default", "dynamic"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"${ENV}={text!r} is not a byte count; use e.g. 131072, or 0 to keep glibc's dynamic threshold") from None
    if value < 0 or value > 32 << 20:
        raise ValueError(f"${ENV}={value} is outside 0..{32 << 20} bytes (glibc's limit); use e.g. 131072, or 0 for glibc's default")
    return value or None


def fix_mmap_threshold() -> int | None:
    """Fix glibc's mmap threshold in this process; the bytes set, or None when left alone.

    Left alone: not Linux glibc, $MALLOC_MMAP_THRESHOLD_ already set (glibc read it at start-up),
    or $MEGASPEC_MMAP_THRESHOLD=0.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    value = threshold_from_env()
    if value is None:
        return None
    libc = ctypes.CDLL(None)
    return value if libc.mallopt(M_MMAP_THRESHOLD, value) == 1 else None
