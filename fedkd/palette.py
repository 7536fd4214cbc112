"""One palette for every picture fedkd draws: the data preview, predictions.png, robustness and sweep plots.

A class has one colour everywhere (catheter red, guidewire green, vessel blue), and the error marks of
predictions.png use colours no class uses (false positive yellow, miss magenta), so green always means
guidewire. Imports nothing heavy (no JAX, no matplotlib).
"""

from __future__ import annotations

from fedkd.data.labels import CATHETER, CLASS_NAMES, GUIDEWIRE, VESSEL

# RGB 0-255 of each foreground class, by label id
CLASS_RGB = {CATHETER: (235, 64, 52), GUIDEWIRE: (60, 220, 60), VESSEL: (70, 120, 255)}
CLASS_COLOUR_NAMES = {CATHETER: "red", GUIDEWIRE: "green", VESSEL: "blue"}
# prediction errors (fedkd.report.error_overlay)
FALSE_POSITIVE_RGB = (255, 215, 0)  # predicted a class where the truth is background
MISS_RGB = (230, 40, 230)  # a labelled pixel predicted as background or as another class


def class_rgb(name_or_id: str | int) -> tuple[int, int, int]:
  """The colour of a class, by name ('catheter') or label id (1)."""
  cid = CLASS_NAMES.index(name_or_id) if isinstance(name_or_id, str) else int(name_or_id)
  if cid not in CLASS_RGB:
    raise KeyError(f"no colour for class {name_or_id!r}; classes with colours: {[CLASS_NAMES[c] for c in CLASS_RGB]}")
  return CLASS_RGB[cid]


def hex_colour(rgb: tuple[int, int, int]) -> str:
  """'#rrggbb' (matplotlib's colour argument)."""
  r, g, b = rgb
  return f"#{r:02x}{g:02x}{b:02x}"


def plot_colour(label: str) -> str | None:
  """matplotlib colour of a line named after a class ('catheter', 'dice/guidewire', 'unseen/dice/vessel');
  None (matplotlib's cycle) for anything else."""
  last = label.rsplit("/", 1)[-1]
  for cid, rgb in CLASS_RGB.items():
    if last == CLASS_NAMES[cid]:
      return hex_colour(rgb)
  return None


def class_legend(class_ids) -> list[tuple[tuple[int, int, int], str]]:
  """(colour, name) legend entries of the given foreground class ids, in label order."""
  return [(CLASS_RGB[c], CLASS_NAMES[c]) for c in sorted(set(int(c) for c in class_ids)) if c in CLASS_RGB]


def caption(class_ids) -> str:
  """'red catheter, green guidewire' for the given foreground class ids (a picture's caption in words)."""
  ids = sorted(set(int(c) for c in class_ids) & set(CLASS_RGB))
  return ", ".join(f"{CLASS_COLOUR_NAMES[c]} {CLASS_NAMES[c]}" for c in ids) or "no labelled pixels"


def error_legend() -> list[tuple[tuple[int, int, int], str]]:
  """Legend entries of predictions.png's error marks."""
  return [(FALSE_POSITIVE_RGB, "false positive"), (MISS_RGB, "missed / wrong class")]
