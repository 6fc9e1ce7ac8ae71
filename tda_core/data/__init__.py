"""Dataset registry. Importing this package registers every dataset."""
from . import images  # noqa: F401  (registers mnist, digits, cifar2)
from . import music  # noqa: F401  (registers chorales, maestro)
from .base import REGISTRY, Dataset, DatasetInfo, SourceStatus, dataset_info, dataset_table, load_dataset, register

__all__ = ["REGISTRY", "Dataset", "DatasetInfo", "SourceStatus", "dataset_info", "dataset_table", "load_dataset",
           "register"]
