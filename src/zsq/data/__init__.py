"""Real datasets behind one spec string (``cifar10:DIR``, ``npz:FILE``, ``digits`` ...)."""

from zsq.data.datasets import (
    ImageArrayDataset,
    JpegArrayDataset,
    head,
    load_dataset,
    read_idx,
    spec_kinds,
    subset,
)

__all__ = [
    "ImageArrayDataset",
    "JpegArrayDataset",
    "head",
    "load_dataset",
    "read_idx",
    "spec_kinds",
    "subset",
]
