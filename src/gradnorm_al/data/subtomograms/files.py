"""Subtomograms on disk: writing a simulated set, reading MRC files and ``.npz`` arrays.

A simulated set (:func:`write_simulation`) is a folder ``OUT`` holding::

    OUT/<NN>_<class>/<class>_<jjjjj>.mrc   one MRC file per subtomogram (float32, mode 2,
                                          voxel size in the header, in Angstrom)
    OUT/labels.csv                        file,label,class,index,qw,qx,qy,qz,shift_x,...
    OUT/simulation.json                   every parameter, the classes, the structures

``NN`` is the class index (two digits or more), so sorting the folder names gives the classes in
label order and :func:`read_volume_folders` reads the set back with its labels.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..._version import __version__
from ...errors import DataError, RunDirectoryError, WriteError
from .simulate import SimulatedSet
from .structures import BUILTIN_STRUCTURES

#: file name extensions read as MRC volumes
MRC_EXTENSIONS = (".mrc", ".rec", ".map")
LABELS_FILE = "labels.csv"
RECORD_FILE = "simulation.json"
RECORD_FORMAT = "gradnorm-al simulated subtomograms 1"


def class_folder_names(class_names: tuple[str, ...]) -> list[str]:
    digits = max(2, len(str(len(class_names) - 1)))
    return [f"{k:0{digits}d}_{name}" for k, name in enumerate(class_names)]


def _is_previous_simulation(out: Path) -> tuple[bool, list[str]]:
    """(whether ``out`` holds a simulation this module wrote and nothing else, the entries that
    are not part of one)."""
    try:
        record = json.loads((out / RECORD_FILE).read_text(encoding="utf-8"))
        folders = set(record["class_folders"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, sorted(p.name for p in out.iterdir())
    foreign = []
    for entry in out.iterdir():
        if entry.name in (RECORD_FILE, LABELS_FILE) and entry.is_file():
            continue
        if entry.name in folders and entry.is_dir():
            foreign += [
                f"{entry.name}/{f.name}"
                for f in entry.iterdir()
                if not (f.is_file() and f.suffix == ".mrc")
            ]
            continue
        foreign.append(entry.name)
    return not foreign, sorted(foreign)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """:class:`RunDirectoryError` unless a simulation may be written to ``out``: a new or empty
    folder, or (with ``overwrite``) one holding a simulation written here and nothing else."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(
            f"output path {out} exists and is not a folder; choose another --out"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours, foreign = _is_previous_simulation(out)
    if not overwrite:
        what = "a simulation" if ours else "files"
        raise RunDirectoryError(
            f"{out} is not empty (it holds {what}); choose an empty or new --out"
            + (", or pass --overwrite to replace it" if ours else "")
        )
    if not ours:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise RunDirectoryError(
            f"{out} holds files that are not a simulation's ({shown}); --overwrite replaces only "
            "a folder written by simulate-subtomograms: choose an empty or new --out"
        )


def write_mrc(path: Path, volume: np.ndarray, voxel_size: float) -> None:
    """One float32 volume [D, H, W] as an MRC file (mode 2, a volume, voxel size in Angstrom)."""
    import mrcfile

    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.set_volume()
        mrc.voxel_size = float(voxel_size)


def write_simulation(sim: SimulatedSet, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``sim`` into the folder ``out`` (see the module docstring), atomically: everything is
    written to a hidden sibling folder first, which then takes ``out``'s place, so ``out`` never
    holds half a set. See :func:`check_out_dir` for which ``out`` is accepted."""
    out = Path(out)
    check_out_dir(out, overwrite)
    params = sim.params
    folders = class_folder_names(sim.class_names)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise WriteError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        rows = []
        for folder in folders:
            (tmp / folder).mkdir()
        for i in range(len(sim.labels)):
            label, j = int(sim.labels[i]), int(sim.index[i])
            name = f"{folders[label]}/{sim.class_names[label]}_{j:05d}.mrc"
            write_mrc(tmp / name, sim.volumes[i], params.voxel_size)
            q, s = sim.quaternions[i], sim.shifts[i]
            rows.append([name, label, sim.class_names[label], j, *q.round(8), *s.round(6)])
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(
            ["file", "label", "class", "index", "qw", "qx", "qy", "qz"]
            + ["shift_x", "shift_y", "shift_z"]
        )
        writer.writerows(rows)
        (tmp / LABELS_FILE).write_text(text.getvalue(), encoding="utf-8")
        builtin = {row[0]: row for row in BUILTIN_STRUCTURES}
        record = {
            "format": RECORD_FORMAT,
            "gradnorm_al_version": __version__,
            "parameters": params.to_dict(),
            "classes": list(sim.class_names),
            "class_folders": folders,
            "samples": len(sim.labels),
            "structures": [
                {
                    "class": name,
                    "pdb_id": name,
                    "description": builtin[name][1],
                    "source": f"Debian package {builtin[name][2]}: {builtin[name][3]}",
                }
                if not params.structures
                else {"class": name, "file": str(Path(path).resolve())}
                for name, path in zip(sim.class_names, params.structures or sim.class_names)
            ],  # fmt: skip
            "conventions": {
                "axes": "volumes are [z, y, x]; beam along z, tilt axis y",
                "snr": "variance of signal / variance of noise over each volume's voxels",
                "voxel_size_unit": "angstrom",
                "quaternion": "w, x, y, z; rotates x y z column vectors about the centre of mass",
                "shift_unit": "voxels, x y z",
            },
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _replace_folder(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"cannot write {out}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_folder(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out`` (absent, empty, or a previous simulation)."""
    if out.is_dir() and any(out.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old.tmp", dir=out.parent))
        os.replace(out, trash)  # trash is an empty folder: rename() replaces it
        os.replace(new, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, out)  # onto nothing or an empty folder


# ---------------------------------------------------------------------------------------------
# reading


def read_volume(path: str | Path) -> tuple[np.ndarray, float]:
    """(volume float32 [D, H, W], voxel size in Angstrom along x, 0 if unset) of an MRC file;
    :class:`DataError` naming the file when it is not a readable real-valued 3-D MRC volume."""
    import mrcfile

    path = Path(path)
    fix = "replace or remove the file"
    try:
        with mrcfile.open(str(path), mode="r", permissive=False) as mrc:
            data = np.asarray(mrc.data)
            voxel = float(mrc.voxel_size.x)
            mode = int(mrc.header.mode)
    except (ValueError, OSError, EOFError) as err:
        detail = " ".join(str(err).split())[:200]
        raise DataError(f"cannot read MRC file {path} ({detail}); {fix}") from err
    if data.dtype.kind not in "iuf":
        raise DataError(
            f"{path}: MRC mode {mode} ({data.dtype}) is not real-valued; save the volume as "
            f"float32 (mode 2), or {fix}"
        )
    if data.ndim != 3 or min(data.shape) < 2:
        raise DataError(
            f"{path}: expected a 3-D volume, got data of shape {tuple(data.shape)}; save one "
            f"volume per file, or {fix}"
        )
    volume = data.astype(np.float32)
    if not np.isfinite(volume).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values; {fix}")
    return volume, voxel


def normalise(volume: np.ndarray, where: str) -> np.ndarray:
    """``(v - mean) / std`` over the volume's voxels (float32); DataError for a constant one."""
    v = volume.astype(np.float64)
    std = v.std()
    if not std > 0:
        raise DataError(f"{where}: the volume is constant (no contrast); replace or remove it")
    return ((v - v.mean()) / std).astype(np.float32)


def list_volume_files(directory: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(classes, files, labels) of ``directory/<class>/*.mrc|.rec|.map`` (sorted class
    folders, files sorted within each; hidden entries skipped; sub-folders read too)."""
    from ..folders import class_folders

    classes = class_folders(directory)
    if not classes:
        raise DataError(
            f"{directory}: no class folders; put each class's volumes (.mrc, .rec) in "
            f"{directory}/<class>/, or give an .npz file"
        )
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        found = sorted(
            Path(dirpath) / f
            for dirpath, dirnames, filenames in os.walk(directory / name)
            for f in filenames
            if f.lower().endswith(MRC_EXTENSIONS) and not f.startswith(".")
            and not any(part.startswith(".") for part in Path(dirpath).relative_to(directory).parts)
        )  # fmt: skip
        if not found:
            raise DataError(
                f"{directory / name}: no volume files (extensions {', '.join(MRC_EXTENSIONS)}) "
                "in this class folder; add volumes or remove the folder"
            )
        files += found
        labels += [k] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def read_volumes(files: list[Path]) -> tuple[np.ndarray, float]:
    """(normalised volumes float32 [N, 1, D, H, W], the voxel size) of MRC files that must share
    one size (and one voxel size where the headers set it)."""
    first_shape = first_voxel = None
    out = None
    for i, path in enumerate(files):
        volume, voxel = read_volume(path)
        if out is None:
            first_shape = volume.shape
            out = np.empty((len(files), 1, *volume.shape), dtype=np.float32)
        elif volume.shape != first_shape:
            raise DataError(
                f"{path}: volume of size {volume.shape} but {files[0]} is {first_shape}; all "
                "volumes must have one size: crop or resample them"
            )
        if voxel > 0:
            if first_voxel is None:
                first_voxel = (voxel, path)
            elif abs(voxel - first_voxel[0]) > 1e-3 * first_voxel[0]:
                raise DataError(
                    f"{path}: voxel size {voxel:g} A but {first_voxel[1]} has "
                    f"{first_voxel[0]:g} A; "
                    "resample the volumes to one voxel size"
                )
        out[i, 0] = normalise(volume, str(path))
    assert out is not None
    return out, (first_voxel[0] if first_voxel else 0.0)


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """(normalised volumes float32 [N, 1, D, H, W], labels int64 [N], class names or None) of
    an ``.npz`` holding ``volumes`` [N, D, H, W] (or [N, 1, D, H, W]), ``labels`` [N] and
    optionally ``class_names`` [K]."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("volumes", "labels") if k not in keys]
            if missing:
                raise DataError(
                    f"{path}: no array {' or '.join(repr(k) for k in missing)} (it holds "
                    f"{', '.join(sorted(keys)) or 'nothing'}); save volumes [N, D, H, W] and "
                    "labels [N] under those names"
                )
            volumes, labels = data["volumes"], data["labels"]
            names = data["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:  # not a zip, a pickled object array, ...
        detail = " ".join(str(err).split())[:200]
        raise DataError(
            f"cannot read {path} as .npz arrays ({detail}); save it with numpy.savez"
        ) from err
    if volumes.ndim == 5 and volumes.shape[1] == 1:
        volumes = volumes[:, 0]
    if volumes.ndim != 4 or volumes.dtype.kind not in "iuf":
        raise DataError(
            f"{path}: 'volumes' must be a real array [N, D, H, W], got {volumes.dtype} of shape "
            f"{volumes.shape}; save one 3-D volume per row"
        )
    if labels.ndim != 1 or len(labels) != len(volumes) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'labels' must be {len(volumes)} integers (one per volume), got "
            f"{labels.dtype} of shape {labels.shape}; fix the labels"
        )
    if not np.isfinite(volumes).all():
        bad = int(np.flatnonzero(~np.isfinite(volumes).reshape(len(volumes), -1).all(1))[0])
        raise DataError(f"{path}: volume {bad} holds NaN or infinite values; fix or drop it")
    out = np.empty((len(volumes), 1, *volumes.shape[1:]), dtype=np.float32)
    for i in range(len(volumes)):
        out[i, 0] = normalise(volumes[i], f"{path}: volume {i}")
    class_names = tuple(str(n) for n in names.tolist()) if names is not None else None
    return out, labels.astype(np.int64), class_names
