"""Simulated cryo-ET subtomograms: structures to densities, the simulator's geometry and noise,
MRC/npz files, the datasets and the ``simulate-subtomograms`` command.

Every computed quantity is checked against a slow, obviously correct reference: the missing
wedge against the intermediate-value test on each tilt range, voxel integrals against
super-sampled Gaussians, rotations against scipy and np.rot90, SNR against its definition.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from gradnorm_al.cli import main
from gradnorm_al.data import DATASETS, load_dataset
from gradnorm_al.data.subtomograms import datasets as subtomo_datasets
from gradnorm_al.data.subtomograms.files import read_volume, write_mrc, write_simulation
from gradnorm_al.data.subtomograms.simulate import (
    SimulationParams,
    apply_fourier_filter,
    ctf_1d,
    electron_wavelength,
    quaternion_matrix,
    random_quaternion,
    random_rotation,
    sample_rng,
    simulate_one,
    simulate_subtomograms,
    wedge_mask,
)
from gradnorm_al.data.subtomograms.structures import (
    BUILTIN_STRUCTURES,
    ELEMENT_MASS,
    TABLE_FILE,
    Atoms,
    build_table,
    builtin_structure,
    coarse_grain,
    read_structure,
    render_density,
    resolution_sigma,
)
from gradnorm_al.errors import ConfigError, DataError

TINY = SimulationParams(classes=2, per_class=3, size=16, voxel_size=12.0, seed=3)


# ---------------------------------------------------------------------------------------------
# the missing wedge


def reference_kept(kz: float, kx: float, lo: float, hi: float) -> bool:
    """Whether some tilt a in [lo, hi] has a central plane containing (kz, kx): the plane of
    tilt a is {k : kz cos a + kx sin a = 0}; f(a) = kz cos a + kx sin a is a sinusoid whose zeros
    are 180 degrees apart, so on a range narrower than 180 degrees it has a zero iff it changes
    sign between the ends (or vanishes at one)."""
    if kz == 0 and kx == 0:
        return True
    if hi - lo >= 180:
        return True

    def f(a: float) -> float:
        return kz * math.cos(math.radians(a)) + kx * math.sin(math.radians(a))

    scale = math.hypot(kz, kx) * 1e-12
    return f(lo) * f(hi) <= scale * scale or abs(f(lo)) <= scale or abs(f(hi)) <= scale


def reference_mask(nz: int, nx: int, lo: float, hi: float) -> np.ndarray:
    """[nz, nx] in full FFT layout: a Fourier coefficient is kept when every frequency it
    stands for is (at index n/2 of an even axis: both +n/2 and -n/2)."""

    def aliases(index: int, n: int) -> list[int]:
        k = index if index < (n + 1) // 2 else index - n
        return [k, -k] if n % 2 == 0 and abs(k) == n // 2 else [k]

    return np.array(
        [
            [
                all(
                    reference_kept(kz, kx, lo, hi)
                    for kz in aliases(iz, nz)
                    for kx in aliases(ix, nx)
                )
                for ix in range(nx)
            ]
            for iz in range(nz)
        ]
    )


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("tilt", [(-60, 60), (-45, 45), (-54, 66), (0, 0), (-90, 90), (30, 70)])
def test_wedge_mask_matches_the_tilt_planes(size: int, tilt: tuple[float, float]) -> None:
    shape = (size, size + 1, size)
    mask = wedge_mask(shape, tilt)
    assert mask.shape == (size, size + 1, size // 2 + 1)
    expected = reference_mask(size, size, *tilt)[:, : size // 2 + 1]
    for iz, ix in itertools.product(range(size), range(size // 2 + 1)):
        assert (mask[iz, :, ix] == expected[iz, ix]).all(), (tilt, iz, ix)


def test_wedge_geometry_at_60_degrees() -> None:
    mask = wedge_mask((16, 16, 16), (-60, 60))
    kz = np.fft.fftfreq(16, 1 / 16)
    assert mask[0].all()  # kz = 0: every (ky, kx) is in the zero-tilt plane
    assert not mask[kz != 0, :, 0].any()  # along the beam (kx = 0): never measured
    # |kz| <= tan(60) |kx| exactly
    kx = np.fft.rfftfreq(16, 1 / 16)
    expected = np.abs(kz)[:, None] <= math.tan(math.radians(60)) * kx[None, :]
    expected[0, 0] = True
    assert (mask == expected[:, None, :]).all()


@pytest.mark.parametrize("size", [10, 9])
@pytest.mark.parametrize("tilt", [(-54.0, 66.0), (-60.0, 60.0)])
def test_wedge_removes_exactly_its_region_and_nothing_else(
    size: int, tilt: tuple[float, float]
) -> None:
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((size, size + 1, size))
    out = apply_fourier_filter(volume, wedge_mask(volume.shape, tilt).astype(float))
    assert out.dtype == np.float64 and out.shape == volume.shape
    before, after = np.fft.fftn(volume), np.fft.fftn(out)
    full = reference_mask(size, size, *tilt)  # [kz, kx]
    full = np.broadcast_to(full[:, None, :], volume.shape)
    scale = np.abs(before).max()
    assert np.abs(after[~full]).max() <= 1e-12 * scale  # the wedge is gone
    assert np.abs(after[full] - before[full]).max() <= 1e-12 * scale  # the rest is untouched
    assert 0.2 < (~full).mean() < 0.5  # and the wedge is a real part of the spectrum


# ---------------------------------------------------------------------------------------------
# rotations


def test_quaternion_matrix_matches_scipy() -> None:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(1)
    for _ in range(20):
        q = random_quaternion(rng)
        expected = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()  # scalar last
        assert np.allclose(quaternion_matrix(q), expected, atol=1e-12)


def test_random_rotations_are_uniform_on_so3() -> None:
    rng = np.random.default_rng(2)
    rs = np.stack([random_rotation(rng) for _ in range(4000)])
    assert np.allclose(rs @ rs.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(rs), 1.0)
    # Haar measure: E[R] = 0 and E[R_ij^2] = 1/3 (sd of a mean of 4000: <= 0.6/63 = 0.01)
    assert np.abs(rs.mean(0)).max() < 0.05
    assert np.abs((rs**2).mean(0) - 1 / 3).max() < 0.03
    # rotation angle t has density (1 - cos t) / pi: P(t < 90 degrees) = (pi/2 - 1) / pi
    angles = np.arccos(np.clip((np.trace(rs, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert abs((angles < math.pi / 2).mean() - (math.pi / 2 - 1) / math.pi) < 0.03


def _rotation_about(axis: int, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    i, j = [a for a in range(3) if a != axis][:: 1 if axis != 1 else -1]  # right-handed
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


BLOBS = Atoms(
    xyz=np.array([[20.0, 0, 0], [0, 9, 0], [0, 0, -14], [5, 6, 7], [-8, 3, 2]]),
    mass=np.array([3.0, 1.0, 2.0, 1.5, 2.5]),
    spread=np.array([0.0, 1.0, 2.0, 0.5, 0.0]),
    name="blobs",
)


def test_rotation_by_90_degrees_equals_np_rot90() -> None:
    size, voxel, res = 16, 4.0, 8.0
    atoms = Atoms(BLOBS.xyz - BLOBS.centre_of_mass(), BLOBS.mass, BLOBS.spread)
    base = render_density(atoms, size, voxel, res)
    # x, y, z are array axes 2, 1, 0: +90 degrees about z takes +x to +y
    for axis, axes in ((2, (2, 1)), (0, (1, 0)), (1, (0, 2))):
        turned = render_density(atoms, size, voxel, res, rotation=_rotation_about(axis, 90))
        # equal up to the Gaussians' tails beyond 5 sd, cut at windows that do not turn along
        assert np.abs(turned - np.rot90(base, 1, axes=axes)).max() <= 1e-6 * base.max()
    # the check is not vacuous: the map is not symmetric under these turns
    assert np.abs(np.rot90(base, 1, axes=(2, 1)) - base).max() > 0.1 * base.max()
    # +x goes to +y: of two atoms about their centre of mass, the heavy one at x = +10 A
    pair = Atoms(np.array([[10.0, 0, 0], [-20.0, 0, 0]]), np.array([2.0, 1.0]), np.zeros(2))
    turned = render_density(pair, size, voxel, res, rotation=_rotation_about(2, 90))
    k, j, i = np.unravel_index(turned.argmax(), turned.shape)
    assert k in (7, 8) and i in (7, 8) and 8 < (j + 0.5 - size / 2) * voxel < 12


def test_rotation_preserves_mass_and_puts_the_centre_of_mass_at_the_shift() -> None:
    rng = np.random.default_rng(4)
    atoms = builtin_structure("1HPV")
    size, voxel = 24, 5.0
    grid = (np.arange(size) + 0.5 - size / 2) * voxel
    for _ in range(3):
        rotation, shift = random_rotation(rng), rng.uniform(-1, 1, 3)
        v = render_density(atoms, size, voxel, 12.0, rotation, shift)
        assert abs(v.sum() - atoms.total_mass) <= 1e-6 * atoms.total_mass
        com = [
            (v.sum(axis=tuple(a for a in range(3) if a != axis)) * grid).sum() / v.sum()
            for axis in (2, 1, 0)
        ]  # x, y, z
        assert np.allclose(com, shift * voxel, atol=0.01 * voxel)


def test_render_density_is_the_voxel_integral_of_the_gaussians() -> None:
    size, voxel = 8, 3.0
    atoms = Atoms(np.array([[1.0, -2, 0.5], [-4, 3, 2]]), np.array([2.0, 1.0]), np.array([1.2, 0]))
    for res in (6.0, 40.0):  # the windowed sum and (wide Gaussians) the matrix product
        got = render_density(atoms, size, voxel, res)
        # reference: each voxel's integral by the midpoint rule on 8^3 sub-voxels
        sub = 8
        centres = (np.arange(size * sub) + 0.5) / sub * voxel - size * voxel / 2
        z, y, x = np.meshgrid(centres, centres, centres, indexing="ij")
        fine = np.zeros_like(x)
        centred = atoms.xyz - atoms.centre_of_mass()  # the centre of mass goes to the centre
        for (ax, ay, az), m, spread in zip(centred, atoms.mass, atoms.spread):
            var = resolution_sigma(res) ** 2 + spread**2 / 3
            r2 = (x - ax) ** 2 + (y - ay) ** 2 + (z - az) ** 2
            fine += m * np.exp(-r2 / (2 * var)) / (2 * math.pi * var) ** 1.5
        expected = fine.reshape(size, sub, size, sub, size, sub).sum((1, 3, 5)) * (voxel / sub) ** 3
        assert np.abs(got - expected).max() <= 5e-3 * expected.max()


# ---------------------------------------------------------------------------------------------
# structures

PDB_TEXT = """\
HEADER    TEST
ATOM      1  N   GLY A   1       0.000   0.000   0.000  1.00  0.00           N
ATOM      2  CA  GLY A   1       1.000   0.000   0.000  1.00  0.00           C
ATOM      3  H   GLY A   1       5.000   5.000   5.000  1.00  0.00           H
ATOM      4  CA AALA A   2       3.000   1.000   0.000  0.50  0.00           C
ATOM      5  CA BALA A   2      30.000   1.000   0.000  0.50  0.00           C
ATOM      6  O   ALA A   2       3.000   2.000   1.000  1.00  0.00      1ABC 6
HETATM    7 ZN    ZN A 101      -2.000   0.000   4.000  1.00  0.00          ZN
HETATM    8  O   HOH A 201       9.000   9.000   9.000  1.00  0.00           O
ENDMDL
ATOM      9  CA  GLY A   1      99.000   0.000   0.000  1.00  0.00           C
"""

CIF_TEXT = """\
data_test
loop_
_atom_site.group_PDB
_atom_site.id
_atom_site.type_symbol
_atom_site.label_atom_id
_atom_site.label_alt_id
_atom_site.label_comp_id
_atom_site.label_asym_id
_atom_site.label_seq_id
_atom_site.Cartn_x
_atom_site.Cartn_y
_atom_site.Cartn_z
_atom_site.auth_seq_id
_atom_site.auth_asym_id
_atom_site.pdbx_PDB_model_num
ATOM 1 N N . GLY A 1 0.000 0.000 0.000 1 A 1
ATOM 2 C CA . GLY A 1 1.000 0.000 0.000 1 A 1
ATOM 3 H H . GLY A 1 5.000 5.000 5.000 1 A 1
ATOM 4 C CA A ALA A 2 3.000 1.000 0.000 2 A 1
ATOM 5 C CA B ALA A 2 30.000 1.000 0.000 2 A 1
ATOM 6 O "O'" . ALA A 2 3.000 2.000 1.000 2 A 1
HETATM 7 ZN ZN . ZN B . -2.000 0.000 4.000 101 A 1
HETATM 8 O O . HOH C . 9.000 9.000 9.000 201 A 1
ATOM 9 C CA . GLY A 1 99.000 0.000 0.000 1 A 2
#
"""

EXPECTED_XYZ = [[0, 0, 0], [1, 0, 0], [3, 1, 0], [3, 2, 1], [-2, 0, 4]]
EXPECTED_MASS = [ELEMENT_MASS[e] for e in ("N", "C", "C", "O", "ZN")]


@pytest.mark.parametrize("name,text", [("t.pdb", PDB_TEXT), ("t.cif.gz", CIF_TEXT)])
def test_read_structure_pdb_and_mmcif(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    data = text.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    atoms = read_structure(path)  # no hydrogen, water, second altloc or second model
    assert np.allclose(atoms.xyz, EXPECTED_XYZ) and np.allclose(atoms.mass, EXPECTED_MASS)
    cg = coarse_grain(path)  # GLY, ALA, ZN
    assert len(cg.mass) == 3 and math.isclose(cg.total_mass, sum(EXPECTED_MASS))
    assert np.allclose(cg.centre_of_mass(), 0, atol=1e-12)
    com = (np.array(EXPECTED_MASS)[:, None] * EXPECTED_XYZ).sum(0) / sum(EXPECTED_MASS)
    gly = (np.array(EXPECTED_MASS[:2])[:, None] * EXPECTED_XYZ[:2]).sum(0) / sum(EXPECTED_MASS[:2])
    assert np.allclose(cg.xyz[0], gly - com)
    rms = math.sqrt(
        sum(
            m * ((np.array(p) - gly) ** 2).sum()
            for m, p in zip(EXPECTED_MASS[:2], EXPECTED_XYZ[:2])
        )
        / sum(EXPECTED_MASS[:2])
    )
    assert math.isclose(cg.spread[0], rms) and cg.spread[2] == 0.0


def test_read_structure_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pdb"
    bad.write_text(PDB_TEXT.replace("          ZN\n", "          QQ\n"))
    with pytest.raises(DataError, match=r"bad\.pdb:8: unknown element 'QQ'"):
        read_structure(bad)
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER\nEND\n")
    with pytest.raises(DataError, match="empty.pdb: no atoms"):
        read_structure(empty)


def test_builtin_structures() -> None:
    assert len(BUILTIN_STRUCTURES) == 8
    masses = {}
    for pdb_id, *_ in BUILTIN_STRUCTURES:
        atoms = builtin_structure(pdb_id)
        assert np.allclose(atoms.centre_of_mass(), 0, atol=0.05)
        masses[pdb_id] = atoms.total_mass / 1000
    # a residue weighs ~110 Da without hydrogens (the HIV protease dimer is ~21.5 kDa with them)
    assert 19 < masses["1HPV"] < 22 and 100 < masses["7CFN"] < 115
    assert len({round(m) for m in masses.values()}) == 8  # eight different sizes
    assert TABLE_FILE.stat().st_size < 100_000


@pytest.mark.skipif(
    not all(Path(row[3]).is_file() for row in BUILTIN_STRUCTURES),
    reason="the Debian packages pymol-data and python-biopython-doc are not installed",
)
def test_builtin_table_is_rebuilt_from_the_debian_files(tmp_path: Path) -> None:
    rows = [row for row in BUILTIN_STRUCTURES if row[0] in ("1HPV", "4ZHL")]  # a PDB, an mmCIF
    build_table({row[0]: row[3] for row in rows}, tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as new, np.load(TABLE_FILE) as shipped:
        assert len(new.files) == 6
        for key in new.files:
            assert np.array_equal(new[key], shipped[key]), key


# ---------------------------------------------------------------------------------------------
# noise, CTF, determinism


def test_snr_is_signal_variance_over_noise_variance() -> None:
    params = SimulationParams(classes=1, per_class=1, size=16, voxel_size=10.0, snr=0.05)
    atoms = builtin_structure("1TII")
    wedge = wedge_mask((16,) * 3, params.tilt)
    for j in range(3):
        signal, noise = simulate_one(atoms, params, sample_rng(0, 0, j), parts=True)
        assert math.isclose(signal.var() / noise.var(), 0.05, rel_tol=1e-9)
        for part in (signal, noise):  # both lie inside the measured region
            assert (
                np.abs(np.fft.rfftn(part)[~wedge]).max() <= 1e-9 * np.abs(np.fft.rfftn(part)).max()
            )
        volume, _, _ = simulate_one(atoms, params, sample_rng(0, 0, j))
        assert np.allclose(volume, signal + noise, atol=1e-5 * np.abs(noise).max())
    none = SimulationParams(classes=1, per_class=1, size=16, voxel_size=10.0, snr=math.inf)
    assert not simulate_one(atoms, none, sample_rng(0, 0, 0), parts=True)[1].any()


def test_ctf_zeros_and_wavelength() -> None:
    lam = electron_wavelength(300.0)
    assert abs(lam - 0.019687) < 1e-5  # the textbook value at 300 kV
    # without spherical aberration or amplitude contrast, zeros where pi lam dz k^2 = n pi
    dz = 3.0e4
    k = np.sqrt(np.arange(1, 4) / (lam * dz))
    assert np.abs(ctf_1d(k, 3.0, cs_mm=0.0, amplitude_contrast=0.0)).max() < 1e-9
    assert math.isclose(float(ctf_1d(np.zeros(1), 3.0)[0]), -0.07)


def test_simulation_is_deterministic_and_extends() -> None:
    a = simulate_subtomograms(TINY)
    b = simulate_subtomograms(TINY)
    assert a.volumes.dtype == np.float32 and a.volumes.shape == (6, 16, 16, 16)
    assert np.array_equal(a.volumes, b.volumes) and np.array_equal(a.quaternions, b.quaternions)
    assert a.labels.tolist() == [0, 0, 0, 1, 1, 1] and a.class_names == ("1TII", "6WQA")
    other = simulate_subtomograms(SimulationParams(**{**TINY.to_dict(), "seed": 4}))
    assert not np.array_equal(a.volumes, other.volumes)
    more = simulate_subtomograms(SimulationParams(**{**TINY.to_dict(), "per_class": 4}))
    assert np.array_equal(more.volumes[[0, 1, 2, 4, 5, 6]], a.volumes)  # a larger set extends
    assert np.abs(a.shifts).max() <= TINY.max_shift


def test_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="classes is 9"):
        SimulationParams(classes=9)
    with pytest.raises(ConfigError, match="tilt"):
        SimulationParams(tilt=(60, -60))
    with pytest.raises(ConfigError, match="snr"):
        SimulationParams(snr=0)


# ---------------------------------------------------------------------------------------------
# files


def test_mrc_round_trip_of_the_simulators_files(tmp_path: Path) -> None:
    sim = simulate_subtomograms(TINY)
    out = write_simulation(sim, tmp_path / "sim")
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    for i, row in enumerate(rows):
        volume, voxel = read_volume(out / row["file"])
        assert np.array_equal(volume, sim.volumes[i])  # bit for bit
        assert voxel == pytest.approx(TINY.voxel_size)
        with mrcfile.open(out / row["file"]) as mrc:
            assert mrc.header.mode == 2 and mrc.voxel_size.z == pytest.approx(12.0)
        assert int(row["label"]) == sim.labels[i] and row["class"] == sim.class_names[sim.labels[i]]
        assert np.allclose([float(row[k]) for k in ("qw", "qx", "qy", "qz")], sim.quaternions[i])
    record = json.loads((out / "simulation.json").read_text())
    assert record["parameters"] == TINY.to_dict() and record["classes"] == ["1TII", "6WQA"]
    assert SimulationParams(**record["parameters"]) == TINY  # the record regenerates the set
    bundle = load_dataset("subtomograms", out)
    assert bundle.num_classes == 2 and bundle.image_size == (16, 16, 16)
    assert bundle.class_names == ("00_1TII", "01_6WQA") and bundle.default_model == "cnn3d"
    x, y = bundle.train.tensors
    assert len(x) + len(bundle.test) == 6 and x.shape[1:] == (1, 16, 16, 16)
    assert set(bundle.test_targets.tolist()) == {0, 1}  # stratified: each class in the test set
    # items are the files' volumes, each normalised on its own
    train_idx = subtomo_datasets.stratified_split(sim.labels, 0.2, 0)[0]
    v = sim.volumes[train_idx[0]].astype(np.float64)
    assert np.allclose(x[0, 0].numpy(), (v - v.mean()) / v.std(), atol=1e-5)
    assert abs(float(x[0].mean())) < 1e-5 and abs(float(x[0].std(unbiased=False)) - 1) < 1e-4


def _classes(root: Path, sizes: dict[str, list[tuple[int, ...]]], voxel: float = 5.0) -> None:
    rng = np.random.default_rng(0)
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j, shape in enumerate(shapes):
            write_mrc(root / name / f"v{j}.mrc", rng.standard_normal(shape), voxel)


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    good = [(6, 6, 6)] * 3
    _classes(tmp_path / "mixed", {"a": good, "b": [(6, 6, 6), (6, 6, 7)]})
    with pytest.raises(DataError, match=r"b/v1\.mrc: volume of size \(6, 6, 7\).*one size"):
        load_dataset("subtomograms", tmp_path / "mixed")

    _classes(tmp_path / "text", {"a": good, "b": good})
    (tmp_path / "text" / "b" / "notes.mrc").write_text("not a volume")
    with pytest.raises(DataError, match=r"cannot read MRC file .*notes\.mrc.*replace or remove"):
        load_dataset("subtomograms", tmp_path / "text")

    _classes(tmp_path / "flat", {"a": good, "b": good})
    with mrcfile.new(tmp_path / "flat" / "b" / "image.mrc") as mrc:
        mrc.set_data(np.zeros((6, 6), dtype=np.float32))
    with pytest.raises(DataError, match=r"image\.mrc: expected a 3-D volume"):
        load_dataset("subtomograms", tmp_path / "flat")

    _classes(tmp_path / "complex", {"a": good, "b": good})
    with mrcfile.new(tmp_path / "complex" / "b" / "c.mrc") as mrc:
        mrc.set_data(np.ones((6, 6, 6), dtype=np.complex64))
    with pytest.raises(DataError, match=r"c\.mrc: MRC mode 4 .*not real-valued"):
        load_dataset("subtomograms", tmp_path / "complex")

    _classes(tmp_path / "empty", {"a": good})
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataError, match=r"empty/b: no volume files.*add volumes or remove"):
        load_dataset("subtomograms", tmp_path / "empty")

    _classes(tmp_path / "voxel", {"a": good})
    _classes(tmp_path / "voxel", {"b": good}, voxel=10.0)
    with pytest.raises(DataError, match=r"b/v0\.mrc: voxel size 10 A but .*a/v0\.mrc has 5 A"):
        load_dataset("subtomograms", tmp_path / "voxel")

    _classes(tmp_path / "flatline", {"a": good, "b": good})
    write_mrc(tmp_path / "flatline" / "a" / "z.mrc", np.ones((6, 6, 6)), 5.0)
    with pytest.raises(DataError, match=r"a/z\.mrc: the volume is constant"):
        load_dataset("subtomograms", tmp_path / "flatline")

    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("subtomograms")


def test_train_and_test_folders(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"a": [(5, 5, 5)] * 3, "b": [(5, 5, 5)] * 2})
    _classes(tmp_path / "test", {"a": [(5, 5, 5)], "b": [(5, 5, 5)] * 2})
    bundle = load_dataset("subtomograms", tmp_path)
    assert bundle.train_targets.tolist() == [0, 0, 0, 1, 1]
    assert bundle.test_targets.tolist() == [0, 1, 1] and bundle.class_names == ("a", "b")
    _classes(tmp_path / "test", {"c": [(5, 5, 5)]})
    with pytest.raises(DataError, match="class folders of train/ .* differ"):
        load_dataset("subtomograms", tmp_path)


def test_npz_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volumes = rng.standard_normal((10, 4, 5, 6)) * 3 + 1
    labels = np.array([0, 1] * 5)
    np.savez(tmp_path / "set.npz", volumes=volumes, labels=labels, class_names=np.array(["x", "y"]))
    bundle = load_dataset("subtomograms", tmp_path / "set.npz")
    assert bundle.class_names == ("x", "y") and bundle.image_size == (4, 5, 6)
    assert len(bundle.train) == 8 and sorted(bundle.test_targets.tolist()) == [0, 1]
    x, _ = bundle.test.tensors
    i = subtomo_datasets.stratified_split(labels, 0.2, 0)[1][0]
    v = volumes[i]
    assert np.allclose(x[0, 0].numpy(), (v - v.mean()) / v.std(), atol=1e-5)
    # train.npz / test.npz in a folder; [N, 1, D, H, W] accepted; names default to the indices
    np.savez(tmp_path / "train.npz", volumes=volumes[:, None], labels=labels)
    np.savez(tmp_path / "test.npz", volumes=volumes[:4], labels=labels[:4])
    bundle = load_dataset("subtomograms", tmp_path)
    assert (len(bundle.train), len(bundle.test), bundle.class_names) == (10, 4, ("0", "1"))
    np.savez(tmp_path / "bad.npz", images=volumes, labels=labels)
    with pytest.raises(
        DataError, match=r"bad\.npz: no array 'volumes' \(it holds images, labels\)"
    ):
        load_dataset("subtomograms", tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", volumes=volumes[:, 0], labels=labels)
    with pytest.raises(
        DataError, match=r"bad2\.npz: 'volumes' must be a real array \[N, D, H, W\]"
    ):
        load_dataset("subtomograms", tmp_path / "bad2.npz")
    np.savez(tmp_path / "bad3.npz", volumes=volumes, labels=labels[:5])
    with pytest.raises(DataError, match=r"bad3\.npz: 'labels' must be 10 integers"):
        load_dataset("subtomograms", tmp_path / "bad3.npz")
    (tmp_path / "bad4.npz").write_text("no zip")
    with pytest.raises(DataError, match=r"cannot read .*bad4\.npz as \.npz"):
        load_dataset("subtomograms", tmp_path / "bad4.npz")


def test_simulated_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"subtomograms", "subtomograms-sim", "subtomograms-sim-large"} <= set(DATASETS.names())
    monkeypatch.setattr(
        subtomo_datasets, "SIM_PARAMS", SimulationParams(**{**TINY.to_dict(), "per_class": 5})
    )
    bundle = load_dataset("subtomograms-sim")
    again = load_dataset("subtomograms-sim")
    x, y = bundle.train.tensors
    assert x.shape == (8, 1, 16, 16, 16) and bundle.default_model == "cnn3d"
    assert bundle.in_channels == 1 and bundle.class_names == ("1TII", "6WQA")
    assert np.array_equal(x.numpy(), again.train.tensors[0].numpy())


# ---------------------------------------------------------------------------------------------
# the command


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sim"
    args = [
        "simulate-subtomograms",
        "--classes",
        "2",
        "--per-class",
        "2",
        "--size",
        "12",
        "--snr",
        "0.1",
        "--voxel-size",
        "15",
        "--tilt=-50,65",
        "--seed",
        "7",
        "--quiet",
    ]
    code, stdout, err = _cli([*args, "--out", str(out)], capsys)
    assert code == 0 and err == "" and stdout.startswith(f"wrote {out}/ (4 MRC files")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "00_1TII/1TII_00000.mrc",
        "00_1TII/1TII_00001.mrc",
        "01_6WQA/6WQA_00000.mrc",
        "01_6WQA/6WQA_00001.mrc",
        "labels.csv",
        "simulation.json",
    ]
    params = json.loads((out / "simulation.json").read_text())["parameters"]
    assert params["tilt"] == [-50.0, 65.0] and params["snr"] == 0.1 and params["seed"] == 7
    expected = simulate_subtomograms(SimulationParams(**params))
    assert np.array_equal(read_volume(out / files[2])[0], expected.volumes[2])
    assert read_volume(out / files[0])[1] == pytest.approx(15.0)
    # a second run refuses the folder; --overwrite replaces the simulation
    code, _, err = _cli([*args, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    code, _, err = _cli([*args, "--per-class", "1", "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and len(list(out.rglob("*.mrc"))) == 2
    # but never a folder holding anything else
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli([*args, "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--classes", "9"], "classes is 9"),
        (["--tilt", "a,b"], "argument --tilt"),
        (["--snr", "-1"], "--snr must be > 0"),
        (["--per-class", "0"], "per_class must be an integer >= 1"),
        (["--structures", "x.pdb", "--classes", "2"], "--classes 2 but 1 --structures"),
        (["--structures", "missing.pdb"], "cannot read structure missing.pdb"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    code, out, err = _cli(["simulate-subtomograms", "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert err.startswith("gradnorm-al: error: ") and not (tmp_path / "o").exists()
