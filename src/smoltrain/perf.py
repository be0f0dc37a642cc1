"""Process-level settings for training on CPU under glibc, each measured (docs/performance.md):
freed memory kept in the heap (`keep_freed_memory`) and the per-thread cache of small blocks
off (`relaunch_with_lean_malloc`). `train.tune_malloc=false` turns both off; the start-up
summary lists what is applied (`cpu_training_tweaks`)."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers

# glibc keeps up to 7 freed blocks of each small size in a per-thread cache ("tcache").
# Those blocks still count as in use, so they sit between freed activation buffers and keep
# them from merging: at a 135M step's peak the heap held ~350 such holes, 0.7-1.1 GB that
# the loss's 100 MB blocks could not use. With the cache off, peak RSS fell 3,998 -> 3,603 MB
# (fp32) and 3,547 -> 3,166 MB (bf16 autocast) at the same speed (bench.worker, A/B).
_TCACHE_COUNT = "glibc.malloc.tcache_count"
LEAN_MALLOC_TUNABLE = f"{_TCACHE_COUNT}=0"
_RELAUNCHED = "SMOLTRAIN_RELAUNCHED"


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


def lean_malloc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) with `LEAN_MALLOC_TUNABLE` added to
    GLIBC_TUNABLES, keeping any tunables already there."""
    env = dict(os.environ if env is None else env)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith(f"{_TCACHE_COUNT}=") for t in tunables):
        tunables.append(LEAN_MALLOC_TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def relaunch_with_lean_malloc() -> None:
    """Replace this process with the same command under `lean_malloc_env`, once. glibc reads
    its tunables only at start-up, so a command that trains re-executes itself (same PID,
    same arguments and environment) before doing any work. Does nothing off glibc, when a
    tcache setting is already chosen (the user's wins), or after one relaunch.
    SMOLTRAIN_RELAUNCHED=1 in the environment turns it off."""
    if os.environ.get(_RELAUNCHED) or platform.libc_ver()[0] != "glibc":
        return
    env = lean_malloc_env()
    if env["GLIBC_TUNABLES"] == os.environ.get("GLIBC_TUNABLES"):
        return  # nothing added: a tcache setting is already there
    env[_RELAUNCHED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def lean_malloc_active() -> bool:
    """Whether this process started with glibc's tcache off (by the relaunch or the user)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    return platform.libc_ver()[0] == "glibc" and LEAN_MALLOC_TUNABLE in tunables


def cpu_training_tweaks(device_type: str, enabled: bool) -> list[str]:
    """Apply the settings that pay for training on CPU (when `enabled`), and say which are
    in force, for the start-up summary. They last as long as the process."""
    applied = []
    if device_type == "cpu" and enabled and keep_freed_memory():
        applied.append("glibc keeps freed memory (mallopt, for the rest of this process)")
    if lean_malloc_active():
        applied.append("glibc tcache off (GLIBC_TUNABLES)")
    return applied
