"""Real datasets behind one spec string (``cifar10:DIR``, ``npz:FILE``, ``digits`` ...)."""

from zsq.data.datasets import (
    DOWNLOADABLE,
    ImageArrayDataset,
    JpegArrayDataset,
    eval_transform,
    head,
    imagefolder_transform,
    load_dataset,
    load_dataset_for,
    read_idx,
    same_dataset,
    spec_kinds,
    subset,
)

__all__ = [
    "DOWNLOADABLE",
    "ImageArrayDataset",
    "JpegArrayDataset",
    "eval_transform",
    "head",
    "imagefolder_transform",
    "load_dataset",
    "load_dataset_for",
    "read_idx",
    "same_dataset",
    "spec_kinds",
    "subset",
]
