"""Run manifests: one YAML file, the same schema as the CLI flags, validated with the key's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _synthetic import SITE, make_store
from click.testing import CliRunner

from sae import manifest as mf
from sae import outputs
from sae.cli import main
from sae.config import ConfigError, EvalConfig, HarvestConfig, InspectConfig, TrainConfig, to_dict
from sae.errors import SaeError
from sae.saedir import CFG_FILE, RUN_FILE, WEIGHTS_FILE, SaeConfig, checkpoint_path

MANIFESTS = sorted((Path(__file__).parents[1] / "manifests").glob("*.yaml"))


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def base(**sections):
    return {"run_dir": "runs/x", "harvest": {"sites": [SITE], "seq_len": 16}, **sections}


def test_defaults_live_in_run_dir_and_are_derived(tmp_path):
    m = mf.load_manifest(write(tmp_path, base(train={"arch": "batchtopk,topk", "k": [16, 32]})))
    assert m.run_dir == Path("runs/x")
    assert m.harvest.out == Path("runs/x/store.zarr")
    assert (m.train.store, m.train.site, m.train.out) == (Path("runs/x/store.zarr"), SITE, Path("runs/x/saes"))
    assert m.eval.out == Path("runs/x/report")
    names = ["batchtopk-k16-x8", "batchtopk-k32-x8", "topk-k16-x8", "topk-k32-x8"]
    assert m.eval.sae_dirs == tuple(Path("runs/x/saes") / n for n in names)
    # Everything not given is the dataclass default: the one schema, no second list of defaults.
    assert m.train.lr == TrainConfig.lr and m.eval.mode == EvalConfig.mode
    assert m.harvest.trust_remote_code is False
    # Given values win over derived ones.
    m = mf.parse_manifest(base(train={"store": "other.zarr", "out": "o"}, eval={"sae_dirs": ["a", "b"], "out": "r"}))
    assert (m.train.store, m.train.out, m.eval.sae_dirs, m.eval.out) == (
        Path("other.zarr"),
        Path("o"),
        (Path("a"), Path("b")),
        Path("r"),
    )


def test_unknown_keys_are_refused_with_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'trian' \(did you mean 'train'\?\)$"):
        mf.load_manifest(write(tmp_path, {**base(), "trian": {}}))
    with pytest.raises(ConfigError, match=r"^unknown key 'zzz'; valid keys: run_dir, description, harvest, train"):
        mf.parse_manifest({**base(), "zzz": 1})
    with pytest.raises(ConfigError, match=r"^harvest: unknown key 'max_token' \(did you mean 'max_tokens'\?\)$"):
        mf.parse_manifest(base(harvest={"max_token": 64}))
    with pytest.raises(ConfigError, match=r"^slurm: unknown key 'partiton' \(did you mean 'partition'\?\)$"):
        mf.parse_manifest(base(slurm={"partiton": "gpu"}))
    # With no close match, the keys valid in that section of a manifest: no runner keys, no class names.
    with pytest.raises(ConfigError, match=r"^harvest: unknown key 'layer'; valid keys: batch_size, ") as err:
        mf.parse_manifest(base(harvest={"layer": 6}))
    listed = str(err.value).split("valid keys: ")[1].split(", ")
    assert "seq_len" in listed and not {"shard", "init", "finalize", "overwrite"} & set(listed)
    assert "Config" not in str(err.value)
    with pytest.raises(ConfigError, match="harvest.shard: set by `sae run` / `sae submit`"):
        mf.parse_manifest(base(harvest={"sites": [SITE], "shard": "0/2"}))
    with pytest.raises(ConfigError, match="train.resume: set by"):
        mf.parse_manifest(base(train={"resume": True}))
    with pytest.raises(ConfigError, match="run_dir: required"):
        mf.parse_manifest({"harvest": {"sites": [SITE]}})


def test_bad_values_are_refused_with_the_allowed_values():
    with pytest.raises(ConfigError, match=r"train\.arch: 'gated' is not one of batchtopk, topk, relu, jumprelu"):
        mf.parse_manifest(base(train={"arch": ["batchtopk", "gated"]}))
    with pytest.raises(ConfigError, match=r"harvest\.dtype: 'int8' is not one of bfloat16, float16, float32"):
        mf.parse_manifest(base(harvest={"sites": [SITE], "dtype": "int8"}))
    with pytest.raises(ConfigError, match=r"eval\.max_tokens: 'lots' is not an integer"):
        mf.parse_manifest(base(eval={"max_tokens": "lots"}))
    with pytest.raises(ConfigError, match=r"harvest: a mapping of settings"):
        mf.parse_manifest({"run_dir": "r", "harvest": ["blocks.0.hook_resid_post"]})
    with pytest.raises(ConfigError, match=r"train\.site: 'blocks.3.hook_mlp_out' is not one of harvest.sites"):
        mf.parse_manifest(base(train={"site": "blocks.3.hook_mlp_out"}))
    with pytest.raises(ConfigError, match=r"train\.site: required when harvest.sites does not name exactly one"):
        mf.parse_manifest({"run_dir": "r", "harvest": {"sites": [SITE, "blocks.1.hook_mlp_out"]}})
    with pytest.raises(ConfigError, match=r"slurm\.cpus: 0 is below 1"):
        mf.parse_manifest(base(slurm={"cpus": 0}))
    with pytest.raises(ConfigError, match=r"slurm\.nproc: 4 training processes for gpus: 2; each process needs a GPU"):
        mf.parse_manifest(base(slurm={"gpus": 2, "nproc": 4}))
    assert mf.parse_manifest(base(slurm={"gpus": 0, "nproc": 4})).slurm.nproc == 4  # CPU ranks (gloo)


def test_unquoted_slurm_time_is_refused_with_a_hint(tmp_path):
    # YAML 1.1 reads 4:00:00 as the base-60 integer 14400, which SLURM would take as minutes.
    path = write(tmp_path, f"run_dir: r\nharvest: {{sites: [{SITE}]}}\nslurm:\n  train_time: 4:00:00\n")
    with pytest.raises(ConfigError, match=r"slurm\.train_time: 14400 is a number, not a SLURM time; quote it"):
        mf.load_manifest(path)
    path.write_text(path.read_text().replace("4:00:00", "'4:00:00'"))
    assert mf.load_manifest(path).slurm.train_time == "4:00:00"


def test_yaml_is_loaded_safely(tmp_path):
    flag = tmp_path / "pwned"
    text = f"run_dir: !!python/object/apply:os.system ['touch {flag}']\nharvest: {{sites: [{SITE}]}}\n"
    with pytest.raises(ConfigError, match="not valid YAML"):
        mf.load_manifest(write(tmp_path, text))
    assert not flag.exists()
    r = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml")])
    assert r.exit_code == 2 and "not valid YAML" in r.output and "Traceback" not in r.output
    assert not flag.exists()


def test_trust_remote_code_only_when_the_manifest_says_so():
    assert mf.parse_manifest(base()).harvest.trust_remote_code is False
    m = mf.parse_manifest(base(harvest={"sites": [SITE], "trust_remote_code": True}))
    assert m.harvest.trust_remote_code is True


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_shipped_manifests_parse_and_validate(path):
    m = mf.load_manifest(path)
    assert m.harvest.sites and m.train.site in m.harvest.sites
    assert m.harvest.trust_remote_code is False
    assert m.eval.sae_dirs and all(Path(d).parent == m.train.out for d in m.eval.sae_dirs)
    assert str(m.run_dir).startswith("runs/")


def test_shipped_manifests_say_what_the_docs_promise():
    demo = mf.load_manifest(Path(__file__).parents[1] / "manifests/smollm2-demo.yaml")
    assert (demo.harvest.model, demo.harvest.dataset) == ("smollm2-135m", "shakespeare")
    assert demo.harvest.sites == ("blocks.6.hook_resid_post",)
    assert set(demo.train.arch) >= {"batchtopk"} and len(demo.eval.sae_dirs) >= 2
    paper = mf.load_manifest(Path(__file__).parents[1] / "manifests/gpt2-small-L8-paper.yaml")
    assert (paper.harvest.model, paper.harvest.dataset) == ("gpt2", "Skylion007/openwebtext")
    assert paper.harvest.sites == ("blocks.8.hook_resid_pre",) and paper.harvest.seq_len == 128
    assert paper.harvest.max_tokens == 10**9 and paper.train.keep_bos is True
    assert paper.train.dict_size == (12288,) and paper.train.k == (16, 32, 64)
    assert set(paper.train.arch) == {"batchtopk", "topk", "jumprelu"} and paper.slurm.gpus >= 1
    gemma = mf.load_manifest(Path(__file__).parents[1] / "manifests/gemma-2-2b-L12.yaml")
    assert gemma.harvest.model == "google/gemma-2-2b" and gemma.harvest.sites == ("blocks.12.hook_resid_post",)


# --------------------------------------------------------------------------------------------------
# `sae run`: stages in order, complete ones skipped, training resumed from its checkpoint.


class Recorder:
    """Stand-in stages that record their configs and leave the outputs a real stage leaves."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def harvest(self, cfg: HarvestConfig):
        self.calls.append(("harvest", cfg))
        if not cfg.init and not cfg.shard:
            make_store(
                Path(cfg.out), seq_len=cfg.seq_len, n_contexts=8, chunk_rows=32, shard_chunks=2,
                shuffle_buffer=cfg.shuffle_buffer,
            )  # fmt: skip

    def train(self, cfg: TrainConfig):
        self.calls.append(("train", cfg))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / RUN_FILE).write_text(json.dumps({"config": to_dict(cfg)}))
        for d in mf.sae_dirs(cfg):
            d.mkdir(parents=True)
            (d / WEIGHTS_FILE).write_bytes(b"weights of " + json.dumps(to_dict(cfg)).encode())
            (d / CFG_FILE).write_text(json.dumps(SaeConfig("topk", 16, 32, k=4, complete=True).to_dict()))

    def evaluate(self, cfg: EvalConfig):
        self.calls.append(("eval", cfg))
        rec = outputs.eval_record(cfg)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "report.json").write_text("[]")
        outputs.write_record(Path(cfg.out), rec)

    def inspect(self, cfg: InspectConfig):
        self.calls.append(("inspect", cfg))
        rec = outputs.inspect_record(cfg)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "index.html").write_text("<html></html>")
        outputs.write_record(Path(cfg.out), rec)

    def stages(self):
        return mf.Stages(self.harvest, self.train, self.evaluate, self.inspect)


def test_run_skips_complete_stages_and_resumes_training(tmp_path, monkeypatch):
    m = mf.parse_manifest({"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE], "seq_len": 16}})
    rec = Recorder()
    # A crash left a checkpoint: the next run resumes.
    checkpoint_path(m.train.out).parent.mkdir(parents=True)
    checkpoint_path(m.train.out).write_text("step-000000010\n")
    monkeypatch.setattr(mf, "train_done", lambda cfg: False)
    mf.run(m, rec.stages(), stage="harvest", echo=lambda s: None)
    mf.run(m, rec.stages(), stage="train", echo=lambda s: None)
    assert [c[0] for c in rec.calls] == ["harvest", "train"]
    assert rec.calls[0][1].shard is None and rec.calls[1][1].resume is True
    monkeypatch.undo()

    rec.calls.clear()
    said: list[str] = []
    mf.run(m, rec.stages(), echo=said.append)  # harvest and train complete: only eval runs
    assert [c[0] for c in rec.calls] == ["eval"]
    assert any("harvest" in s and "complete" in s for s in said) and any("train" in s for s in said)
    rec.calls.clear()
    mf.run(m, rec.stages(), echo=said.append)
    assert rec.calls == []
    assert mf.status(m) == {"harvest": True, "train": True, "eval": True, "inspect": True}


def test_changed_eval_and_inspect_settings_redo_those_stages(tmp_path, monkeypatch):
    data = {"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE], "seq_len": 16}, "inspect": {"top": 20}}
    rec = Recorder()
    mf.run(mf.parse_manifest(data), rec.stages(), echo=lambda s: None)
    assert [c[0] for c in rec.calls] == ["harvest", "train", "eval", "inspect"]
    rec.calls.clear()
    said: list[str] = []
    mf.run(mf.parse_manifest(data), rec.stages(), echo=said.append)
    assert rec.calls == []  # nothing changed: every stage is current
    assert said[-5].startswith("run: ") and all("skipped" in line for line in said[-4:])

    rec.calls.clear()
    said.clear()
    changed = {**data, "eval": {"max_tokens": 2048}, "inspect": {"top": 5}}
    mf.run(mf.parse_manifest(changed), rec.stages(), echo=said.append)
    assert [c[0] for c in rec.calls] == ["eval", "inspect"]
    assert any("max_tokens: 65536 → 2048" in line and "redoing" in line for line in said)
    assert any("top: 20 → 5" in line and "redoing" in line for line in said)
    assert any(line.split()[:2] == ["eval", "redone"] for line in said)
    rec.calls.clear()
    mf.run(mf.parse_manifest(changed), rec.stages(), echo=lambda s: None)
    assert rec.calls == []

    # The same run named by another spelling of its path is the same run.
    monkeypatch.chdir(tmp_path)
    mf.run(mf.parse_manifest({**changed, "run_dir": "run"}), rec.stages(), echo=lambda s: None)
    assert rec.calls == []

    # New weights in an SAE directory make the report and its pages stale too.
    m = mf.parse_manifest(changed)
    (m.eval.sae_dirs[0] / WEIGHTS_FILE).write_bytes(b"retrained")
    assert mf.eval_changes(m.eval) == [f"{m.eval.sae_dirs[0].name}: changed"]
    mf.run(m, rec.stages(), echo=lambda s: None)
    assert [c[0] for c in rec.calls] == ["eval", "inspect"]

    # --redo reruns one stage on purpose; without --stage it is refused.
    rec.calls.clear()
    mf.run(m, rec.stages(), stage="eval", redo=True, echo=lambda s: None)
    assert [c[0] for c in rec.calls] == ["eval"]
    with pytest.raises(SaeError, match="--redo reruns one stage"):
        mf.run(m, rec.stages(), redo=True)


def test_changed_training_settings_are_refused_until_redone(tmp_path):
    data = {"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE], "seq_len": 16}}
    rec = Recorder()
    mf.run(mf.parse_manifest(data), rec.stages(), echo=lambda s: None)
    changed = mf.parse_manifest({**data, "train": {"lr": 0.001, "device": "cpu"}})
    refused = r"trained with other settings \(lr: None then, 0.001 now\).*--stage train --redo"
    with pytest.raises(SaeError, match=refused):
        mf.run(changed, rec.stages(), echo=lambda s: None)
    rec.calls.clear()
    mf.run(changed, rec.stages(), stage="train", redo=True, echo=lambda s: None)
    assert [c[0] for c in rec.calls] == ["train"] and rec.calls[0][1].lr == 0.001
    mf.run(changed, rec.stages(), echo=lambda s: None)  # the report is of the old SAEs: redone
    assert [c[0] for c in rec.calls] == ["train", "eval"]
    # a device change alone retrains nothing (it does not change what is computed)
    rec.calls.clear()
    mf.run(mf.parse_manifest({**data, "train": {"lr": 0.001}}), rec.stages(), echo=lambda s: None)
    assert rec.calls == []


def test_cli_redo_needs_a_stage(tmp_path):
    path = write(tmp_path, yaml.safe_dump({"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE]}}))
    r = CliRunner().invoke(main, ["run", str(path), "--redo"])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "--redo reruns one stage" in r.stderr
    assert not (tmp_path / "run").exists()


def test_redo_deletes_only_a_training_run_of_ours(tmp_path):
    m = mf.parse_manifest({"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE], "seq_len": 16}})
    Path(m.train.out).mkdir(parents=True)
    (Path(m.train.out) / "notes.txt").write_text("mine")
    with pytest.raises(SaeError, match="holds no training run of ours"):
        mf.run(m, Recorder().stages(), stage="train", redo=True)
    assert (Path(m.train.out) / "notes.txt").read_text() == "mine"


def test_run_stages_for_array_jobs(tmp_path):
    m = mf.parse_manifest({"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE], "seq_len": 16}})
    rec = Recorder()
    mf.run(m, rec.stages(), stage="init")
    mf.run(m, rec.stages(), stage="harvest", shard="1/3")
    mf.run(m, rec.stages(), stage="finalize")
    flags = [(c[1].init, c[1].shard, c[1].finalize) for c in rec.calls]
    assert flags == [(True, None, False), (False, "1/3", False), (False, None, True)]
    assert [c[0] for c in rec.calls] == ["harvest"] * 3  # no training before the store is done


def test_a_finished_store_with_other_settings_is_not_reused(tmp_path):
    m = mf.parse_manifest({"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE], "seq_len": 32}})
    make_store(m.harvest.out, seq_len=16, n_contexts=8, chunk_rows=32, shard_chunks=2)
    with pytest.raises(SaeError, match="made with other settings .*seq_len: store has 16, manifest 32"):
        mf.run(m, Recorder().stages())
    # a store read in corpus order is not one sampled through the shuffle buffer
    m = mf.parse_manifest({"run_dir": str(tmp_path / "run2"), "harvest": {"sites": [SITE], "seq_len": 16}})
    make_store(m.harvest.out, seq_len=16, n_contexts=8, chunk_rows=32, shard_chunks=2, shuffle_buffer=0)
    with pytest.raises(SaeError, match="shuffle_buffer: store has 0, manifest 10000.*--redo"):
        mf.run(m, Recorder().stages())


def test_one_list_of_stages():
    """`sae run --stage`, the local runner and the SLURM chain share sae.manifest.STAGES."""
    from sae import slurm

    assert mf.STAGES == ("init", "harvest", "finalize", "train", "eval", "inspect")
    assert not hasattr(slurm, "JOBS") and slurm.STAGES is mf.STAGES
    m = mf.parse_manifest(base())
    assert list(slurm.scripts(m)) == list(mf.STAGES[:-1])  # no inspect section: no inspect job
    assert list(slurm.scripts(mf.parse_manifest(base(inspect={})))) == list(mf.STAGES)
    assert mf.done_stages(m) == {"inspect"}  # no inspect section: the optional stage has nothing to do


def test_manifest_does_not_import_slurm():
    """The dependency runs one way, sae.slurm → sae.manifest (no import cycle)."""
    import subprocess
    import sys

    code = "import sys, sae.manifest; assert 'sae.slurm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
