"""The shared base of the training SAEs: parameters, input scale, encoder, decoders, AuxK, dead latents, export.

    pre = (x − b_dec)·W_enc + b_enc          a = activation(select(pre))          x̂ = a·W_dec + b_dec

An architecture (one module each in this package) subclasses `TrainingSae` and supplies what differs: `select`
(which entries of pre it keeps), `activate` (their values and its sparsity penalty), `loss`, its per-step updates
(`after_step`), what it exports as (`export_threshold`, `export_k`), its log fields and its metadata. The class
registers itself under `arch`, the name of its entry in `sae.architectures`.

Inputs are scaled by one dataset-level scalar c so that E‖x‖ = √d (`estimate_input_scale`); the trainer
multiplies each batch by `sae.input_scale` and `export` folds c back into the weights.

Reconstruction term. `recon_loss` = Σ‖x − x̂‖² / (B·σ²), σ² = E‖x − x̄‖² of the training rows, one fixed
dataset-level number (the store's statistics, in scaled units) passed in at construction. The batch's own
variance would make the optimised objective depend on which rows land in a batch: one massive-activation row
(5–100× the median norm) holds a large part of a batch's variance and would shrink every other row's weight in
that step. The per-batch FVU, Σ‖x − x̂‖² / Σ‖x − x̄‖², is still reported beside it (`fvu`).

Sparsity is exploited twice. (1) The encoder never builds a gradient graph over the dense [B, F]
pre-activations: they are computed under no_grad into a reused buffer, and `SparseEncode` hands back only
the selected entries. (2) The decoder either densifies a and runs a·W_dec (`dense`) or multiplies the CSR
matrix of the N entries (`sparse`); `auto` picks by timing both once at the real shapes (`choose_decoder`).
AuxK works densely on the dead columns only. Pre-activations, selection, thresholds and both decoders run in
fp32 with autocast off (see sae.train.kernels), so a bf16 autocast around the step changes no selection.

Transcoders (`d_out` given): the same architectures predict a target y [B, d_out] (another site of the same rows)
from x instead of reconstructing x. Then W_dec is [F, d_out] and b_dec [d_out]; the input is not centred (pre =
x·W_enc + b_enc, as SAELens' transcoders compute it: `centre` is a zero vector); the reconstruction term, the FVU
and AuxK (which fits the residual y − ŷ) are taken against y, with σ² the target's variance; y has its own
dataset-level scale (`target_scale`), folded back on export like the input's. With `skip`, ŷ gains an affine
skip connection x·W_skipᵀ, W_skip [d_out, d_in] initialised at zero. W_enc is drawn independently of W_dec (the
tied init W_enc = W_decᵀ is a reconstruction trick). The export is the same `sae.saedir.SparseAutoencoder`, in
SAELens' transcoder layout.

Per step, the trainer:
    sae.before_step(step, plan)          # schedules that depend on the step (relu: λ warm-up)
    out = sae(x * sae.input_scale, dead_mask=sae.dead_mask(dead_tokens))
    out.loss.backward()
    sae.remove_parallel_grad()           # unit-norm decoders: keep ‖W_dec,i‖ = 1 to first order
    clip_grad_norm_(sae.parameters(), 1.0); opt.step(); opt.zero_grad()
    sae.after_step(out, B, step, plan)   # renormalise, dead counters, θ EMA, threshold projection
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed
from torch import Tensor, nn

from sae import architectures
from sae.errors import SaeError
from sae.saedir import (
    SaeConfig,
    SparseAutoencoder,
    architecture_name,
    flat_nonzero,
    fold_scales,
    save_sae,
    weight_shapes,
)

from ..kernels import AuxDecode, SparseDecode, SparseEncode, SparsePattern, dense_decode, no_autocast

DECODERS = ("auto", "dense", "sparse")
"""Decoder paths: dense matmul, CSR sparse product over the non-zeros, or measured choice."""

REGISTRY: dict[str, type[TrainingSae]] = {}
"""Training classes by architecture name (filled as the modules of sae.train.archs are imported)."""


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
# Outputs


class SaeOutput(NamedTuple):
    """One training forward. Losses are fp32 scalars; only `loss` (and what it sums) carries gradients. With a
    `process_group`, `mse`, `recon_loss`, `fvu`, `aux_loss`, `sparsity_loss`, `loss` and `l0` are this rank's
    shares: their sums over the ranks are the global-batch values; `fired` and `min_act` are already global."""

    x_hat: Tensor
    """Reconstruction [B, d_in] (a transcoder's prediction [B, d_out]) in training (scaled) units (Matryoshka: the
    whole dictionary's)."""
    rows: Tensor
    """Row of each stored latent activation, int64 [N], ascending."""
    cols: Tensor
    """Latent of each stored activation, int64 [N], ascending within a row."""
    acts: Tensor
    """Activation values [N] (differentiable). JumpReLU's sparse path also stores entries just below their
    threshold (value 0, inside the STE window); every other entry is > 0."""
    mse: Tensor
    """‖x − x̂‖² summed over d_in, averaged over rows."""
    recon_loss: Tensor
    """The optimised reconstruction term: Σ‖x − x̂‖² / (B·σ²), σ² the fixed dataset variance (Matryoshka: the
    mean of it over the prefixes)."""
    fvu: Tensor
    """Fraction of variance unexplained over this batch: Σ‖x − x̂‖² / Σ‖x − x̄‖² (logged, not optimised)."""
    aux_loss: Tensor
    """AuxK: ‖ê − e‖² / ‖e − ē‖² · min(n_dead/k_aux, 1), unweighted; 0 when nothing is dead or without AuxK."""
    sparsity_loss: Tensor
    """Unweighted penalty: relu Σ_i a_i‖W_dec,i‖ per row; jumprelu L0 per row (STE); 0 for the topk family."""
    loss: Tensor
    """What to backpropagate (the architecture's `loss`)."""
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


class Terms(NamedTuple):
    """The loss terms an architecture's `loss` combines (fp32 scalars, this rank's shares)."""

    mse: Tensor
    """‖x − x̂‖² per row."""
    recon: Tensor
    """Σ‖x − x̂‖² / (B·σ²) (mean over the prefixes for Matryoshka)."""
    aux: Tensor
    """AuxK, unweighted."""
    sparsity: Tensor
    """The architecture's sparsity penalty, unweighted."""


# --------------------------------------------------------------------------------------------------
# The base module


class TrainingSae(nn.Module):
    """One SAE being trained. Parameters: W_enc [d_in, F], b_enc [F], W_dec [F, d_in], b_dec [d_in] (and what
    an architecture adds). Buffers (checkpointed with `state_dict`): input_scale, theta, theta_updates,
    tokens_since_fired. A transcoder (`d_out`): W_dec [F, d_out], b_dec [d_out], W_skip [d_out, d_in] with
    `skip`, and the buffer target_scale."""

    arch: ClassVar[str] = ""
    """Name of the architecture's entry in `sae.architectures`."""
    uses_aux: ClassVar[bool] = False
    """Whether the loss has AuxK (the topk family)."""
    dense_forward: ClassVar[bool] = False
    """With the dense decoder, run the whole forward densely with ordinary autograd (relu, jumprelu: the
    selection is a mask, not a top-k, so nothing is gained from the sparse encoder)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are held at unit norm (gradient projection before the step, renormalisation after)."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.arch:
            architectures.get(cls.arch)  # a class needs its table entry
            REGISTRY[cls.arch] = cls

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        variance: float,
        k_aux: int | None = None,
        aux_alpha: float = 1 / 32,
        decoder: str = "auto",
        device: str | torch.device | None = None,
        seed: int | None = 0,
        d_out: int | None = None,
        skip: bool = False,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise SaeError(f"decoder {decoder!r} is not one of {', '.join(DECODERS)}")
        transcoder = d_out is not None
        d_out = d_out if transcoder else d_in  # an SAE's target is its input
        if d_in < 1 or d_sae < 1 or d_out < 1:
            raise SaeError(f"d_in, d_sae and d_out must be positive, got {d_in}, {d_sae} and {d_out}")
        if skip and not transcoder:
            raise SaeError("a skip connection needs a transcoder (a target site, d_out)")
        if not (math.isfinite(variance) and variance > 0):
            raise SaeError(f"the dataset variance must be a positive number, got {variance}")
        self.info = architectures.get(self.arch)
        self.d_in, self.d_sae = d_in, d_sae
        self.transcoder = transcoder
        """Predicts a target [B, d_out] instead of reconstructing its input."""
        self.d_out = d_out
        self.skip = bool(skip)
        self.saelens_architecture = architecture_name(self.info.exports_as, transcoder=self.transcoder, skip=self.skip)
        """The SAELens architecture `export` writes (SaeError here for one SAELens lacks: a topk transcoder)."""
        self.k: float | None = None
        """Mean latents per row for the architectures that select a fixed number (set by them)."""
        self.variance = float(variance)
        """σ² = E‖x − x̄‖² of the scaled training rows: the fixed normaliser of the reconstruction term."""
        self.k_aux = int(k_aux) if k_aux else max(1, d_in // 2)
        self.aux_alpha = aux_alpha
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
        self.W_dec = nn.Parameter(torch.empty(d_sae, self.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, **kw))
        if self.transcoder:
            self.register_buffer("target_scale", torch.ones((), **kw))
            self.register_buffer("_zero_centre", torch.zeros(d_in, **kw), persistent=False)
        self.register_buffer("input_scale", torch.ones((), **kw))
        self.register_buffer("theta", torch.zeros((), **kw))
        self.register_buffer("theta_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long, device=device))
        self.reset_parameters(seed)

    @classmethod
    def options(cls, cfg: Any, point: Any) -> dict[str, Any]:
        """The architecture's own constructor arguments from TrainConfig `cfg` and sweep point `point`."""
        return {}

    @property
    def centre(self) -> Tensor:
        """What is subtracted from the input before encoding: b_dec for an SAE, zeros for a transcoder."""
        return self._zero_centre if self.transcoder else self.b_dec

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Random decoder rows of norm `init_decoder_norm()`, W_enc = W_decᵀ (a transcoder: W_enc columns of the
        same norm drawn independently), zero biases (and W_skip)."""
        if self.W_dec.device.type == "meta":
            return
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        w = torch.randn(self.d_sae, self.d_out, generator=gen, dtype=torch.float32)
        w *= self.init_decoder_norm() / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        if self.transcoder:
            e = torch.randn(self.d_sae, self.d_in, generator=gen, dtype=torch.float32)
            self.W_enc.copy_((e * (self.init_decoder_norm() / e.norm(dim=1, keepdim=True))).t())
        else:
            self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.skip:
            self.W_skip.zero_()

    def init_decoder_norm(self) -> float:
        """Norm of the initial decoder rows."""
        return 1.0

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, target: Tensor | None = None) -> None:
        """b_dec ← geometric median of a sample of (scaled) training rows [n, d_in]; a transcoder's: of their
        (scaled) targets [n, d_out]."""
        rows = target if self.transcoder else x
        if rows is None:
            raise SaeError("a transcoder's b_dec is initialised from a sample of its targets; pass target=")
        self.b_dec.copy_(geometric_median(rows.to(self.b_dec.device).float()))

    @torch.no_grad()
    def set_target_scale(self, scale: float) -> None:
        """A transcoder's dataset-level target scale c_out (y_train = c_out·y_raw), folded back by `export`."""
        if not self.transcoder:
            raise SaeError("only a transcoder has a target scale")
        self.target_scale.fill_(float(scale))

    @torch.no_grad()
    def set_input_scale(self, scale: float) -> None:
        """Record the dataset-level scale c (x_train = c·x_raw) that `export` folds into the weights."""
        self.input_scale.fill_(float(scale))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups at base lr `lr`; each carries `lr_scale`, its lr as a multiple of the base
        (the trainer sets lr = base·lr_scale every step)."""
        return [{"params": list(self.parameters()), "lr": lr, "lr_scale": 1.0}]

    # ---------------------------------------------------------------------------------------------
    # What an architecture supplies

    def select(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the entries of pre [B, F] (fp32, no graph) the architecture keeps, rows ascending and
        columns ascending within a row. `n_rows`: rows of the global batch."""
        raise NotImplementedError

    def activate(self, vals: Tensor, cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """From the selected pre-activations `vals` [N] (differentiable) of latents `cols`: (activations [N],
        bool [N] of those that count as active or None when all do, sparsity penalty per row of the global
        batch)."""
        return vals, None, vals.new_zeros(())

    def activate_dense(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        """`dense_forward` architectures: (activations [B, F], sparsity penalty) from differentiable pre."""
        raise NotImplementedError

    def reconstruct(self, pat: SparsePattern, acts: Tensor, sparse: bool) -> Tensor:
        """What the reconstruction term compares with x: x̂ [B, d_in], or [B, P, d_in] for several (Matryoshka's
        prefixes; the last is the whole dictionary's)."""
        dec = SparseDecode.apply(acts, self.W_dec, pat) if sparse else dense_decode(pat, acts, self.W_dec)
        return dec + self.b_dec

    def loss(self, t: Terms) -> Tensor:
        """The loss to backpropagate."""
        raise NotImplementedError

    def before_step(self, step: int, plan: Any) -> None:
        """Schedules that depend on the step (0-based) of the run `plan` (sae.train Plan), before the forward."""

    @torch.no_grad()
    def after_step(self, out: SaeOutput, n_tokens: int, step: int, plan: Any) -> None:
        """Per-step updates after the optimizer step: decoder renormalisation and the dead-latent counters (and
        what an architecture adds: θ's EMA, threshold projection)."""
        self.normalize_decoder()
        self.update_dead(out.fired, n_tokens)

    def theta_ready(self) -> bool:
        """Whether the exported SAE's threshold mode is meaningful yet (BatchTopK: θ's EMA has started)."""
        return True

    def log_fields(self, x: Tensor) -> dict[str, Any]:
        """Extra training-log fields of this step on the scaled batch `x`."""
        return {}

    def metadata(self) -> dict[str, Any]:
        """The architecture's settings, written into the exported cfg.json's metadata."""
        return {}

    def export_threshold(self) -> Tensor | None:
        """The exported jumprelu threshold [F] (pre-activation units), or None."""
        return None

    def export_k(self) -> float | None:
        """The exported k (topk: latents per row; BatchTopK: the batch mode's mean per row), or None."""
        return self.k

    # ---------------------------------------------------------------------------------------------
    # Forward

    def _use_sparse(self, decoder: str | None, device: torch.device) -> bool:
        mode = decoder or self.decoder
        if mode != "auto":
            return mode == "sparse"
        limit = self.sparse_max_density
        if limit is None:  # not measured: CPU favours the sparse product, GPUs the dense matmul
            limit = 0.05 if device.type == "cpu" else 0.0
        if self.k is not None:  # a fixed number per row
            density = float(self.k) / self.d_sae
        else:  # last step's, dense until known
            density = self._density if self._density is not None else 1.0
        return density <= limit

    def _pre(self, x: Tensor) -> Tensor:
        """Dense pre-activations without a graph, fp32 with autocast off (selection, θ and the STE windows see
        fp32 values); on CPU into a reused buffer (a fresh [B, F] tensor per step costs page faults on every step)."""
        with no_autocast(x.device):
            xc = x.float() - self.centre
            if x.device.type == "cpu":
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

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        *,
        target: Tensor | None = None,
        decoder: str | None = None,
        n_rows: int | None = None,
    ) -> SaeOutput:
        """Training forward on scaled rows x [B, d_in] (a transcoder's: with their scaled targets `target`
        [B, d_out]). `dead_mask` [F] bool marks dead latents for AuxK; `decoder` overrides the module's decoder
        choice ("dense" or "sparse"); `n_rows`: rows of the global batch when the caller knows them (else, with a
        `process_group`, a collective and a host read find them)."""
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise SaeError(f"expected input rows [B, {self.d_in}], got {list(x.shape)}")
        y = self._target(x, target)
        b, f = x.shape[0], self.d_sae
        # the loss normaliser: b in one process, the global batch in DDP
        n = int(n_rows) if n_rows is not None else self._global_rows(b, x.device)
        sparse = self._use_sparse(decoder, x.device)
        if self.dense_forward and not sparse:
            return self._forward_dense(x, n, y)
        with torch.no_grad():
            pre = self._pre(x)
            rows, cols = self.select(pre, n)
        pat = SparsePattern(rows, cols, b, f)
        vals = SparseEncode.apply(x, self.W_enc, self.b_enc, self.centre, pre, pat).float()
        acts, active, sparsity = self.activate(vals, cols, n)
        with no_autocast(x.device):
            recon = self._with_skip(self.reconstruct(pat, acts, sparse), x)
        self._density = pat.nnz / (b * f)
        x_hat = recon if recon.dim() == 2 else recon[:, -1]
        aux, n_dead = x.new_zeros((), dtype=torch.float32), 0
        if self.uses_aux and dead_mask is not None and self.aux_alpha > 0:
            aux, n_dead = self._aux(x, y, x_hat, pre, dead_mask)
        return self._finish(y, recon, rows, cols, acts, active, aux, n_dead, sparsity, sparse, n)

    def _target(self, x: Tensor, target: Tensor | None) -> Tensor:
        """What the output is compared with: x for an SAE, the given target rows for a transcoder."""
        if not self.transcoder:
            if target is not None:
                raise SaeError("an SAE reconstructs its input; target= is for transcoders")
            return x
        if target is None or target.dim() != 2 or tuple(target.shape) != (x.shape[0], self.d_out):
            shape = None if target is None else list(target.shape)
            raise SaeError(f"a transcoder needs target rows [{x.shape[0]}, {self.d_out}], got {shape}")
        return target

    def _with_skip(self, recon: Tensor, x: Tensor) -> Tensor:
        """Add the skip connection x·W_skipᵀ (to every prefix of a [B, P, d_out] reconstruction)."""
        if not self.skip:
            return recon
        s = x.float() @ self.W_skip.float().t()
        return recon + (s if recon.dim() == 2 else s[:, None])

    def _aux(self, x: Tensor, y: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor) -> tuple[Tensor, int]:
        """AuxK: reconstruct the detached residual e = y − ŷ (y = x for an SAE) from the top k_aux
        pre-activations of the dead latents (no b_dec), ‖ê − e‖² / ‖e − ē‖², times min(n_dead / k_aux, 1) as in
        sparsify/SAELens."""
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
        e_hat = AuxDecode.apply(acts, x, self.W_enc, self.b_enc, self.centre, self.W_dec, dead)
        e = (y.float() - x_hat.float()).detach()
        var = self._sum_var(e)
        return scale * (e_hat - e).pow(2).sum() / var, n_dead

    def _forward_dense(self, x: Tensor, n: int, y: Tensor) -> SaeOutput:
        """`dense_forward` architectures with dense tensors and ordinary autograd (high densities, GPUs)."""
        b = x.shape[0]
        with no_autocast(x.device):
            pre = torch.addmm(self.b_enc, x.float() - self.centre, self.W_enc)
            a, sparsity = self.activate_dense(pre, n)
            x_hat = self._with_skip(a @ self.W_dec + self.b_dec, x)
        with torch.no_grad():
            idx = flat_nonzero(a > 0)
        rows, cols = idx // self.d_sae, idx % self.d_sae
        acts = a.reshape(-1)[idx]
        self._density = rows.numel() / (b * self.d_sae)
        zero = x.new_zeros((), dtype=torch.float32)
        return self._finish(y, x_hat, rows, cols, acts, None, zero, 0, sparsity, False, n)

    def _finish(self, x, recon, rows, cols, acts, active, aux, n_dead, sparsity, sparse, n) -> SaeOutput:
        # x: what the output is compared with (a transcoder's target); n: rows of the global batch (DDP: each
        # rank's losses are its share of the global ones)
        x32 = x.float()
        x_hat = recon if recon.dim() == 2 else recon[:, -1]
        sse = (x_hat.float() - x32).pow(2).sum()
        if recon.dim() == 2:
            recon_loss = sse / (n * self.variance)
        else:  # the mean over the prefixes of each one's term
            recon_loss = (recon.float() - x32[:, None]).pow(2).sum() / (recon.shape[1] * n * self.variance)
        mse = sse / n
        fvu = sse.detach() / self._sum_var(x32)
        loss = self.loss(Terms(mse, recon_loss, aux, sparsity))
        with torch.no_grad():
            # On the device, without boolean indexing (its size would be read back to the host every step).
            # `active` None: every stored entry is > 0 by construction.
            a = acts.detach().float()
            if active is None:
                fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
                fired[cols] = True
                n_active = torch.full((), float(a.numel()), device=x.device)
            else:
                hits = torch.zeros(self.d_sae, dtype=torch.int32, device=x.device)
                fired = hits.index_add_(0, cols, active.to(torch.int32)) > 0
                a = torch.where(active, a, math.inf)
                n_active = active.sum().float()
            min_act = a.min() if a.numel() else torch.full((), math.inf, device=x.device)
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
            recon_loss=recon_loss,
            fvu=fvu,
            aux_loss=aux,
            sparsity_loss=sparsity,
            loss=loss,
            l0=n_active / n,
            fired=fired,
            min_act=min_act,
            n_dead=n_dead,
            sparse=sparse,
        )

    # ---------------------------------------------------------------------------------------------
    # Per-step bookkeeping

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Unit-norm decoders: drop the component of each W_dec row's gradient along that row (call after
        backward, before clipping and the optimizer step), so the step does not change the row norms to first
        order."""
        g = self.W_dec.grad
        if g is None or not self.unit_norm_decoder:
            return
        w = self.W_dec
        coef = (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        g.sub_(coef * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoders: renormalise W_dec rows to unit norm (call after the optimizer step)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

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

    def choose_decoder(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        repeats: int = 2,
        autocast: Any = None,
        *,
        target: Tensor | None = None,
    ) -> dict[str, float]:
        """Time one forward+backward with the dense and with the sparse decoder on the real batch `x` (scaled),
        the forward under `autocast` (the training step's context; none by default), and keep the faster for
        `decoder="auto"`. For
        architectures whose density changes during training, the result becomes a density limit: with
        t(ρ) ≈ t_enc + (t − t_enc)·ρ/ρ₀ for the sparse path, sparse is used while
        ρ ≤ ρ₀·(t_dense − t_enc)/(t_sparse − t_enc). Gradients and state are left untouched.
        Returns the timings in seconds."""
        saved = {n: (p.grad.clone() if p.grad is not None else None) for n, p in self.named_parameters()}
        density = self._density

        def run(mode: str) -> float:
            times = []
            for _ in range(repeats + 1):  # the first run warms up and is not counted
                t0 = time.perf_counter()
                with autocast if autocast is not None else contextlib.nullcontext():
                    out = self.forward(x, dead_mask, target=target, decoder=mode)
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
                    with autocast if autocast is not None else contextlib.nullcontext():
                        self._pre(x)
                    if x.device.type == "cuda":
                        torch.cuda.synchronize(x.device)
                    t_enc = min(t_enc, time.perf_counter() - t0)
        finally:
            for n, p in self.named_parameters():
                p.grad = saved[n]
            self._density = density
        if self.k is not None:  # fixed density: one path for the whole run
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
        hook_name_out: str | None = None,
        complete: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> SparseAutoencoder:
        """The inference SAE in raw activation units (`sae.saedir.fold_scales`): with x_train = c·x, W_enc' = c·W_enc,
        W_dec' = W_dec/c_out, b_dec' = b_dec/c_out (c_out = c for an SAE, a transcoder's own target scale); b_enc
        and thresholds unchanged. The SAELens architecture is the table's `exports_as` (a transcoder's: its
        transcoder counterpart, with `hook_name_out` its target site); `metadata` gains σ² (`recon_variance`,
        scaled units) and the architecture's own keys."""
        c_in = float(self.input_scale)
        c_out = float(self.target_scale) if self.transcoder else c_in
        cfg = SaeConfig(
            architecture=self.saelens_architecture,
            d_in=self.d_in,
            d_sae=self.d_sae,
            d_out=self.d_out,
            k=self.export_k(),
            model_name=model_name,
            hook_name=hook_name,
            hook_name_out=hook_name_out,
            training_architecture=self.arch,
            theta=float(self.theta) if self.info.has_theta else None,
            input_scale=c_in,
            target_scale=c_out,
            complete=complete,
            metadata={**(metadata or {}), "recon_variance": self.variance, **self.metadata()},
        )
        # the tensors of its SAELens layout, in training units (the threshold: the one exported)
        w = {n: self.export_threshold() if n == "threshold" else getattr(self, n) for n in weight_shapes(cfg)}
        sae = SparseAutoencoder(cfg, device=self.W_enc.device)
        sae.load_state_dict(
            {k: v.detach().float() for k, v in fold_scales(w, input_scale=c_in, target_scale=c_out).items()}
        )
        return sae

    def save(self, path: Any, **export_kw: Any) -> Any:
        """`export` then `sae.saedir.save_sae` to `path` (atomic)."""
        return save_sae(self.export(**export_kw), None, path)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"{self.arch} as {self.saelens_architecture}, d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}{k}, "
            f"decoder={self.decoder}"
        )


def point_size(point: Any, d_in: int) -> int:
    """F of sweep point `point` (sae.saedir.SweepPoint): its dict_size, or its expansion × d_in."""
    return point.dict_size if point.dict_size is not None else point.expansion * d_in


__all__ = [
    "DECODERS",
    "REGISTRY",
    "SaeOutput",
    "Terms",
    "TrainingSae",
    "estimate_input_scale",
    "geometric_median",
    "point_size",
]
