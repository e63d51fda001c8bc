"""Seeded synthetic shapes with their segmentation masks, for unit tests and examples.

:func:`synthetic_shapes` draws ``n`` RGB images of a noisy background with a few filled
rectangles (class 1) and circles (class 2) of random size, position and colour tint, and the
mask of each: 0 background, 1 rectangle, 2 circle, later shapes painted over earlier ones. The
classes are told apart by shape and by a colour bias (rectangles reddish, circles bluish), so a
tiny fully-convolutional network learns them in a few epochs. Same seed, same arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError

#: class of each pixel: background, rectangle, circle
SHAPE_CLASSES = ("background", "rectangle", "circle")
_TINT = np.array([[0.2, 0.2, 0.2], [0.9, 0.3, 0.2], [0.2, 0.4, 0.9]], dtype=np.float32)


def synthetic_shapes(
    n: int, size: int = 16, *, shapes: int = 2, noise: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [n, 3, size, size] in [0, 1], masks int64 [n, size, size] in {0, 1, 2}).

    Each image gets ``shapes`` shapes (each a rectangle or a circle with probability 1/2) and
    Gaussian pixel noise of standard deviation ``noise``, clipped to [0, 1].
    """
    for name, value, low in (("n", n, 0), ("size", size, 4), ("shapes", shapes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.int64)
    rows, cols = np.mgrid[0:size, 0:size]
    for i in range(n):
        for _ in range(shapes):
            half = rng.integers(max(1, size // 8), max(2, size // 3) + 1)
            cy, cx = rng.integers(0, size, size=2)
            if rng.random() < 0.5:
                inside = (np.abs(rows - cy) <= half) & (np.abs(cols - cx) <= half)
                masks[i][inside] = 1
            else:
                inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= half**2
                masks[i][inside] = 2
    images = _TINT[masks].transpose(0, 3, 1, 2)  # [n, 3, size, size]
    images = images + rng.normal(0.0, noise, size=images.shape).astype(np.float32)
    return torch.from_numpy(np.clip(images, 0.0, 1.0)), torch.from_numpy(masks)
