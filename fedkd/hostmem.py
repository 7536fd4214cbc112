"""Host memory: let freed buffers be reused inside the process instead of going back to the OS (glibc).

XLA:CPU allocates an executable's temporary buffer (activations, gradients: 832 MiB for the bench's
width-32 round of 8 clients x 2 steps) with ``malloc`` at every execution and frees it afterwards. glibc
serves a block that large with a fresh ``mmap`` and returns it with ``munmap``, so every round touches
all of it for the first time again: one page fault (and the kernel zeroing 4 KiB) per page, 213,000 per
round there. :func:`reuse_freed_memory` makes glibc serve large blocks from its heap and keep what is
freed (``mallopt``: one arena, no ``mmap`` blocks, no trimming of the heap), so from the second
execution on the same pages are reused: 0 page faults per round. See ``docs/engine.md`` (CPU) for the
measured effect. The cost: the process keeps its peak host memory until it exits.

The entry points (``fedkd.cli.run_app``, ``python -m bench``) call it before JAX starts its threads;
arenas that threads already own are not changed, so calling it later helps less. ``FEDKD_MALLOC=system``
keeps glibc's defaults. Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV = "FEDKD_MALLOC"
# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NEVER = -1  # mallopt takes an int; glibc stores this threshold as a size_t: -1 is the largest, i.e. never trim

_state: str | None = None


def reuse_freed_memory() -> str:
  """Applies the settings above once per process; returns ``"reuse"`` when they are in effect, else
  ``"system"`` (turned off with ``FEDKD_MALLOC=system``, not glibc, or ``mallopt`` refused)."""
  global _state
  if _state is not None:
    return _state
  choice = os.environ.get(ENV, "reuse")
  if choice not in ("reuse", "system"):
    raise ValueError(f"{ENV}={choice!r}: use 'reuse' (the default) or 'system' (glibc's own malloc settings)")
  _state = "system"
  if choice == "system" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return _state
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return _state
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER))
  if all(libc.mallopt(param, value) == 1 for param, value in settings):
    _state = "reuse"
  return _state
