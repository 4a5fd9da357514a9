"""Streaming per-task statistics of one linear layer's inputs.

For task i the solvers need ``H_i = X_i X_i^T / n_i`` (X_i: [dim, n_i], one column per token)
and, for expert-activation targets, ``C_i = X_i^expert X_i^T / n_i``. Tokens arrive in batches
of any leading shape ``[..., dim]``; the accumulator keeps *sums* and a token count, so
batches of different sizes weigh by their token counts and distributed ranks can all-reduce
the :meth:`GramAccumulator.state_dict` tensors with SUM (or call :meth:`merge_`).

Each batch's product is taken in the accumulator's ``dtype`` (float32 by default) and added
to float64 sums: a float64 sum of float32 products is, in practice, exact, so the sums do not
depend on the order the batches arrive in, and one process and ``torchrun`` ranks (each summing
its share, then all-reducing) reach the same statistics and so the same codes. With float32
sums, one process and two ranks agreed on only 81–95 % of the codes
(benchmarks/bench_distributed.py).

With ``means=True`` it also keeps the float64 token sums ``Σ_t x_t`` (and ``Σ_t x_t^expert``),
so the per-task mean inputs ``μ_i`` (and ``μ̃_i``) come from the same pass (bias correction,
quant/bias.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from epmq.errors import EpmqError
from epmq.quant.checks import check_finite

#: The running sums' dtype, whatever the statistics' (see the module docs).
SUM_DTYPE = torch.float64


class GramAccumulator:
    """Accumulates ``X X^T`` (and optionally ``X_cross X^T``) over batches of tokens.

    Args:
        dim: input features of the layer.
        dtype: the statistics' dtype: each batch's product and :attr:`gram` / :attr:`cross`
            (float32 default, float64 on request); the running sums are float64 either way.
        cross: also accumulate the cross statistic; :meth:`add` then needs ``x_cross``.
        device: where the sums live (default CPU); batches are moved there.
        means: also accumulate the token sums (float64) for :attr:`mean` / :attr:`cross_mean`.
    """

    def __init__(
        self,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        cross: bool = False,
        device: torch.device | str | None = None,
        means: bool = False,
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise EpmqError(f"GramAccumulator: dim must be a positive int, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise EpmqError(f"GramAccumulator: dtype must be float32 or float64, got {dtype}")
        self.dim = dim
        self.dtype = dtype
        self._gram_sum = torch.zeros(dim, dim, dtype=SUM_DTYPE, device=device)
        self._cross_sum = torch.zeros(dim, dim, dtype=SUM_DTYPE, device=device) if cross else None
        self._x_sum = torch.zeros(dim, dtype=torch.float64, device=device) if means else None
        self._cross_x_sum = (
            torch.zeros(dim, dtype=torch.float64, device=device) if means and cross else None
        )
        self._count = 0

    def add(self, x: Tensor, x_cross: Tensor | None = None) -> None:
        """Add a batch ``x`` [..., dim] (all leading dims are tokens); masking is the caller's.

        ``x_cross`` (same shape; e.g. the expert model's inputs for the same tokens) is
        required iff the accumulator was built with ``cross=True``.
        """
        rows = self._tokens(x, "x")
        if self._cross_sum is None:
            if x_cross is not None:
                raise EpmqError("GramAccumulator.add: x_cross given but cross=False")
        else:
            if x_cross is None:
                raise EpmqError("GramAccumulator.add: x_cross is required (cross=True)")
            if x_cross.shape != x.shape:
                raise EpmqError(
                    f"GramAccumulator.add: x_cross has shape {tuple(x_cross.shape)}, "
                    f"x has {tuple(x.shape)}"
                )
            cross_rows = self._tokens(x_cross, "x_cross")
            self._add_product(self._cross_sum, cross_rows, rows)  # sum_t xc_t x_t^T
            if self._cross_x_sum is not None:
                self._cross_x_sum.add_(cross_rows.sum(0, dtype=torch.float64))
        if self._x_sum is not None:
            self._x_sum.add_(rows.sum(0, dtype=torch.float64))
        self._add_product(self._gram_sum, rows, rows)  # sum_t x_t x_t^T
        self._count += rows.shape[0]

    @staticmethod
    def _add_product(total: Tensor, left: Tensor, right: Tensor) -> None:
        """``total += leftᵀ right``: the product in the rows' dtype, the sum in float64."""
        if left.dtype == total.dtype:
            total.addmm_(left.T, right)
        else:
            total.add_(left.T @ right)

    def _tokens(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise EpmqError(f"GramAccumulator.add: {name} must be a floating-point tensor")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise EpmqError(
                f"GramAccumulator.add: {name} must have last dim {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )
        # No per-batch NaN/Inf scan (it costs as much as the product itself): a non-finite
        # input makes the running sum non-finite, which ``gram``/``cross`` check once.
        return x.detach().reshape(-1, self.dim).to(device=self._gram_sum.device, dtype=self.dtype)

    @property
    def count(self) -> int:
        """Number of tokens seen."""
        return self._count

    @property
    def gram(self) -> Tensor:
        """``X X^T / n`` [dim, dim] over all tokens seen."""
        check_finite(self._gram_sum, "GramAccumulator statistics (an input batch was not finite):")
        return (self._gram_sum / self._require_tokens()).to(self.dtype)

    @property
    def cross(self) -> Tensor | None:
        """``X_cross X^T / n`` [dim, dim] (so ``W @ cross = (W X_cross) X^T / n``), or None."""
        if self._cross_sum is None:
            return None
        check_finite(
            self._cross_sum, "GramAccumulator cross statistics (an input batch was not finite):"
        )
        return (self._cross_sum / self._require_tokens()).to(self.dtype)

    @property
    def mean(self) -> Tensor | None:
        """``Σ_t x_t / n`` [dim] (float64), or None without ``means``."""
        if self._x_sum is None:
            return None
        check_finite(self._x_sum, "GramAccumulator token sums (an input batch was not finite):")
        return self._x_sum / self._require_tokens()

    @property
    def cross_mean(self) -> Tensor | None:
        """``Σ_t x_t^cross / n`` [dim] (float64), or None without ``means`` and ``cross``."""
        if self._cross_x_sum is None:
            return None
        check_finite(self._cross_x_sum, "GramAccumulator cross token sums (not finite):")
        return self._cross_x_sum / self._require_tokens()

    def _require_tokens(self) -> int:
        if self._count == 0:
            raise EpmqError("GramAccumulator: no tokens were added")
        return self._count

    def merge_(self, other: GramAccumulator) -> None:
        """Add ``other``'s statistics to this one (e.g. from another rank or shard)."""
        if other.dim != self.dim or (other._cross_sum is None) != (self._cross_sum is None):
            raise EpmqError(
                f"GramAccumulator.merge_: dim/cross mismatch ({self.dim}, "
                f"cross={self._cross_sum is not None}) vs ({other.dim}, "
                f"cross={other._cross_sum is not None})"
            )
        self._gram_sum.add_(other._gram_sum.to(self._gram_sum))
        if self._cross_sum is not None and other._cross_sum is not None:
            self._cross_sum.add_(other._cross_sum.to(self._cross_sum))
        for mine, theirs in ((self._x_sum, other._x_sum), (self._cross_x_sum, other._cross_x_sum)):
            if mine is not None:
                if theirs is None:
                    raise EpmqError("GramAccumulator.merge_: the other accumulator has no means")
                mine.add_(theirs.to(mine))
        self._count += other._count

    def state_dict(self) -> dict[str, Tensor]:
        """Sums and count: ``gram_sum``, ``count`` (int64 scalar), and ``cross_sum``,
        ``x_sum``, ``cross_x_sum`` if kept."""
        state = {"gram_sum": self._gram_sum, "count": torch.tensor(self._count)}
        if self._cross_sum is not None:
            state["cross_sum"] = self._cross_sum
        if self._x_sum is not None:
            state["x_sum"] = self._x_sum
        if self._cross_x_sum is not None:
            state["cross_x_sum"] = self._cross_x_sum
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], *, dtype: torch.dtype = torch.float32
    ) -> GramAccumulator:
        """Rebuild an accumulator saved with :meth:`state_dict` (``dtype``: the statistics'
        dtype, as built; sums saved in float32 are read into float64)."""
        for key in ("gram_sum", "count"):
            if key not in state:
                raise EpmqError(f"GramAccumulator state is missing {key!r}")
        gram_sum = state["gram_sum"]
        if gram_sum.dim() != 2 or gram_sum.shape[0] != gram_sum.shape[1]:
            raise EpmqError(
                f"GramAccumulator state gram_sum is not square: {tuple(gram_sum.shape)}"
            )
        acc = cls(
            gram_sum.shape[0],
            dtype=dtype,
            cross="cross_sum" in state,
            device=gram_sum.device,
            means="x_sum" in state,
        )
        acc._gram_sum = gram_sum.to(SUM_DTYPE).clone()
        if acc._cross_sum is not None:
            if state["cross_sum"].shape != gram_sum.shape:
                raise EpmqError("GramAccumulator state cross_sum has the wrong shape")
            acc._cross_sum = state["cross_sum"].to(SUM_DTYPE).clone()
        for key in ("x_sum", "cross_x_sum"):
            if key in state and getattr(acc, f"_{key}") is not None:
                if state[key].shape != (acc.dim,):
                    raise EpmqError(f"GramAccumulator state {key} has the wrong shape")
                setattr(acc, f"_{key}", state[key].to(torch.float64).clone())
        acc._count = int(state["count"])
        return acc
