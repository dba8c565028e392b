"""Training-time SAEs (sae.train.archs, sae.train.kernels): selection, losses, gradients, bookkeeping, export."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from sae import architectures
from sae.errors import SaeError
from sae.saedir import SweepPoint, batch_topk_indices
from sae.train.archs import from_config, make_sae, sae_class
from sae.train.archs.base import TrainingSae, estimate_input_scale, geometric_median
from sae.train.kernels import JumpReLU, SparseDecode, SparsePattern, Step

D, F = 16, 96
ARCHS = list(architectures.NAMES)
VAR = D * 1.5**2
"""σ² of the rows `batch` draws: the fixed dataset variance every test SAE normalises its reconstruction by."""


def accepted(arch: str) -> set[str]:
    """Constructor arguments of `arch`'s class and its bases."""
    return {
        p for c in sae_class(arch).__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters
    }


def new(arch: str, **kw) -> TrainingSae:
    """`make_sae(arch, D, F, ...)` with the arguments `arch` takes out of `kw` (σ² = VAR unless given)."""
    kw = {"variance": VAR, **kw}
    return make_sae(arch, D, F, **{k: v for k, v in kw.items() if k in accepted(arch)})


def make(arch: str, seed: int = 0, **kw) -> TrainingSae:
    """A small SAE with non-trivial biases (so every gradient path is exercised)."""
    torch.manual_seed(seed)
    kw = {"k": 4, "k_aux": 8, "init_threshold": 0.4, "bandwidth": 0.3, "widths": (8, 32, F), **kw}
    sae = new(arch, seed=seed, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.2)
        if arch == "jumprelu":
            sae.threshold.mul_(torch.exp(torch.randn(F) * 0.3))
    return sae


def batch(n: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 1.5 + 0.3


def grads(sae: TrainingSae) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Selection


def _topk_reference(pre: torch.Tensor, k_total: int) -> set[int]:
    flat = pre.flatten()
    top = torch.topk(flat, k_total)
    return set(top.indices[top.values > 0].tolist())


@pytest.mark.parametrize("shape,k", [((64, 300), 7), ((33, 1000), 5), ((8, 50), 30), ((256, 512), 2)])
def test_batch_topk_indices_matches_torch_topk(shape, k):
    pre = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    k_total = k * shape[0]
    idx = batch_topk_indices(pre, k_total)
    assert idx.numel() == min(k_total, int((pre > 0).sum()))  # (8, 50) with k=30: fewer positives than k·B
    assert torch.all(idx[1:] > idx[:-1])  # ascending, unique
    assert set(idx.tolist()) == _topk_reference(pre, k_total)


def test_batch_topk_indices_sample_miss_falls_back_exactly():
    # Huge values exactly on the positions a strided sample sees: its bound overshoots the cut twice,
    # and the function must widen until it is exact.
    n_rows, row = 100, 1000
    k_total = 20000
    pre = torch.rand(n_rows * row)
    stride = 9  # what batch_topk_indices picks for these sizes (k_total // 2048, coprime with the row)
    pre[::stride] += 10
    pre = pre.view(n_rows, row)
    idx = batch_topk_indices(pre, k_total)
    assert set(idx.tolist()) == _topk_reference(pre, k_total)


def test_batch_topk_indices_ties_go_to_lower_index():
    pre = torch.randint(-2, 4, (40, 60)).float()  # massive ties
    k_total = 300
    idx = batch_topk_indices(pre, k_total)
    flat = pre.flatten()
    order = torch.sort(-flat, stable=True).indices[:k_total]  # ties: lower flat index first
    expected = set(order[flat[order] > 0].tolist())
    assert set(idx.tolist()) == expected and idx.numel() == k_total
    assert torch.equal(idx, batch_topk_indices(pre.clone(), k_total))  # deterministic


def test_batch_topk_indices_few_positives():
    pre = -torch.rand(20, 30)
    pre[3, 4], pre[7, 1] = 0.5, 0.2
    assert sorted(batch_topk_indices(pre, 100).tolist()) == [3 * 30 + 4, 7 * 30 + 1]
    assert batch_topk_indices(pre, 1).tolist() == [3 * 30 + 4]


def test_batchtopk_keeps_k_times_b_with_variable_counts():
    sae = make("batchtopk")
    x = batch(64)
    out = sae(x)
    assert out.acts.numel() == 4 * 64 and bool((out.acts > 0).all())
    counts = torch.bincount(out.rows, minlength=64)
    assert counts.sum() == 4 * 64 and len(set(counts.tolist())) > 1  # tokens get different numbers of latents
    assert out.l0.item() == pytest.approx(4.0)
    # the same set as a plain top-k of relu(pre) over the batch
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    got = set((out.rows * F + out.cols).tolist())
    assert got == _topk_reference(pre, 4 * 64)


def test_topk_keeps_exactly_k_per_row():
    sae = make("topk", k=5)
    x = batch(40)
    out = sae(x)
    assert torch.equal(torch.bincount(out.rows, minlength=40), torch.full((40,), 5))
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    ref = torch.topk(pre, 5, dim=1).indices.sort(dim=1).values
    assert torch.equal(out.cols.view(40, 5), ref)
    assert torch.all(out.rows[1:] >= out.rows[:-1])


# --------------------------------------------------------------------------------------------------
# Losses and gradients


def _reference_loss(sae: TrainingSae, x: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """The BatchTopK / TopK loss written naively with dense tensors and plain autograd."""
    b = x.shape[0]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.arch != "topk":  # batchtopk (matryoshka has its own reference below)
        flat = pre.relu().flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat, int(sae.k) * b).indices] = True
        a = (flat * mask).view(b, F)
    else:
        top = torch.topk(pre, int(sae.k), dim=1)
        a = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = a @ sae.W_dec + sae.b_dec
    fvu = (x_hat - x).pow(2).sum() / (b * sae.variance)  # the fixed dataset variance, not the batch's
    if dead is None or not dead.any():
        return fvu
    n_dead = int(dead.sum())
    k_aux = min(sae.k_aux, n_dead)
    masked = torch.where(dead[None], pre, torch.full_like(pre, -math.inf))
    top = torch.topk(masked, k_aux, dim=1)
    a_aux = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    e = (x - x_hat).detach()
    aux = (a_aux @ sae.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return fvu + sae.aux_alpha * min(n_dead / sae.k_aux, 1.0) * aux


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_topk_family_matches_naive_reference(arch, decoder):
    x = batch(32)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::5] = True
    sae = make(arch)
    out = sae(x, dead, decoder=decoder)
    out.loss.backward()
    got = grads(sae)
    ref = make(arch)
    loss = _reference_loss(ref, x, dead)
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, g in grads(ref).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_and_dense_decoders_agree(arch):
    x = batch(40)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::4] = True
    outs, gs = {}, {}
    for decoder in ("dense", "sparse"):
        sae = make(arch)
        out = sae(x, dead, decoder=decoder)
        out.loss.backward()
        outs[decoder], gs[decoder] = out, grads(sae)
    d, s = outs["dense"], outs["sparse"]
    assert d.sparse is False and s.sparse is True
    torch.testing.assert_close(d.x_hat, s.x_hat, rtol=1e-5, atol=1e-5)
    for field in ("loss", "mse", "fvu", "aux_loss", "sparsity_loss", "l0", "min_act"):
        torch.testing.assert_close(getattr(d, field), getattr(s, field), rtol=1e-5, atol=1e-5, msg=field)
    assert torch.equal(d.fired, s.fired)
    torch.testing.assert_close(d.dense_acts(), s.dense_acts(), rtol=1e-6, atol=1e-6)
    for name in gs["dense"]:
        torch.testing.assert_close(gs["dense"][name], gs["sparse"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_decoder_gradient_touches_only_active_rows():
    rows = torch.tensor([0, 0, 1, 3, 3, 3])
    cols = torch.tensor([2, 5, 5, 0, 1, 7])
    pat = SparsePattern(rows, cols, 4, 9)
    vals = torch.rand(6, requires_grad=True)
    w = torch.randn(9, 5, requires_grad=True)
    out = SparseDecode.apply(vals, w, pat)
    dense = torch.zeros(4, 9).index_put((rows, cols), vals.detach())
    torch.testing.assert_close(out, dense @ w.detach())
    g = torch.randn(4, 5)
    out.backward(g)
    untouched = torch.ones(9, dtype=torch.bool)
    untouched[cols] = False
    assert torch.all(w.grad[untouched] == 0) and torch.all(w.grad[~untouched].abs().sum(1) > 0)
    torch.testing.assert_close(vals.grad, (g[rows] * w.detach()[cols]).sum(1))


def test_relu_l1_is_scaled_by_decoder_norms():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, F)[:, None])  # rows no longer unit norm
    x = batch(24)
    out = sae(x, decoder="dense")
    with torch.no_grad():
        a = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
        expected = (a * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert out.sparsity_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - a.sum(1).mean().item()) > 1e-2 * expected.item()
    assert out.loss.item() == pytest.approx(out.mse.item() + sae.l1_coeff * expected.item(), rel=1e-5)


def test_jumprelu_gradients_follow_the_formulas():
    torch.manual_seed(0)
    eps = 0.2
    pre = torch.randn(50, 7, requires_grad=True)
    theta = torch.rand(7, requires_grad=True) * 0.5 + 0.1
    theta = theta.detach().requires_grad_()
    g = torch.randn(50, 7)
    JumpReLU.apply(pre, theta, eps).backward(g)
    window = ((pre.detach() - theta.detach()) / eps).abs() < 0.5
    on = pre.detach() > theta.detach()
    torch.testing.assert_close(pre.grad, g * on)  # ordinary gradient through the jump
    torch.testing.assert_close(theta.grad, (-(theta.detach() / eps) * window * g).sum(0))
    assert window.any() and (window & ~on).any()  # the test has entries on both sides of θ

    theta.grad = None
    pre.grad = None
    Step.apply(pre, theta, eps).sum().backward()
    assert pre.grad is None or torch.all(pre.grad == 0)  # the L0 step trains θ only
    torch.testing.assert_close(theta.grad, -(window.sum(0).float()) / eps)


def test_jumprelu_threshold_gradient_matches_finite_differences():
    """The rectangle-kernel STE is a central finite difference of width ε: exact for the L0 count, and for
    Σ g·JumpReLU up to the spread of pre inside the window (relative error ≲ ε / 2θ)."""
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(20000, generator=gen) * 0.5 + 1.0
    g = torch.rand(20000, generator=gen) + 0.5
    eps, t0 = 0.02, 1.1
    theta = torch.tensor(t0, requires_grad=True)

    Step.apply(pre, theta, eps).sum().backward()
    l0 = lambda t: (pre > t).float().sum()  # noqa: E731
    fd = (l0(t0 + eps / 2) - l0(t0 - eps / 2)) / eps
    assert theta.grad.item() == pytest.approx(fd.item(), rel=1e-4)
    assert theta.grad.item() < -100  # a real signal, not 0 = 0

    theta.grad = None
    JumpReLU.apply(pre, theta, eps).mul(g).sum().backward()
    f = lambda t: (g * pre * (pre > t)).sum()  # noqa: E731
    fd = (f(t0 + eps / 2) - f(t0 - eps / 2)) / eps
    assert theta.grad.item() == pytest.approx(fd.item(), rel=eps / t0)


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_jumprelu_module_threshold_gradient(decoder):
    """The module's threshold gradient: the STE formulas for MSE + λ·L0, θ itself the parameter."""
    sae = make("jumprelu")
    x = batch(64)
    out = sae(x, decoder=decoder)
    out.loss.backward()
    with torch.no_grad():
        theta = sae.threshold
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        a = pre * (pre > theta)
        x_hat = a @ sae.W_dec + sae.b_dec
        g_a = (2 * (x_hat - x) / x.shape[0]) @ sae.W_dec.t()
        k = (((pre - theta) / sae.bandwidth).abs() < 0.5).float()
        from_mse = (-(theta / sae.bandwidth) * k * g_a).sum(0)
        from_l0 = sae.l0_coeff * (-(1 / sae.bandwidth) * k).sum(0) / x.shape[0]
        d_theta = from_mse + from_l0
    torch.testing.assert_close(sae.threshold.grad, d_theta, rtol=1e-4, atol=1e-5)
    assert sae.threshold.grad.abs().sum() > 0


def test_jumprelu_threshold_has_its_own_lr_and_stays_non_negative():
    sae = make("jumprelu")
    groups = sae.param_groups(1e-3)
    assert [g["lr_scale"] for g in groups] == [1.0, pytest.approx(math.sqrt(D))]
    assert groups[1]["params"] == [sae.threshold] and groups[1]["lr"] == pytest.approx(1e-3 * math.sqrt(D))
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(list(sae.parameters())) and {id(p) for p in every} == {id(p) for p in sae.parameters()}
    assert make("jumprelu", threshold_lr_scale=3.0).param_groups(1.0)[1]["lr"] == 3.0
    (g,) = make("batchtopk").param_groups(1e-3)
    assert g["lr_scale"] == 1.0 and len(g["params"]) == len(list(make("batchtopk").parameters()))
    with pytest.raises(SaeError):
        make("jumprelu", threshold_lr_scale=0.0)
    # the projection after the step: θ < 0 would pass negative pre-activations; at 0 the L0 term still lifts it
    with torch.no_grad():
        sae.threshold[:5] = -0.2
    sae.clamp_threshold()
    assert sae.threshold.min().item() == 0.0 and sae.threshold[5:].gt(0).all()
    sae(batch(64), decoder="dense").loss.backward()
    assert (sae.threshold.grad[:5] < 0).all()  # descent raises θ


def _train_jumprelu(l0_coeff: float, steps: int = 60, **kw) -> tuple[float, float]:
    """(L0 at the start, L0 at the end) of a short Adam run on a fixed Gaussian batch, through `param_groups`."""
    sae = new("jumprelu", l0_coeff=l0_coeff, init_threshold=0.01, seed=0, **kw)
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(3))
    x *= math.sqrt(D) / x.norm(dim=1).mean()  # the trainer's input scale: E‖x‖ = √d
    opt = torch.optim.Adam(sae.param_groups(5e-3))
    first = None
    for _ in range(steps):
        out = sae(x, decoder="dense")
        first = float(out.l0) if first is None else first
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        sae.clamp_threshold()
    return first, float(sae(x, decoder="dense").l0)


def test_jumprelu_l0_follows_the_coefficient_in_a_short_run():
    """In a few hundred steps the thresholds move far enough that the L0 coefficient, not θ's init, sets L0.
    A log-threshold at the weights' lr (θ moves by a factor e^(lr·steps) ≈ 1.35 at most) fails this."""
    start, weak = _train_jumprelu(0.01)
    _, strong = _train_jumprelu(1.0)
    assert start > 0.4 * F  # θ = 0.01 starts with about half of the latents active
    assert strong < 0.25 * start and strong < 0.5 * weak
    _, slow = _train_jumprelu(1.0, threshold_lr_scale=1.0)  # θ at the weights' lr barely moves in this run
    assert slow > 2 * strong


# --------------------------------------------------------------------------------------------------
# Decoder constraint, init, AuxK, θ, bookkeeping


def test_decoder_rows_stay_unit_norm():
    sae = make("batchtopk")
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    x = batch(64)
    out = sae(x)
    out.loss.backward()
    assert (torch.einsum("fd,fd->f", sae.W_dec.grad, sae.W_dec).abs() > 1e-6).any()
    sae.remove_parallel_grad()
    torch.testing.assert_close(torch.einsum("fd,fd->f", sae.W_dec.grad, sae.W_dec), torch.zeros(F), atol=1e-6, rtol=0)
    before = sae.W_dec.detach().clone()
    opt.step()
    drift = (sae.W_dec.norm(dim=1) - 1).abs().max().item()
    assert drift < 1e-2  # second order only
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    assert not torch.equal(before, sae.W_dec)


def test_init_w_enc_is_w_dec_transpose():
    sae = new("batchtopk", k=4, seed=5)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    other = new("batchtopk", k=4, seed=5)
    assert torch.equal(sae.W_dec, other.W_dec)


def test_geometric_median_beats_mean_with_outliers():
    gen = torch.Generator().manual_seed(0)
    center = torch.full((D,), 3.0)
    inliers = center + 0.3 * torch.randn(900, D, generator=gen)
    outliers = 200.0 + torch.randn(100, D, generator=gen)
    pts = torch.cat([inliers, outliers])
    med = geometric_median(pts)
    assert (med - center).norm() < 0.2 * (pts.mean(0) - center).norm()
    assert (med - center).norm() < 0.5
    cost = lambda y: (pts - y).norm(dim=1).sum()  # noqa: E731
    for _ in range(5):  # a local minimum of the summed distances
        assert cost(med) <= cost(med + 0.05 * torch.randn(D, generator=gen))
    sae = make("batchtopk")
    sae.init_from_sample(pts)
    torch.testing.assert_close(sae.b_dec.detach(), med)


def test_aux_is_zero_without_dead_latents():
    sae = make("batchtopk")
    x = batch(32)
    for dead in (None, torch.zeros(F, dtype=torch.bool)):
        out = sae(x, dead)
        assert out.aux_loss.item() == 0 and out.n_dead == 0
        assert out.loss.item() == pytest.approx(out.recon_loss.item())


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_aux_uses_only_dead_latents(decoder):
    sae = make("topk")
    x = batch(32)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(2))[:20]] = True
    out = sae(x, dead, decoder=decoder)
    assert out.n_dead == 20 and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert torch.all(sae.W_dec.grad[~dead] == 0) and sae.W_dec.grad[dead].abs().sum() > 0
    assert torch.all(sae.W_enc.grad[:, ~dead] == 0) and sae.W_enc.grad[:, dead].abs().sum() > 0
    assert torch.all(sae.b_enc.grad[~dead] == 0)


def test_theta_ema():
    sae = make("batchtopk")
    out = sae(batch(32))
    assert out.min_act.item() == pytest.approx(out.acts.min().item()) and out.min_act.dtype == torch.float32
    assert sae.theta.item() == 0
    sae.update_theta(torch.tensor(2.0), decay=0.9)
    assert sae.theta.item() == pytest.approx(2.0)  # first update: no bias towards the 0 start
    sae.update_theta(torch.tensor(1.0), decay=0.9)
    assert sae.theta.item() == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    sae.update_theta(torch.tensor(math.inf), decay=0.9)  # a batch without positive activations
    assert sae.theta.item() == pytest.approx(1.9) and int(sae.theta_updates) == 2
    assert sae.theta.dtype == torch.float32 and "theta" in sae.state_dict()


def test_dead_counters():
    sae = make("batchtopk")
    fired = torch.zeros(F, dtype=torch.bool)
    fired[:10] = True
    sae.update_dead(fired, 100)
    sae.update_dead(torch.zeros(F, dtype=torch.bool), 100)
    assert sae.dead_mask(150).sum() == F - 10 and not sae.dead_mask(150)[:10].any()
    assert not sae.dead_mask(250).any()
    out = sae(batch(32))
    sae.update_dead(out.fired, 32)
    assert torch.equal(sae.tokens_since_fired[out.fired], torch.zeros(int(out.fired.sum()), dtype=torch.long))


def test_input_scale():
    x = torch.randn(500, D) * 7 + 2
    c = estimate_input_scale(x)
    assert (c * x).norm(dim=1).mean().item() == pytest.approx(math.sqrt(D), rel=1e-5)
    with pytest.raises(SaeError):
        estimate_input_scale(torch.zeros(4, D))


# --------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("arch", ARCHS)
def test_export_folds_the_input_scale(arch):
    sae = make(arch)
    c = 3.7
    sae.set_input_scale(c)
    if sae.info.has_theta:
        sae.update_theta(torch.tensor(0.3))
    raw = batch(32) / c
    out = sae(raw * c, decoder="dense")
    exported = sae.export(model_name="m", hook_name="blocks.0.hook_resid_post")
    with torch.no_grad():
        if exported.batch_topk:
            x_hat = exported.decode(exported.encode_batch(raw))
        else:
            x_hat = exported(raw)
    torch.testing.assert_close(x_hat, out.x_hat.detach() / c, rtol=1e-5, atol=1e-6)
    assert exported.cfg.input_scale == pytest.approx(c)
    if sae.info.has_theta:  # inference mode: the θ threshold, as JumpReLU
        with torch.no_grad():
            pre = (raw * c - sae.b_dec) @ sae.W_enc + sae.b_enc
            expected = pre * (pre > 0.3)
            torch.testing.assert_close(exported.encode(raw), expected, rtol=1e-5, atol=1e-5)
        assert exported.cfg.architecture == "jumprelu" and exported.cfg.theta == pytest.approx(0.3)


def test_decoder_choice():
    sae = make("batchtopk")
    x = batch(64)
    sae(x).loss.backward()
    before = grads(sae)
    times = sae.choose_decoder(x, repeats=1)
    assert set(times) >= {"dense", "sparse"} and sae.sparse_max_density in (0.0, 1.0)
    for name, g in grads(sae).items():
        assert torch.equal(g, before[name])  # grads untouched
    assert sae(x).sparse == (sae.sparse_max_density == 1.0)
    relu = make("relu")
    relu.choose_decoder(x, repeats=1)
    assert 0.0 <= relu.sparse_max_density <= 1.0


def test_autocast_is_safe():
    sae = make("batchtopk")
    x = batch(32)
    ref = sae(x).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, decoder="sparse")
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx(ref, rel=0.1)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())


def _ddp_worker(rank: int, world: int, init_file: str, pre: torch.Tensor, x: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    from sae.train.ddp import destroy_process_group

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        idx = batch_topk_indices(pre.chunk(world)[rank], 7 * pre.shape[0], group=dist.group.WORLD)
        sae = make("batchtopk")
        sae.process_group = dist.group.WORLD
        out = sae(x.chunk(world)[rank], decoder="sparse")
        torch.save(
            {"idx": idx, "rows": out.rows, "cols": out.cols, "fired": out.fired, "min": out.min_act},
            f"{out_dir}/{rank}.pt",
        )
    finally:
        destroy_process_group()  # (right after a collective: torch < 2.8 could hang here)


def test_distributed_batch_topk_matches_one_process(tmp_path):
    """Two gloo ranks, each with half the batch, select exactly what one process selects on the whole batch
    (ties included: integer-valued pre-activations)."""
    world = 2
    pre = torch.randint(-3, 9, (30, 40)).float()
    x = batch(30)
    torch.multiprocessing.start_processes(  # fork: no re-import of torch in the children (seconds saved)
        _ddp_worker,
        args=(world, str(tmp_path / "init"), pre, x, str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    expected = batch_topk_indices(pre, 7 * 30)
    per_rank = pre.numel() // world
    for r in range(world):
        mine = expected[(expected >= r * per_rank) & (expected < (r + 1) * per_rank)] - r * per_rank
        assert torch.equal(got[r]["idx"], mine)
    one = make("batchtopk")(x, decoder="sparse")
    rows = torch.cat([got[0]["rows"], got[1]["rows"] + 15])
    assert torch.equal(rows, one.rows) and torch.equal(torch.cat([g["cols"] for g in got]), one.cols)
    assert all(torch.equal(g["fired"], one.fired) and g["min"] == one.min_act for g in got)


def test_from_config_and_bad_arguments():
    from sae.config import TrainConfig

    cfg = TrainConfig(k=(8,), expansion=(4,), k_aux=6, decoder="sparse")
    sae = from_config(cfg, SweepPoint("batchtopk-k8-x4", "batchtopk", 8, None, 4, None), D, variance=VAR)
    assert (sae.d_sae, sae.k, sae.k_aux, sae.decoder, sae.variance) == (4 * D, 8, 6, "sparse", VAR)
    with pytest.raises(SaeError):
        make_sae("gated", D, F, variance=VAR)
    with pytest.raises(SaeError):
        make_sae("topk", D, F, k=F + 1, variance=VAR)
    with pytest.raises(SaeError):
        make_sae("batchtopk", D, F, variance=0.0)
    with pytest.raises(SaeError):
        make("batchtopk")(torch.zeros(3, D + 1))


@pytest.mark.parametrize("n", [0, 5, 64, 1003, 40000])
def test_flat_nonzero(n):
    from sae.saedir import flat_nonzero

    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.03
    assert torch.equal(flat_nonzero(mask), mask.nonzero().squeeze(1))
    assert torch.equal(flat_nonzero(mask.view(1, n) if n else mask), mask.nonzero().squeeze(1))
