"""What a task builds once per process and reuses: jitted programs, models, held-out data."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any


class Kept:
  """The values built for the latest ``size`` keys, the least recently used dropped first.

  A task keys what it builds by everything the value depends on (its config, engine options, devices), so a
  re-run, a resumed run or a sweep's repeat in the same process reuses the jitted program and JAX neither
  traces nor lowers it again (the persistent compilation cache spares only the compile). ``size`` bounds
  what stays alive: each value holds its compiled programs or arrays. A ``build`` that raises keeps
  nothing."""

  def __init__(self, size: int):
    if size < 1:
      raise ValueError(f"Kept needs a size of at least 1, got {size}")
    self.size = size
    self._values: collections.OrderedDict = collections.OrderedDict()

  def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
    """The value kept under ``key``, or ``build()``'s, now kept as the most recently used."""
    if key in self._values:
      self._values.move_to_end(key)
      return self._values[key]
    value = build()  # may itself get other keys
    self._values[key] = value
    while len(self._values) > self.size:
      self._values.popitem(last=False)
    return value

  def __len__(self) -> int:
    return len(self._values)
