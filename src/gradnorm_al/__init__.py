"""gradnorm-al: deep active learning by per-sample gradient norms (Wang et al., AAAI 2022).

The main entry points:

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
    UnknownNameError,
)
from .experiment import ExperimentConfig, run_experiment
from .models import MODELS, create_model
from .pergrad import per_sample_grad_norms
from .pool import Pool
from .strategies import STRATEGIES, create_strategy, gradnorm_scores

__all__ = [
    "DATASETS",
    "MODELS",
    "STRATEGIES",
    "ConfigError",
    "DataError",
    "DatasetBundle",
    "ExperimentConfig",
    "GradnormALError",
    "Pool",
    "PoolError",
    "RunDirectoryError",
    "UnknownNameError",
    "create_model",
    "create_strategy",
    "gradnorm_scores",
    "load_dataset",
    "per_sample_grad_norms",
    "run_experiment",
]
