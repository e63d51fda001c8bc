"""Cryo-electron-tomography subtomograms: class densities from atomic structures
(:mod:`.structures`), a simulator (:mod:`.simulate`), MRC/npz files (:mod:`.files`) and the
datasets ``subtomograms``, ``subtomograms-sim`` and ``subtomograms-sim-large``
(:mod:`.datasets`)."""

from . import datasets  # noqa: F401  (registers the datasets)
from .files import read_volume, write_mrc, write_simulation
from .simulate import (
    SimulatedSet,
    SimulationParams,
    ctf,
    quaternion_matrix,
    random_rotation,
    simulate_subtomograms,
    wedge_mask,
)
from .structures import BUILTIN_STRUCTURES, Atoms, builtin_structure, coarse_grain, render_density

__all__ = [
    "BUILTIN_STRUCTURES",
    "Atoms",
    "SimulatedSet",
    "SimulationParams",
    "builtin_structure",
    "coarse_grain",
    "ctf",
    "quaternion_matrix",
    "random_rotation",
    "read_volume",
    "render_density",
    "simulate_subtomograms",
    "wedge_mask",
    "write_mrc",
    "write_simulation",
]
