"""The SAE directory format (SAELens layout) and the inference SparseAutoencoder (sae.saedir)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sae import architectures
from sae.errors import SaeError
from sae.saedir import (
    CFG_FILE,
    WEIGHTS_FILE,
    SaeConfig,
    SparseAutoencoder,
    checkpoint_path,
    is_complete,
    load_sae,
    read_cfg,
    save_sae,
    sweep,
    sweep_names,
)
from sae.train.archs import make_sae
from sae.train.archs.base import TrainingSae

D, F = 16, 64
ARCHS = list(architectures.NAMES)
OPTIONS = {"batchtopk": {"k": 4}, "topk": {"k": 4}, "jumprelu": {"init_threshold": 0.3}, "matryoshka": {"k": 4}}
META = {"store": "/runs/store.zarr", "keep_bos": False, "tokens_seen": 123456, "model": {"id": "gpt2"}}


def trained(arch: str, seed: int = 0) -> TrainingSae:
    """A training SAE with non-trivial weights, scale and θ, as if trained for a while."""
    torch.manual_seed(seed)
    sae = make_sae(arch, D, F, variance=1.0, seed=seed, **OPTIONS.get(arch, {}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.threshold.mul_(torch.exp(torch.randn(F) * 0.3))
    sae.set_input_scale(2.5)
    if sae.info.has_theta:
        sae.update_theta(torch.tensor(0.25))
    return sae


def raw_batch(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 0.6


def exported_dir(tmp_path, arch: str):
    sae = trained(arch).export(model_name="gpt2", hook_name="blocks.1.hook_resid_post", complete=True, metadata=META)
    path = tmp_path / arch
    save_sae(sae, None, path)
    return sae, path


def sae_lens():
    return pytest.importorskip("sae_lens")


# --------------------------------------------------------------------------------------------------
# Our own round trip


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    sae, path = exported_dir(tmp_path, arch)
    assert sorted(p.name for p in path.iterdir()) == [CFG_FILE, WEIGHTS_FILE]
    loaded = load_sae(path)
    assert set(loaded.state_dict()) == set(sae.state_dict())
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    c = loaded.cfg
    assert (c.architecture, c.d_in, c.d_sae, c.training_architecture) == (sae.cfg.architecture, D, F, arch)
    assert (c.model_name, c.hook_name, c.complete, c.input_scale) == ("gpt2", "blocks.1.hook_resid_post", True, 2.5)
    assert c.metadata["store"] == META["store"] and c.metadata["model"] == {"id": "gpt2"}
    assert c.theta == (pytest.approx(0.25) if architectures.get(arch).has_theta else None)
    assert c.k == (4 if architectures.get(arch).sweep == "k" else None)
    x = raw_batch()
    torch.testing.assert_close(loaded(x), sae(x))
    torch.testing.assert_close(loaded.encode_batch(x), sae.encode_batch(x))
    assert is_complete(path)


def test_cfg_json_layout(tmp_path):
    _, path = exported_dir(tmp_path, "batchtopk")
    cfg = json.loads((path / CFG_FILE).read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is True and cfg["d_in"] == D and cfg["d_sae"] == F
    meta = cfg["metadata"]
    assert meta["training_architecture"] == "batchtopk" and meta["k"] == 4 and meta["theta"] == pytest.approx(0.25)
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["model_name"] == "gpt2"
    assert meta["sae_lens_version"] >= "6"  # else SAELens rebuilds metadata as a pre-6.0 config, dropping ours


TOP = ["architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations"]
SAE_HEAD = ["sae_lens_version", "sae_lens_training_version", "sae_pipeline_version", "hook_head_index", "prepend_bos"]
OURS = ["model_name", "hook_name", "training_architecture", "theta", "input_scale", "complete"]


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_cfg_json_keys_and_their_order(tmp_path, arch):
    """An SAE's cfg.json has these keys in this order (one writer serves SAEs and transcoders; a transcoder's are
    pinned in test_transcoder_format): no d_out, hook_name_out or target_scale."""
    _, path = exported_dir(tmp_path, arch)
    cfg = json.loads((path / CFG_FILE).read_text())
    topk = ["k", "rescale_acts_by_decoder_norm"] if arch == "topk" else []
    assert list(cfg) == [*TOP, "reshape_activations", "metadata", *topk]
    assert list(cfg["metadata"]) == [*SAE_HEAD, *META, "recon_variance", *OURS, "k"]


def test_batchtopk_encode_batch_keeps_k_per_row_on_average(tmp_path):
    sae, _ = exported_dir(tmp_path, "batchtopk")
    x = raw_batch(50)
    a = sae.encode_batch(x)
    assert int((a > 0).sum()) == 4 * 50
    counts = (a > 0).sum(1)
    assert len(set(counts.tolist())) > 1
    pre = sae.pre_acts(x)
    kept = a > 0
    assert torch.all(pre[kept].min() >= pre[~kept].max())  # the largest ones
    # inference mode: the exported θ
    torch.testing.assert_close(sae.encode(x), pre.relu() * (pre > 0.25))


def test_overwrite_keeps_other_files_and_is_atomic(tmp_path, monkeypatch):
    sae, path = exported_dir(tmp_path, "topk")
    (path / "training_state.json").write_text("{}")
    (path / "extra").mkdir()
    (path / "extra" / "f.txt").write_text("x")
    newer = trained("topk", seed=3).export(hook_name="h")
    save_sae(newer, None, path)
    assert (path / "training_state.json").read_text() == "{}" and (path / "extra" / "f.txt").read_text() == "x"
    assert torch.equal(load_sae(path).W_dec, newer.W_dec)

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_sae(sae, None, path)
    assert torch.equal(load_sae(path).W_dec, newer.W_dec)  # the previous directory is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topk"]  # no temporary folder left behind


def test_load_errors(tmp_path):
    _, path = exported_dir(tmp_path, "relu")
    with pytest.raises(SaeError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (path / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SaeError, match="corrupt"):
        load_sae(path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(SaeError, match="sae_weights.safetensors is missing"):
        load_sae(path)
    _, path = exported_dir(tmp_path, "jumprelu")
    weights = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(SaeError, match="corrupt"):
        load_sae(path)
    (path / WEIGHTS_FILE).write_bytes(weights)
    cfg = json.loads((path / CFG_FILE).read_text())
    (path / CFG_FILE).write_text(json.dumps({**cfg, "d_sae": F + 1}))
    with pytest.raises(SaeError, match="shape"):
        load_sae(path)
    (path / CFG_FILE).write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SaeError, match="not supported"):
        load_sae(path)
    (path / CFG_FILE).write_text("{not json")
    with pytest.raises(SaeError, match="JSON"):
        load_sae(path)
    (path / CFG_FILE).unlink()
    with pytest.raises(SaeError, match="cfg.json is missing"):
        load_sae(path)
    assert not is_complete(path)


def test_missing_threshold_is_an_error(tmp_path):
    sae, path = exported_dir(tmp_path, "jumprelu")
    w = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    save_file(w, str(path / WEIGHTS_FILE))
    with pytest.raises(SaeError, match="threshold"):
        load_sae(path)


def test_save_rejects_bad_weights(tmp_path):
    cfg = SaeConfig("standard", D, F)
    with pytest.raises(SaeError, match="shape"):
        save_sae(
            {
                "W_enc": torch.zeros(D, F),
                "W_dec": torch.zeros(F, D + 1),
                "b_enc": torch.zeros(F),
                "b_dec": torch.zeros(D),
            },
            cfg,
            tmp_path / "s",
        )
    with pytest.raises(SaeError, match="topk SAE needs"):
        SaeConfig("topk", D, F).to_dict()
    with pytest.raises(SaeError, match="shadow"):
        SaeConfig("standard", D, F, metadata={"items": 1}).to_dict()
    assert not (tmp_path / "s").exists()


def test_is_complete_needs_the_flag(tmp_path):
    sae = trained("batchtopk").export(hook_name="h")  # complete defaults to False (an intermediate save)
    save_sae(sae, None, tmp_path / "a")
    assert not is_complete(tmp_path / "a") and not is_complete(tmp_path / "missing")
    save_sae(sae, sae.cfg.replace(complete=True), tmp_path / "a")
    assert is_complete(tmp_path / "a")


# --------------------------------------------------------------------------------------------------
# SAELens compatibility


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_loads_our_directories(tmp_path, arch):
    sl = sae_lens()
    ours, path = exported_dir(tmp_path, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sl.SAE.load_from_disk(str(path))
    assert theirs.cfg.architecture() == ours.cfg.architecture
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.metadata.training_architecture == arch
    assert theirs.cfg.metadata.store == META["store"]  # our metadata survives
    x = raw_batch(30)
    mine = load_sae(path)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), mine.encode(x), rtol=1e-5, atol=1e-6)
        a = mine.encode(x)
        assert (a > 0).any()
        torch.testing.assert_close(theirs.decode(a), mine.decode(a), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), mine(x), rtol=1e-5, atol=1e-6)


def _sae_lens_dir(tmp_path, name, cls_name, cfg_name, **kw):
    sl = sae_lens()
    cfg = getattr(sl, cfg_name)(
        d_in=D, d_sae=F, metadata=sl.saes.sae.SAEMetadata(hook_name="blocks.0.hook_resid_pre"), **kw
    )
    torch.manual_seed(7)
    sae = getattr(sl, cls_name)(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(F) * 0.5)  # one threshold per latent
    sae.save_model(str(tmp_path / name))
    return sae, tmp_path / name


@pytest.mark.parametrize(
    "name,cls_name,cfg_name,kw",
    [
        ("jumprelu", "JumpReLUSAE", "JumpReLUSAEConfig", {}),
        ("topk", "TopKSAE", "TopKSAEConfig", {"k": 5}),
        ("standard", "StandardSAE", "StandardSAEConfig", {}),
    ],
)
def test_sae_lens_made_directories_load(tmp_path, name, cls_name, cfg_name, kw):
    theirs, path = _sae_lens_dir(tmp_path, name, cls_name, cfg_name, **kw)
    mine = load_sae(path)
    assert mine.cfg.architecture == name and mine.cfg.hook_name == "blocks.0.hook_resid_pre"
    if name == "jumprelu":
        assert mine.threshold.unique().numel() == F
        assert not mine.batch_topk  # no k: batch mode falls back to the thresholds
    x = torch.randn(25, D)
    with torch.no_grad():
        torch.testing.assert_close(mine.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.encode_batch(x), mine.encode(x))


def test_hand_built_jumprelu_directory(tmp_path):
    """A SAELens-style directory written by hand: per-latent threshold vector, legacy log_threshold too."""
    path = tmp_path / "gemmascope-like"
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    w = {
        "W_enc": torch.randn(D, F, generator=g),
        "W_dec": torch.randn(F, D, generator=g),
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g) * 0.1,
        "threshold": torch.rand(F, generator=g) + 0.5,
    }
    save_file(w, str(path / WEIGHTS_FILE))
    cfg = {
        "architecture": "jumprelu",
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "model_name": "gemma-2-2b", "hook_name": "blocks.3.hook_resid_post"},
    }
    (path / CFG_FILE).write_text(json.dumps(cfg))
    sae = load_sae(path)
    x = torch.randn(30, D, generator=g)
    pre = x @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input False: b_dec not subtracted
    expected = pre.relu() * (pre > w["threshold"])
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae(x), expected @ w["W_dec"] + w["b_dec"])
    assert sae.cfg.model_name == "gemma-2-2b" and read_cfg(path).hook_name == "blocks.3.hook_resid_post"

    w["log_threshold"] = w.pop("threshold").log()
    save_file(w, str(path / WEIGHTS_FILE))
    torch.testing.assert_close(load_sae(path).encode(x), expected, rtol=1e-5, atol=1e-5)


def test_pre_6_flat_config(tmp_path):
    path = tmp_path / "old"
    path.mkdir()
    sae, _ = exported_dir(tmp_path, "topk")
    save_file({k: v for k, v in sae.state_dict().items()}, str(path / WEIGHTS_FILE))
    cfg = {
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "hook_point": "blocks.2.hook_resid_pre",
        "model_name": "gpt2",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": True,
    }
    (path / CFG_FILE).write_text(json.dumps(cfg))
    loaded = load_sae(path)
    assert (loaded.cfg.architecture, loaded.cfg.k, loaded.cfg.hook_name) == ("topk", 4, "blocks.2.hook_resid_pre")
    x = raw_batch()
    torch.testing.assert_close(loaded(x), sae(x))


def test_load_dtype_and_device(tmp_path):
    _, path = exported_dir(tmp_path, "batchtopk")
    sae = load_sae(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in sae.parameters())
    out = sae.encode_batch(raw_batch().bfloat16())
    assert out.dtype == torch.bfloat16
    assert isinstance(sae, SparseAutoencoder)


# --------------------------------------------------------------------------------------------------
# Sweep naming


def test_sweep_names():
    from sae.config import TrainConfig

    cfg = TrainConfig(arch=("batchtopk", "relu", "jumprelu", "topk"), k=(16, 32), expansion=(8,), l0_coeff=(0.5, 2.0))
    assert sweep_names(cfg) == [
        "batchtopk-k16-x8",
        "batchtopk-k32-x8",
        "relu-x8",
        "jumprelu-l0c0.5-x8",
        "jumprelu-l0c2-x8",
        "topk-k16-x8",
        "topk-k32-x8",
    ]
    pts = sweep(TrainConfig(k=(32,), dict_size=(4096, 8192)))
    assert [(p.name, p.dict_size, p.expansion, p.k) for p in pts] == [
        ("batchtopk-k32-F4096", 4096, None, 32),
        ("batchtopk-k32-F8192", 8192, None, 32),
    ]
    assert checkpoint_path("runs/x").as_posix() == "runs/x/checkpoint/latest"
