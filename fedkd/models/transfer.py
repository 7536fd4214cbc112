"""Transfer of a pretrained ("foundation") encoder into a student model, on pure param pytrees.

Works on the nested dicts of ``nnx.to_pure_dict`` (list levels such as ``layers`` have int keys),
e.g. TransUNet params, whose encoder (CNN stem, patch projection, position embedding, ViT layers,
final norm) lives entirely under ``"encoder"``.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import numpy as np


def _leaves(tree, path=()):
  """Yields (path tuple, leaf) for a nested mapping, in sorted-key order."""
  if isinstance(tree, Mapping):
    for k in sorted(tree, key=lambda k: (str(type(k)), k)):
      yield from _leaves(tree[k], path + (k,))
  else:
    yield path, tree


def _get(tree, path):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      raise KeyError(path)
    tree = tree[k]
  return tree


def _set(tree, path, value):
  """Returns a copy of ``tree`` with the leaf at ``path`` replaced (copies only the dicts on the
  path; all other leaves are shared with the input)."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = _set(tree[path[0]], path[1:], value)
  return new


def _fmt(path) -> str:
  return "/".join(str(k) for k in path)


def _hidden(encoder) -> Any:
  try:
    return np.shape(encoder["pos_embed"])[-1]
  except (KeyError, TypeError, IndexError):
    return "?"


def load_encoder(student_params, foundation_params, prefix=("encoder",), require=("layers",)):
  """Copies the foundation's encoder leaves into the student where path and shape agree.

  Every leaf under ``prefix`` in the student whose key path also exists in the foundation with the
  same shape is replaced by the foundation's value (cast to the student's dtype); so a student
  with fewer transformer layers receives the foundation's first layers. All other student leaves
  (outside ``prefix``, or not matching) are returned unchanged (the same array objects).

  Returns ``(new_params, report)`` with ``report`` a dict of lists:
    ``loaded``: paths copied; ``skipped_shape``: ``(path, student_shape, foundation_shape)``;
    ``missing_in_foundation``: student paths the foundation lacks; ``unused_in_foundation``:
    foundation encoder paths the student lacks (e.g. its extra layers). Paths are key tuples.

  Raises ``ValueError`` when nothing could be loaded, or when the student has a subtree named in
  ``require`` (by default the transformer ``layers``) under ``prefix`` of which no leaf could be
  loaded or some leaf that both have differs in shape: a half-copied transformer layer is
  meaningless, and copying only the CNN stem would silently leave the ViT untransferred (the
  usual cause is a different hidden size / head count / MLP width). Shape mismatches elsewhere
  (stem, patch projection, position embedding of another token grid) are only reported.
  """
  prefix = tuple(prefix)
  try:
    s_enc = _get(student_params, prefix)
  except KeyError:
    raise ValueError(
      f"the student params have no {_fmt(prefix)!r} subtree; top-level keys: {sorted(map(str, student_params))}"
    ) from None
  try:
    f_enc = _get(foundation_params, prefix)
  except KeyError:
    raise ValueError(
      f"the foundation params have no {_fmt(prefix)!r} subtree; top-level keys: {sorted(map(str, foundation_params))}"
    ) from None

  report = dict(loaded=[], skipped_shape=[], missing_in_foundation=[], unused_in_foundation=[])
  new = student_params
  for path, leaf in _leaves(s_enc):
    full = prefix + path
    try:
      f_leaf = _get(f_enc, path)
    except KeyError:
      report["missing_in_foundation"].append(full)
      continue
    if isinstance(f_leaf, Mapping):
      report["missing_in_foundation"].append(full)
      continue
    s_shape, f_shape = tuple(np.shape(leaf)), tuple(np.shape(f_leaf))
    if s_shape != f_shape:
      report["skipped_shape"].append((full, s_shape, f_shape))
      continue
    dtype = getattr(leaf, "dtype", None)
    value = f_leaf.astype(dtype) if dtype is not None and hasattr(f_leaf, "astype") else f_leaf
    new = _set(new, full, value)
    report["loaded"].append(full)
  s_paths = {p for p, _ in _leaves(s_enc)}
  report["unused_in_foundation"] = [prefix + p for p, _ in _leaves(f_enc) if p not in s_paths]

  shapes = "; ".join(f"{_fmt(p)}: student {s} vs foundation {f}" for p, s, f in report["skipped_shape"][:4])
  if any(isinstance(e, Mapping) and "pos_embed" in e for e in (s_enc, f_enc)):  # a ViT (TransUNet) encoder
    hint = (
      f"the student's encoder must share hidden size/patch size (and heads, mlp_dim) with the "
      f"foundation; got hidden {_hidden(s_enc)} (student) vs {_hidden(f_enc)} (foundation)"
    )
  else:  # a conv encoder (UNet enc / mid blocks): no hidden size to name
    hint = "the student's encoder must have the foundation's channel widths (UNet: the same width and depth)"
  if not report["loaded"]:
    raise ValueError(
      f"no encoder parameter of the foundation matches the student: {hint}; "
      f"shape mismatches: {shapes or 'none'}; "
      f"{len(report['missing_in_foundation'])} student paths missing in foundation"
    )
  loaded_keys = {p[len(prefix)] for p in report["loaded"]}
  for key in require:
    if key not in s_enc:
      continue
    bad = [(p, s, f) for p, s, f in report["skipped_shape"] if p[len(prefix)] == key]
    if bad or key not in loaded_keys:
      bad_s = "; ".join(f"{_fmt(p)}: student {s} vs foundation {f}" for p, s, f in bad[:4])
      raise ValueError(
        f"the foundation's encoder {key!r} do not match the student's (a "
        f"transformer layer must be transferred whole; {len(bad)} of its leaves "
        f"differ in shape: {bad_s or 'none'}): {hint}"
      )
  return new, report
