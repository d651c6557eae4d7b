"""Low-rank factorisation of a dense update: ``M ≈ B A`` by truncated SVD.

By Eckart–Young, the best rank-r approximation of ``M`` in Frobenius norm keeps the r largest
singular triplets, and its relative error is ``√(Σ_{i>r} s_i²) / √(Σ_i s_i²)``. Small matrices
get an exact SVD; large ones a randomized SVD (Halko, Martinsson & Tropp 2011, "Finding
structure with randomness", SIAM Review 53(2), arXiv:0909.4061: a Gaussian sketch, power
iterations with re-orthonormalisation, then an exact SVD of the small projected matrix).
The singular values are split evenly, ``B = U√S`` and ``A = √S Vᵀ``, so both factors have the
same scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from alloykit.errors import AlloyError

SvdKind = Literal["exact", "randomized"]


@dataclass(frozen=True)
class SvdOptions:
    """How to factorise.

    Args:
        exact_limit: matrices whose smaller side is at most this get an exact SVD (default 1024).
        oversample: extra sketch columns of the randomized SVD (default 10).
        power_iterations: power iterations of the randomized SVD (default 4; more for flat
            spectra).
        seed: seed of the randomized sketch (per matrix, combined with its name).
        precision: ``float32`` or ``float64`` for the decomposition (default float32).
        device: where the decomposition runs (``cpu``, ``cuda``, ``auto``); factors come back
            to the CPU.
    """

    exact_limit: int = 1024
    oversample: int = 10
    power_iterations: int = 4
    seed: int = 0
    precision: Literal["float32", "float64"] = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class Spectrum:
    """A truncated SVD ``M ≈ U diag(S) Vh`` and the total energy ``‖M‖_F²``."""

    U: torch.Tensor  # (m, k)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, n)
    total_energy: float
    kind: SvdKind


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x1f{name}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iterations: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``matrix`` (m × n), by Halko et al.'s algorithm.

    Steps (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1):
    1) sketch ``Y = M Ω`` with a Gaussian ``Ω`` (n × (rank + oversample));
    2) ``q`` power iterations ``Q ← qr(M qr(Mᵀ Q))`` sharpen the spectrum's decay;
    3) exact SVD of the small ``Qᵀ M = Û S Vh``; ``U = Q Û``.

    Returns ``(U, S, Vh)`` with shapes (m, rank), (rank,), (rank, n).
    """
    m, n = matrix.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=matrix.dtype).to(matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)  # (m, k)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(matrix.T @ q)  # (n, k)
        q, _ = torch.linalg.qr(matrix @ z)  # (m, k)
    u_small, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)  # (k, k), (k,), (k, n)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def spectrum(matrix: torch.Tensor, max_rank: int, name: str, options: SvdOptions) -> Spectrum:
    """The top ``max_rank`` singular triplets of ``matrix``: exact below the size limit or when
    ``max_rank`` is most of the full rank, randomized otherwise."""
    from alloykit.execute import resolve_device

    dtype = torch.float64 if options.precision == "float64" else torch.float32
    work = matrix.to(device=resolve_device(options.device), dtype=dtype)
    total = float(work.double().square().sum())
    full = min(work.shape)
    if full <= options.exact_limit or 2 * max_rank >= full:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        return Spectrum(u[:, :max_rank], s[:max_rank], vh[:max_rank], total, "exact")
    u, s, vh = randomized_svd(
        work,
        max_rank,
        oversample=options.oversample,
        power_iterations=options.power_iterations,
        generator=_generator(options.seed, name),
    )
    return Spectrum(u, s, vh, total, "randomized")


def energy_rank(singular_values: torch.Tensor, total_energy: float, energy: float) -> int:
    """The smallest r whose top r singular values hold ``energy`` of ``total_energy``
    (``Σ_{i≤r} s_i² ≥ energy · ‖M‖_F²``); all of them when they hold less.

    Example:
        >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 14.0, 0.9)  # (9 + 4) / 14 >= 0.9
        2
    """
    if total_energy <= 0:
        return 0
    kept = torch.cumsum(singular_values.double().square(), 0) / total_energy
    reached = torch.nonzero(kept >= energy - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


def factors(found: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of rank ``rank`` on the CPU, the singular values split evenly:
    ``B A = U_r S_r Vh_r``."""
    root = found.S[:rank].sqrt()
    b, a = found.U[:, :rank] * root, root[:, None] * found.Vh[:rank]
    return b.cpu(), a.cpu()


def relative_error(matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``‖M − B A‖_F / ‖M‖_F`` in float64 (0 for a zero matrix)."""
    m = matrix.double()
    norm = float(m.norm())
    return float((m - b.double() @ a.double()).norm()) / norm if norm > 0 else 0.0


def check_rank(rank: int | None, energy: float | None) -> None:
    """Reject a rank <= 0 and an energy outside (0, 1]; at least one of them is needed."""
    if rank is None and energy is None:
        raise AlloyError("give a rank (--rank R) or an energy fraction (--energy 0.9)")
    if rank is not None and rank <= 0:
        raise AlloyError(f"rank {rank}: a LoRA rank must be a positive integer")
    if energy is not None and not 0 < energy <= 1:
        raise AlloyError(f"energy {energy}: must be in (0, 1], e.g. 0.9 keeps 90% of ‖ΔW‖²")
