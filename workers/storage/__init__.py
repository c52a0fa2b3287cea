"""Storage on a local folder (``file://``) or an S3-compatible endpoint (``s3://bucket/prefix``), on pyarrow.fs.
Modules, each importing only those before it: ``objects``, ``datasets`` (push / ls / rm), ``resolver`` (data sources
as verified files in the node's cache; :class:`Storage`); ``ray_fs``: Tune's S3 filesystem, pickled without keys."""

from workers.storage.datasets import DATASET_NAME, DATASETS, MANIFEST, data_formats, human_size, validate_dataset_name
from workers.storage.objects import ObjectNotFound, ObjectStore, S3Connection, StorageError, StorageUnreachable
from workers.storage.resolver import Storage, resolver_from_settings

__all__ = [
    "DATASETS",
    "DATASET_NAME",
    "MANIFEST",
    "ObjectNotFound",
    "ObjectStore",
    "S3Connection",
    "Storage",
    "StorageError",
    "StorageUnreachable",
    "data_formats",
    "human_size",
    "resolver_from_settings",
    "validate_dataset_name",
]
