"""Outputs get the modes the user's umask gives (as `open()` / `mkdir()` would), so colleagues sharing a run
directory can read them: atomically written files, SAE directories, checkpoints and the store's JSON files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from _synthetic import make_store

from sae import atomic
from sae.saedir import SaeConfig, SparseAutoencoder, save_sae
from sae.train import checkpoint


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_outputs_follow_the_umask(tmp_path: Path, mask: int) -> None:
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    f = tmp_path / "x.json"
    atomic.write_json(f, {"a": 1})
    assert _mode(f) == want_file

    sae = SparseAutoencoder(SaeConfig(architecture="standard", d_in=4, d_sae=8))
    d = save_sae(sae, None, tmp_path / "sae")
    assert _mode(d) == want_dir
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert _mode(d / name) == want_file

    ck = checkpoint.save(tmp_path / "run", 3, {"w": torch.zeros(2)}, {"step": 3})
    assert _mode(ck) == want_dir
    assert _mode(ck / "state.json") == want_file
    assert _mode(ck / "tensors.safetensors") == want_file
    assert _mode(tmp_path / "run" / checkpoint.DIR / checkpoint.LATEST) == want_file

    store = make_store(tmp_path / "store.zarr")
    for name in ("manifest.json", "plan.json", "zarr.json"):
        assert _mode(store / name) == want_file, name
    markers = list((store / "markers").iterdir())
    assert markers and all(_mode(m) == want_file for m in markers)


def test_train_on_a_file_or_a_missing_path_is_one_line(tmp_path: Path) -> None:
    """`sae train README.md` used to print a NotADirectoryError traceback."""
    from click.testing import CliRunner

    from sae.cli import main

    f = tmp_path / "README.md"
    f.write_text("not a store")
    for target, words in ((f, "is a file"), (tmp_path / "nope.zarr", "does not exist")):
        r = CliRunner().invoke(main, ["train", str(target), "--out", str(tmp_path / "saes")])
        assert r.exit_code == 2, r.output
        assert words in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "saes").exists()
