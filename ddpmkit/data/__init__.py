"""Images (and their labels) from digits, CIFAR-10 or a folder, and batches of them on the device.

``sources`` loads a dataset into one uint8 tensor (``load_dataset`` -> ``ImageData``); ``batcher`` serves
float batches in [-1, 1] from it (``Batcher``).
"""

from . import sources
from .batcher import Batcher
from .sources import *  # noqa: F401,F403  (the names in sources.__all__)

__all__ = ["Batcher", *sources.__all__]
