"""Process-level settings that make the hot loop faster; each one measured (bench/)."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc caps the threshold at 32 MiB on 64-bit


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed blocks to the OS. By default every block over the
    (dynamic) mmap threshold is a fresh mmap whose pages fault in, zeroed, on first touch,
    and the chunked loss allocates and frees tens of MB per chunk: on this 2-core CPU that
    page-faulting cost 35% of a tiny-model train step. Returns whether it applied (glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )
