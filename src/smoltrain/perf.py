"""Process-level settings that make the hot loop faster; each one measured (bench/)."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed blocks to the OS. By default every block over the
    (dynamic, at most 32 MiB) mmap threshold is a fresh mmap whose pages fault in, zeroed, on
    first touch, and a training step allocates and frees large blocks (the chunked loss's
    logits, 100 MB a chunk) over and over: on this 2-core CPU that page-faulting cost 35% of
    a tiny-model step and 12-20% of a 135M one. With mmap off and no trimming, freed blocks
    stay in the heap and the next step reuses them. Returns whether it applied (glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
