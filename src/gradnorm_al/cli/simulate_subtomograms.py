"""``gradnorm-al simulate-subtomograms``: a labelled set of simulated cryo-ET subtomograms as MRC
files, with labels.csv and simulation.json (:mod:`gradnorm_al.data.subtomograms`)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..data.subtomograms import SimulationParams, simulate_subtomograms, write_simulation
from ..data.subtomograms.files import check_out_dir
from ..data.subtomograms.simulate import class_structures
from ..data.subtomograms.structures import BUILTIN_STRUCTURES
from ..errors import ConfigError
from .common import make_log, parse_float, parse_int

DEFAULTS = SimulationParams()


def parse_tilt(text: str) -> tuple[float, float]:
    """``T`` (the range -T..T) or ``LO,HI``, degrees."""
    try:
        parts = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected degrees T or LO,HI (e.g. 60 or -54,66), got {text!r}"
        ) from None
    if len(parts) == 1:
        return (-abs(parts[0]), abs(parts[0]))
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"expected T or LO,HI, got {text!r}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = DEFAULTS
    p = sub.add_parser(
        "simulate-subtomograms",
        help="simulate labelled cryo-ET subtomograms (MRC files, labels.csv, simulation.json)",
        description="Simulate subtomograms: per sample a class density (atoms of a real "
        "structure blurred at --resolution) turned by a uniform random rotation and shifted, "
        "optionally a CTF, Gaussian noise at --snr, and the missing wedge of a tilt series "
        "about the y axis (beam along z). Writes OUT/<NN>_<class>/*.mrc, OUT/labels.csv and "
        "OUT/simulation.json; read them back with `--dataset subtomograms --data-root OUT`.",
    )
    p.add_argument(
        "--classes",
        type=parse_int,
        default=None,
        metavar="K",
        help=f"number of classes: the first K of the {len(BUILTIN_STRUCTURES)} built-in "
        f"structures ({', '.join(r[0] for r in BUILTIN_STRUCTURES)}); default {d.classes}",
    )
    p.add_argument(
        "--per-class",
        type=parse_int,
        default=d.per_class,
        metavar="N",
        help=f"subtomograms per class (default {d.per_class})",
    )
    p.add_argument(
        "--size",
        type=parse_int,
        default=d.size,
        metavar="S",
        help=f"side of the cubic volumes, voxels (default {d.size})",
    )
    p.add_argument(
        "--snr",
        type=parse_float,
        default=d.snr,
        help=f"signal variance / noise variance per volume; inf: no noise (default {d.snr})",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a simulation already in --out (nothing else is ever replaced)",
    )
    p.add_argument("--seed", type=parse_int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument(
        "--tilt",
        type=parse_tilt,
        default=d.tilt,
        metavar="T|LO,HI",
        help="tilt range, degrees: T for -T..T or LO,HI (write --tilt=-54,66); "
        f"default {d.tilt[1]:g}",
    )
    p.add_argument(
        "--voxel-size",
        type=parse_float,
        default=d.voxel_size,
        metavar="A",
        help=f"Angstrom per voxel, written in each MRC header (default {d.voxel_size:g})",
    )
    p.add_argument(
        "--resolution",
        type=parse_float,
        default=d.resolution,
        metavar="A",
        help=f"resolution of the atoms' Gaussian blur, Angstrom (default {d.resolution:g})",
    )
    p.add_argument(
        "--max-shift",
        type=parse_float,
        default=d.max_shift,
        metavar="V",
        help=f"largest random shift along each axis, voxels (default {d.max_shift:g})",
    )
    p.add_argument(
        "--ctf-defocus",
        type=parse_float,
        default=d.ctf_defocus,
        metavar="UM",
        help="apply a CTF with this underfocus, micrometres (300 kV, Cs 2.7 mm, 7%% "
        "amplitude contrast); 0: none (default)",
    )
    p.add_argument(
        "--structures",
        nargs="+",
        default=None,
        metavar="FILE",
        help="PDB or mmCIF files (.gz too), one class each, instead of the built-in ones",
    )
    p.add_argument("--quiet", action="store_true", help="no log lines")


def execute(args: argparse.Namespace) -> int:
    structures = tuple(args.structures or ())
    if structures and args.classes is not None and args.classes != len(structures):
        raise ConfigError(
            f"--classes {args.classes} but {len(structures)} --structures files (one class "
            "each); drop --classes or give that many files"
        )
    if math.isnan(args.snr) or args.snr <= 0:
        raise ConfigError(f"--snr must be > 0 (inf: no noise), got {args.snr}")
    params = SimulationParams(
        classes=args.classes if args.classes is not None else DEFAULTS.classes,
        per_class=args.per_class,
        size=args.size,
        voxel_size=args.voxel_size,
        resolution=args.resolution,
        snr=args.snr,
        tilt=args.tilt,
        max_shift=args.max_shift,
        ctf_defocus=args.ctf_defocus,
        seed=args.seed,
        structures=structures,
    )
    log = make_log(args.quiet)
    out = Path(args.out)
    check_out_dir(out, args.overwrite)  # before the work, not after
    structures_read = class_structures(params)  # a bad structure file fails before the log
    total = params.classes * params.per_class
    log(f"simulating {total} subtomograms of {params.size}^3 voxels ({params.classes} classes)")
    started = time.perf_counter()
    sim = simulate_subtomograms(params, structures=structures_read)
    write_simulation(sim, out, overwrite=args.overwrite)
    seconds = time.perf_counter() - started
    print(
        f"wrote {out}/ ({total} MRC files in {params.classes} class folders, labels.csv, "
        f"simulation.json) in {seconds:.1f} s"
    )
    return 0
