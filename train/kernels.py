"""Custom autograd functions of the training SAEs and the sparse pattern they share.

- `SparsePattern`: the N selected entries of a [B, F] matrix with its CSR structure (and its transpose's).
- `SparseEncode`: the selected pre-activations as a function of (x, W_enc, b_enc, b_dec); its backward forms
  the parameter gradients from those N entries only (W_enc: one sparse·dense product, b_dec: −W_enc·∇b_enc),
  instead of two dense B×d×F matmuls.
- `SparseDecode`: A·W_dec for the CSR matrix A of the entries; backward a sampled dense-dense product for
  ∇values and a sparse·dense product for ∇W_dec that touches only active rows.
- `dense_decode`: the same product through one dense [B, F] buffer (faster on GPUs at high density).
- `AuxDecode`: AuxK's reconstruction from dead latents, dense over the dead columns only.
- `JumpReLU`, `Step`: the straight-through estimators of Rajamanoharan et al. 2024 (rectangle kernel).

Precision: everything here computes in fp32 with autocast off, whatever the caller's autocast, so the two
decoder paths agree and a run that switches between them (relu, jumprelu) does not switch precision. CPU has
no bf16 sparse CSR product, and selection, θ and the STE windows must see fp32 values (ties and rounding of a
bf16 GEMM bias the BatchTopK cut, θ's EMA and the ε window).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

_csr_warned = False


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # Our patterns are valid by construction; checking them would cost a pass per product.
    global _csr_warned
    if _csr_warned:
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
    _csr_warned = True
    with warnings.catch_warnings():  # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _row_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers [n_rows + 1] of ascending row indices `rows`: where each row's entries start. By binary
    search, not bincount + cumsum: CUDA's bincount reads the largest index back to the host (a sync per step)."""
    bounds = torch.arange(n_rows + 1, dtype=rows.dtype, device=rows.device)
    return torch.searchsorted(rows, bounds)


class SparsePattern:
    """Positions of N non-zeros of a [B, F] matrix, rows ascending (and columns ascending within a row),
    with the CSR structure of the matrix and, built on first use, of its transpose."""

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int):
        self.rows, self.cols, self.n_rows, self.n_cols = rows, cols, n_rows, n_cols
        self.crow = _row_pointers(rows, n_rows)
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @property
    def flat(self) -> Tensor:
        """Row-major flat indices."""
        return self.rows * self.n_cols + self.cols

    def _transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._t is None:
            # int32 keys: torch's int64 sort is far slower on CPU; stable keeps rows ascending per column
            perm = torch.argsort(self.cols.to(torch.int32), stable=True)
            crow_t = _row_pointers(self.cols[perm], self.n_cols)
            self._t = (perm, crow_t, self.rows[perm])
        return self._t

    def with_rows(self, rows: Tensor, n_rows: int) -> SparsePattern:
        """The same entries moved to other rows of an [n_rows, F] matrix, still ascending, with each column's
        entries in the same order (e.g. row r → r·P + g with g a function of the column): the transpose's sort
        is shared, not redone."""
        out = SparsePattern(rows, self.cols, n_rows, self.n_cols)
        perm, crow_t, _ = self._transpose()
        out._t = (perm, crow_t, rows[perm])
        return out

    def csr(self, values: Tensor) -> Tensor:
        return _csr(self.crow, self.cols, values, (self.n_rows, self.n_cols))

    def mm(self, values: Tensor, dense: Tensor) -> Tensor:
        """A·dense, A the [B, F] matrix holding `values` [N] at the pattern; dense [F, m] → [B, m]."""
        if self.nnz == 0:
            return dense.new_zeros(self.n_rows, dense.shape[1])
        return torch.sparse.mm(self.csr(values), dense)

    def t_mm(self, values: Tensor, dense: Tensor) -> Tensor:
        """Aᵀ·dense; dense [B, m] → [F, m]. Only rows of the result with a non-zero in A are touched."""
        if self.nnz == 0:
            return dense.new_zeros(self.n_cols, dense.shape[1])
        perm, crow_t, rows_t = self._transpose()
        a_t = _csr(crow_t, rows_t, values[perm], (self.n_cols, self.n_rows))
        return torch.sparse.mm(a_t, dense)

    def sddmm(self, left: Tensor, right: Tensor) -> Tensor:
        """(left·rightᵀ) sampled at the pattern: [N] dot products of left[rows] [B, m] and right[cols] [F, m]."""
        if self.nnz == 0:
            return left.new_zeros(0)
        ones = left.new_ones(self.nnz)
        return torch.sparse.sampled_addmm(self.csr(ones), left, right.t(), beta=0.0).values()


def no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class SparseEncode(torch.autograd.Function):
    """pre[rows, cols] as a differentiable function of (x, W_enc, b_enc, b_dec), pre = (x − b_dec)W_enc + b_enc
    computed elsewhere without a graph. The backward only touches the N selected entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre, pat: SparsePattern):  # type: ignore[override]
        ctx.pat = pat
        ctx.save_for_backward(x, W_enc, b_dec)
        return pre.reshape(-1)[pat.flat]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, W_enc, b_dec = ctx.saved_tensors
        pat: SparsePattern = ctx.pat
        with no_autocast(g.device):
            g = g.float()
            grad_x = grad_w = grad_be = grad_bd = None
            need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
            if need_be or need_bd:
                grad_be = torch.zeros(pat.n_cols, dtype=torch.float32, device=g.device).index_add_(0, pat.cols, g)
            if need_w:
                xc = x.float() - b_dec.float()
                grad_w = pat.t_mm(g, xc).t().contiguous().to(W_enc.dtype)  # [F, d] → [d, F]
            if need_bd:
                grad_bd = -(W_enc.float() @ grad_be).to(b_dec.dtype)
            if need_x:
                grad_x = pat.mm(g, W_enc.float().t().contiguous()).to(x.dtype)
            if grad_be is not None and not need_be:
                grad_be = None
        return grad_x, grad_w, grad_be, grad_bd, None, None


class SparseDecode(torch.autograd.Function):
    """A·W_dec for the [B, F] matrix A with `values` at the pattern. Backward: ∇values = (∇out·W_decᵀ) sampled at
    the pattern; ∇W_dec = Aᵀ·∇out, non-zero only in rows of active latents."""

    @staticmethod
    def forward(ctx, values, W_dec, pat: SparsePattern):  # type: ignore[override]
        ctx.pat = pat
        with no_autocast(values.device):
            values, w = values.float(), W_dec.float()
            ctx.save_for_backward(values, w)
            return pat.mm(values, w)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        values, w = ctx.saved_tensors
        pat: SparsePattern = ctx.pat
        grad_v = grad_w = None
        with no_autocast(g.device):
            g = g.float().contiguous()
            if ctx.needs_input_grad[0]:
                grad_v = pat.sddmm(g, w)
            if ctx.needs_input_grad[1]:
                grad_w = pat.t_mm(values, g)
        return grad_v, grad_w, None


class AuxDecode(torch.autograd.Function):
    """AuxK's ê = a·W_dec[dead] (no b_dec), a [B, n_dead] the selected dead pre-activations (zeros elsewhere),
    as a function of (W_enc, b_enc, b_dec, W_dec). Dense over the dead columns only: four B×d×n_dead matmuls
    (ê, ∇a, ∇W_dec, ∇W_enc), which beat gathering k_aux = d/2 decoder rows per token whatever n_dead is;
    ∇b_dec = −W_enc[:, dead]·Σ_rows ∇a needs no B×d product."""

    @staticmethod
    def forward(ctx, acts, x, W_enc, b_enc, b_dec, W_dec, dead):  # type: ignore[override]
        with no_autocast(acts.device):
            w_sub = W_dec.float().index_select(0, dead)
            ctx.save_for_backward(acts, x, W_enc, b_dec, w_sub, dead)
            ctx.shapes = (W_enc.shape, W_dec.shape)
            return acts @ w_sub

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        acts, x, W_enc, b_dec, w_sub, dead = ctx.saved_tensors
        enc_shape, dec_shape = ctx.shapes
        need = ctx.needs_input_grad
        grad_we = grad_be = grad_bd = grad_wd = None
        with no_autocast(g.device):
            g = g.float()
            g_a = (g @ w_sub.t()).mul_(acts > 0)  # [B, n_dead]: only selected entries carry gradient
            if need[5]:
                grad_wd = g.new_zeros(dec_shape).index_copy_(0, dead, acts.t() @ g)
            col = g_a.sum(0)
            if need[3]:
                grad_be = g.new_zeros(enc_shape[1]).index_copy_(0, dead, col)
            if need[2]:
                xc = x.float() - b_dec.float()
                grad_we = g.new_zeros(enc_shape).index_copy_(1, dead, xc.t() @ g_a)
            if need[4]:
                grad_bd = -(W_enc.float().index_select(1, dead) @ col)
        return None, None, grad_we, grad_be, grad_bd, grad_wd, None


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(t: Tensor, like: Tensor) -> Tensor:
    """Reduce a broadcast gradient `t` to the shape of `like` (θ [F] against pre [B, F])."""
    while t.dim() > like.dim():
        t = t.sum(0)
    return t


class JumpReLU(torch.autograd.Function):
    """a = pre·H(pre − θ). ∂a/∂pre = H(pre − θ); ∂a/∂θ := −(θ/ε)·K((pre − θ)/ε), K the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, theta, eps: float):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = g * (pre > theta) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(-(theta / eps) * _rect((pre - theta) / eps) * g, theta)
        return grad_pre, grad_theta, None


class Step(torch.autograd.Function):
    """H(pre − θ). ∂/∂pre = 0 (the L0 penalty trains θ only); ∂/∂θ := −(1/ε)·K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, theta, eps: float):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(-(1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps) * g, theta)
        return None, grad_theta, None


def dense_acts(pat: SparsePattern, values: Tensor) -> Tensor:
    """The [B, F] matrix holding `values` at the pattern: one fp32 buffer written in place (differentiable)."""
    a = torch.zeros(pat.n_rows * pat.n_cols, dtype=torch.float32, device=values.device)
    return a.index_put_((pat.flat,), values.float()).view(pat.n_rows, pat.n_cols)


def dense_decode(pat: SparsePattern, values: Tensor, W_dec: Tensor) -> Tensor:
    """A·W_dec like `SparseDecode`, through the dense buffer of `dense_acts`, in fp32 with autocast off."""
    with no_autocast(values.device):
        return dense_acts(pat, values) @ W_dec.float()


__all__ = [
    "AuxDecode",
    "JumpReLU",
    "SparseDecode",
    "SparseEncode",
    "SparsePattern",
    "Step",
    "dense_acts",
    "dense_decode",
    "no_autocast",
]
