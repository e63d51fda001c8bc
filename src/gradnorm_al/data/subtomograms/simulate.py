"""A labelled subtomogram set simulated from class density maps (SHREC-style, offline).

Sample ``j`` of class ``c`` is made with its own generator, ``numpy.random.default_rng([seed,
c, j])`` (so a larger set begins with the samples of a smaller one, and any sample can be
regenerated alone), in this order:

1. a rotation uniform on SO(3) (:func:`random_rotation`: a unit quaternion from four standard
   normal numbers) and a shift uniform in ``[-max_shift, max_shift]`` voxels along x, y and z;
2. the class's structure, turned about its centre of mass and shifted, is rendered into the box
   (:func:`~.structures.render_density`: atoms blurred at ``resolution``, voxel ``voxel_size``);
3. optionally a contrast transfer function (:func:`ctf`), multiplied in Fourier space;
4. Gaussian white noise, scaled so that the sample's SNR is exactly ``snr``;
5. the missing wedge (:func:`wedge_mask`), applied in Fourier space to signal and noise alike
   (a reconstructed tomogram holds neither where no tilt image was taken).

SNR is ``var(signal) / var(noise)``: the variances over the sample's voxels of its two parts,
each after the CTF and the wedge (the noise is rescaled per sample, after the wedge, so that
the ratio is ``snr`` for every sample, not only on average). ``snr = inf`` adds no noise.

Geometry: volumes are ``[D, H, W]`` = ``(z, y, x)``; the electron beam is along z and the tilt
axis is y. A tilt of ``+a`` degrees turns the beam from +z toward +x. The images of a tilt
series at angles ``lo..hi`` fill the Fourier planes perpendicular to those beam directions, so a
frequency ``(kz, ky, kx)`` is measured when the plane that contains it and the ky axis has its
beam angle ``a = atan(-kz / kx)`` (in (-90, 90]) inside ``[lo, hi]``: for a symmetric range
``+-t``, exactly where ``|kz| <= tan(t) |kx|``. The rest, a double wedge around the kz axis
that extends along ky, is zeroed. The boundary planes are kept (and on the Nyquist planes of
an even box, see :func:`wedge_mask`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from .structures import BUILTIN_STRUCTURES, Atoms, builtin_structure, coarse_grain, render_density

#: electron energy (kV), spherical aberration (mm) and amplitude contrast of :func:`ctf`
CTF_VOLTAGE_KV = 300.0
CTF_CS_MM = 2.7
CTF_AMPLITUDE_CONTRAST = 0.07


@dataclass(frozen=True)
class SimulationParams:
    """Every parameter of a simulation (what ``simulation.json`` records).

    ``classes``: how many classes, the first ones of the built-in structures (at most 8) unless
    ``structures`` names structure files (PDB or mmCIF, one class each, in that order; then
    ``classes`` is their number). ``per_class`` samples per class; ``size`` the side of the cubic
    box (voxels); ``voxel_size`` Angstrom per voxel; ``resolution`` (Angstrom) of the atoms'
    Gaussian blur; ``snr`` signal variance over noise variance; ``tilt`` the tilt range (degrees,
    lo, hi); ``max_shift`` voxels; ``ctf_defocus`` micrometres of underfocus (0: no CTF);
    ``seed``.
    """

    classes: int = 5
    per_class: int = 100
    size: int = 32
    voxel_size: float = 6.0
    resolution: float = 15.0
    snr: float = 0.05
    tilt: tuple[float, float] = (-60.0, 60.0)
    max_shift: float = 2.0
    ctf_defocus: float = 0.0
    seed: int = 0
    structures: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tilt", tuple(float(t) for t in self.tilt))
        object.__setattr__(self, "structures", tuple(str(s) for s in self.structures))
        if self.structures:
            object.__setattr__(self, "classes", len(self.structures))
        self.check()

    def check(self) -> None:
        """:class:`ConfigError` naming the first invalid parameter."""
        for name, low in (("classes", 1), ("per_class", 1), ("size", 4)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.structures and self.classes > len(BUILTIN_STRUCTURES):
            raise ConfigError(
                f"classes is {self.classes} but there are {len(BUILTIN_STRUCTURES)} built-in "
                "structures; lower it or give one structure file per class (--structures)"
            )
        for name in ("voxel_size", "resolution", "snr", "max_shift", "ctf_defocus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if math.isnan(value) or value < 0 or (name != "snr" and math.isinf(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.voxel_size == 0 or self.snr == 0:
            raise ConfigError("voxel_size and snr must be > 0 (snr inf: no noise)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        lo, hi = self.tilt if len(self.tilt) == 2 else (1.0, 0.0)
        if len(self.tilt) != 2 or not -90.0 <= lo <= hi <= 90.0:
            raise ConfigError(
                f"tilt must be two angles -90 <= lo <= hi <= 90 (degrees), got {self.tilt!r}"
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tilt"] = list(self.tilt)
        out["structures"] = list(self.structures)
        return out


@dataclass
class SimulatedSet:
    """``volumes`` float32 [N, D, H, W], ``labels`` int64 [N], ``class_names`` [K],
    ``quaternions`` float64 [N, 4] (w, x, y, z), ``shifts`` float64 [N, 3] (x, y, z, voxels),
    ``index`` int64 [N] (sample j of its class), ``params``."""

    volumes: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    quaternions: np.ndarray
    shifts: np.ndarray
    index: np.ndarray
    params: SimulationParams


# ---------------------------------------------------------------------------------------------
# geometry and filters


def random_quaternion(rng: np.random.Generator) -> np.ndarray:
    """A unit quaternion (w, x, y, z) uniform on the 3-sphere, so its rotation is uniform on
    SO(3) (Haar measure); w >= 0 (q and -q are the same rotation)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def quaternion_matrix(q: np.ndarray) -> np.ndarray:
    """The 3x3 rotation matrix (acting on x y z column vectors) of the unit quaternion
    (w, x, y, z)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniform on SO(3)."""
    return quaternion_matrix(random_quaternion(rng))


def _rfft_frequencies(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kz, ky, kx) in cycles per box, broadcastable to the ``rfftn`` layout of ``shape``."""
    d, h, w = shape
    kz = np.fft.fftfreq(d, 1.0 / d)[:, None, None]
    ky = np.fft.fftfreq(h, 1.0 / h)[None, :, None]
    kx = np.fft.rfftfreq(w, 1.0 / w)[None, None, :]
    return kz, ky, kx


def _tilt_kept(kz: np.ndarray, kx: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Whether the frequency (kz, kx) (any real numbers) lies in a plane of a tilt in [lo, hi]."""
    alpha = np.degrees(np.arctan2(-kz, kx))  # in (-180, 180]
    alpha = np.where(alpha > 90.0, alpha - 180.0, alpha)
    alpha = np.where(alpha <= -90.0, alpha + 180.0, alpha)  # now in (-90, 90]
    eps = 1e-9
    kept = (alpha >= lo - eps) & (alpha <= hi + eps)
    if lo <= -90.0 + eps:  # the plane at -90 degrees is the one at +90
        kept |= alpha >= 90.0 - eps
    return kept | ((kz == 0) & (kx == 0))  # the ky axis lies in every plane


def wedge_mask(
    shape: tuple[int, int, int], tilt: tuple[float, float] = (-60.0, 60.0)
) -> np.ndarray:
    """bool [D, H, W // 2 + 1] in ``numpy.fft.rfftn``'s layout: True where a tilt series over
    ``tilt = (lo, hi)`` degrees measures the frequency (see the module docstring).

    In a box of even side the last frequency along an axis, N/2, is also -N/2 (one Fourier
    coefficient stands for both): there it is kept only when both are measured, so the mask is
    the same for a frequency and its negative and filtering a real volume with it removes
    exactly the masked coefficients. (For a symmetric range ``+-t`` this changes nothing.)"""
    lo, hi = (float(t) for t in tilt)
    d, _, w = shape
    kz, _, kx = _rfft_frequencies(shape)
    kz, kx = np.broadcast_arrays(kz, kx)
    kept = _tilt_kept(kz, kx, lo, hi)
    if d % 2 == 0:  # kz = -d/2 is also +d/2
        kept &= np.where(kz == -d / 2, _tilt_kept(-kz, kx, lo, hi), True)
    if w % 2 == 0:  # kx = w/2 is also -w/2
        kept &= np.where(kx == w / 2, _tilt_kept(kz, -kx, lo, hi), True)
    if d % 2 == 0 and w % 2 == 0:
        corner = (kz == -d / 2) & (kx == w / 2)
        kept &= np.where(corner, _tilt_kept(-kz, -kx, lo, hi), True)
    return np.broadcast_to(kept, (shape[0], shape[1], w // 2 + 1)).copy()


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Angstrom) at ``voltage_kv``."""
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    volts = voltage_kv * 1e3
    return h / math.sqrt(2 * m * e * volts * (1 + e * volts / (2 * m * c * c))) * 1e10


def ctf_1d(
    k: np.ndarray,
    defocus_um: float,
    voltage_kv: float = CTF_VOLTAGE_KV,
    cs_mm: float = CTF_CS_MM,
    amplitude_contrast: float = CTF_AMPLITUDE_CONTRAST,
) -> np.ndarray:
    """The contrast transfer function at spatial frequencies ``k`` (1/Angstrom):
    ``-(sqrt(1 - A^2) sin(chi) + A cos(chi))``, ``chi = pi lambda dz k^2 - pi/2 Cs lambda^3
    k^4``, ``dz`` the underfocus (positive). No envelope."""
    lam = electron_wavelength(voltage_kv)
    dz = defocus_um * 1e4
    cs = cs_mm * 1e7
    k2 = np.asarray(k, dtype=np.float64) ** 2
    chi = math.pi * lam * dz * k2 - 0.5 * math.pi * cs * lam**3 * k2 * k2
    a = amplitude_contrast
    return -(math.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi))


def ctf(shape: tuple[int, int, int], voxel_size: float, defocus_um: float) -> np.ndarray:
    """The isotropic 3-D CTF in ``rfftn`` layout (float64 [D, H, W // 2 + 1]), a function of
    ``|k|`` only: a simplification (a tilt series has one CTF per image)."""
    kz, ky, kx = _rfft_frequencies(shape)
    d, h, w = shape
    k = np.sqrt(
        (kz / (d * voxel_size)) ** 2 + (ky / (h * voxel_size)) ** 2 + (kx / (w * voxel_size)) ** 2
    )
    return ctf_1d(k, defocus_um)


def apply_fourier_filter(volume: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """``irfftn(rfftn(volume) * filt)``, float64, same shape."""
    return np.fft.irfftn(np.fft.rfftn(volume) * filt, s=volume.shape, axes=(0, 1, 2))


# ---------------------------------------------------------------------------------------------
# simulation


def class_structures(params: SimulationParams) -> list[Atoms]:
    """The structure of each class: the built-in ones or the files in ``params.structures``."""
    if params.structures:
        return [coarse_grain(path) for path in params.structures]
    return [builtin_structure(row[0]) for row in BUILTIN_STRUCTURES[: params.classes]]


def class_names(params: SimulationParams) -> tuple[str, ...]:
    if params.structures:
        return tuple(Path(p).name.split(".")[0] for p in params.structures)
    return tuple(row[0] for row in BUILTIN_STRUCTURES[: params.classes])


def simulate_one(
    atoms: Atoms,
    params: SimulationParams,
    rng: np.random.Generator,
    filters: tuple[np.ndarray, np.ndarray | None] | None = None,
    parts: bool = False,
):
    """One subtomogram: ``(volume float32 [D, H, W], quaternion, shift)``; with ``parts``,
    ``(signal, noise)`` float64 instead of the volume (volume = signal + noise)."""
    n = params.size
    if filters is None:
        filters = _filters(params)
    wedge, ctf_filter = filters
    q = random_quaternion(rng)
    shift = rng.uniform(-params.max_shift, params.max_shift, size=3)
    density = render_density(
        atoms, n, params.voxel_size, params.resolution, quaternion_matrix(q), shift
    )
    spectrum = np.fft.rfftn(density)
    if ctf_filter is not None:
        spectrum = spectrum * ctf_filter
    signal = np.fft.irfftn(spectrum * wedge, s=density.shape, axes=(0, 1, 2))
    noise = np.zeros_like(signal)
    if math.isfinite(params.snr):
        white = rng.standard_normal(density.shape)
        noise = np.fft.irfftn(np.fft.rfftn(white) * wedge, s=density.shape, axes=(0, 1, 2))
        noise *= math.sqrt(signal.var() / (params.snr * noise.var()))
    if parts:
        return signal, noise
    return (signal + noise).astype(np.float32), q, shift


def _filters(params: SimulationParams) -> tuple[np.ndarray, np.ndarray | None]:
    shape = (params.size,) * 3
    wedge = wedge_mask(shape, params.tilt).astype(np.float64)
    filt = ctf(shape, params.voxel_size, params.ctf_defocus) if params.ctf_defocus > 0 else None
    return wedge, filt


def sample_rng(seed: int, label: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of class ``label``."""
    return np.random.default_rng([seed, label, index])


def simulate_subtomograms(
    params: SimulationParams | None = None,
    *,
    structures: list[Atoms] | None = None,
    **kwargs,
) -> SimulatedSet:
    """Simulate ``params.classes * params.per_class`` subtomograms, class by class (keyword
    arguments build the :class:`SimulationParams` when ``params`` is not given; ``structures``:
    :func:`class_structures` of ``params``, when already read)."""
    params = params if params is not None else SimulationParams(**kwargs)
    if structures is None:
        structures = class_structures(params)
    filters = _filters(params)
    total = params.classes * params.per_class
    n = params.size
    volumes = np.empty((total, n, n, n), dtype=np.float32)
    quaternions = np.empty((total, 4))
    shifts = np.empty((total, 3))
    labels = np.repeat(np.arange(params.classes, dtype=np.int64), params.per_class)
    index = np.tile(np.arange(params.per_class, dtype=np.int64), params.classes)
    for i in range(total):
        rng = sample_rng(params.seed, int(labels[i]), int(index[i]))
        volumes[i], quaternions[i], shifts[i] = simulate_one(
            structures[labels[i]], params, rng, filters
        )
    return SimulatedSet(volumes, labels, class_names(params), quaternions, shifts, index, params)
