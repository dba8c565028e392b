"""`sae eval` on transcoders: one forward reads the input site and replaces the output site with the prediction;
every metric against a plain computation with its own hooks; zero and mean ablation of the output site; batch
mode; SAELens-made transcoders; bad directories in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_model, make_tokenizer
from test_evaluate import N_CONTEXTS, SEQ, D, _text, run

from sae import rowtypes
from sae.cli import main
from sae.corpus import iter_contexts
from sae.saedir import SaeConfig, SparseAutoencoder, load_sae, save_sae

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
F = 96


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """test_evaluate's setting: a saved tiny Llama (4 layers, d=64) and a held-out text file."""
    root = tmp_path_factory.mktemp("tceval")
    make_model("llama", n_layers=4, d_model=D).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "heldout.txt").write_text(_text(2))
    return {"root": root, "model": root / "model", "heldout": root / "heldout.txt"}


def make_tc(path, env, *, arch="transcoder", seed=0, zero=False, hook=IN, hook_out=OUT, d_out=D, **kw):
    """A transcoder directory of ours (metadata as `sae train` writes it: trained without BOS)."""
    meta = {"keep_bos": False, "model": {"id": str(env["model"].resolve()), "revision": None, "sha256": None}}
    cfg = SaeConfig(arch, D, F, d_out, hook_name=hook, hook_name_out=hook_out, complete=True, metadata=meta, **kw)
    t = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.copy_(torch.zeros_like(p) if zero else torch.randn(p.shape, generator=g) * (0.3 if "W" in name else 0.05))
        if cfg.layout.activation == "jumprelu":
            t.threshold.copy_(torch.rand(F, generator=g) * (0.0 if zero else 0.5))
    return save_sae(t, None, path)


def direct_metrics(env, tc_dir, *, t0: int = 1) -> dict[str, float]:
    """The metrics with plain forward hooks on the Llama block's post-attention norm (the input) and MLP (the
    output it replaces)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["model"]).float().eval()
    ctx = np.stack(list(iter_contexts(str(env["heldout"]), make_tokenizer(), seq_len=SEQ, max_tokens=SEQ * N_CONTEXTS)))
    ids = torch.tensor(ctx, dtype=torch.long)
    block = model.model.layers[1]
    tc = load_sae(tc_dir)
    seen = {}

    def forward(replace=None):
        def read(mod, args, out):
            seen["x"] = out

        def write(mod, args, out):
            seen["y"] = out
            if replace is None:
                return None
            new = out.clone()
            new[:, t0:] = replace(seen["x"][:, t0:], out[:, t0:])
            return new

        hs = [block.post_attention_layernorm.register_forward_hook(read), block.mlp.register_forward_hook(write)]
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            for h in hs:
                h.remove()

    def ce(logits):
        return torch.nn.functional.cross_entropy(
            logits[:, t0:-1].reshape(-1, logits.shape[-1]), ids[:, t0 + 1 :].reshape(-1)
        ).item()

    with torch.no_grad():
        clean = forward()
        x, y = seen["x"][:, t0:].reshape(-1, D), seen["y"][:, t0:].reshape(-1, D)
        a = tc.encode(x)
        y_hat = tc.decode(a, x)
        ybar = y.mean(0)
        spliced = forward(lambda xs, ys: tc(xs))
        zero = forward(lambda xs, ys: torch.zeros_like(ys))
        meaned = forward(lambda xs, ys: ybar.expand_as(ys))
        lp_c = torch.log_softmax(clean[:, t0:-1], -1)
        lp_s = torch.log_softmax(spliced[:, t0:-1], -1)
        fired = (a != 0).float()
        return {
            "ce_clean": ce(clean),
            "ce_sae": ce(spliced),
            "ce_zero": ce(zero),
            "ce_mean": ce(meaned),
            "kl": (lp_c.exp() * (lp_c - lp_s)).sum(-1).mean().item(),
            "fvu": ((y - y_hat).square().sum() / (y - ybar).square().sum()).item(),
            "nmse": ((y - y_hat).square().sum() / y.square().sum()).item(),
            "l0": fired.sum(-1).mean().item(),
            "dead_fraction": (fired.sum(0) == 0).float().mean().item(),
            "n_tokens": x.shape[0],
        }


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_skip_transcoder"])
def test_metrics_match_direct_computation(env, tmp_path, arch):
    """CE (spliced, zero- and mean-ablated output), KL, FVU and NMSE of the prediction against the true output,
    L0 and dead latents equal a plain two-hook computation; the skip connection reads the input site."""
    path = make_tc(tmp_path / "tc", env, arch=arch, seed=3)
    got = run(env, [path], tmp_path)["tc"]
    want = direct_metrics(env, path)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    rec = (want["ce_zero"] - want["ce_sae"]) / (want["ce_zero"] - want["ce_clean"])
    assert got["ce_recovered"] == pytest.approx(rec, rel=1e-3)
    assert got["hook_name"] == IN and got["target_site"] == OUT and got["skip"] == ("skip" in arch)
    assert 0 < got["fvu"] and got["ce_sae"] != got["ce_clean"]
    types = got["row_types"]  # the output site's rows, typed by their own norms
    assert types["typical"]["n_rows"] + types["massive"]["n_rows"] == types["all"]["n_rows"] == got["n_tokens"]
    for key, (lo, hi) in got["ci95"].items():
        assert lo <= got[key] <= hi, key
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"`{IN}` → `{OUT}`" in md


def test_zero_transcoder_is_zero_ablation_of_the_output(env, tmp_path):
    """A transcoder predicting 0 everywhere gives exactly the zero-ablated CE of the output site (so ablation is
    of the output site, not of the input), CE recovered 0, NMSE 1."""
    path = make_tc(tmp_path / "zero", env, zero=True)
    r = run(env, [path], tmp_path)["zero"]
    assert r["ce_sae"] == r["ce_zero"] and r["ce_recovered"] == 0.0
    assert r["nmse"] == 1.0 and r["l0"] == 0.0 and r["dead_fraction"] == 1.0


def test_batch_mode_and_massive_output_rows(env, tmp_path):
    """A BatchTopK-trained transcoder is evaluated in both modes; batch mode keeps k per row on average. A massive
    factor below every row's norm ratio makes the massive group hold the rows above it, judged on the output."""
    path = make_tc(tmp_path / "btk", env, arch="jumprelu_transcoder", training_architecture="batchtopk", k=6.0)
    r = run(env, [path], tmp_path, mode="both", batch_rows=64)
    assert sorted(r) == ["btk", "btk (batch)"]
    assert r["btk (batch)"]["l0"] == pytest.approx(6.0, rel=0.02)
    assert r["btk (batch)"]["mode"] == "batch" and r["btk (batch)"]["target_site"] == OUT
    r2 = run(env, [path], tmp_path / "m", mode="threshold", massive_factor=1.2)["btk"]
    types = r2["row_types"]
    assert types["median_source"] == "eval tokens" and types["massive"]["n_rows"] > 0
    assert types["typical"]["n_rows"] + types["massive"]["n_rows"] == r2["n_tokens"]
    # the median is the output site's (mlp_out rows), not the input's
    from transformers import AutoModelForCausalLM

    from sae.sites import capture, parse_site

    model = AutoModelForCausalLM.from_pretrained(env["model"]).float().eval()
    ctx = np.stack(list(iter_contexts(str(env["heldout"]), make_tokenizer(), seq_len=SEQ, max_tokens=SEQ * N_CONTEXTS)))
    with torch.no_grad():
        acts = capture(model, [parse_site(OUT, model)], torch.tensor(ctx, dtype=torch.long))
    y = next(iter(acts.values()))[:, 1:].reshape(-1, D)
    assert types["median_norm"] == pytest.approx(float(rowtypes.row_norms(y).median()), rel=1e-5)


def test_saelens_made_transcoder(env, tmp_path):
    """A transcoder sae-lens saved (its own cfg.json, no metadata of ours) evaluates with --model; it is spliced
    at every position (it records no BOS handling)."""
    sl = pytest.importorskip("sae_lens")
    ours = make_tc(tmp_path / "ours", env, arch="skip_transcoder", seed=5)
    theirs = sl.SAE.load_from_disk(str(ours))
    theirs.save_model(tmp_path / "theirs")
    cfg = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if k in ("hook_name", "hook_name_out", "model_name")}
    (tmp_path / "theirs" / "cfg.json").write_text(json.dumps(cfg))
    r = run(env, [tmp_path / "theirs"], tmp_path)["theirs"]
    assert r["first_spliced_position"] == 0 and r["target_site"] == OUT and r["skip"]
    want = direct_metrics(env, tmp_path / "theirs", t0=0)
    assert r["ce_sae"] == pytest.approx(want["ce_sae"], rel=1e-4) and r["fvu"] == pytest.approx(want["fvu"], rel=1e-4)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hook": "blocks.2.ln2.hook_normalized"}, "computes after its output site"),
        ({"d_out": 48}, "has d_out 48, but site blocks.1.hook_mlp_out"),
        ({"hook_out": "blocks.1.hook_nothing"}, "hook_nothing"),
    ],
)
def test_bad_transcoder_is_one_line(env, tmp_path, changes, match):
    path = make_tc(tmp_path / "bad", env, **changes)
    r = CliRunner().invoke(
        main,
        ["eval", str(path), "--model", str(env["model"]), "--dataset", str(env["heldout"]), "--out",
         str(tmp_path / "rep"), "--max-tokens", str(SEQ * 4), "--seq-len", str(SEQ), "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not (tmp_path / "rep" / "report.json").exists()
