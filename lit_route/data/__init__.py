"""Datasets: loading through Hugging Face ``datasets``, format adapters, pair encoding, DataModules."""

from lit_route.data.adapters import FORMATS, detect_format
from lit_route.data.io import DataFormatError, resolve_path
from lit_route.data.readers import ReadReport, load_pair_dataset, load_pairs, pairs_from_dataset

__all__ = ["FORMATS", "DataFormatError", "ReadReport", "detect_format", "load_pair_dataset", "load_pairs",
           "pairs_from_dataset", "resolve_path"]
