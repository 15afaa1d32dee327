"""The MAPL codec on numpy arrays: RVQ, scalar int8 and int4 codes, and the Stiefel-manifold
projector.

Every function takes float32 numpy arrays (any layout; copied when not C-contiguous) and
returns new arrays. Bad input (wrong shape or dtype, codes out of range, NaN or Inf) raises
``ValueError`` with a message that names the problem.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from . import _mapl

__all__ = ["RVQ", "Int8Codec", "Int4Codec", "Bf16Codec", "msign", "retract", "spel_step",
           "project", "lift", "distance_kernel"]


class RVQ:
    """Residual vector quantizer: ``levels`` codebooks of ``codebook_size`` centroids in ``dim``.

    Codes are one byte per level per vector. With ``gain_shape=True`` each vector's norm is
    sent separately: ``encode`` returns ``(codes, norms)`` and ``decode`` takes the norms.
    """

    def __init__(self, dim: int, levels: int, codebook_size: int = 256, seed: int = 0,
                 gain_shape: bool = False) -> None:
        self._impl = _mapl.Rvq(dim, levels, codebook_size, seed, gain_shape)

    @property
    def dim(self) -> int:
        return self._impl.dim

    @property
    def levels(self) -> int:
        return self._impl.levels

    @property
    def codebook_size(self) -> int:
        return self._impl.codebook_size

    @property
    def gain_shape(self) -> bool:
        return self._impl.gain_shape

    @property
    def fitted(self) -> bool:
        return self._impl.fitted

    @property
    def codebooks(self) -> np.ndarray:
        """A copy of the codebooks, float32 (levels, codebook_size, dim)."""
        return self._impl.get_codebooks()

    @codebooks.setter
    def codebooks(self, value: np.ndarray) -> None:
        self._impl.set_codebooks(value)

    def fit(self, x: np.ndarray, iterations: int = 20, refine_passes: int = 2) -> "RVQ":
        """k-means, level by level, on x: float32 (n, dim), n >= codebook_size."""
        self._impl.fit(x, iterations, refine_passes)
        return self

    def encode(self, x: np.ndarray, beam: int = 1):
        """Codes of x (n, dim): uint8 (n, levels); with gain_shape, ``(codes, norms)``."""
        codes, norms = self._impl.encode(x, beam)
        return (codes, norms) if self.gain_shape else codes

    def decode(self, codes: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
        """float32 (n, dim) from uint8 codes (n, levels) (and float32 norms (n,) in gain-shape)."""
        return self._impl.decode(codes, norms)

    def update(self, x: np.ndarray, decay: float = 0.99, dead_fraction: float = 0.01) -> dict:
        """One streaming k-means step on x (n, dim); returns ``{"relative_mse", "reseeded"}``."""
        return self._impl.update(x, decay, dead_fraction)


class Int8Codec:
    """Per-row symmetric int8 codes with a scale per row that is exactly a bfloat16 value, so the
    wire carries it in 2 bytes (k + 2 bytes a row)."""

    def encode(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """x: float32 (n, k) -> (int8 (n, k), float32 scales (n,))."""
        return _mapl.int8_encode(x)

    def decode(self, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
        return _mapl.int8_decode(q, scales)


class Int4Codec:
    """Per-row symmetric int4 codes in [-7, 7], two a byte (low nibble first; an odd k leaves the
    last high nibble 0), with a scale per row that is exactly a bfloat16 value: ceil(k / 2) + 2
    bytes a row."""

    def encode(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """x: float32 (n, k) -> (uint8 (n, ceil(k / 2)), float32 scales (n,))."""
        return _mapl.int4_encode(x)

    def decode(self, q: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
        """float32 (n, k) from packed codes (n, ceil(k / 2)): k says whether a row's last byte
        holds one value or two."""
        return _mapl.int4_decode(q, scales, k)


class Bf16Codec:
    """bfloat16 codes (round to nearest even), carried as their raw uint16 bits: 2 bytes a value."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x: float32 (n, k) -> uint16 (n, k)."""
        return _mapl.bf16_encode(x)

    def decode(self, b: np.ndarray) -> np.ndarray:
        return _mapl.bf16_decode(b)


def msign(y: np.ndarray, max_iterations: int = 40, tolerance: float = 1e-4) -> np.ndarray:
    """Polar factor y (y^T y)^(-1/2) of a tall float32 (d, k) matrix, by Newton-Schulz."""
    return _mapl.msign(y, max_iterations, tolerance)


def retract(u: np.ndarray) -> np.ndarray:
    """Exact polar factor of u (d, k) through its Gram matrix: the nearest orthonormal matrix."""
    return _mapl.retract(u)


def spel_step(u: np.ndarray, grad: np.ndarray, momentum: np.ndarray, lr: float,
              beta: float) -> Tuple[np.ndarray, np.ndarray]:
    """One SPEL step on the Stiefel manifold that descends ``grad`` (the loss gradient dL/dU).

    Returns the new ``(u, momentum)``. The step length is ``lr`` whatever grad's scale.
    """
    return _mapl.spel_step(u, grad, momentum, lr, beta)


def project(h: np.ndarray, u: np.ndarray) -> np.ndarray:
    """z = h U: h (n, d), u (d, k) -> (n, k)."""
    return _mapl.project(h, u)


def lift(z: np.ndarray, u: np.ndarray) -> np.ndarray:
    """h = z U^T: z (n, k), u (d, k) -> (n, d)."""
    return _mapl.lift(z, u)


def distance_kernel() -> str:
    """Which nearest-centroid kernel RVQ encoding uses on this CPU: "avx512", "avx2" or "generic"."""
    return _mapl.distance_kernel()
