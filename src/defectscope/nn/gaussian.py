"""Per-position multivariate Gaussians: streaming fit and Mahalanobis distances (used by PaDiM)."""

from __future__ import annotations

import torch


class StreamingGaussian:
    """Mean and covariance of P independent d-dimensional variables, accumulated batch by batch.

    Sums of the samples and of their outer products are kept in float64, shifted by the first
    batch's mean so that the final ``S2 - S1 S1^T / n`` does not cancel catastrophically. Memory
    is O(P d^2) whatever the number of samples.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: torch.Tensor | None = None  # (P, d)
        self._sum: torch.Tensor | None = None  # (P, d)
        self._outer: torch.Tensor | None = None  # (P, d, d)

    def update(self, samples: torch.Tensor) -> None:
        """Add ``samples`` of shape (N, P, d): N observations of every position."""
        x = samples.detach().to(torch.float64)
        if self._shift is None:
            p, d = x.shape[1:]
            self._shift = x.mean(0)
            self._sum = torch.zeros(p, d, dtype=torch.float64)
            self._outer = torch.zeros(p, d, d, dtype=torch.float64)
        elif x.shape[1:] != self._shift.shape:
            raise ValueError(f"samples of shape {tuple(x.shape[1:])} after {tuple(self._shift.shape)}")
        assert self._sum is not None and self._outer is not None  # set with _shift
        x = (x - self._shift).transpose(0, 1)  # (P, N, d)
        self._sum += x.sum(1)
        self._outer.baddbmm_(x.transpose(1, 2), x)
        self.count += x.shape[1]

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulated sums, to merge with others (:meth:`merged`)."""
        if self._shift is None:
            return {"count": torch.tensor(0)}
        assert self._sum is not None and self._outer is not None  # set with _shift
        return {"count": torch.tensor(self.count), "shift": self._shift, "sum": self._sum, "outer": self._outer}

    @classmethod
    def merged(cls, states: list[dict[str, torch.Tensor]]) -> StreamingGaussian:
        """One accumulator holding the samples of all ``states`` (from :meth:`state`): the same sums, up to
        float64 rounding, as one accumulator fed every sample. Each part's sums are moved to the first
        part's shift ``a``: with ``delta = b - a``, ``sum(x - a) = sum(x - b) + n delta`` and
        ``sum((x - a)(x - a)^T) = outer_b + delta sum_b^T + sum_b delta^T + n delta delta^T``."""
        out = cls()
        for state in states:
            n = int(state["count"])
            if n == 0:
                continue
            shift, total, outer = (state[k].to(torch.float64) for k in ("shift", "sum", "outer"))
            if out._shift is None:
                out._shift, out._sum, out._outer, out.count = shift.clone(), total.clone(), outer.clone(), n
                continue
            assert out._sum is not None and out._outer is not None  # set with _shift
            if shift.shape != out._shift.shape:
                raise ValueError(f"parts of shape {tuple(shift.shape)} and {tuple(out._shift.shape)}")
            delta = shift - out._shift
            out._sum += total + n * delta
            out._outer += (
                outer
                + delta[:, :, None] * total[:, None, :]
                + total[:, :, None] * delta[:, None, :]
                + n * delta[:, :, None] * delta[:, None, :]
            )
            out.count += n
        return out

    def mean(self) -> torch.Tensor:
        """(P, d) sample mean."""
        if self._shift is None:
            raise ValueError("no samples were added")
        assert self._sum is not None  # set with _shift
        return self._shift + self._sum / self.count

    def covariance(self, positions: slice = slice(None)) -> torch.Tensor:
        """(P, d, d) unbiased sample covariance (divides by n - 1), float64; or of ``positions`` only."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        assert self._sum is not None and self._outer is not None  # set by the first update
        s = self._sum[positions]
        return (self._outer[positions] - s[:, :, None] * s[:, None, :] / self.count) / (self.count - 1)

    def whitener(self, eps: float, chunk: int = 64) -> torch.Tensor:
        """(P, d, d) float32 :func:`whitening` of the covariance, ``chunk`` positions at a time.

        Working in chunks keeps the float64 temporaries of the Cholesky factorisation small.
        """
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        assert self._sum is not None  # set by the first update
        p, d = self._sum.shape
        out = torch.empty(p, d, d)
        for start in range(0, p, chunk):
            positions = slice(start, start + chunk)
            out[positions] = whitening(self.covariance(positions), eps)
        return out


def whitening(covariance: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse Cholesky factor ``L^-1`` of ``covariance + eps I`` (batched, float64 in, float64 out).

    ``|L^-1 (x - mean)|`` is the Mahalanobis distance, computed with one batched matmul.
    """
    d = covariance.shape[-1]
    eye = torch.eye(d, dtype=covariance.dtype)
    chol = torch.linalg.cholesky(covariance + eps * eye)
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def mahalanobis(samples: torch.Tensor, mean: torch.Tensor, whitener: torch.Tensor) -> torch.Tensor:
    """Distances (N, P) of ``samples`` (N, P, d) to per-position Gaussians ``mean`` (P, d), ``whitener`` (P, d, d)."""
    centred = (samples - mean).transpose(0, 1).transpose(1, 2)  # (P, d, N)
    return torch.linalg.vector_norm(torch.bmm(whitener, centred), dim=1).transpose(0, 1)
