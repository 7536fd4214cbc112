"""The one base class of user errors.

Every error caused by what a user gave (a config value, a flag, a data folder, a checkpoint, a
workdir) derives from :class:`UserError`; entry points print it as one line
(``fedkd: error: ...``) and exit with status 2, without a traceback. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

from fedkd.config import ConfigError  # a leaf module: config files load nothing else


class UserError(Exception):
  """Bad input from the user; the message names the problem and the fix."""


class DivergedError(UserError):
  """Training produced NaN/Inf; the run stopped before writing the bad state anywhere."""


class NonFiniteOutput(UserError):
  """A model whose outputs on held-out images are NaN/Inf (finite but huge parameters overflow): a diverged
  model, which has no scores. Training turns it into a :class:`DivergedError`."""


def first_names(names, limit: int) -> str:
  """``a, b, c`` for a message; past ``limit`` names the first ``limit`` and ``and N more``."""
  names = [str(n) for n in names]
  return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def reason(e: BaseException, limit: int = 200) -> str:
  """``Type: first line`` of an exception (at most ``limit`` characters of the line; TensorStore's spec
  dump cut off), for the cause inside a one-line error."""
  lines = str(e).strip().splitlines()
  text = lines[0].split(" See full TensorStore details")[0][:limit] if lines else ""
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


# What entry points catch as user errors: ConfigError lives in fedkd.config (which imports nothing
# from fedkd), every other one derives from UserError.
USER_ERRORS = (UserError, ConfigError)
