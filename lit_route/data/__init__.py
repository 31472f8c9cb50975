"""Datasets: readers for each preference format, pair encoding, DataModules."""

from lit_route.data.io import DataFormatError, resolve_path
from lit_route.data.readers import FORMATS, ReadReport, load_pairs

__all__ = ["FORMATS", "DataFormatError", "ReadReport", "load_pairs", "resolve_path"]
