"""Images (and their labels) from digits, CIFAR-10 or a folder, and batches of them on the device.

``sources`` loads a dataset into one uint8 tensor (``load_dataset`` -> ``ImageData``); ``batcher`` serves
float batches in [-1, 1] from it (``Batcher``).
"""

from .batcher import Batcher
from .sources import (
    CIFAR10_CLASSES,
    CIFAR10_MD5,
    CIFAR10_URL,
    DIGITS_CLASSES,
    IMAGE_EXTENSIONS,
    SOURCES,
    DataWarning,
    ImageData,
    available_memory_bytes,
    folder_classes,
    load_dataset,
    parse_source,
)

__all__ = [
    "Batcher",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DIGITS_CLASSES",
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "DataWarning",
    "ImageData",
    "available_memory_bytes",
    "folder_classes",
    "load_dataset",
    "parse_source",
]
