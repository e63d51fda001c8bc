"""A minimal reader of single-file NIfTI-1 volumes (``.nii``, or gzipped ``.nii.gz``).

Enough for the atlases and templates that Debian's ``mricron-data`` ships (and most NIfTI-1
files): a 348-byte header in either byte order, magic ``n+1``, voxel data in Fortran order (the
first axis varies fastest) from ``vox_offset``, the scaling ``scl_slope``/``scl_inter``. Only the
first three axes are read (any further axis must have length 1). Header-and-image pairs
(``.hdr``/``.img``, magic ``ni1``) and NIfTI-2 are refused with a :class:`DataError`.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

HEADER_SIZE = 348
#: NIfTI-1 ``datatype`` code -> numpy type (byte order set from the header)
DATATYPES: dict[int, str] = {
    2: "u1",  # uint8
    4: "i2",  # int16
    8: "i4",  # int32
    16: "f4",  # float32
    64: "f8",  # float64
    256: "i1",  # int8
    512: "u2",  # uint16
    768: "u4",  # uint32
    1024: "i8",  # int64
    1280: "u8",  # uint64
}


@dataclass(frozen=True)
class NiftiVolume:
    """A 3-D volume: ``data`` [X, Y, Z] (the file's first three axes, in voxel order) and the
    header fields that place it in space."""

    path: Path
    data: np.ndarray
    pixdim: tuple[float, float, float]
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]  # quatern_b, c, d, qoffset_x, y, z
    srow: tuple[float, ...]  # srow_x, srow_y, srow_z (12 numbers)

    def placement(self) -> tuple[str, tuple[float, ...]]:
        """How the header places the voxels in space: ``("sform", srow)`` when ``sform_code``
        is set, else ``("qform", quatern)`` when ``qform_code`` is, else ``("none", ())``
        (the NIfTI-1 precedence; fields of an unset code are meaningless)."""
        if self.sform_code > 0:
            return "sform", self.srow
        if self.qform_code > 0:
            return "qform", self.quatern
        return "none", ()

    def same_grid(self, other: NiftiVolume, tol: float = 1e-3) -> bool:
        """Whether both volumes have the same shape, voxel size and placement in space
        (:meth:`placement`, compared number by number within ``tol`` mm)."""
        (kind, mine), (their_kind, theirs) = self.placement(), other.placement()
        return (
            self.data.shape == other.data.shape
            and kind == their_kind
            and all(
                abs(a - b) <= tol for a, b in zip((*self.pixdim, *mine), (*other.pixdim, *theirs))
            )
        )


def read_nifti(path: str | Path) -> NiftiVolume:
    """Read the NIfTI-1 file ``path`` (gzipped or not, recognised by its first bytes).

    Integer data without scaling keeps its type; scaled data (``scl_slope`` not 0 and not the
    identity) is float64 ``data * slope + inter``. :class:`DataError` naming the file when it is
    missing, unreadable, truncated, not NIfTI-1, or of an unsupported type or shape.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}); replace it") from err
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: {len(raw)} bytes, too short for a NIfTI-1 header (348)")
    for order in "<>":
        if struct.unpack(order + "i", raw[:4])[0] == HEADER_SIZE:
            break
    else:
        size = struct.unpack("<i", raw[:4])[0]
        kind = "NIfTI-2, not supported" if size in (540, 0x1C020000) else "not a NIfTI-1 file"
        raise DataError(f"{path}: header size {size}: {kind}; convert it to NIfTI-1")
    magic = raw[344:348]
    if magic != b"n+1\x00":
        what = (
            "a header without its image (.hdr/.img pair)" if magic == b"ni1\x00" else "not NIfTI-1"
        )
        raise DataError(f"{path}: magic {magic!r}: {what}; give a single-file .nii or .nii.gz")

    def fields(fmt: str, offset: int) -> tuple:
        return struct.unpack_from(order + fmt, raw, offset)

    dim = fields("8h", 40)
    datatype = fields("h", 70)[0]
    pixdim = fields("8f", 76)
    vox_offset = int(fields("f", 108)[0])
    slope, inter = fields("2f", 112)
    qform_code, sform_code = fields("2h", 252)
    quatern = fields("6f", 256)
    srow = fields("12f", 280)
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1 : ndim + 1]):
        raise DataError(f"{path}: invalid dimensions {dim[: ndim + 1]} in the header")
    if ndim > 3 and any(d != 1 for d in dim[4 : ndim + 1]):
        raise DataError(f"{path}: a {ndim}-D image {dim[1 : ndim + 1]}; give a 3-D volume")
    shape = tuple(dim[1:4]) if ndim >= 3 else tuple(dim[1 : ndim + 1]) + (1,) * (3 - ndim)
    if datatype not in DATATYPES:
        raise DataError(
            f"{path}: NIfTI datatype {datatype} is not supported (supported codes: "
            f"{', '.join(map(str, DATATYPES))}); convert the volume"
        )
    dtype = np.dtype(order + DATATYPES[datatype])
    start = max(vox_offset, HEADER_SIZE + 4)  # single-file NIfTI: data after header + extender
    count = math.prod(shape)
    if start + count * dtype.itemsize > len(raw):
        raise DataError(
            f"{path}: truncated: {len(raw)} bytes, the header's {shape} voxels of {dtype.name} "
            f"from byte {start} need {start + count * dtype.itemsize}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=start)
    data = data.reshape(shape[::-1]).transpose(2, 1, 0)  # Fortran order: first axis fastest
    data = data.astype(dtype.newbyteorder("="))
    if slope != 0 and math.isfinite(slope) and (slope, inter) != (1.0, 0.0):
        data = data.astype(np.float64) * slope + inter
    return NiftiVolume(
        path=path,
        data=data,
        pixdim=tuple(float(p) for p in pixdim[1:4]),
        qform_code=int(qform_code),
        sform_code=int(sform_code),
        quatern=tuple(float(q) for q in quatern),
        srow=tuple(float(s) for s in srow),
    )
