"""Atomic structures as class densities: reading PDB/mmCIF, coarse-graining, rendering.

A structure becomes a density map in three steps:

1. :func:`read_structure` reads the atoms of the first model of a PDB or mmCIF file (``.gz``
   too): waters, hydrogens (H, D) and all alternate locations but the first are left out.
   Each atom's mass is its element's standard atomic weight (:data:`ELEMENT_MASS`, daltons).
2. :func:`coarse_grain` replaces each residue (and each ligand or ion) by one pseudo-atom at its
   centre of mass, with the residue's mass and its ``spread``: the root-mean-square distance of
   its atoms from that centre. The structure is moved so that its centre of mass is at the
   origin. The pseudo-atoms keep the structure's mass and centre of mass exactly.
3. :func:`render_density` sums one isotropic Gaussian per pseudo-atom, of variance
   ``sigma**2 + spread**2 / 3`` per axis, with ``sigma = resolution / (pi * sqrt(2))`` (the
   Gaussian whose Fourier transform falls to 1/e at the spatial frequency 1/resolution; the
   ``spread**2 / 3`` keeps each residue's second moment), each integrated over the voxel it
   falls in (not sampled at the voxel centre), so the map's sum is the structure's mass in
   daltons for any voxel size, up to what falls outside the box. Voxel ``(k, j, i)`` of a
   ``[D, H, W]`` map covers ``z, y, x`` in ``[(k, j, i) - n/2, (k, j, i) + 1 - n/2) * voxel``
   (Angstrom): the origin, where the centre of mass goes, is the centre of the box.

Built-in structures (:data:`BUILTIN_STRUCTURES`, the table ``structures.npz`` beside this
module) are real macromolecules from the Protein Data Bank whose coordinate files Debian ships in
two packages (``pymol-data`` and ``python-biopython-doc``): :func:`build_table` made the table from
those files, and running this module (``python -m gradnorm_al.data.subtomograms.structures``)
makes it again where the packages are installed. PDB entries are public domain (CC0).
"""

from __future__ import annotations

import gzip
import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError

#: standard atomic weights (daltons) of the elements met in macromolecular structures
ELEMENT_MASS = {
    "C": 12.011, "N": 14.007, "O": 15.999, "S": 32.06, "P": 30.974, "SE": 78.971,
    "F": 18.998, "CL": 35.45, "BR": 79.904, "I": 126.904, "NA": 22.990, "K": 39.098,
    "MG": 24.305, "CA": 40.078, "MN": 54.938, "FE": 55.845, "CO": 58.933, "NI": 58.693,
    "CU": 63.546, "ZN": 65.38, "CD": 112.414, "HG": 200.592, "B": 10.81, "SI": 28.085,
    "AS": 74.922, "MO": 95.95, "W": 183.84, "PT": 195.084, "AU": 196.967, "AG": 107.868,
    "LI": 6.94, "BA": 137.327, "SR": 87.62, "CS": 132.905, "RB": 85.468, "AL": 26.982,
    "GA": 69.723, "V": 50.942, "CR": 51.996, "YB": 173.045, "GD": 157.25, "TB": 158.925,
    "SM": 150.36, "EU": 151.964, "PB": 207.2, "U": 238.029, "XE": 131.293, "KR": 83.798,
}  # fmt: skip
WATER = frozenset({"HOH", "WAT", "DOD", "H2O"})
HYDROGEN = frozenset({"H", "D"})

#: the default class maps' structures, in class order (the first K make K classes): PDB id,
#: what it is, the Debian package and path it was read from
BUILTIN_STRUCTURES = (
    ("1TII", "E. coli heat-labile enterotoxin IIb, AB5 (a ring of five B chains and the A chain)",
     "pymol-data", "/usr/share/pymol/data/demo/1tii.pdb"),
    ("6WQA", "one long chain of 392 residues: an elongated rod", "python-biopython-doc",
     "/usr/share/doc/python-biopython-doc/Tests/PDB/6WQA.cif.gz"),
    ("7CFN", "five chains, 1,035 residues: the largest", "python-biopython-doc",
     "/usr/share/doc/python-biopython-doc/Tests/PDB/7CFN.cif.gz"),
    ("1HPV", "HIV-1 protease dimer with an inhibitor: small", "pymol-data",
     "/usr/share/pymol/data/tut/1hpv.pdb"),
    ("2XHE", "Unc18-syntaxin 1 complex (M. brevicollis)", "python-biopython-doc",
     "/usr/share/doc/python-biopython-doc/Tests/PDB/2XHE.cif.gz"),
    ("4ZHL", "urokinase-type plasminogen activator with the peptide mupain-1-IG: globular",
     "python-biopython-doc", "/usr/share/doc/python-biopython-doc/Tests/PDB/4ZHL.cif.gz"),
    ("7DDO", "human ACE2 with a coronavirus receptor-binding domain (cryo-EM)",
     "python-biopython-doc", "/usr/share/doc/python-biopython-doc/Tests/PDB/7DDO.pdb.gz"),
    ("2BEG", "amyloid-beta(1-42) fibril, five stacked chains: flat", "python-biopython-doc",
     "/usr/share/doc/python-biopython-doc/Tests/PDB/2BEG.pdb.gz"),
)  # fmt: skip
TABLE_FILE = Path(__file__).with_name("structures.npz")


@dataclass(frozen=True)
class Atoms:
    """Point masses: ``xyz`` float64 [N, 3] (Angstrom, x y z), ``mass`` float64 [N] (daltons),
    ``spread`` float64 [N] (Angstrom; 0 for real atoms), ``name`` for messages."""

    xyz: np.ndarray
    mass: np.ndarray
    spread: np.ndarray
    name: str = ""

    @property
    def total_mass(self) -> float:
        return float(self.mass.sum())

    def centre_of_mass(self) -> np.ndarray:
        return (self.mass[:, None] * self.xyz).sum(0) / self.mass.sum()

    def radius(self) -> float:
        """The largest distance of a (pseudo-)atom from the centre of mass (Angstrom)."""
        return float(np.linalg.norm(self.xyz - self.centre_of_mass(), axis=1).max())


# ---------------------------------------------------------------------------------------------
# reading


def _open_text(path: Path) -> str:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        return data.decode("utf-8", errors="replace")
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"cannot read structure {path} ({err}); give a PDB or mmCIF file") from err


def _element(symbol: str, atom_name: str, where: str, polymer: bool = True) -> str | None:
    """The element (upper case), or None for a hydrogen; DataError if unknown.

    Without an element symbol (old PDB files leave columns 77-78 blank or fill them with the
    line number) it is read from the PDB atom name: a two-letter element fills columns 13-14
    (``FE``, ``ZN``) of a hetero atom; otherwise it is the first letter after a leading space
    or digit (``" CA "`` is a carbon, ``"1HB "`` a hydrogen)."""
    element = symbol.strip().upper()
    if not element.isalpha():
        name = atom_name.upper()
        letters = re.sub(r"[^A-Z]", "", name)
        two = name[:2]
        if not polymer and two.isalpha() and two in ELEMENT_MASS:
            element = two
        else:
            element = letters[:1]
    if element in HYDROGEN:
        return None
    if element not in ELEMENT_MASS:
        raise DataError(
            f"{where}: unknown element {element!r} (atom {atom_name.strip()!r}); correct the "
            f"element column or remove the atom"
        )
    return element


# (residue key, element, x, y, z)
_Row = tuple[tuple[str, ...], str, float, float, float]


def _pdb_rows(text: str, path: Path) -> list[_Row]:
    rows: list[_Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("ENDMDL"):
            break  # the first model only
        if not line.startswith(("ATOM  ", "HETATM")):
            continue
        if line[17:20].strip() in WATER or line[16] not in " A":
            continue
        where = f"{path}:{number}"
        try:
            x, y, z = float(line[30:38]), float(line[38:46]), float(line[46:54])
        except ValueError:
            raise DataError(f"{where}: no coordinates in columns 31-54; fix the line") from None
        element = _element(line[76:78], line[12:16], where, line.startswith("ATOM"))
        if element is not None:
            rows.append(((line[21], line[22:27], line[17:20]), element, x, y, z))
    return rows


_CIF_TOKEN = re.compile(r"'(?:[^']|'(?=\S))*'|\"(?:[^\"]|\"(?=\S))*\"|\S+")


def _cif_rows(text: str, path: Path) -> list[_Row]:
    lines = text.splitlines()
    columns: list[str] = []
    rows: list[_Row] = []
    i = 0
    while i < len(lines) and not columns:  # find the _atom_site loop header
        if lines[i].startswith("_atom_site."):
            while i < len(lines) and lines[i].startswith("_atom_site."):
                columns.append(lines[i].split()[0][len("_atom_site.") :])
                i += 1
        else:
            i += 1
    need = ("Cartn_x", "Cartn_y", "Cartn_z")
    if not columns or any(c not in columns for c in need):
        raise DataError(f"{path}: no _atom_site loop with Cartn_x/y/z; give a coordinate file")
    col = {name: k for k, name in enumerate(columns)}

    def get(tokens: list[str], *names: str) -> str:
        for name in names:
            if name in col:
                value = tokens[col[name]].strip("'\"")
                return "" if value in ("?", ".") else value
        return ""

    first_model = None
    for number in range(i + 1, len(lines) + 1):
        line = lines[number - 1]
        if not line.strip() or line.startswith("#") or line.startswith(("loop_", "_", "data_")):
            break
        tokens = _CIF_TOKEN.findall(line)
        where = f"{path}:{number}"
        if len(tokens) != len(columns):
            raise DataError(
                f"{where}: {len(tokens)} values for {len(columns)} _atom_site columns; "
                "fix the line (multi-line values are not read)"
            )
        model = get(tokens, "pdbx_PDB_model_num")
        first_model = model if first_model is None else first_model
        if model != first_model:
            break
        resname = get(tokens, "auth_comp_id", "label_comp_id")
        if resname in WATER or get(tokens, "label_alt_id") not in ("", "A"):
            continue
        try:
            x, y, z = (float(get(tokens, c)) for c in need)
        except ValueError:
            raise DataError(f"{where}: a coordinate is not a number; fix the line") from None
        atom = get(tokens, "auth_atom_id", "label_atom_id")
        element = _element(get(tokens, "type_symbol"), atom, where)
        if element is not None:
            chain = get(tokens, "auth_asym_id", "label_asym_id")
            seq = get(tokens, "auth_seq_id", "label_seq_id") + get(tokens, "pdbx_PDB_ins_code")
            if not seq:  # label_seq_id is '.' for ligands: one entity instance per residue
                seq = get(tokens, "label_asym_id") + ":" + resname
            rows.append(((chain, seq, resname), element, x, y, z))
    return rows


def read_structure(path: str | Path) -> Atoms:
    """The heavy atoms of the first model of a PDB (``.pdb``, ``.ent``) or mmCIF (``.cif``)
    file, optionally gzipped; ``spread`` is zero. Residue keys go in ``Atoms.name`` only as the
    file name; :func:`coarse_grain` needs :func:`read_residues`."""
    residues = read_residues(path)
    xyz = np.concatenate([r[0] for r in residues])
    mass = np.concatenate([r[1] for r in residues])
    return Atoms(xyz, mass, np.zeros(len(mass)), Path(path).name)


def read_residues(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per residue (and per ligand or ion), in file order: (xyz [n, 3], mass [n])."""
    path = Path(path)
    text = _open_text(path)
    stem = path.name.lower().removesuffix(".gz")
    is_cif = stem.endswith((".cif", ".mmcif")) or (
        not stem.endswith((".pdb", ".ent")) and re.search(r"^_atom_site\.", text, re.M)
    )
    rows = _cif_rows(text, path) if is_cif else _pdb_rows(text, path)
    if not rows:
        raise DataError(f"{path}: no atoms (other than waters and hydrogens); give a structure")
    groups: dict[tuple[str, ...], list[tuple[str, float, float, float]]] = {}
    for key, element, x, y, z in rows:
        groups.setdefault(key, []).append((element, x, y, z))
    out = []
    for atoms in groups.values():
        xyz = np.array([a[1:] for a in atoms], dtype=np.float64)
        mass = np.array([ELEMENT_MASS[a[0]] for a in atoms], dtype=np.float64)
        out.append((xyz, mass))
    return out


def coarse_grain(path: str | Path) -> Atoms:
    """One pseudo-atom per residue of the structure file ``path`` (see the module docstring),
    centred on the structure's centre of mass."""
    residues = read_residues(path)
    mass = np.array([m.sum() for _, m in residues])
    centres = np.stack([(m[:, None] * xyz).sum(0) / m.sum() for xyz, m in residues])
    spread = np.array(
        [
            math.sqrt(float((m * ((xyz - c) ** 2).sum(1)).sum() / m.sum()))
            for (xyz, m), c in zip(residues, centres)
        ]
    )
    com = (mass[:, None] * centres).sum(0) / mass.sum()
    return Atoms(centres - com, mass, spread, Path(path).name)


# ---------------------------------------------------------------------------------------------
# the built-in table


def build_table(sources: dict[str, str | Path], out: str | Path) -> None:
    """Write the table of coarse-grained structures (``id -> file``) to ``out`` (npz, float32
    arrays ``<id>_xyz`` [N, 3], ``<id>_mass`` [N], ``<id>_spread`` [N])."""
    from ...atomic import atomic_open

    arrays: dict[str, np.ndarray] = {}
    for pdb_id, path in sources.items():
        atoms = coarse_grain(path)
        arrays[f"{pdb_id}_xyz"] = np.round(atoms.xyz, 2).astype(np.float32)
        arrays[f"{pdb_id}_mass"] = np.round(atoms.mass, 2).astype(np.float32)
        arrays[f"{pdb_id}_spread"] = np.round(atoms.spread, 2).astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_open(out, "wb") as fh:
        fh.write(buffer.getvalue())


def builtin_structure(pdb_id: str) -> Atoms:
    """The coarse-grained built-in structure ``pdb_id`` (one of :data:`BUILTIN_STRUCTURES`)."""
    with np.load(TABLE_FILE) as table:
        xyz, mass, spread = (table[f"{pdb_id}_{k}"] for k in ("xyz", "mass", "spread"))
    return Atoms(xyz.astype(np.float64), mass.astype(np.float64), spread.astype(np.float64), pdb_id)


# ---------------------------------------------------------------------------------------------
# rendering


def resolution_sigma(resolution: float) -> float:
    """The Gaussian's standard deviation (Angstrom) for a resolution (Angstrom)."""
    return resolution / (math.pi * math.sqrt(2.0))


#: each Gaussian is integrated over +-this many standard deviations (the mass beyond, a
#: fraction 6e-7 per axis, is dropped)
TRUNCATE_SD = 5.0


def _axis_weights(
    coord: np.ndarray, sd: np.ndarray, size: int, voxel: float, width: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(weights [N, p], voxel indices [N, p]) along one axis: the mass fraction of each Gaussian
    (mean ``coord``, sd ``sd``, Angstrom) in each of the ``p`` voxel slabs of its window (all
    ``size`` slabs when ``width`` is None); slabs outside the box get weight 0."""
    from scipy.special import ndtr

    c = coord / voxel + size / 2  # voxel units: slab i is [i, i + 1)
    if width is None:
        start = np.zeros(len(c), dtype=np.int64)
        width = size
    else:
        start = np.floor(c - TRUNCATE_SD * sd / voxel).astype(np.int64)
    slabs = start[:, None] + np.arange(width + 1)[None, :]
    weights = np.diff(ndtr((slabs - c[:, None]) * (voxel / sd[:, None])), axis=1)
    index = slabs[:, :-1]
    inside = (index >= 0) & (index < size)
    return np.where(inside, weights, 0.0), np.clip(index, 0, size - 1)


def render_density(
    atoms: Atoms,
    size: int,
    voxel_size: float,
    resolution: float,
    rotation: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """The density map float64 [size, size, size] (daltons per voxel, axes z, y, x) of
    ``atoms`` turned by ``rotation`` (3x3, acting on x y z column vectors, about the centre of
    mass) and moved by ``shift`` (x y z, voxels), the centre of mass then at the box centre.

    Each Gaussian is separable: its mass in voxel (k, j, i) is ``m wz[k] wy[j] wx[i]``, the
    products of its mass fractions in the slabs along each axis, summed over a window of
    +-:data:`TRUNCATE_SD` standard deviations (one ``bincount``), or over the whole box (one
    matrix product) when the window would be as wide as half the box."""
    xyz = atoms.xyz - atoms.centre_of_mass()
    if rotation is not None:
        xyz = xyz @ np.asarray(rotation, dtype=np.float64).T
    if shift is not None:
        xyz = xyz + np.asarray(shift, dtype=np.float64) * voxel_size
    sd = np.sqrt(resolution_sigma(resolution) ** 2 + atoms.spread**2 / 3.0)
    sd = np.maximum(sd, 1e-3 * voxel_size)  # a point mass at resolution 0: one voxel
    width = math.ceil(2 * TRUNCATE_SD * float(sd.max()) / voxel_size) + 1
    dense = width >= size // 2
    (wx, ix), (wy, iy), (wz, iz) = (
        _axis_weights(xyz[:, a], sd, size, voxel_size, None if dense else width) for a in range(3)
    )
    n = len(xyz)
    if dense:  # V[k, j, i] = sum_a m_a wz[a, k] wy[a, j] wx[a, i]
        yx = (wy[:, :, None] * wx[:, None, :]).reshape(n, size * size)
        return ((wz * atoms.mass[:, None]).T @ yx).reshape(size, size, size)
    weights = (
        atoms.mass[:, None, None, None]
        * wz[:, :, None, None]
        * wy[:, None, :, None]
        * wx[:, None, None, :]
    )
    flat = (iz[:, :, None, None] * size + iy[:, None, :, None]) * size + ix[:, None, None, :]
    volume = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=size**3)
    return volume.reshape(size, size, size)


def main(argv: list[str] | None = None) -> int:
    """Rebuild :data:`TABLE_FILE` from the Debian packages' files (where installed)."""
    sources = {pdb_id: path for pdb_id, _, _, path in BUILTIN_STRUCTURES}
    missing = sorted({pkg for _, _, pkg, p in BUILTIN_STRUCTURES if not Path(p).is_file()})
    if missing:
        print(f"install the Debian packages {' '.join(missing)} first", file=sys.stderr)
        return 2
    out = Path(argv[0]) if argv else TABLE_FILE
    build_table(sources, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
