"""gradnorm-al: deep active learning by per-sample gradient norms (Wang et al., AAAI 2022).

The main entry points:

* :class:`ActiveLearner` - a task model, a pool, a task and a strategy; labels arrive through
  ``update`` (from the caller or an :class:`Oracle`);
* :func:`gradnorm_scores` - the paper's score for every sample of a dataset;
* :func:`run_experiment` with an :class:`ExperimentConfig` - Algorithm 1 over strategies x trials;
* the registries ``DATASETS``, ``MODELS``, ``STRATEGIES``.
"""

from ._version import __version__ as __version__
from .data import DATASETS, DatasetBundle, load_dataset
from .errors import (
    ConfigError,
    DataError,
    GradnormALError,
    PoolError,
    RunDirectoryError,
    SelectionError,
    UnknownNameError,
)
from .experiment import ExperimentConfig, run_experiment
from .learner import ActiveLearner
from .models import MODELS, create_model
from .oracles import CallbackOracle, DatasetOracle, HumanOracle, Oracle
from .pergrad import per_sample_grad_norms
from .pool import Pool
from .strategies import SAMPLERS, STRATEGIES, Selection, create_strategy, gradnorm_scores
from .tasks import ClassificationTask, SegmentationTask, Task
from .train import TrainConfig

__all__ = [
    "DATASETS",
    "MODELS",
    "SAMPLERS",
    "STRATEGIES",
    "ActiveLearner",
    "CallbackOracle",
    "ClassificationTask",
    "ConfigError",
    "DataError",
    "DatasetBundle",
    "DatasetOracle",
    "ExperimentConfig",
    "GradnormALError",
    "HumanOracle",
    "Oracle",
    "Pool",
    "PoolError",
    "RunDirectoryError",
    "SegmentationTask",
    "Selection",
    "SelectionError",
    "Task",
    "TrainConfig",
    "UnknownNameError",
    "create_model",
    "create_strategy",
    "gradnorm_scores",
    "load_dataset",
    "per_sample_grad_norms",
    "run_experiment",
]
