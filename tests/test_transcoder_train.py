"""Training transcoders with the SAE architectures: the loss against a naive reference, the sparse and dense paths
against each other, AuxK on the target's residual, the skip connection, the export in raw units (and sae-lens
loading it), and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

from sae.errors import SaeError
from sae.saedir import load_sae
from sae.train.archs import make_sae

D_IN, D_OUT, F, B = 16, 24, 64, 32
ARCHS = ["batchtopk", "relu", "jumprelu", "matryoshka"]  # topk has no SAELens transcoder
OPTIONS = {"batchtopk": {"k": 4}, "matryoshka": {"k": 4, "widths": (0.25, 1.0)}, "relu": {}, "jumprelu": {}}


def data(seed: int = 0, n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randn(n, D_OUT, generator=g) + x @ torch.randn(D_IN, D_OUT, generator=g) / 4
    return x, y


def make(arch: str, *, skip: bool = False, decoder: str = "dense", seed: int = 0, **kw):
    sae = make_sae(
        arch, D_IN, F, d_out=D_OUT, skip=skip, variance=D_OUT * 1.0, decoder=decoder, seed=seed,
        **{**OPTIONS[arch], **kw},
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases and skip, so every term is exercised
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D_OUT, generator=g) * 0.1)
        if skip:
            sae.W_skip.copy_(torch.randn(D_OUT, D_IN, generator=g) * 0.1)
    return sae


def grads(sae, x, y, dead=None, decoder=None):
    out = sae(x, dead, target=y, decoder=decoder)
    out.loss.backward()
    g = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    return out, g


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_and_dense_paths_agree(arch, skip):
    x, y = data()
    dense = make(arch, skip=skip)
    sparse = copy.deepcopy(dense)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    a, ga = grads(dense, x, y, dead, "dense")
    b, gb = grads(sparse, x, y, dead, "sparse")
    assert a.x_hat.shape == (B, D_OUT)
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-6)
    assert ga.keys() == gb.keys() and ("W_skip" in ga) == skip
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("skip", [False, True])
def test_batchtopk_loss_and_gradients_equal_a_naive_transcoder(skip):
    """ŷ = a·W_dec + b_dec (+ x·W_skipᵀ), a the k·B largest of relu(x·W_enc + b_enc) over the batch (no input
    centring); loss Σ‖y − ŷ‖²/(B·σ²) + α·AuxK, AuxK fitting the residual y − ŷ from the dead latents."""
    x, y = data(seed=2)
    sae = make("batchtopk", skip=skip, decoder="sparse")
    dead = torch.zeros(F, dtype=torch.bool)
    dead[1::4] = True
    out, got = grads(sae, x, y, dead)

    p = {n: t.detach().clone().requires_grad_(True) for n, t in sae.named_parameters()}
    pre = x @ p["W_enc"] + p["b_enc"]
    keep = torch.zeros(B * F, dtype=torch.bool)
    keep[pre.detach().relu().flatten().topk(4 * B).indices] = True
    a = torch.where(keep.view(B, F), pre, 0.0)
    y_hat = a @ p["W_dec"] + p["b_dec"] + (x @ p["W_skip"].t() if skip else 0)
    recon = (y - y_hat).pow(2).sum() / (B * sae.variance)
    e = (y - y_hat).detach()
    sub = pre[:, dead]
    k_aux = sae.k_aux
    top = sub.detach().topk(min(k_aux, int(dead.sum())), dim=1).indices
    aux_a = torch.zeros_like(sub).scatter(1, top, 1.0).bool() & (sub > 0)
    e_hat = torch.where(aux_a, sub, 0.0) @ p["W_dec"][dead]
    aux = min(int(dead.sum()) / k_aux, 1.0) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    loss = recon + sae.aux_alpha * aux
    loss.backward()

    torch.testing.assert_close(out.x_hat, y_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon_loss, recon.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.aux_loss, aux.detach(), rtol=1e-4, atol=1e-7)
    for k, g in got.items():
        torch.testing.assert_close(g, p[k].grad, rtol=1e-4, atol=1e-6, msg=k)
    assert got["b_dec"].abs().sum() > 0  # b_dec is the output bias, trained through ŷ only


@pytest.mark.parametrize("arch", ["batchtopk", "relu", "jumprelu"])
def test_export_is_the_trained_transcoder_in_raw_units(tmp_path, arch):
    sl = pytest.importorskip("sae_lens")
    sae = make(arch, skip=True)
    c_in, c_out = 2.5, 0.4
    sae.set_input_scale(c_in)
    sae.set_target_scale(c_out)
    with torch.no_grad():
        sae.theta.fill_(0.05)
        sae.theta_updates.fill_(1)
    x, y = data(seed=3)
    with torch.no_grad():
        trained = sae(x * c_in, target=y * c_out, decoder="dense").x_hat / c_out
        t = sae.export(model_name="m", hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
    assert t.cfg.layout.transcoder and t.cfg.architecture.endswith("skip_transcoder") and t.d_out == D_OUT
    assert t.cfg.input_scale == pytest.approx(c_in) and t.cfg.target_scale == pytest.approx(c_out)
    assert t.cfg.training_architecture == arch
    with torch.no_grad():
        mine = t.decode(t.encode_batch(x), x) if arch == "batchtopk" else t(x)
    torch.testing.assert_close(mine, trained, rtol=1e-4, atol=1e-5)
    path = sae.save(tmp_path / arch, hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
    theirs = sl.SAE.load_from_disk(str(path))
    assert theirs.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out" and theirs.cfg.d_out == D_OUT
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), load_sae(path)(x))
        torch.testing.assert_close(theirs(x), t(x))


def test_skip_transcoder_learns_the_linear_part():
    """On a target that is mostly a linear map of the input, W_skip (from zero) carries it: the skip transcoder's
    FVU ends far below the plain transcoder's at the same k and F."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(D_IN, D_OUT, generator=g) / D_IN**0.5
    fvu = {}
    for skip in (False, True):
        sae = make_sae("batchtopk", D_IN, F, d_out=D_OUT, skip=skip, variance=float(D_OUT), k=2, seed=5)
        if skip:
            assert torch.count_nonzero(sae.W_skip) == 0
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for _ in range(100):
            x = torch.randn(64, D_IN, generator=g)
            y = x @ a + 0.05 * torch.randn(64, D_OUT, generator=g)
            out = sae(x, target=y)
            out.loss.backward()
            sae.remove_parallel_grad()
            opt.step()
            opt.zero_grad()
            sae.normalize_decoder()
        fvu[skip] = float(out.fvu)
    assert fvu[True] < 0.05 and fvu[True] < 0.2 * fvu[False], fvu


def test_errors():
    with pytest.raises(SaeError, match="'topk' has no SAELens transcoder"):
        make_sae("topk", D_IN, F, d_out=D_OUT, variance=1.0, k=4)
    with pytest.raises(SaeError, match="skip connection needs a transcoder"):
        make_sae("batchtopk", D_IN, F, skip=True, variance=1.0, k=4)
    x, y = data()
    sae = make("batchtopk")
    with pytest.raises(SaeError, match=r"needs target rows \[32, 24\], got None"):
        sae(x)
    with pytest.raises(SaeError, match=r"needs target rows \[32, 24\], got \[32, 16\]"):
        sae(x, target=x)
    plain = make_sae("batchtopk", D_IN, F, variance=1.0, k=4)
    with pytest.raises(SaeError, match="target= is for transcoders"):
        plain(x, target=y)
    with pytest.raises(SaeError, match="only a transcoder has a target scale"):
        plain.set_target_scale(2.0)
    with pytest.raises(SaeError, match="pass target="):
        sae.init_from_sample(x)
    sae.init_from_sample(x, y)
    assert sae.b_dec.shape == (D_OUT,)


def test_a_transcoder_checkpoint_round_trips():
    """state_dict holds W_skip and target_scale (not the zero centre), and loads into a fresh module."""
    sae = make("batchtopk", skip=True)
    sae.set_target_scale(0.3)
    state = sae.state_dict()
    assert "W_skip" in state and "target_scale" in state and "_zero_centre" not in state
    fresh = make("batchtopk", skip=True, seed=9)
    fresh.load_state_dict(state)
    x, y = data(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, target=y).loss, sae(x, target=y).loss)
