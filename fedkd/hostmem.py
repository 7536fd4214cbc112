"""Host memory of XLA:CPU programs: keep freed memory in the process instead of mapping it afresh each run.

XLA:CPU allocates a compiled program's temporary buffer (activations and gradients of every client step
of a round: hundreds of MiB) with ``malloc`` at every execution, on one of its worker threads. glibc
serves a block that large with a fresh ``mmap`` and returns it with ``munmap``, so every round faults in
every page of it again: on the 2-core VM of docs/engine.md, 62,000 page faults and about 0.13 s of a
1.37 s round. ``apply("keep")`` (engine.host_memory) changes two process-wide settings, before JAX's
CPU backend starts:

- JAX's CPU dispatch becomes synchronous (``jax_cpu_enable_async_dispatch=False``), so a single-device
  program runs on the calling thread and its buffers come from glibc's main heap (a worker thread's
  heap cannot hold a block over 64 MiB and always maps one);
- glibc serves blocks up to ``HEAP_BLOCK_MAX`` from the heap and trims the heap's top only above
  ``TRIM_THRESHOLD`` (``mallopt``), so a freed temporary buffer stays mapped for the next execution.

The process then keeps its peak heap: resident memory does not fall between rounds. Programs that run
over several devices (``--cpu_devices``, sharded rounds) still dispatch asynchronously and are not
changed. Needs Linux with glibc; elsewhere, and on a machine with JAX's GPU/TPU plugins (unless
JAX_PLATFORMS=cpu), ``auto`` keeps the defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

MODES = ("auto", "keep", "release")
HEAP_BLOCK_MAX = 1 << 30  # glibc M_MMAP_THRESHOLD: blocks below this come from the heap
TRIM_THRESHOLD = 2**31 - 1  # glibc M_TRIM_THRESHOLD (an int): free heap top kept up to this many bytes
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_kept = False


def kept() -> bool:
  """Whether ``apply`` kept freed host memory in this process."""
  return _kept


def in_effect() -> bool:
  """Whether kept memory reaches the round: kept, JAX running on the CPU, and one CPU device (programs
  over several devices still dispatch asynchronously, and their buffers come from XLA's worker threads)."""
  import jax

  return _kept and jax.default_backend() == "cpu" and jax.local_device_count("cpu") == 1


def _mallopt():
  """glibc's ``mallopt``, or None where the C library is not glibc (or not Linux)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt as a no-op)
    return libc.mallopt
  except (OSError, AttributeError):
    return None


def _accelerator_plugins() -> list[str]:
  """JAX's accelerator plugins installed here (the ``jax_plugins`` entry points and namespace, libtpu)."""
  import importlib.util
  import pkgutil
  from importlib.metadata import entry_points

  found = [ep.name for ep in entry_points(group="jax_plugins")]
  try:
    import jax_plugins

    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return found


def _cpu_first(platforms: str | None = None) -> bool:
  """Whether JAX will run on the CPU: ``platforms`` (default: jax_platforms / JAX_PLATFORMS) naming cpu
  first, or, unset, no accelerator plugin installed (a GPU/TPU machine keeps glibc's and JAX's defaults)."""
  import jax

  if platforms is None:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  first = platforms.split(",")[0].strip().lower()
  return first == "cpu" or (first == "" and not _accelerator_plugins())


def apply(mode: str = "auto") -> bool:
  """Sets the process up for ``mode`` (see the module doc) and returns whether freed memory is kept.

  ``auto``: keep on Linux with glibc where JAX runs on the CPU (JAX_PLATFORMS naming cpu first, or unset
  and no GPU/TPU plugin of JAX installed); ``keep``:
  keep, or ValueError where it cannot; ``release``: glibc's and JAX's defaults. Call it before any
  JAX computation: the CPU backend reads the dispatch setting when it starts, so afterwards ``keep`` is a
  RuntimeError and ``auto`` changes nothing."""
  global _kept
  if mode not in MODES:
    raise ValueError(f"host memory mode {mode!r} is unknown; use one of {', '.join(MODES)}")
  if mode == "release" or (mode == "auto" and not _cpu_first()):
    return _kept
  mallopt = _mallopt()
  if mallopt is None:
    if mode == "keep":
      raise ValueError(
        "engine.host_memory='keep' needs Linux with glibc (it sets glibc's malloc thresholds); "
        "use 'auto' or 'release' here"
      )
    return _kept
  import jax
  from jax._src import xla_bridge

  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    if mode == "keep":
      raise RuntimeError("fedkd.hostmem.apply('keep') must run before any JAX computation (the backend has started)")
    return _kept  # 'auto' in a process that already ran JAX (a notebook, a test): nothing changes
  if not (mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
    if mode == "keep":
      raise ValueError("engine.host_memory='keep': glibc refused the malloc thresholds; use 'release'")
    return _kept
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _kept = True
  return _kept
