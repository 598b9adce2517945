"""Data layer: the on-disk VQA format, the synthetic benchmark and client partitioners.

See DESIGN.md §4 ("Dataset format", "Partitioners").
"""

from fednano_ray.data import synth
from fednano_ray.data.dataset import (
    DATA_FILE,
    SPLITS,
    DatasetError,
    VQAExample,
    load_dataset,
    load_split,
    open_image,
)
from fednano_ray.data.partition import METHODS, partition, split_holdout
from fednano_ray.data.synth import CATEGORIES, GENERATOR_VERSION, generate

__all__ = [
    "CATEGORIES",
    "DATA_FILE",
    "GENERATOR_VERSION",
    "METHODS",
    "SPLITS",
    "DatasetError",
    "VQAExample",
    "generate",
    "load_dataset",
    "load_split",
    "open_image",
    "partition",
    "split_holdout",
    "synth",
]
