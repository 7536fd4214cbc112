"""The label space of every fedkd mask (synthetic sites, TFDS records, models, metrics, reports).

Imports nothing, so light modules (the TFDS record readers) share it without loading JAX.
"""

CLASS_NAMES = ("background", "catheter", "guidewire", "vessel")
NUM_CLASSES = len(CLASS_NAMES)
BACKGROUND, CATHETER, GUIDEWIRE, VESSEL = range(NUM_CLASSES)
