"""`sae eval`: splicing, the metric definitions against a direct computation, reports, interop and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCHS, TINY_TEXT, make_model, make_tokenizer

from sae import rowtypes
from sae.config import EvalConfig
from sae.corpus import corpus_info, iter_contexts
from sae.errors import SaeError
from sae.evaluate import evaluate
from sae.evaluate.evaluate import PrefixReplay, RowTypes, SaeSpec, _sae_splice, _SaeState, resolve_dataset, run_pass
from sae.evaluate.metrics import bootstrap_weights, fvu_resampled, interval
from sae.evaluate.report import METRIC_KEYS, PLOTS
from sae.saedir import SaeConfig, SparseAutoencoder, load_sae, save_sae
from sae.sites import parse_site

D = 64
SITE = "blocks.1.hook_resid_post"
SEQ = 16
N_CONTEXTS = 24


def _text(seed: int, n_words: int = 4000) -> str:
    words = TINY_TEXT.split()
    rng = random.Random(seed)
    paras = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n_words // 40)]
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny Llama (4 layers, d=64) with its tokenizer, and train/held-out text files beside each other."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = root / "model"
    make_model("llama", n_layers=4, d_model=D).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(_text(1))
    (corpus / "heldout.txt").write_text(_text(2))
    return {"root": root, "model": model_dir, "train": corpus / "train.txt", "heldout": corpus / "heldout.txt"}


def identity_weights(d: int = D) -> dict[str, torch.Tensor]:
    """x̂ = relu(x) − relu(−x) = x exactly: latents [I, −I] with a zero threshold."""
    eye = torch.eye(d)
    return {
        "W_enc": torch.cat([eye, -eye], 1),
        "b_enc": torch.zeros(2 * d),
        "W_dec": torch.cat([eye, -eye], 0),
        "b_dec": torch.zeros(d),
        "threshold": torch.zeros(2 * d),
    }


def random_weights(d: int = D, f: int = 128, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(f, d, generator=g), dim=1) * scale
    return {
        "W_enc": w_dec.T.contiguous() / scale**2,
        "b_enc": -0.05 * torch.rand(f, generator=g),
        "W_dec": w_dec,
        "b_dec": 0.01 * torch.randn(d, generator=g),
        "threshold": 0.1 * torch.rand(f, generator=g),
    }


def make_sae(path, weights, *, env=None, hook=SITE, keep_bos=False, model=None, corpus=None, store=None, **cfg):
    """An SAE directory of ours (metadata as `sae train` writes it)."""
    meta = {"keep_bos": keep_bos}
    if model is not None:
        meta["model"] = model
    elif env is not None:
        meta["model"] = {"id": str(env["model"].resolve()), "revision": None, "sha256": None}
    if corpus is not None:
        meta["corpus"] = corpus
    if store is not None:
        meta["store"] = str(store)
    d_in = weights["W_enc"].shape[0]
    d_sae = weights["W_enc"].shape[1]
    arch = "jumprelu" if "threshold" in weights else cfg.pop("architecture", "standard")
    c = SaeConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=hook, complete=True, metadata=meta, **cfg)
    return save_sae(weights, c, path)


def run(env, dirs, tmp_path, **kw):
    kw.setdefault("model", str(env["model"]))
    kw.setdefault("dataset", str(env["heldout"]))
    cfg = EvalConfig(
        sae_dirs=tuple(dirs),
        out=tmp_path / "report",
        max_tokens=SEQ * N_CONTEXTS,
        seq_len=SEQ,
        batch_size=8,
        device="cpu",
        **kw,
    )
    out = evaluate(cfg)
    return {r["name"]: r for r in json.loads((out / "report.json").read_text())}


# --------------------------------------------------------------------------------------------------
# An independent computation of every metric, with a plain forward hook on the Llama block.


def direct_metrics(env, sae_dir, *, t0: int, mean: torch.Tensor | None = None) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["model"]).float().eval()
    tok = make_tokenizer()
    ctx = np.stack(list(iter_contexts(str(env["heldout"]), tok, seq_len=SEQ, max_tokens=SEQ * N_CONTEXTS)))
    ids = torch.tensor(ctx, dtype=torch.long)
    block = model.model.layers[1]
    sae = load_sae(sae_dir)
    seen = {}

    def forward(replace=None):
        def hook(mod, args, out):
            act = out[0] if isinstance(out, tuple) else out
            seen["x"] = act
            if replace is None:
                return None
            new = act.clone()
            new[:, t0:] = replace(act[:, t0:])
            return (new, *out[1:]) if isinstance(out, tuple) else new

        h = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            h.remove()

    def ce(logits):  # predictions made from positions t0..T-2
        return torch.nn.functional.cross_entropy(
            logits[:, t0:-1].reshape(-1, logits.shape[-1]), ids[:, t0 + 1 :].reshape(-1)
        ).item()

    with torch.no_grad():
        clean = forward()
        x = seen["x"][:, t0:].reshape(-1, D)
        a = sae.encode(x)
        x_hat = sae.decode(a)
        xbar = x.mean(0) if mean is None else mean
        spliced = forward(lambda v: sae.decode(sae.encode(v)))
        zero = forward(lambda v: torch.zeros_like(v))
        meaned = forward(lambda v: xbar.expand_as(v))
        lp_c = torch.log_softmax(clean[:, t0:-1], -1)
        lp_s = torch.log_softmax(spliced[:, t0:-1], -1)
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1).mean().item()
        fired = (a != 0).float()
        return {
            "ce_clean": ce(clean),
            "ce_sae": ce(spliced),
            "ce_zero": ce(zero),
            "ce_mean": ce(meaned),
            "kl": kl,
            "fvu": ((x - x_hat).square().sum() / (x - x.mean(0)).square().sum()).item(),
            "nmse": ((x - x_hat).square().sum() / x.square().sum()).item(),
            "cosine": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean().item(),
            "l0": fired.sum(-1).mean().item(),
            "dead_fraction": (fired.sum(0) == 0).float().mean().item(),
            "dense_fraction": (fired.mean(0) > 0.1).float().mean().item(),
            "n_tokens": x.shape[0],
            "n_ce_tokens": ids[:, t0 + 1 :].numel(),
        }


def check_against_direct(got, want):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert got["delta_ce"] == pytest.approx(want["ce_sae"] - want["ce_clean"], rel=1e-4, abs=1e-6)
    rec = (want["ce_zero"] - want["ce_sae"]) / (want["ce_zero"] - want["ce_clean"])
    rec_mean = (want["ce_mean"] - want["ce_sae"]) / (want["ce_mean"] - want["ce_clean"])
    assert got["ce_recovered"] == pytest.approx(rec, rel=1e-3)
    assert got["ce_recovered_mean"] == pytest.approx(rec_mean, rel=1e-3)
    assert sum(got["l0_histogram"]) == got["n_tokens"]


# --------------------------------------------------------------------------------------------------
# Splicing


def test_identity_and_zero_saes_and_report(env, tmp_path):
    """Identity SAE: CE_sae == CE_clean, KL == FVU == 0 exactly. Zero SAE: CE_sae == CE_zero exactly. A `sae
    train`-like folder (SAE subfolders plus a checkpoint folder) evaluates every SAE into one full report."""
    out = tmp_path / "saes"
    make_sae(out / "identity", identity_weights(), env=env)
    make_sae(out / "zero", {k: torch.zeros_like(v) for k, v in identity_weights().items()}, env=env)
    make_sae(out / "random", random_weights(), env=env, training_architecture="batchtopk", k=8)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "latest").write_text("step-10")
    r = run(env, [out], tmp_path)
    assert sorted(r) == ["identity", "random", "zero"]
    ident, zero = r["identity"], r["zero"]
    assert ident["ce_sae"] == ident["ce_clean"]
    assert ident["kl"] == 0.0 and ident["fvu"] == 0.0 and ident["nmse"] == 0.0
    assert ident["delta_ce"] == 0.0 and ident["ce_recovered"] == 1.0
    assert zero["ce_sae"] == zero["ce_zero"]
    assert zero["ce_recovered"] == 0.0 and zero["nmse"] == 1.0 and zero["l0"] == 0.0
    assert zero["dead_fraction"] == 1.0 and zero["cosine"] == 0.0
    assert ident["ce_clean"] == zero["ce_clean"] == r["random"]["ce_clean"]  # one clean pass for all
    # SAEBench's normalised KL: 1 for a perfect SAE, 0 for one no better than zero ablation
    assert ident["kl_score"] == 1.0 and zero["kl_score"] == pytest.approx(0.0, abs=1e-9) and zero["kl_zero"] > 0
    rnd = r["random"]
    for key, (lo, hi) in rnd["ci95"].items():
        assert lo <= rnd[key] <= hi, key
    types = rnd["row_types"]
    assert types["median_source"] == "eval tokens" and types["massive_factor"] == rowtypes.DEFAULT_MASSIVE_FACTOR
    assert types["typical"]["n_rows"] + types["massive"]["n_rows"] == types["all"]["n_rows"] == rnd["n_tokens"]
    for e in r.values():
        assert set(METRIC_KEYS) <= set(e)
        assert all(isinstance(e[k], (int, float)) for k in METRIC_KEYS)
        assert e["n_tokens"] == N_CONTEXTS * (SEQ - 1) and e["n_ce_tokens"] == N_CONTEXTS * (SEQ - 2)
        assert e["first_spliced_position"] == 1
        assert e["mean_source"] == "eval tokens"
    assert r["random"]["architecture"] == "batchtopk"
    report = tmp_path / "report"
    entries = json.loads((report / "report.json").read_text())
    assert isinstance(entries, list) and len(entries) == 3
    md = (report / "report.md").read_text()
    assert "| identity |" in md and "CE recovered" in md and "frontier.png" in md
    assert "## 95 % bootstrap intervals over contexts" in md and "random: typical" in md
    assert ident["sae_dir"] == str(out / "identity")  # as the user named it (through its folder), not resolved
    for name in PLOTS:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_match_direct_computation(env, tmp_path):
    """Every metric equals a plain computation with its own hook; BOS (position 0) stays clean when the SAE was
    trained without it, and CE counts the predictions made from positions 1..T-2."""
    path = make_sae(tmp_path / "sae", random_weights(seed=3), env=env)
    got = run(env, [path], tmp_path)["sae"]
    check_against_direct(got, direct_metrics(env, path, t0=1))
    assert 0 < got["l0"] < 128 and 0 < got["fvu"]


def _state(sae, t0, exclude=rowtypes.Exclusion(), median=1.0, factor=3.0, n_contexts=2):
    spec = SaeSpec(None, "s", sae, "h", bool(t0), None, None, None, exclude=exclude)
    return _SaeState(spec, None, t0, torch.device("cpu"), "threshold", RowTypes(median, factor, "test"), n_contexts)


def test_bos_left_clean_only_when_trained_without_it():
    sae = SparseAutoencoder(SaeConfig(architecture="standard", d_in=4, d_sae=8))  # all-zero weights: x̂ = 0
    act = torch.randn(2, 5, 4)
    for t0 in (0, 1):
        st = _state(sae, t0, median=None)
        out = _sae_splice(st, torch.zeros(2, 5, dtype=torch.long), 0)(act)
        assert torch.equal(out[:, :t0], act[:, :t0])
        assert not out[:, t0:].any()
        assert st.recon.n == 2 * (5 - t0)


def test_excluded_rows_stay_clean_and_row_groups_sum_to_all():
    """Rows the SAE never trained on (massive rows, a position, a token id) keep their activation and are in no
    metric; the typical and massive groups partition the spliced rows, their row and latent shares sum to 1."""
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(architecture="standard", d_in=4, d_sae=8))
    sae.load_state_dict({"W_enc": torch.randn(4, 8, generator=g), "b_enc": torch.zeros(8),
                         "W_dec": torch.randn(8, 4, generator=g), "b_dec": torch.zeros(4)})  # fmt: skip
    act = torch.nn.functional.normalize(torch.randn(2, 6, 4, generator=g), dim=-1)  # norms 1 = the median
    act[0, 3] *= 10  # massive (> 3 × median)
    act[1, 4] *= 5  # massive
    ids = torch.arange(12).view(2, 6)
    for exclude, left in (
        (rowtypes.Exclusion(), set()),
        (rowtypes.Exclusion(massive_factor=3.0), {(0, 3), (1, 4)}),
        (rowtypes.Exclusion(massive_threshold=7.0, positions=(2,), token_ids=(11,)), {(0, 3), (0, 2), (1, 2), (1, 5)}),
    ):
        st = _state(sae, 1, exclude)
        out = _sae_splice(st, ids, 0)(act)
        for b in range(2):
            for t in range(6):
                clean = t == 0 or (b, t) in left
                assert torch.equal(out[b, t], act[b, t]) == clean, (exclude, b, t)
        r = st.stats.result()
        assert st.stats.n_excluded == len(left) and r["n_tokens"] == 10 - len(left)
        groups = r["groups"]
        assert groups["typical"]["n_rows"] + groups["massive"]["n_rows"] == groups["all"]["n_rows"] == r["n_tokens"]
        assert groups["massive"]["n_rows"] == 2 - len(left & {(0, 3), (1, 4)})
        assert groups["typical"]["share_rows"] + groups["massive"]["share_rows"] == pytest.approx(1.0)
        budget = groups["typical"]["share_budget"] + (
            groups["massive"]["share_budget"] if groups["massive"]["n_rows"] else 0
        )
        assert budget == pytest.approx(1.0)
        assert st.stats.ctx_n.sum().item() == r["n_tokens"]


def test_bootstrap_intervals_shrink_with_more_contexts():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 640):
        err, sq = rng.gamma(2.0, 1.0, n), rng.gamma(20.0, 1.0, n) + 50
        sums, counts = rng.normal(size=(n, 3)), np.full(n, 10.0)
        w = bootstrap_weights(n, 500, seed=1)
        assert np.array_equal(w, bootstrap_weights(n, 500, seed=1)) and (w.sum(1) == n).all()
        lo, hi = interval(fvu_resampled(w, err, sums, sq, counts))
        point = fvu_resampled(np.ones((1, n)), err, sums, sq, counts)[0]
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/√n: 16× the contexts, about a quarter of the width


def test_shuffled_batch_mode_is_deterministic_for_a_seed(env, tmp_path):
    """Batch mode selects over seeded shuffles of all eval rows in batches of the training batch size: the same
    seed gives the same numbers, another seed other ones, and every batch keeps k per row on average."""
    path = make_sae(tmp_path / "btk", random_weights(seed=4), env=env, training_architecture="batchtopk", k=4)
    a = run(env, [path], tmp_path, mode="batch", batch_rows=40, bootstrap=0)["btk"]
    b = run(env, [path], tmp_path, mode="batch", batch_rows=40, bootstrap=0)["btk"]
    c = run(env, [path], tmp_path, mode="batch", batch_rows=40, bootstrap=0, seed=1)["btk"]
    assert a["batch_rows"] == 40 and a["l0"] == pytest.approx(4.0)
    assert a["l0_histogram"] == b["l0_histogram"] and a["fvu"] == b["fvu"] and a["ce_sae"] == b["ce_sae"]
    assert a["l0_histogram"] != c["l0_histogram"] and a["fvu"] != c["fvu"]
    assert a["ci95"] == {}


def test_batch_mode_keeps_k_per_token_on_average(env, tmp_path):
    path = make_sae(tmp_path / "btk", random_weights(seed=4), env=env, training_architecture="batchtopk", k=4)
    batch = run(env, [path], tmp_path, mode="batch")["btk"]
    assert batch["l0"] == pytest.approx(4.0)
    assert batch["mode"] == "batch"
    threshold = run(env, [path], tmp_path, mode="threshold")["btk"]
    assert threshold["l0"] != pytest.approx(4.0)
    assert threshold["ce_clean"] == batch["ce_clean"]
    # `both`: one pass, an entry per mode for the BatchTopK SAE (the same numbers as the separate runs), one
    # entry for an SAE that has a single encoder
    other = make_sae(tmp_path / "jr", random_weights(seed=5), env=env)
    both = run(env, [path, other], tmp_path, mode="both")
    assert sorted(both) == ["btk", "btk (batch)", "jr"]
    assert [both[n]["mode"] for n in ("btk", "btk (batch)", "jr")] == ["threshold", "batch", "threshold"]
    for name, alone in (("btk", threshold), ("btk (batch)", batch)):
        for key in ("l0", "fvu", "ce_sae", "kl", "ce_zero", "ce_mean", "dead_fraction"):
            assert both[name][key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), (name, key)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_replay_changes_nothing(arch):
    """Running only the blocks from the site on (replaying the clean prefix) gives the same numbers as full
    forwards, at every site kind and at the last layer; identity SAEs stay exact."""
    model = make_model(arch, n_layers=3, d_model=D)
    hooks = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]
    specs = []
    for i, hook in enumerate(hooks):
        for kind, w in (("id", identity_weights()), ("rand", random_weights(seed=i, scale=3.0))):
            sae = SparseAutoencoder(SaeConfig(architecture="jumprelu", d_in=D, d_sae=128, hook_name=hook))
            sae.load_state_dict(w)
            specs.append(SaeSpec(None, f"{kind}{i}", sae, hook, i % 2 == 0, None, None, None))
    sites = {h: parse_site(h, model) for h in hooks}
    means = {(h, t0): (torch.full((D,), 0.5), "test") for h in hooks for t0 in (0, 1)}
    ids = np.random.default_rng(0).integers(1, 320, (6, 12)).astype(np.int32)
    cfg = EvalConfig(batch_size=4)
    fast = run_pass(model, ids, specs, sites, means, cfg, reuse_prefix=True)
    slow = run_pass(model, ids, specs, sites, means, cfg, reuse_prefix=False)
    for a, b in zip(fast[0], slow[0], strict=True):
        assert a.ce.ce == pytest.approx(b.ce.ce, rel=1e-6) and a.ce.mean_kl == pytest.approx(b.ce.mean_kl, abs=1e-7)
        assert a.recon.result()["fvu"] == pytest.approx(b.recon.result()["fvu"], rel=1e-6)
        if a.spec.name.startswith("id"):
            assert a.ce.ce == fast[1][a.t0].ce and a.ce.mean_kl == 0.0
    for key in fast[2]:
        for kind in ("zero", "mean"):
            assert fast[2][key][kind].ce == pytest.approx(slow[2][key][kind].ce, rel=1e-6)
    assert not any("forward" in vars(b) for b in PrefixReplay(model, list(sites.values())).blocks)


# --------------------------------------------------------------------------------------------------
# Means, interop, data choice


def test_mean_from_store(env, tmp_path):
    from _synthetic import make_store

    from sae.store import Store

    store = make_store(tmp_path / "s.zarr", d=D, sites=(SITE,), dtype="float32", model=str(env["model"].resolve()))
    path = make_sae(tmp_path / "sae", random_weights(seed=5), env=env, store=store)
    got = run(env, [path], tmp_path)["sae"]  # the store recorded in the SAE cfg
    assert got["mean_source"] == f"store {store}"
    mean = Store.open(store).stats(SITE, skip_bos=True).mean
    want = direct_metrics(env, path, t0=1, mean=mean)
    assert got["ce_mean"] == pytest.approx(want["ce_mean"], rel=1e-4)
    got2 = run(env, [make_sae(tmp_path / "sae2", random_weights(seed=5), env=env)], tmp_path, store=store)
    assert got2["sae2"]["ce_mean"] == got["ce_mean"]  # --store
    other = make_store(tmp_path / "other.zarr", d=D, sites=(SITE,), dtype="float32", model="gpt2")
    with pytest.raises(SaeError, match="activations of model 'gpt2'"):
        run(env, [tmp_path / "sae2"], tmp_path, store=other)
    with pytest.raises(SaeError, match="no site"):
        sae3 = make_sae(tmp_path / "sae3", random_weights(), env=env, hook="blocks.0.hook_resid_post")
        run(env, [sae3], tmp_path, store=store)


def test_saelens_jumprelu_directory(env, tmp_path):
    """A directory in SAELens 6's exact file contract (per-latent thresholds, no BOS notion): loads, is spliced
    at every position, and matches the direct computation."""
    from safetensors.torch import save_file

    path = tmp_path / "saelens"
    path.mkdir()
    w = random_weights(seed=6)
    w["threshold"] = torch.linspace(0.0, 0.3, 128)
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "sae_weights.safetensors"))
    cfg = {
        "d_in": D,
        "d_sae": 128,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "dataset_path": "monology/pile-uncopyrighted",
            "hook_name": SITE,
            "model_name": str(env["model"]),
            "model_class_name": "HookedTransformer",
            "hook_head_index": None,
            "context_size": 128,
            "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
            "prepend_bos": True,
            "exclude_special_tokens": False,
            "sequence_separator_token": "bos",
            "disable_concat_sequences": False,
        },
        "architecture": "jumprelu",
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    got = run(env, [path], tmp_path, model=None)["saelens"]  # model from metadata.model_name
    assert got["first_spliced_position"] == 0 and got["architecture"] == "jumprelu"
    assert got["n_tokens"] == N_CONTEXTS * SEQ and got["n_ce_tokens"] == N_CONTEXTS * (SEQ - 1)
    check_against_direct(got, direct_metrics(env, path, t0=0))


def test_default_data_is_the_heldout_split(env, tmp_path):
    trained = corpus_info(str(env["train"]), split="train")
    path = make_sae(tmp_path / "sae", identity_weights(), env=env, corpus=trained)
    got = run(env, [path], tmp_path, dataset=None)["sae"]
    assert got["dataset"] == str(env["heldout"].resolve())
    spec = SaeSpec(path, "s", None, SITE, True, None, {"id": "shakespeare", "split": "train"}, None)
    assert resolve_dataset(EvalConfig(), [spec]) == ("shakespeare", "heldout")
    concat = spec._replace(corpus={"concat": [trained, spec.corpus]})  # a store made by `sae concat`
    with pytest.raises(SaeError, match="2 training corpora"):
        resolve_dataset(EvalConfig(), [concat])


def test_refuses_training_data_unless_allowed(env, tmp_path):
    trained = corpus_info(str(env["train"]), split="train")
    path = make_sae(tmp_path / "sae", identity_weights(), env=env, corpus=trained)
    with pytest.raises(SaeError, match="allow-train-data"):
        run(env, [path], tmp_path, dataset=str(env["train"]))
    both = {"concat": [{"id": "shakespeare", "split": "train"}, trained]}
    with pytest.raises(SaeError, match="allow-train-data"):
        run(
            env,
            [make_sae(tmp_path / "concat", identity_weights(), env=env, corpus=both)],
            tmp_path,
            dataset=str(env["train"]),
        )
    got = run(env, [path], tmp_path, dataset=str(env["train"]), allow_train_data=True)["sae"]
    assert got["ce_sae"] == got["ce_clean"]


# --------------------------------------------------------------------------------------------------
# Bad input


def test_d_in_mismatch(env, tmp_path):
    path = make_sae(tmp_path / "small", random_weights(d=32), env=env)
    with pytest.raises(SaeError, match="d_in 32.*width 64"):
        run(env, [path], tmp_path)


@pytest.mark.parametrize(
    ("hook", "match"), [("blocks.9.hook_resid_post", "out of range"), ("blocks.1.hook_z", "unknown site")]
)
def test_unknown_site(env, tmp_path, hook, match):
    path = make_sae(tmp_path / "sae", identity_weights(), env=env, hook=hook)
    with pytest.raises(SaeError, match=match):
        run(env, [path], tmp_path)


def test_corrupt_or_missing_weights(env, tmp_path):
    path = make_sae(tmp_path / "sae", identity_weights(), env=env)
    (path / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SaeError, match="corrupt"):
        run(env, [path], tmp_path)
    (path / "sae_weights.safetensors").unlink()
    with pytest.raises(SaeError, match="missing"):
        run(env, [path], tmp_path)
    with pytest.raises(SaeError, match="does not exist"):
        run(env, [tmp_path / "nowhere"], tmp_path)
    assert not (tmp_path / "report").exists()


def test_model_mismatch_needs_force(env, tmp_path, capsys):
    other = {"id": "/models/another-llama", "revision": None, "sha256": "0" * 64}
    path = make_sae(tmp_path / "sae", identity_weights(), env=env, model=other)
    with pytest.raises(SaeError, match="--force"):
        run(env, [path], tmp_path)
    got = run(env, [path], tmp_path, force=True)["sae"]
    assert got["ce_sae"] == got["ce_clean"]
    assert "WARNING" in capsys.readouterr().err


def test_cli(env, tmp_path):
    from click.testing import CliRunner

    from sae.cli import main

    make_sae(tmp_path / "saes" / "a", identity_weights(), env=env)
    make_sae(tmp_path / "saes" / "b", random_weights(), env=env)
    args = ["eval", str(tmp_path / "saes" / "*"), "--out", str(tmp_path / "rep"), "--dataset", str(env["heldout"])]
    args += ["--max-tokens", str(SEQ * 8), "--seq-len", str(SEQ), "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "rep" / "report.json").read_text())) == 2
    make_sae(tmp_path / "bad", random_weights(d=32), env=env)
    # with eval data named: the data is checked before the model loads, the SAE's width after
    bad = ["eval", str(tmp_path / "bad"), "--out", str(tmp_path / "rep2"), "--dataset", str(env["heldout"])]
    res = CliRunner().invoke(main, bad)
    assert res.exit_code == 2 and "d_in 32" in res.output


def test_report_shows_a_recorded_store_as_the_user_would_type_it(tmp_path, monkeypatch):
    """An SAE records its store's absolute path; the report shows one under the working directory relative to it
    (no absolute paths the user never typed), and others as they are."""
    from sae.evaluate.evaluate import _shown

    monkeypatch.chdir(tmp_path)
    assert _shown(tmp_path / "run" / "store.zarr") == str(Path("run") / "store.zarr")
    assert _shown("/elsewhere/store.zarr") == "/elsewhere/store.zarr"


def test_a_moved_run_finds_its_store_and_the_report_says_where_statistics_come_from(env, tmp_path):
    """An SAE records its store relative to its own directory too: a run moved as a whole still finds it, and
    the report names the store (or says it is missing) and marks a snapshot."""
    import shutil

    from _synthetic import make_store

    run_dir = tmp_path / "run"
    store = make_store(run_dir / "store.zarr", d=D, sites=(SITE,), dtype="float32", model=str(env["model"].resolve()))
    path = make_sae(run_dir / "saes" / "sae", random_weights(seed=5), env=env, store=store.resolve())
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["store_relative"] = "../../store.zarr"
    cfg["metadata"]["sae_pipeline_version"], cfg["metadata"]["complete"] = "0.1.0", False
    cfg["metadata"]["tokens_seen"] = 4096
    (path / "cfg.json").write_text(json.dumps(cfg))
    shutil.move(run_dir, tmp_path / "moved")

    moved = tmp_path / "moved" / "saes" / "sae"
    got = run(env, [moved], tmp_path)["sae"]
    assert got["store"] == str(tmp_path / "moved" / "store.zarr")
    assert got["store_note"] == "found relative to the SAE directory"
    assert got["mean_source"].startswith("store ") and got["row_types"]["median_source"].startswith("store ")
    assert got["training_complete"] is False and got["tokens_seen"] == 4096
    md = (tmp_path / "report" / "report.md").read_text()
    assert "sae: **a snapshot taken before its training finished** (4,096 tokens seen)" in md
    assert "found relative to the SAE directory" in md
    settings = json.loads((tmp_path / "report" / "settings.json").read_text())
    assert settings["stage"] == "eval" and settings["settings"]["max_tokens"] == SEQ * N_CONTEXTS

    # Without the store anywhere, the report says so instead of silently using the eval tokens.
    shutil.rmtree(tmp_path / "moved" / "store.zarr")
    got = run(env, [moved], tmp_path)["sae"]
    assert got["store"] is None and got["store_note"].startswith(f"recorded store {store.resolve()} not found")
    assert got["row_types"]["median_source"] == "eval tokens"
    assert "not found (moved or deleted)" in (tmp_path / "report" / "report.md").read_text()
