"""The SAELens transcoder layout of `sae.saedir` (a transcoder is an SAE whose decoder writes another site): every
variant we write loads in sae-lens with equal outputs, SAELens-made ones load in ours, scales fold exactly, and bad
directories are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from sae import __version__
from sae.errors import SaeError
from sae.saedir import (
    ARCHITECTURES,
    SaeConfig,
    SparseAutoencoder,
    architecture_name,
    fold_scales,
    load_sae,
    read_cfg,
    save_sae,
    weight_shapes,
)

D_IN, D_SAE, D_OUT = 16, 40, 24  # d_out ≠ d_in, so a transposed decoder or skip cannot pass
TRANSCODERS = [name for name, layout in ARCHITECTURES.items() if layout.transcoder]


def make(arch: str, seed: int = 0, **kw) -> SparseAutoencoder:
    cfg = SaeConfig(
        arch, D_IN, D_SAE, D_OUT, model_name="tiny", hook_name="blocks.1.ln2.hook_normalized",
        hook_name_out="blocks.1.hook_mlp_out", **kw,
    )  # fmt: skip
    t = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if cfg.layout.activation == "jumprelu":
            t.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.8)
    return t


def inputs(n: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def sae_lens():
    return pytest.importorskip("sae_lens")


def test_the_transcoder_architectures():
    assert TRANSCODERS == ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.mark.parametrize("arch", TRANSCODERS)
def test_sae_lens_loads_ours_with_equal_outputs(tmp_path, arch):
    sl = sae_lens()
    ours = make(arch, k=8.0, theta=0.3, training_architecture="batchtopk", input_scale=2.0, target_scale=0.5)
    save_sae(ours, None, tmp_path / "tc")
    theirs = sl.SAE.load_from_disk(str(tmp_path / "tc"))
    want = {
        "transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
        "jumprelu_transcoder": "JumpReLUTranscoder", "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
    }[arch]  # fmt: skip
    assert type(theirs).__name__ == want
    assert theirs.cfg.d_in == D_IN and theirs.cfg.d_sae == D_SAE and theirs.cfg.d_out == D_OUT
    assert theirs.cfg.metadata.hook_name == "blocks.1.ln2.hook_normalized"
    assert theirs.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    assert theirs.cfg.metadata.model_name == "tiny" and theirs.cfg.apply_b_dec_to_input is False
    assert tuple(theirs.W_dec.shape) == (D_SAE, D_OUT)
    x = inputs()
    with torch.no_grad():
        a, y = ours.encode(x), ours(x)
        torch.testing.assert_close(theirs.encode(x), a)
        torch.testing.assert_close(theirs(x), y)
        if "skip" in arch:
            assert tuple(theirs.W_skip.shape) == (D_OUT, D_IN)
            assert not torch.allclose(ours.decode(a, torch.zeros_like(x)), y)  # the skip term counts
        if "jumprelu" in arch:  # the thresholds cut some positive pre-activations
            pre = ours.pre_acts(x)
            assert ((pre > 0) & (a == 0)).any() and (a > 0).any()


@pytest.mark.parametrize("arch", TRANSCODERS)
def test_round_trip_and_sae_lens_made(tmp_path, arch):
    sl = sae_lens()
    ours = make(arch, seed=3, k=4.0, theta=0.1, complete=True, metadata={"store": "s.zarr", "tokens_seen": 123})
    save_sae(ours, None, tmp_path / "a")
    back = load_sae(tmp_path / "a")
    # exact, and marked as a directory of ours (eval tells ours by it)
    assert back.cfg == ours.cfg.replace(metadata={**ours.cfg.metadata, "sae_pipeline_version": __version__})
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert read_cfg(tmp_path / "a").layout.transcoder

    # A transcoder SAELens made and saved loads in ours with equal outputs.
    theirs = sl.SAE.load_from_disk(str(tmp_path / "a"))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    theirs.save_model(tmp_path / "b")
    mine = load_sae(tmp_path / "b")
    assert mine.cfg.architecture == arch and mine.cfg.d_out == D_OUT
    assert mine.cfg.hook_name_out == "blocks.1.hook_mlp_out"
    x = inputs(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x))


def test_cfg_json_keys_and_their_order(tmp_path):
    """A transcoder's cfg.json has these keys in this order (an SAE's are pinned in test_saedir)."""
    meta = {"store": "s.zarr", "tokens_seen": 1}
    ours = make("jumprelu_skip_transcoder", k=4.0, theta=0.1, input_scale=2.0, target_scale=0.5, metadata=meta)
    cfg = json.loads((save_sae(ours, None, tmp_path / "t") / "cfg.json").read_text())
    assert list(cfg) == [
        "architecture", "d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
        "reshape_activations", "metadata",
    ]  # fmt: skip
    assert list(cfg["metadata"]) == [
        "sae_lens_version", "sae_lens_training_version", "hook_head_index", "hook_head_index_out", "prepend_bos",
        *meta, "sae_pipeline_version", "model_name", "hook_name", "hook_name_out", "training_architecture", "theta",
        "input_scale", "target_scale", "complete", "k",
    ]  # fmt: skip


def test_fold_scales_gives_the_same_transcoder_in_raw_units():
    trained = make("jumprelu_skip_transcoder", seed=4).double()  # float64: equal up to rounding only
    c_in, c_out = 3.5, 0.25
    raw = SparseAutoencoder(trained.cfg, dtype=torch.float64)
    raw.load_state_dict(fold_scales(trained.state_dict(), input_scale=c_in, target_scale=c_out))
    x = inputs(seed=8).double()
    with torch.no_grad():
        torch.testing.assert_close(raw.encode(x), trained.encode(c_in * x))
        torch.testing.assert_close(raw(x), trained(c_in * x) / c_out)
    assert torch.equal(raw.threshold, trained.threshold) and torch.equal(raw.b_enc, trained.b_enc)
    with pytest.raises(SaeError, match="positive"):
        fold_scales(trained.state_dict(), input_scale=0.0, target_scale=1.0)


def test_encode_batch_keeps_k_per_row_over_the_batch():
    t = make("jumprelu_transcoder", seed=6, k=3.0, training_architecture="batchtopk")
    x = inputs(n=20, seed=9)
    with torch.no_grad():
        a = t.encode_batch(x)
        pre = t.pre_acts(x).relu()
    assert int((a > 0).sum()) == 60
    kept = pre.flatten().topk(60).values
    torch.testing.assert_close(a[a > 0].sort().values, kept.sort().values)
    relu = make("transcoder", seed=6, k=3.0)
    assert not relu.batch_topk and torch.equal(relu.encode_batch(x), relu.encode(x))


def test_architecture_names():
    assert architecture_name("jumprelu", transcoder=True, skip=False) == "jumprelu_transcoder"
    assert architecture_name("jumprelu", transcoder=True, skip=True) == "jumprelu_skip_transcoder"
    assert architecture_name("standard", transcoder=True, skip=False) == "transcoder"
    assert architecture_name("standard", transcoder=True, skip=True) == "skip_transcoder"
    for sae in ("jumprelu", "topk", "standard"):
        assert architecture_name(sae) == sae
    with pytest.raises(SaeError, match="'topk' has no SAELens transcoder.*batchtopk"):
        architecture_name("topk", transcoder=True, skip=False)
    assert set(weight_shapes(make("skip_transcoder").cfg)) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}


def test_bad_weights_are_refused_and_nothing_is_written(tmp_path):
    t = make("skip_transcoder")
    w = t.state_dict()
    cases = [
        ({k: v for k, v in w.items() if k != "W_skip"}, "missing tensor.*W_skip"),
        ({**w, "W_dec": torch.zeros(D_SAE, D_IN)}, r"W_dec has shape \[40, 16\], expected \[40, 24\]"),
        ({**w, "W_skip": torch.zeros(D_IN, D_OUT)}, r"W_skip has shape \[16, 24\], expected \[24, 16\]"),
        ({**w, "threshold": torch.zeros(D_SAE)}, "unexpected tensor.*threshold"),
        ({**w, "b_dec": torch.zeros(D_OUT, dtype=torch.int32)}, "floating-point"),
    ]
    for weights, match in cases:
        with pytest.raises(SaeError, match=match):
            save_sae(weights, t.cfg, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind either


def test_save_over_keeps_other_files(tmp_path):
    path = save_sae(make("transcoder"), None, tmp_path / "t")
    (path / "train_log.jsonl").write_text('{"step": 1}\n')
    save_sae(make("transcoder", seed=2), None, path)
    assert (path / "train_log.jsonl").read_text() == '{"step": 1}\n'
    assert torch.equal(load_sae(path).W_enc, make("transcoder", seed=2).W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def edit_cfg(path, **changes):
    d = json.loads((path / "cfg.json").read_text())
    d.update(changes)
    (path / "cfg.json").write_text(json.dumps(d))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        # read as an SAE, whose decoder would write its input's width
        ({"architecture": "jumprelu"}, r"W_dec has shape \[40, 24\], expected \[40, 16\]"),
        ({"apply_b_dec_to_input": True}, "apply_b_dec_to_input is true"),
        ({"d_out": None}, "d_out must be a positive integer"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'"),
    ],
)
def test_bad_cfg_is_one_line(tmp_path, changes, match):
    path = save_sae(make("jumprelu_transcoder"), None, tmp_path / "t")
    edit_cfg(path, **changes)
    with pytest.raises(SaeError, match=match) as e:
        load_sae(path)
    assert "\n" not in str(e.value)


def test_corrupt_or_missing_files(tmp_path):
    with pytest.raises(SaeError, match="does not exist"):
        read_cfg(tmp_path / "nope")
    path = save_sae(make("transcoder"), None, tmp_path / "t")
    (path / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SaeError, match="cannot read the weights"):
        load_sae(path)
    (path / "cfg.json").write_text("{")
    with pytest.raises(SaeError, match="not valid JSON"):
        load_sae(path)
