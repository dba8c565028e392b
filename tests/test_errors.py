"""Every command, given the mistakes users make: exit code 2, one line naming the problem, no traceback, and
nothing written anywhere under the test's folder (its tree is compared before and after each case)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch
from _synthetic import SITE as STORE_SITE
from _synthetic import make_store
from click.testing import CliRunner
from conftest import make_model, make_tokenizer

from sae.cli import main
from sae.saedir import SaeConfig, save_sae

SITE = "blocks.1.hook_resid_post"
D = 64
TEXT = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer.\n\n" * 40


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """One folder holding every input the cases refer to; the cases run with it as the working directory."""
    root = tmp_path_factory.mktemp("errors")
    p = {"root": root}
    p["model"] = root / "model"
    make_model("llama", n_layers=2, d_model=D).save_pretrained(p["model"])
    make_tokenizer().save_pretrained(p["model"])
    p["corpus"] = root / "corpus.txt"
    p["corpus"].write_text(TEXT)
    p["jsonl"] = root / "docs.jsonl"
    p["jsonl"].write_text('{"body": "some text"}\n' * 50)
    p["emptytxt"] = root / "empty.txt"
    p["emptytxt"].write_text("")
    p["blanktxt"] = root / "blank.txt"
    p["blanktxt"].write_text("\n\n   \n")
    p["emptydir"] = root / "emptydir"
    p["emptydir"].mkdir()
    p["notstore"] = root / "notstore"
    p["notstore"].mkdir()
    (p["notstore"] / "notes.txt").write_text("a folder of other things\n")
    p["file"] = root / "README.md"
    p["file"].write_text("# not a store, not an SAE, not a manifest\n")
    p["store"] = make_store(root / "store.zarr")

    def sae(name: str, hook: str) -> Path:
        eye = torch.eye(D)
        weights = {
            "W_enc": torch.cat([eye, -eye], 1),
            "b_enc": torch.zeros(2 * D),
            "W_dec": torch.cat([eye, -eye], 0),
            "b_dec": torch.zeros(D),
            "threshold": torch.zeros(2 * D),
        }
        meta = {"model": {"id": str(p["model"]), "revision": None, "sha256": None}, "keep_bos": False}
        cfg = SaeConfig(architecture="jumprelu", d_in=D, d_sae=2 * D, hook_name=hook, complete=True, metadata=meta)
        return save_sae(weights, cfg, root / name)

    p["sae"] = sae("sae", SITE)
    p["sae_badsite"] = sae("sae_badsite", "blocks.7.hook_resid_post")

    def manifest(name: str, text: str) -> None:
        p[name] = root / f"{name}.yaml"
        p[name].write_text(text)

    ok_harvest = f"harvest: {{model: {p['model']}, dataset: {p['corpus']}, sites: [{SITE}], max_tokens: 512}}\n"
    manifest("m_ok", "run_dir: run\n" + ok_harvest)
    manifest("m_bound", "run_dir: run\n" + ok_harvest + "train: {expansion: [4, 0]}\n")
    manifest("m_typo", "run_dir: run\nharvest: {max_token: 100}\n")
    manifest("m_typo_train", "run_dir: run\ntrain: {expnasion: 4}\n")
    manifest("m_top", "run_dir: run\nharvst: {}\n")
    manifest("m_runner_key", "run_dir: run\ntrain: {resume: true}\n")
    manifest("m_yaml", "run_dir: run\nharvest: {max_tokens: 100\n")
    manifest("m_list", "- run_dir\n- harvest\n")
    manifest("m_value", "run_dir: run\nharvest: {max_tokens: lots}\n")
    manifest("m_section", "run_dir: run\nharvest: [max_tokens]\n")
    manifest("m_no_run_dir", "harvest: {max_tokens: 100}\n")

    def harvest_section(dataset: str, site: str) -> str:
        return f"run_dir: run\nharvest: {{model: {p['model']}, dataset: {dataset}, sites: [{site}]}}\n"

    manifest("m_badsite", harvest_section(p["corpus"], "blocks.9.hook_resid_post"))
    manifest("m_empty_data", harvest_section(p["emptydir"], SITE))
    manifest("m_missing_data", harvest_section("./gone.txt", SITE))
    manifest("m_run_dir_file", f"run_dir: {p['file']}\n" + ok_harvest)
    manifest("m_slurm", "run_dir: run\n" + ok_harvest + "slurm: {partitoin: gpu}\n")
    return p


# (id, arguments, words the one line must contain). `{name}` is a path from `env`.
H = ["harvest", "--model", "{model}", "--dataset", "{corpus}", "--site", SITE]
CASES = [
    # harvest
    ("harvest-out-is-file", [*H, "--out", "{file}"], ["README.md"]),
    ("harvest-out-not-store", [*H, "--out", "{notstore}"], ["notstore"]),
    ("harvest-model-is-file", ["harvest", "--model", "{file}", "--site", SITE, "--dataset", "{corpus}"], ["file"]),
    ("harvest-model-missing", ["harvest", "--model", "./nomodel", "--site", SITE, "--out", "s.zarr"], ["nomodel"]),
    ("harvest-dataset-missing", [*H[:4], "./gone.txt", *H[5:], "--out", "s.zarr"], ["gone.txt"]),
    ("harvest-dataset-empty-dir", [*H[:4], "{emptydir}", *H[5:], "--out", "s.zarr"], ["emptydir"]),
    ("harvest-dataset-empty-file", [*H[:4], "{emptytxt}", *H[5:], "--out", "s.zarr"], ["empty.txt"]),
    ("harvest-dataset-blank-file", [*H[:4], "{blanktxt}", *H[5:], "--out", "s.zarr"], ["blank.txt"]),
    ("harvest-text-column", [*H[:4], "{jsonl}", *H[5:], "--out", "s.zarr"], ["column 'text'", "body", "--text-column"]),
    ("harvest-unknown-site", [*H[:5], "blocks.9.hook_resid_post", "--out", "s.zarr"], ["blocks.9"]),
    ("harvest-bad-site-name", [*H[:5], "layer9", "--out", "s.zarr"], ["layer9"]),
    (
        "harvest-bad-site-hub",
        [*H[:1], "--model", "no-org/no-model", *H[3:6], "blocks.2.resid", "--out", "s.zarr"],
        ["blocks.2.resid"],
    ),
    ("harvest-shard-no-slash", [*H, "--out", "s.zarr", "--shard", "3"], ["--shard", "3"]),
    ("harvest-shard-out-of-range", [*H, "--out", "s.zarr", "--shard", "4/2"], ["4"]),
    ("harvest-shard-words", [*H, "--out", "s.zarr", "--shard", "a/b"], ["a/b"]),
    ("harvest-max-tokens-word", [*H, "--out", "s.zarr", "--max-tokens", "many"], ["--max-tokens", "many"]),
    ("harvest-seq-len-float", [*H, "--out", "s.zarr", "--seq-len", "1.5"], ["--seq-len", "1.5"]),
    ("harvest-seq-len-negative", [*H, "--out", "s.zarr", "--seq-len", "-4"], ["--seq-len", "-4"]),
    ("harvest-dtype-choice", [*H, "--out", "s.zarr", "--dtype", "int8"], ["--dtype", "int8"]),
    ("harvest-max-tokens-negative", [*H, "--out", "s.zarr", "--max-tokens", "-5"], ["--max-tokens", "-5"]),
    ("harvest-max-tokens-zero", [*H, "--out", "s.zarr", "--max-tokens", "0"], ["--max-tokens", "0"]),
    ("harvest-seq-len-one", [*H, "--out", "s.zarr", "--seq-len", "1"], ["--seq-len", "at least 2"]),
    ("harvest-batch-size-zero", [*H, "--out", "s.zarr", "--batch-size", "0"], ["--batch-size", "0"]),
    ("harvest-chunk-rows-negative", [*H, "--out", "s.zarr", "--chunk-rows", "-64"], ["--chunk-rows", "-64"]),
    ("harvest-shard-chunks-zero", [*H, "--out", "s.zarr", "--shard-chunks", "0"], ["--shard-chunks", "0"]),
    ("harvest-massive-factor-zero", [*H, "--out", "s.zarr", "--massive-factor", "0"], ["--massive-factor", "0"]),
    ("harvest-max-tokens-below-seq-len", [*H, "--out", "s.zarr", "--max-tokens", "100"], ["--max-tokens 100"]),
    ("harvest-unknown-option", [*H, "--out", "s.zarr", "--max-token", "100"], ["--max-token"]),
    # train
    ("train-store-is-file", ["train", "{file}", "--site", STORE_SITE], ["README.md"]),
    ("train-store-missing", ["train", "./nostore.zarr", "--site", STORE_SITE], ["nostore.zarr"]),
    ("train-store-not-store", ["train", "{notstore}", "--site", STORE_SITE], ["notstore"]),
    ("train-store-empty-dir", ["train", "{emptydir}", "--site", STORE_SITE], ["emptydir"]),
    ("train-store-is-sae", ["train", "{sae}", "--site", STORE_SITE], ["sae"]),
    ("train-unknown-site", ["train", "{store}", "--site", "blocks.7.hook_resid_post", "--out", "o"], ["blocks.7"]),
    ("train-out-is-file", ["train", "{store}", "--site", STORE_SITE, "--out", "{file}"], ["README.md"]),
    ("train-out-is-store", ["train", "{store}", "--site", STORE_SITE, "--out", "{store}"], ["store.zarr", "store;"]),
    (
        "train-out-inside-store",
        ["train", "{store}", "--site", STORE_SITE, "--out", "{store}/saes"],
        ["saes", "inside", "activation store"],
    ),
    ("train-expansion-zero", ["train", "{store}", "--site", STORE_SITE, "--expansion", "0"], ["--expansion", "0"]),
    ("train-dict-size-negative", ["train", "{store}", "--dict-size", "-8"], ["--dict-size", "-8"]),
    ("train-k-zero-in-list", ["train", "{store}", "--site", STORE_SITE, "--k", "8,0"], ["--k", "got 0"]),
    ("train-batch-size-zero", ["train", "{store}", "--batch-size", "0"], ["--batch-size", "0"]),
    ("train-tokens-negative", ["train", "{store}", "--tokens", "-1000"], ["--tokens", "-1000"]),
    ("train-lr-zero", ["train", "{store}", "--lr", "0"], ["--lr", "positive"]),
    ("train-log-every-zero", ["train", "{store}", "--log-every", "0"], ["--log-every", "0"]),
    ("train-k-word", ["train", "{store}", "--site", STORE_SITE, "--out", "o", "--k", "abc"], ["--k", "abc"]),
    ("train-batch-word", ["train", "{store}", "--site", STORE_SITE, "--out", "o", "--batch-size", "x"], ["x"]),
    ("train-lr-word", ["train", "{store}", "--site", STORE_SITE, "--out", "o", "--lr", "fast"], ["--lr", "fast"]),
    ("train-arch-choice", ["train", "{store}", "--site", STORE_SITE, "--out", "o", "--arch", "vanilla"], ["vanilla"]),
    ("train-shard", ["train", "{store}", "--site", STORE_SITE, "--shard", "0/2"], ["--shard"]),
    # eval
    ("eval-sae-is-file", ["eval", "{file}", "--out", "rep"], ["README.md"]),
    ("eval-sae-missing", ["eval", "./nosae", "--out", "rep"], ["nosae"]),
    ("eval-not-sae-dir", ["eval", "{notstore}", "--out", "rep"], ["notstore"]),
    ("eval-empty-dir", ["eval", "{emptydir}", "--out", "rep"], ["emptydir"]),
    ("eval-store-as-sae", ["eval", "{store}", "--out", "rep"], ["store.zarr"]),
    ("eval-unknown-site", ["eval", "{sae_badsite}", "--dataset", "{corpus}", "--out", "rep"], ["blocks.7"]),
    ("eval-dataset-missing", ["eval", "{sae}", "--dataset", "./gone.txt", "--out", "rep"], ["gone.txt"]),
    ("eval-dataset-empty", ["eval", "{sae}", "--dataset", "{emptydir}", "--out", "rep"], ["emptydir"]),
    ("eval-dataset-empty-file", ["eval", "{sae}", "--dataset", "{emptytxt}", "--out", "rep"], ["empty.txt"]),
    (
        "eval-text-column",
        ["eval", "{sae}", "--dataset", "{jsonl}", "--out", "rep"],
        ["column 'text'", "body", "--text-column"],
    ),
    ("eval-out-is-file", ["eval", "{sae}", "--dataset", "{corpus}", "--out", "{file}"], ["README.md"]),
    ("eval-model-missing", ["eval", "{sae}", "--model", "./nomodel", "--out", "rep"], ["nomodel"]),
    ("eval-max-tokens-word", ["eval", "{sae}", "--max-tokens", "lots", "--out", "rep"], ["--max-tokens", "lots"]),
    ("eval-mode-choice", ["eval", "{sae}", "--mode", "fast", "--out", "rep"], ["fast"]),
    ("eval-max-tokens-negative", ["eval", "{sae}", "--max-tokens", "-5", "--out", "rep"], ["--max-tokens", "-5"]),
    ("eval-seq-len-one", ["eval", "{sae}", "--seq-len", "1", "--out", "rep"], ["--seq-len", "at least 2"]),
    ("eval-batch-size-zero", ["eval", "{sae}", "--batch-size", "0", "--out", "rep"], ["--batch-size", "0"]),
    ("eval-bootstrap-negative", ["eval", "{sae}", "--bootstrap", "-1", "--out", "rep"], ["--bootstrap", "-1"]),
    ("eval-batch-rows-zero", ["eval", "{sae}", "--batch-rows", "0", "--out", "rep"], ["--batch-rows", "0"]),
    (
        "eval-max-tokens-below-seq-len",
        ["eval", "{sae}", "--dataset", "{corpus}", "--max-tokens", "100", "--out", "rep"],
        ["--max-tokens 100", "--seq-len 128"],
    ),
    # run
    ("run-manifest-missing", ["run", "./gone.yaml"], ["gone.yaml"]),
    ("run-manifest-is-dir", ["run", "{emptydir}"], ["emptydir"]),
    ("run-manifest-not-yaml-mapping", ["run", "{file}"], ["README.md", "mapping"]),
    ("run-manifest-list", ["run", "{m_list}"], ["mapping"]),
    ("run-malformed-yaml", ["run", "{m_yaml}"], ["YAML"]),
    ("run-typo", ["run", "{m_typo}"], ["harvest: unknown key 'max_token' (did you mean 'max_tokens'?)"]),
    ("run-typo-train", ["run", "{m_typo_train}"], ["train: unknown key 'expnasion' (did you mean 'expansion'?)"]),
    ("run-typo-top", ["run", "{m_top}"], ["unknown key 'harvst' (did you mean 'harvest'?)"]),
    ("run-typo-slurm", ["run", "{m_slurm}"], ["slurm: unknown key 'partitoin' (did you mean 'partition'?)"]),
    ("run-runner-key", ["run", "{m_runner_key}"], ["train.resume"]),
    ("run-bad-value", ["run", "{m_value}"], ["harvest.max_tokens", "lots"]),
    ("run-bad-bound", ["run", "{m_bound}"], ["train.expansion must be at least 1, got 0"]),
    ("run-section-not-mapping", ["run", "{m_section}"], ["harvest", "mapping"]),
    ("run-no-run-dir", ["run", "{m_no_run_dir}"], ["run_dir"]),
    ("run-unknown-site", ["run", "{m_badsite}"], ["blocks.9"]),
    ("run-dataset-empty", ["run", "{m_empty_data}"], ["emptydir"]),
    ("run-dataset-missing", ["run", "{m_missing_data}"], ["gone.txt"]),
    ("run-run-dir-is-file", ["run", "{m_run_dir_file}"], ["README.md"]),
    ("run-shard-bad", ["run", "{m_ok}", "--stage", "harvest", "--shard", "x"], ["--shard", "x"]),
    ("run-shard-out-of-range", ["run", "{m_ok}", "--stage", "harvest", "--shard", "2/2"], ["2"]),
    ("run-shard-without-stage", ["run", "{m_ok}", "--shard", "0/2"], ["--shard"]),
    ("run-stage-choice", ["run", "{m_ok}", "--stage", "everything"], ["everything"]),
    # submit
    ("submit-manifest-missing", ["submit", "./gone.yaml", "--scheduler", "slurm", "--dry-run"], ["gone.yaml"]),
    ("submit-typo", ["submit", "{m_typo}", "--scheduler", "slurm", "--dry-run"], ["did you mean 'max_tokens'?"]),
    ("submit-malformed-yaml", ["submit", "{m_yaml}", "--scheduler", "slurm", "--dry-run"], ["YAML"]),
    ("submit-run-dir-is-file", ["submit", "{m_run_dir_file}", "--scheduler", "slurm", "--dry-run"], ["README.md"]),
    ("submit-scheduler-choice", ["submit", "{m_ok}", "--scheduler", "pbs", "--dry-run"], ["pbs"]),
    # stats
    ("stats-file", ["stats", "{file}"], ["README.md"]),
    ("stats-missing", ["stats", "./nostore.zarr"], ["nostore.zarr"]),
    ("stats-not-store", ["stats", "{notstore}"], ["notstore"]),
    ("stats-unknown-site", ["stats", "{store}", "--site", "blocks.7.hook_resid_post"], ["blocks.7"]),
    # validate
    ("validate-file", ["validate", "{file}"], ["README.md"]),
    ("validate-missing", ["validate", "./nostore.zarr"], ["nostore.zarr"]),
    ("validate-not-store", ["validate", "{notstore}"], ["notstore"]),
    ("validate-sae-dir", ["validate", "{sae}"], ["sae"]),
    # concat
    ("concat-input-file", ["concat", "{file}", "--out", "new.zarr"], ["README.md"]),
    ("concat-input-missing", ["concat", "./nostore.zarr", "--out", "new.zarr"], ["nostore.zarr"]),
    ("concat-input-not-store", ["concat", "{notstore}", "--out", "new.zarr"], ["notstore"]),
    ("concat-out-is-file", ["concat", "{store}", "--out", "{file}"], ["README.md"]),
    ("concat-out-not-store", ["concat", "{store}", "--out", "{notstore}"], ["notstore"]),
    ("concat-out-is-input", ["concat", "{store}", "--out", "{store}"], ["store.zarr"]),
    ("concat-chunk-rows-word", ["concat", "{store}", "--out", "new.zarr", "--chunk-rows", "big"], ["big"]),
    ("concat-no-out", ["concat", "{store}"], ["--out"]),
    # the global option
    ("progress-interval-word", ["--progress-interval", "often", "validate", "{store}"], ["often"]),
    ("unknown-command", ["trian", "{store}"], ["trian"]),
    # inspect
    ("inspect-sae-is-file", ["inspect", "{file}", "--out", "site"], ["README.md"]),
    ("inspect-sae-missing", ["inspect", "./nosae", "--out", "site"], ["nosae"]),
    ("inspect-not-sae-dir", ["inspect", "{notstore}", "--out", "site"], ["notstore"]),
    ("inspect-store-as-sae", ["inspect", "{store}", "--out", "site"], ["store.zarr"]),
    ("inspect-no-store-recorded", ["inspect", "{sae}", "--out", "site"], ["records no store", "--store"]),
    ("inspect-store-missing", ["inspect", "{sae}", "--store", "./nostore.zarr", "--out", "site"], ["nostore.zarr"]),
    ("inspect-unknown-site", ["inspect", "{sae}", "--store", "{store}", "--out", "site"], [SITE]),
    ("inspect-top-word", ["inspect", "{sae}", "--top", "many"], ["--top", "many"]),
    ("inspect-max-rows-negative", ["inspect", "{sae}", "--max-rows", "-5"], ["--max-rows", "-5"]),
    ("inspect-window-negative", ["inspect", "{sae}", "--window", "-1"], ["--window", "-1"]),
    ("inspect-quantiles-zero", ["inspect", "{sae}", "--quantiles", "0"], ["--quantiles", "0"]),
    ("inspect-latents-outside", ["inspect", "{sae}", "--store", "{store}", "--latents", "0-999"], ["0-999"]),
]


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under `root`: (mode, size, mtime_ns); folders' mtimes change when entries come or go."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size if name != "." else 0, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("args, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_gives_one_line_and_exit_2(env, args, words, monkeypatch):
    monkeypatch.chdir(env["root"])
    monkeypatch.setenv("SAE_HOME", str(env["root"] / "sae-home"))  # the embedded model must not be needed
    before = _tree(env["root"])
    argv = [a.format(**{k: str(v) for k, v in env.items()}) for a in args]
    result = CliRunner().invoke(main, argv)
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {out}\n{result.exc_info}"
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in out
    # `sae run` heads each stage it starts with a `== stage:` line on stdout; the problem is the one other line
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("== ")]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: "), out
    for w in words:
        assert w in lines[0], out
    assert _tree(env["root"]) == before, "the failed command wrote or changed files"


BEFORE_THE_MODEL = [
    "harvest-out-is-file",
    "harvest-out-not-store",
    "harvest-model-missing",
    "harvest-dataset-missing",
    "harvest-dataset-empty-dir",
    "harvest-dataset-blank-file",
    "harvest-text-column",
    "harvest-max-tokens-below-seq-len",
    "eval-dataset-missing",
    "eval-dataset-empty",
    "eval-text-column",
    "eval-model-missing",
    "eval-max-tokens-below-seq-len",
    "run-dataset-empty",
    "run-dataset-missing",
    "harvest-unknown-site",
    "harvest-bad-site-name",
    "harvest-bad-site-hub",
    "run-unknown-site",
]


# Values no run can use (negative or zero counts and sizes) are refused as the options are read: before the
# stage's code is imported, let alone its model loaded.
BOUNDS = [c[0] for c in CASES if c[0].endswith(("-negative", "-zero", "-one", "-zero-in-list"))]


@pytest.mark.parametrize("case", BOUNDS)
def test_bounds_are_checked_before_the_stage_starts(env, case, monkeypatch):
    def no_stage(*args, **kwargs):
        raise AssertionError("the stage started before the check")

    for module, name in (("sae.harvest", "harvest"), ("sae.train", "train"), ("sae.evaluate", "evaluate")):
        monkeypatch.setattr(importlib.import_module(module), name, no_stage)
    monkeypatch.setattr(importlib.import_module("sae.evaluate.inspect"), "inspect", no_stage)
    monkeypatch.chdir(env["root"])
    args = next(c[1] for c in CASES if c[0] == case)
    result = CliRunner().invoke(main, [a.format(**{k: str(v) for k, v in env.items()}) for a in args])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output


@pytest.mark.parametrize("case", BEFORE_THE_MODEL)
def test_checked_before_the_model_loads(env, case, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    for module in ("sae.harvest.loop", "sae.evaluate.evaluate"):
        monkeypatch.setattr(importlib.import_module(module), "load_model", no_model)
    monkeypatch.chdir(env["root"])
    args = next(c[1] for c in CASES if c[0] == case)
    result = CliRunner().invoke(main, [a.format(**{k: str(v) for k, v in env.items()}) for a in args])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output
