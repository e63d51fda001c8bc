"""Labelling projects: active learning with people as the oracle, on a folder of images.

``Project.create(path, images, classes=...)`` (``gradnorm-al init``), then rounds of
``train`` -> ``query`` -> annotators answer -> ``import_labels``; ``status`` says where the
project stands. State lives in one SQLite database (:mod:`.db`); Label Studio's file formats are
in :mod:`.labelstudio_files`, CSV label files in :mod:`.labelfiles`.
"""

from .labelfiles import LabelRow, read_labels_csv, read_labels_file
from .labelstudio_files import labeling_config, read_labelstudio_export, write_tasks
from .project import (
    Batch,
    BatchItem,
    ImportSummary,
    Item,
    Project,
    ProjectTrainConfig,
    Round,
)

__all__ = [
    "Batch",
    "BatchItem",
    "ImportSummary",
    "Item",
    "LabelRow",
    "Project",
    "ProjectTrainConfig",
    "Round",
    "labeling_config",
    "read_labels_csv",
    "read_labels_file",
    "read_labelstudio_export",
    "write_tasks",
]
