"""Training-time SAEs: BatchTopK (default), TopK, ReLU + L1 and JumpReLU in one module and one code path.

Inputs are scaled by one dataset-level scalar c so that E‖x‖ = √d (`estimate_input_scale`); the trainer
multiplies each batch by `sae.input_scale` and `export` folds c back into the weights.

    pre = (x − b_dec)·W_enc + b_enc          a = select(pre)          x̂ = a·W_dec + b_dec

select: batchtopk keeps the k·B largest of relu(pre) over the whole batch; topk the k largest per row; relu
relu(pre); jumprelu pre·H(pre − θ_i) with a per-latent threshold θ ≥ 0.

Losses (`SaeOutput.loss`):
- batchtopk, topk: FVU + α·AuxK, both normalised MSEs (OpenAI's "normalised MSE", so α = 1/32 weighs the two
  like the reference): AuxK reconstructs the detached residual e = x − x̂ from the top k_aux pre-activations
  of the dead latents, ‖ê − e‖² / ‖e − ē‖², times min(n_dead / k_aux, 1) as in sparsify/SAELens.
- relu: MSE + λ·Σ_i a_i‖W_dec,i‖ (Anthropic's April 2024 recipe; SAELens' coefficient scale).
- jumprelu: MSE + λ·L0, with the straight-through estimator of Rajamanoharan et al. 2024 ("Jumping Ahead"):
  ∂H(pre − θ)/∂θ := −(1/ε)·K((pre − θ)/ε), ∂JumpReLU/∂θ := −(θ/ε)·K((pre − θ)/ε), K the rectangle
  1[|u| < ½]; pre gets the ordinary gradients (H(pre − θ) through JumpReLU, none through the L0 step).
MSE is ‖x − x̂‖² summed over d and averaged over rows.

JumpReLU's θ is a parameter in pre-activation units, not exp(log θ) as in the paper: Adam moves a parameter by
about its lr per step, so a log-threshold changes θ by a factor ~e^(lr·steps) in the whole run (≈ 1.1 in a few
hundred CPU steps) and L0 stays wherever θ's init put it, whatever the L0 coefficient (SAELens made the same
change, its issue #494). For the same reason θ gets its own lr, `threshold_lr_scale` times the weights' (default
√d_in): with inputs scaled to E‖x‖ = √d and unit-norm decoder rows, pre-activations and θ are O(1), while a
weight entry is O(1/√d), so a step of lr·√d moves θ as far, relative to its scale, as lr moves a weight.
θ is projected back to ≥ 0 after each step (`clamp_threshold`); below 0 the gate would pass negative values.
θ starts at 1 by default (SAELens: 0.01): pre-activations start with a standard deviation ≤ 1 (‖x − b_dec‖ ≤ √d
roughly), so θ = 1 leaves a few percent of the latents active instead of half of them, and SAEs with an L0 of
tens end near θ ≈ 1 (BatchTopK's θ lands at 0.8–1.6 on SmolLM2-135M layer 15 for k = 64…16), so a short run
does not spend its first hundred steps, densely and slowly, raising θ from 0.01.

Sparsity is exploited twice. (1) The encoder never builds a gradient graph over the dense [B, F]
pre-activations: they are computed under no_grad into a reused buffer, and `_SparseEncode` hands back only
the selected entries; its backward forms the W_enc / b_enc / b_dec gradients from those N ≈ k·B entries
(W_enc: one sparse·dense product, b_dec: −W_enc·∇b_enc), instead of two dense B×d×F matmuls. (2) The decoder
either densifies a and runs a·W_dec (`dense`) or multiplies the CSR matrix of the N entries (`sparse`;
its backward is a sampled dense-dense product for ∇a and a sparse·dense product for ∇W_dec, touching only
active rows). `auto` picks by timing both once at the real shapes (`choose_decoder`). AuxK works densely on
the dead columns only (`_AuxDecode`: four B×d×n_dead matmuls, nothing over live latents).
BatchTopK's selection itself avoids `torch.topk` over B·F values (`sae.saedir.batch_topk_indices`: exact,
ties to the lower index, and global over the ranks of a DDP run when `process_group` is set).

Per step, the trainer:
    out = sae(x * sae.input_scale, dead_mask=sae.dead_mask(dead_tokens))
    out.loss.backward()
    sae.remove_parallel_grad()          # keep ‖W_dec,i‖ = 1 to first order
    clip_grad_norm_(sae.parameters(), 1.0); opt.step(); opt.zero_grad()
    sae.normalize_decoder()             # and exactly
    sae.clamp_threshold()               # jumprelu: θ ≥ 0
    sae.update_dead(out.fired, B)       # dead-latent counters
    if step >= theta_warmup: sae.update_theta(out.min_act, theta_ema)   # batchtopk
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple

import torch
import torch.distributed
from torch import Tensor, nn

from sae.errors import SaeError
from sae.saedir import TRAINED_AS, SaeConfig, SparseAutoencoder, batch_topk_indices, flat_nonzero, save_sae

ARCHS = ("batchtopk", "topk", "relu", "jumprelu")
"""Training architectures."""

DECODERS = ("auto", "dense", "sparse")
"""Decoder paths: dense matmul, CSR sparse product over the non-zeros, or measured choice."""


# --------------------------------------------------------------------------------------------------
# Helpers the trainer calls once


def estimate_input_scale(x: Tensor) -> float:
    """The dataset-level scale c with E‖c·x‖ = √d, from a sample of raw rows [n, d]."""
    norm = x.float().norm(dim=-1).mean().item()
    if not math.isfinite(norm) or norm <= 0:
        raise SaeError(f"cannot scale the inputs: their mean norm is {norm}")
    return math.sqrt(x.shape[-1]) / norm


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows of `points` [n, d] (Weiszfeld's iteration, float64), as a [d] tensor of
    points' dtype. Robust where the mean is not: a few far outliers barely move it."""
    p = points.detach().double()
    y = p.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (p - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * p).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(float(y.norm()), 1.0)
        y = y_new
        if done:
            break
    return y.to(points.dtype)


# --------------------------------------------------------------------------------------------------
# Sparse pattern and the custom autograd functions


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


class SparsePattern:
    """Positions of N non-zeros of a [B, F] matrix, rows ascending (and columns ascending within a row),
    with the CSR structure of the matrix and, built on first use, of its transpose."""

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int):
        self.rows, self.cols, self.n_rows, self.n_cols = rows, cols, n_rows, n_cols
        counts = torch.bincount(rows, minlength=n_rows)
        self.crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(counts, 0, out=self.crow[1:])
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
            # int32 keys: torch's int64 sort is ~50x slower on CPU; stable keeps rows ascending per column
            perm = torch.argsort(self.cols.to(torch.int32), stable=True)
            counts = torch.bincount(self.cols, minlength=self.n_cols)
            crow_t = torch.zeros(self.n_cols + 1, dtype=torch.long, device=self.rows.device)
            torch.cumsum(counts, 0, out=crow_t[1:])
            self._t = (perm, crow_t, self.rows[perm])
        return self._t

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


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class _SparseEncode(torch.autograd.Function):
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
        with _no_autocast(g.device):
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


class _SparseDecode(torch.autograd.Function):
    """A·W_dec for the [B, F] matrix A with `values` at the pattern. Backward: ∇values = (∇out·W_decᵀ) sampled at
    the pattern; ∇W_dec = Aᵀ·∇out, non-zero only in rows of active latents."""

    @staticmethod
    def forward(ctx, values, W_dec, pat: SparsePattern):  # type: ignore[override]
        ctx.pat = pat
        with _no_autocast(values.device):
            values, w = values.float(), W_dec.float()
            ctx.save_for_backward(values, w)
            return pat.mm(values, w)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        values, w = ctx.saved_tensors
        pat: SparsePattern = ctx.pat
        grad_v = grad_w = None
        with _no_autocast(g.device):
            g = g.float().contiguous()
            if ctx.needs_input_grad[0]:
                grad_v = pat.sddmm(g, w)
            if ctx.needs_input_grad[1]:
                grad_w = pat.t_mm(values, g)
        return grad_v, grad_w, None


class _AuxDecode(torch.autograd.Function):
    """AuxK's ê = a·W_dec[dead] (no b_dec), a [B, n_dead] the selected dead pre-activations (zeros elsewhere),
    as a function of (W_enc, b_enc, b_dec, W_dec). Dense over the dead columns only: four B×d×n_dead matmuls
    (ê, ∇a, ∇W_dec, ∇W_enc), which beat gathering k_aux = d/2 decoder rows per token whatever n_dead is;
    ∇b_dec = −W_enc[:, dead]·Σ_rows ∇a needs no B×d product."""

    @staticmethod
    def forward(ctx, acts, x, W_enc, b_enc, b_dec, W_dec, dead):  # type: ignore[override]
        with _no_autocast(acts.device):
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
        with _no_autocast(g.device):
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


# --------------------------------------------------------------------------------------------------
# The module


class SaeOutput(NamedTuple):
    """One training forward. Losses are fp32 scalars; only `loss` (and what it sums) carries gradients. With a
    `process_group`, `mse`, `fvu`, `aux_loss`, `sparsity_loss`, `loss` and `l0` are this rank's shares: their sums
    over the ranks are the global-batch values; `fired` and `min_act` are already global."""

    x_hat: Tensor
    """Reconstruction [B, d_in] in training (scaled) units."""
    rows: Tensor
    """Row of each stored latent activation, int64 [N], ascending."""
    cols: Tensor
    """Latent of each stored activation, int64 [N], ascending within a row."""
    acts: Tensor
    """Activation values [N] (differentiable). JumpReLU's sparse path also stores entries just below their
    threshold (value 0, inside the STE window); every other entry is > 0."""
    mse: Tensor
    """‖x − x̂‖² summed over d_in, averaged over rows."""
    fvu: Tensor
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch."""
    aux_loss: Tensor
    """AuxK: ‖ê − e‖² / ‖e − ē‖² · min(n_dead/k_aux, 1), unweighted; 0 when nothing is dead (topk family only)."""
    sparsity_loss: Tensor
    """Unweighted penalty: relu Σ_i a_i‖W_dec,i‖ per row; jumprelu L0 per row (STE); 0 for the topk family."""
    loss: Tensor
    """What to backpropagate: fvu + α·aux_loss (batchtopk, topk), mse + l1_coeff·sparsity_loss (relu),
    mse + l0_coeff·sparsity_loss (jumprelu)."""
    l0: Tensor
    """Mean number of active (> 0) latents per row, detached."""
    fired: Tensor
    """Bool [F]: the latent was active on at least one row of this batch (for `update_dead`)."""
    min_act: Tensor
    """Smallest positive activation in the batch, fp32, detached; +inf when none (for `update_theta`)."""
    n_dead: int
    """Latents AuxK treated as dead in this step."""
    sparse: bool
    """Whether the sparse decoder ran."""

    def dense_acts(self) -> Tensor:
        """Activations as a dense [B, F] tensor (differentiable)."""
        b = self.x_hat.shape[0]
        f = self.fired.shape[0]
        out = self.acts.new_zeros(b * f)
        return out.index_put((self.rows * f + self.cols,), self.acts).view(b, f)


class TrainingSae(nn.Module):
    """One SAE being trained. Parameters: W_enc [d_in, F], b_enc [F], W_dec [F, d_in] (unit rows), b_dec [d_in],
    and threshold [F] for jumprelu. Buffers (checkpointed with `state_dict`): input_scale, theta,
    theta_updates, tokens_since_fired."""

    def __init__(
        self,
        arch: str,
        d_in: int,
        d_sae: int,
        *,
        k: float | None = 32,
        k_aux: int | None = None,
        aux_alpha: float = 1 / 32,
        l1_coeff: float = 5.0,
        l0_coeff: float = 1.0,
        bandwidth: float = 0.05,
        init_threshold: float = 1.0,
        threshold_lr_scale: float | None = None,
        decoder: str = "auto",
        device: str | torch.device | None = None,
        seed: int | None = 0,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise SaeError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
        if decoder not in DECODERS:
            raise SaeError(f"decoder {decoder!r} is not one of {', '.join(DECODERS)}")
        if d_in < 1 or d_sae < 1:
            raise SaeError(f"d_in and d_sae must be positive, got {d_in} and {d_sae}")
        if arch in ("batchtopk", "topk"):
            if k is None or k <= 0 or (arch == "topk" and (int(k) != k or k > d_sae)):
                raise SaeError(f"{arch} needs k in [1, d_sae={d_sae}] (an integer for topk), got {k!r}")
        if bandwidth <= 0 or init_threshold <= 0:
            raise SaeError("jumprelu bandwidth and initial threshold must be positive")
        if threshold_lr_scale is not None and threshold_lr_scale <= 0:
            raise SaeError(f"jumprelu threshold lr scale must be positive, got {threshold_lr_scale}")
        self.arch = arch
        self.d_in, self.d_sae = d_in, d_sae
        self.k = k if arch in ("batchtopk", "topk") else None
        self.k_aux = int(k_aux) if k_aux else max(1, d_in // 2)
        self.aux_alpha = aux_alpha
        self.l1_coeff, self.l0_coeff, self.bandwidth = l1_coeff, l0_coeff, bandwidth
        self.threshold_lr_scale = threshold_lr_scale if threshold_lr_scale is not None else math.sqrt(d_in)
        """jumprelu: θ's learning rate as a multiple of the weights' (see the module docstring)."""
        self.decoder = decoder
        self.sparse_max_density: float | None = None
        """Use the sparse decoder when the step's density N/(B·F) is at most this (set by choose_decoder)."""
        self.process_group: Any = None
        """torch.distributed group of a DDP run: BatchTopK then selects over the global batch (every rank's rows),
        `fired` / `min_act` are reduced over the ranks, and the losses are normalised by global quantities (rows,
        variances), so each rank's loss is its share of the global-batch loss: the ranks' losses and gradients
        *sum* to those of one process on the whole batch."""
        self._density: float | None = None  # last step's, to pick the path before selecting (relu, jumprelu)
        self._pre_buf: Tensor | None = None

        kw: dict[str, Any] = dict(device=device, dtype=torch.float32)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if arch == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold), **kw))
        self.register_buffer("input_scale", torch.ones((), **kw))
        self.register_buffer("theta", torch.zeros((), **kw))
        self.register_buffer("theta_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long, device=device))
        self.reset_parameters(seed)

    @classmethod
    def from_config(cls, cfg: Any, point: Any, d_in: int, device: str | torch.device | None = None) -> TrainingSae:
        """Build the SAE of sweep point `point` (sae.saedir.SweepPoint) of TrainConfig `cfg`."""
        d_sae = point.dict_size if point.dict_size is not None else point.expansion * d_in
        return cls(
            point.arch,
            d_in,
            d_sae,
            k=point.k,
            k_aux=cfg.k_aux,
            aux_alpha=cfg.aux_alpha,
            l1_coeff=cfg.l1_coeff,
            l0_coeff=point.l0_coeff if point.l0_coeff is not None else 1.0,
            bandwidth=cfg.jumprelu_bandwidth,
            init_threshold=cfg.jumprelu_init_threshold,
            threshold_lr_scale=cfg.jumprelu_lr_scale,
            decoder=cfg.decoder,
            device=device,
            seed=cfg.seed,
        )

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Random unit-norm decoder rows, W_enc = W_decᵀ, zero biases."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        w = torch.randn(self.d_sae, self.d_in, generator=gen, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """b_dec ← geometric median of a sample of (scaled) training rows [n, d_in]."""
        self.b_dec.copy_(geometric_median(x.to(self.b_dec.device).float()))

    @torch.no_grad()
    def set_input_scale(self, scale: float) -> None:
        """Record the dataset-level scale c (x_train = c·x_raw) that `export` folds into the weights."""
        self.input_scale.fill_(float(scale))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups at base lr `lr`; each carries `lr_scale`, its lr as a multiple of the base
        (the trainer sets lr = base·lr_scale every step). jumprelu's θ gets `threshold_lr_scale`."""
        if self.arch != "jumprelu":
            return [{"params": list(self.parameters()), "lr": lr, "lr_scale": 1.0}]
        weights = [p for n, p in self.named_parameters() if n != "threshold"]
        s = self.threshold_lr_scale
        return [
            {"params": weights, "lr": lr, "lr_scale": 1.0},
            {"params": [self.threshold], "lr": lr * s, "lr_scale": s},
        ]

    # ---------------------------------------------------------------------------------------------
    # Forward

    def _use_sparse(self, decoder: str | None, device: torch.device) -> bool:
        mode = decoder or self.decoder
        if mode != "auto":
            return mode == "sparse"
        limit = self.sparse_max_density
        if limit is None:  # not measured: CPU favours the sparse product, GPUs the dense matmul
            limit = 0.05 if device.type == "cpu" else 0.0
        if self.k is not None:  # batchtopk, topk: fixed
            density = float(self.k) / self.d_sae
        else:  # relu, jumprelu: last step's, dense until known
            density = self._density if self._density is not None else 1.0
        return density <= limit

    def _pre(self, x: Tensor) -> Tensor:
        """Dense pre-activations without a graph; on CPU into a reused buffer (a fresh 75 MB tensor per step
        costs ~20 ms of page faults)."""
        xc = x - self.b_dec
        if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32:
            shape = (x.shape[0], self.d_sae)
            if self._pre_buf is None or self._pre_buf.shape != shape or self._pre_buf.device != x.device:
                self._pre_buf = torch.empty(shape, dtype=torch.float32, device=x.device)
            return torch.addmm(self.b_enc, xc, self.W_enc, out=self._pre_buf)
        return torch.addmm(self.b_enc, xc, self.W_enc)

    def _global_rows(self, b: int, device: torch.device) -> int:
        """Rows of the global batch: `b` alone, or summed over the ranks of `process_group`."""
        if self.process_group is None:
            return b
        t = torch.tensor([b], device=device)
        torch.distributed.all_reduce(t, group=self.process_group)
        return int(t)

    def _sum_var(self, t: Tensor) -> Tensor:
        """Σ‖t − t̄‖² over the rows of the (global) batch, clamped away from 0; no graph."""
        with torch.no_grad():
            if self.process_group is None:
                return (t - t.mean(0)).pow(2).sum().clamp_min(1e-12)
            t64 = t.double()
            s = torch.cat([t64.sum(0), t64.pow(2).sum().reshape(1), t64.new_tensor([t.shape[0]])])
            torch.distributed.all_reduce(s, group=self.process_group)
            total, sq, n = s[:-2], s[-2], s[-1].clamp_min(1)
            return (sq - total.pow(2).sum() / n).float().clamp_min(1e-12)

    def _select(self, pre: Tensor, n_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the entries the architecture keeps (jumprelu: also its STE window). `n_rows`: rows of
        the global batch (default: this rank's only, or all ranks' with a process group)."""
        b, f = pre.shape
        if self.arch == "batchtopk":
            if n_rows is None:
                n_rows = self._global_rows(b, pre.device)
            idx = batch_topk_indices(pre, round(float(self.k) * n_rows), group=self.process_group)
            return idx // f, idx % f
        if self.arch == "topk":
            top = torch.topk(pre, int(self.k), dim=1, sorted=False)
            cols, order = torch.sort(top.indices, dim=1)
            keep = top.values.gather(1, order) > 0
            rows = torch.arange(b, device=pre.device)[:, None].expand_as(cols)
            return rows[keep], cols[keep]
        if self.arch == "relu":
            idx = flat_nonzero(pre > 0)
        else:
            idx = flat_nonzero(pre > (self.threshold.detach() - self.bandwidth / 2).to(pre.dtype))
        return idx // f, idx % f

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *, decoder: str | None = None) -> SaeOutput:
        """Training forward on scaled rows x [B, d_in]. `dead_mask` [F] bool marks dead latents for AuxK;
        `decoder` overrides the module's decoder choice ("dense" or "sparse")."""
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise SaeError(f"expected input rows [B, {self.d_in}], got {list(x.shape)}")
        b, f = x.shape[0], self.d_sae
        n = self._global_rows(b, x.device)  # the loss normaliser: b in one process, the global batch in DDP
        sparse = self._use_sparse(decoder, x.device)
        if self.arch in ("relu", "jumprelu") and not sparse:
            return self._forward_dense(x, n)
        with torch.no_grad():
            pre = self._pre(x)
            rows, cols = self._select(pre, n)
        pat = SparsePattern(rows, cols, b, f)
        vals = _SparseEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, pre, pat).float()
        sparsity = x.new_zeros((), dtype=torch.float32)
        if self.arch == "jumprelu":
            theta = self.threshold[cols]
            acts = JumpReLU.apply(vals, theta, self.bandwidth)
            sparsity = Step.apply(vals, theta, self.bandwidth).sum() / n
            active = vals > theta.detach()
        else:
            acts = vals
            active = None
            if self.arch == "relu":
                sparsity = (acts * self.W_dec.norm(dim=1)[cols]).sum() / n
        x_hat = self._decode(pat, acts, sparse) + self.b_dec
        self._density = pat.nnz / (b * f)

        aux, n_dead = x.new_zeros((), dtype=torch.float32), 0
        if self.arch in ("batchtopk", "topk") and dead_mask is not None and self.aux_alpha > 0:
            aux, n_dead = self._aux(x, x_hat, pre, dead_mask)
        return self._finish(x, x_hat, rows, cols, acts, active, aux, n_dead, sparsity, sparse, n)

    def _decode(self, pat: SparsePattern, acts: Tensor, sparse: bool) -> Tensor:
        if sparse:
            return _SparseDecode.apply(acts, self.W_dec, pat)
        dense = acts.new_zeros(pat.n_rows * pat.n_cols).index_put((pat.flat,), acts)
        return dense.view(pat.n_rows, pat.n_cols) @ self.W_dec

    def _aux(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor) -> tuple[Tensor, int]:
        dead = dead_mask.to(pre.device).nonzero().squeeze(1)
        n_dead = dead.numel()
        zero = x.new_zeros((), dtype=torch.float32)
        if n_dead == 0:
            return zero, 0
        k_aux = min(self.k_aux, n_dead)
        scale = min(n_dead / self.k_aux, 1.0)
        with torch.no_grad():
            sub = pre.index_select(1, dead).float()  # [B, n_dead]
            if k_aux < n_dead:
                top = torch.topk(sub, k_aux, dim=1, sorted=False)
                keep = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, top.indices, True)
                acts = torch.where(keep & (sub > 0), sub, 0.0)
            else:
                acts = sub.relu_()
        e_hat = _AuxDecode.apply(acts, x, self.W_enc, self.b_enc, self.b_dec, self.W_dec, dead)
        e = (x.float() - x_hat.float()).detach()
        var = self._sum_var(e)
        return scale * (e_hat - e).pow(2).sum() / var, n_dead

    def _forward_dense(self, x: Tensor, n: int | None = None) -> SaeOutput:
        """relu / jumprelu with dense tensors and ordinary autograd (high densities, GPUs); `n` the global rows."""
        b = x.shape[0]
        n = b if n is None else n
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        if self.arch == "relu":
            a = pre.relu()
            sparsity = (a.float() @ self.W_dec.norm(dim=1)).sum() / n
        else:
            theta = self.threshold
            a = JumpReLU.apply(pre.float(), theta, self.bandwidth)
            sparsity = Step.apply(pre.float(), theta, self.bandwidth).sum() / n
        x_hat = a @ self.W_dec + self.b_dec
        with torch.no_grad():
            idx = flat_nonzero(a > 0)
        rows, cols = idx // self.d_sae, idx % self.d_sae
        acts = a.reshape(-1)[idx].float()
        self._density = rows.numel() / (b * self.d_sae)
        zero = x.new_zeros((), dtype=torch.float32)
        return self._finish(x, x_hat, rows, cols, acts, None, zero, 0, sparsity, False, n)

    def _finish(self, x, x_hat, rows, cols, acts, active, aux, n_dead, sparsity, sparse, n=None) -> SaeOutput:
        # n: rows of the global batch (DDP: each rank's losses are its share of the global ones)
        b = x.shape[0] if n is None else n
        x32, x_hat32 = x.float(), x_hat.float()
        sse = (x_hat32 - x32).pow(2).sum()
        mse = sse / b
        var = self._sum_var(x32)
        fvu = sse / var
        if self.arch in ("batchtopk", "topk"):
            loss = fvu + self.aux_alpha * aux
        elif self.arch == "relu":
            loss = mse + self.l1_coeff * sparsity
        else:
            loss = mse + self.l0_coeff * sparsity
        with torch.no_grad():
            # `active` None: every stored entry is > 0 by construction (no boolean indexing needed)
            a = acts.detach() if active is None else acts.detach()[active]
            fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
            fired[cols if active is None else cols[active]] = True
            min_act = a.min().float() if a.numel() else torch.full((), math.inf, device=x.device)
            n_active = torch.tensor(float(a.numel()), device=x.device)
            if self.process_group is not None:
                dist = torch.distributed
                fired_u8 = fired.to(torch.uint8)
                dist.all_reduce(fired_u8, op=dist.ReduceOp.MAX, group=self.process_group)
                fired = fired_u8.bool()
                min_act = min_act.reshape(1).clone()
                dist.all_reduce(min_act, op=dist.ReduceOp.MIN, group=self.process_group)
                min_act = min_act[0]
        return SaeOutput(
            x_hat=x_hat,
            rows=rows,
            cols=cols,
            acts=acts,
            mse=mse,
            fvu=fvu,
            aux_loss=aux,
            sparsity_loss=sparsity,
            loss=loss,
            l0=n_active / b,
            fired=fired,
            min_act=min_act,
            n_dead=n_dead,
            sparse=sparse,
        )

    # ---------------------------------------------------------------------------------------------
    # Per-step bookkeeping the trainer calls

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the component of each W_dec row's gradient along that row (call after backward, before clipping
        and the optimizer step), so the step does not change the row norms to first order."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        coef = (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        g.sub_(coef * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise W_dec rows to unit norm (call after the optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        """jumprelu: project θ back to ≥ 0 (call after the optimizer step; a no-op for the other architectures).
        A projection, not a clamp in the graph, so a θ at 0 still gets the L0 gradient that lifts it."""
        if self.arch == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def update_theta(self, min_act: Tensor | float, decay: float = 0.99) -> None:
        """BatchTopK: θ ← decay·θ + (1 − decay)·min_act (fp32; the first update sets θ = min_act). Skips
        non-finite values (a batch without any positive activation). No host sync."""
        m = torch.as_tensor(min_act, dtype=torch.float32, device=self.theta.device)
        ema = torch.where(self.theta_updates > 0, decay * self.theta + (1 - decay) * m, m)
        ok = torch.isfinite(m)
        self.theta.copy_(torch.where(ok, ema, self.theta))
        self.theta_updates.add_(ok.long())

    @torch.no_grad()
    def update_dead(self, fired: Tensor, n_tokens: int) -> None:
        """Advance the dead-latent counters by a batch of `n_tokens` rows in which `fired` [F] latents fired."""
        self.tokens_since_fired.add_(int(n_tokens))
        self.tokens_since_fired.masked_fill_(fired.to(self.tokens_since_fired.device), 0)

    def dead_mask(self, dead_tokens: int) -> Tensor:
        """Latents that have not fired in the last `dead_tokens` tokens (bool [F])."""
        return self.tokens_since_fired >= int(dead_tokens)

    # ---------------------------------------------------------------------------------------------
    # Decoder choice

    def choose_decoder(self, x: Tensor, dead_mask: Tensor | None = None, repeats: int = 2) -> dict[str, float]:
        """Time one forward+backward with the dense and with the sparse decoder on the real batch `x` (scaled)
        and keep the faster for `decoder="auto"`. For relu/jumprelu, whose density changes during training,
        the result becomes a density limit: with t(ρ) ≈ t_enc + (t − t_enc)·ρ/ρ₀ for the sparse path, sparse is
        used while ρ ≤ ρ₀·(t_dense − t_enc)/(t_sparse − t_enc). Gradients and state are left untouched.
        Returns the timings in seconds."""
        saved = {n: (p.grad.clone() if p.grad is not None else None) for n, p in self.named_parameters()}
        density = self._density

        def run(mode: str) -> float:
            times = []
            for _ in range(repeats + 1):  # the first run warms up and is not counted
                t0 = time.perf_counter()
                out = self.forward(x, dead_mask, decoder=mode)
                out.loss.backward()
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                times.append(time.perf_counter() - t0)
                for p in self.parameters():
                    p.grad = None
            return min(times[1:])

        try:
            t_dense = run("dense")
            t_sparse = run("sparse")
            rho = self._density if self._density is not None else 1.0
            with torch.no_grad():
                t_enc = math.inf
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self._pre(x)
                    if x.device.type == "cuda":
                        torch.cuda.synchronize(x.device)
                    t_enc = min(t_enc, time.perf_counter() - t0)
        finally:
            for n, p in self.named_parameters():
                p.grad = saved[n]
            self._density = density
        if self.arch in ("batchtopk", "topk"):
            self.sparse_max_density = 1.0 if t_sparse < t_dense else 0.0
        elif t_sparse <= t_enc:
            self.sparse_max_density = 1.0
        else:
            self.sparse_max_density = min(1.0, rho * max(t_dense - t_enc, 0.0) / (t_sparse - t_enc))
        return {"dense": t_dense, "sparse": t_sparse, "encoder": t_enc, "density": rho}

    # ---------------------------------------------------------------------------------------------
    # Export

    @torch.no_grad()
    def export(
        self,
        *,
        model_name: str | None = None,
        hook_name: str | None = None,
        complete: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> SparseAutoencoder:
        """The inference SAE in raw activation units: with x_train = c·x, W_enc' = c·W_enc, W_dec' = W_dec/c,
        b_dec' = b_dec/c; b_enc and thresholds unchanged. BatchTopK → jumprelu with threshold θ·1 (and k kept
        for batch mode), topk → topk, relu → standard, jumprelu → jumprelu with its θ."""
        c = float(self.input_scale)
        cfg = SaeConfig(
            architecture=TRAINED_AS[self.arch],
            d_in=self.d_in,
            d_sae=self.d_sae,
            k=(int(self.k) if self.arch == "topk" else self.k),
            model_name=model_name,
            hook_name=hook_name,
            training_architecture=self.arch,
            theta=float(self.theta) if self.arch == "batchtopk" else None,
            input_scale=c,
            complete=complete,
            metadata=dict(metadata or {}),
        )
        sae = SparseAutoencoder(cfg, device=self.W_enc.device)
        sae.W_enc.copy_(self.W_enc * c)
        sae.b_enc.copy_(self.b_enc)
        sae.W_dec.copy_(self.W_dec / c)
        sae.b_dec.copy_(self.b_dec / c)
        if self.arch == "batchtopk":
            sae.threshold.fill_(float(self.theta))
        elif self.arch == "jumprelu":
            sae.threshold.copy_(self.threshold.clamp_min(0))
        return sae

    def save(self, path: Any, **export_kw: Any) -> Any:
        """`export` then `sae.saedir.save_sae` to `path` (atomic)."""
        return save_sae(self.export(**export_kw), None, path)

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        return f"{self.arch}, d_in={self.d_in}, d_sae={self.d_sae}{extra}, decoder={self.decoder}"


__all__ = [
    "ARCHS",
    "DECODERS",
    "JumpReLU",
    "SaeOutput",
    "SparsePattern",
    "Step",
    "TrainingSae",
    "estimate_input_scale",
    "geometric_median",
]
