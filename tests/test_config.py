"""The config schema is the single source of CLI flags, manifest keys, defaults and help text."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae.cli import main
from sae.config import ConfigError, EvalConfig, HarvestConfig, TrainConfig, field_docs, make

CONFIGS = [HarvestConfig, TrainConfig, EvalConfig]
COMMANDS = {HarvestConfig: "harvest", TrainConfig: "train", EvalConfig: "eval"}


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_is_documented(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_is_a_cli_option_with_its_docstring(cls):
    result = CliRunner().invoke(main, [COMMANDS[cls], "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    positional = {"store", "sae_dirs"}
    for f in dataclasses.fields(cls):
        if f.name in positional:
            continue
        flag = "--site" if f.name == "sites" else "--" + f.name.replace("_", "-")
        assert flag in text, f"{flag} missing from `sae {COMMANDS[cls]} --help`"
        first_words = " ".join(field_docs(cls)[f.name].split()[:4])
        assert first_words in text


def test_make_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'sequence_length'.*seq_len"):
        make(HarvestConfig, {"sequence_length": 64})
    with pytest.raises(ConfigError, match="dtype: 'int8' is not one of bfloat16, float16, float32"):
        make(HarvestConfig, {"dtype": "int8"})
    with pytest.raises(ConfigError, match="seq_len: 'long' is not an integer"):
        make(HarvestConfig, {"seq_len": "long"})
    with pytest.raises(ConfigError, match="arch: 'gated' is not one of"):
        make(TrainConfig, {"arch": "batchtopk,gated"})


def test_values_are_coerced_from_cli_strings_and_yaml():
    cfg = make(TrainConfig, {"k": "16,32,64", "arch": ["batchtopk", "topk"], "tokens": "1e6", "keep_bos": "true"})
    assert cfg.k == (16, 32, 64)
    assert cfg.arch == ("batchtopk", "topk")
    assert cfg.tokens == 1_000_000
    assert cfg.keep_bos is True
    cfg = make(HarvestConfig, {"sites": "blocks.1.hook_resid_post", "out": "x.zarr", "max_tokens": None})
    assert cfg.sites == ("blocks.1.hook_resid_post",) and cfg.out == Path("x.zarr") and cfg.max_tokens is None


def test_cli_passes_only_given_values(monkeypatch):
    seen = {}
    import sae.harvest

    monkeypatch.setattr(sae.harvest, "harvest", lambda cfg: seen.setdefault("cfg", cfg))
    result = CliRunner().invoke(
        main, ["harvest", "--site", "blocks.0.hook_resid_pre", "--site", "blocks.1.hook_mlp_out", "--seq-len", "64"]
    )
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.sites == ("blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out")
    assert cfg.seq_len == 64
    assert cfg.batch_size == HarvestConfig().batch_size


def test_bad_value_is_one_clean_error_line():
    result = CliRunner().invoke(main, ["train", "store.zarr", "--site", "s", "--k", "many"])
    assert result.exit_code == 2
    assert result.output == "error: --k: 'many' is not an integer\n"
    assert "Traceback" not in result.output


def test_stage_folders_do_not_shadow_hugging_face_evaluate(tmp_path):
    # The repo root holds a folder named evaluate/ (installed as sae.evaluate). Python started there must
    # still import Hugging Face's `evaluate` when it is installed, and never hand out our stage under that name.
    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "site" / "evaluate"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'hugging face'\n")
    probe = [sys.executable, "-c", "import evaluate; print(evaluate.WHO)"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(probe, capture_output=True, text=True, cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hugging face"

    installed = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('evaluate') is not None)"],
        capture_output=True, text=True, cwd=tmp_path,
    ).stdout.strip() == "True"  # fmt: skip
    if not installed:
        result = subprocess.run([sys.executable, "-c", "import evaluate"], capture_output=True, text=True, cwd=root)
        assert result.returncode != 0 and "No module named 'evaluate'" in result.stderr

    import sae.evaluate

    assert sae.evaluate.__name__ == "sae.evaluate"


def _commands(text: str) -> list[str]:
    """The `sae ...` command lines of `text`, backslash continuations joined, whitespace normalised."""
    parts = (part for line in text.replace("\\\n", " ").splitlines() for part in line.split("&&"))
    return [" ".join(part.split()) for part in parts if part.strip().startswith("sae ")]


def test_help_lists_whole_command_summaries():
    out = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    listing = " ".join(out.split("Commands:")[1].split())
    for name, command in main.commands.items():
        first_paragraph = " ".join(command.help.split("\n\n")[0].split())
        assert f"{name} {first_paragraph}" in listing, name
    assert "..." not in listing


def test_help_examples_are_the_readme_commands():
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = _commands(out.split("Options:")[0])
    assert len(examples) == 4 and examples[0] == "sae run manifests/smollm2-demo.yaml"
    assert set(examples) <= set(_commands(readme)), set(examples) - set(_commands(readme))
