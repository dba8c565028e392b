"""`sae submit --scheduler slurm`: the scripts it writes, and a whole run through a stand-in `sbatch` that must
end with the very store and report `sae run` makes from the same manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY_TEXT, make_model, make_tokenizer
from safetensors.numpy import load_file

from sae import slurm, store
from sae.cli import main
from sae.config import field_docs
from sae.manifest import STAGES, load_manifest
from sae.slurm import SlurmConfig

SITE = "blocks.2.hook_resid_post"
JOBS = ("init", "harvest", "finalize", "train", "eval")

# The stand-in: records its arguments and the script's #SBATCH options, refuses a dependency on a job it never
# ran or that failed (as afterok would hold it forever), then runs the job at once, every array task at the
# same time, with the SLURM variables a real array task gets. Jobs arrive in dependency order, so running each
# on submission runs them in that order.
SBATCH = r"""#!PYTHON
import json, os, re, subprocess, sys
from pathlib import Path

state_path = Path(os.environ["FAKE_SLURM_STATE"])
state = json.loads(state_path.read_text()) if state_path.exists() else {"jobs": []}
args = sys.argv[1:]
script = Path(args[-1])
opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in args[:-1])
for line in script.read_text().splitlines():
    if line.startswith("#SBATCH --"):
        key, _, value = line[len("#SBATCH --"):].partition("=")
        opts.setdefault(key, value or True)
job_id = str(1000 + len(state["jobs"]))
record = {"id": job_id, "script": script.name, "cli": args[:-1], "options": opts, "ok": False}
deps = opts.get("dependency", "")
ok_ids = {j["id"] for j in state["jobs"] if j["ok"]}
if deps and not all(d in ok_ids for d in deps.removeprefix("afterok:").split(":")):
    record["skipped"] = True
else:
    array = opts.get("array")
    tasks = [None]
    if array:
        lo, hi = re.match(r"(\d+)-(\d+)", array).groups()
        tasks = list(range(int(lo), int(hi) + 1))
    procs = []
    for t in tasks:
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NAME=opts["job-name"])
        log = opts["output"].replace("%x", opts["job-name"]).replace("%j", job_id).replace("%A", job_id)
        if t is not None:
            env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_COUNT=str(len(tasks)),
                       SLURM_ARRAY_TASK_MIN=str(tasks[0]), SLURM_ARRAY_TASK_MAX=str(tasks[-1]))
            log = log.replace("%a", str(t))
        out = open(log, "w")
        procs.append(subprocess.Popen(["bash", str(script)], cwd=opts["chdir"], env=env, stdout=out, stderr=out))
    record["returncodes"] = [p.wait() for p in procs]
    record["ok"] = all(rc == 0 for rc in record["returncodes"])
state["jobs"].append(record)
state_path.write_text(json.dumps(state))
print(job_id + ("" if "parsable" not in opts else ";fakecluster"))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", n_layers=4).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_corpus(folder: Path, n_docs: int) -> None:
    """train.txt and heldout.txt of shuffled words of the tokenizer's text (eval finds heldout.txt itself)."""
    words = TINY_TEXT.split()
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", n_docs), ("heldout.txt", n_docs // 4)):
        docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(n)]
        (folder / name).write_text("\n\n".join(docs) + "\n")


def manifest(tmp_path: Path, model_dir: Path, run_dir: str, harvest: dict | None = None, **slurm) -> Path:
    write_corpus(tmp_path / "corpus", 40)
    data = {
        "run_dir": run_dir,
        "harvest": {
            "model": str(model_dir),
            "dataset": str(tmp_path / "corpus" / "train.txt"),
            "sites": [SITE],
            "seq_len": 16,
            "max_tokens": 1024,
            "batch_size": 8,
            "chunk_rows": 32,
            "shard_chunks": 2,
            "dtype": "float32",
            "model_dtype": "float32",
            "device": "cpu",
            **(harvest or {}),
        },
        "train": {
            "arch": ["batchtopk", "topk"],
            "k": [4],
            "expansion": [2],
            "batch_size": 64,
            "device": "cpu",
            "decoder": "dense",  # `auto` times both paths: a choice by speed is not reproducible
        },
        "eval": {"max_tokens": 256, "seq_len": 16, "batch_size": 8, "device": "cpu"},
        "slurm": {"gpus": 0, "harvest_tasks": 3, "cpus": 2, **slurm},
    }
    path = tmp_path / f"{run_dir.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sbatch_lines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", text, re.M))


def test_dry_run_writes_the_scripts_with_resources_and_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slurm = {
        "partition": "gpu", "account": "lab", "gpus": 4, "gpu_type": "a100", "cpus": 12, "mem": "96G",
        "harvest_tasks": 8, "harvest_max_running": 3, "train_time": "1-12:00:00",
        "extra": ["--qos=high", "#SBATCH --constraint=ib"],
        "setup": ["module load cuda/12.4", "source ~/venv/bin/activate"],
    }  # fmt: skip
    path = manifest(tmp_path, tmp_path / "model", "runs/a", **slurm)
    r = CliRunner().invoke(main, ["submit", str(path), "--scheduler", "slurm", "--dry-run"])
    assert r.exit_code == 0, r.output
    d = tmp_path / "runs/a/slurm"
    assert sorted(p.name for p in d.glob("*.sbatch")) == [f"{j}.sbatch" for j in sorted(JOBS)]
    assert (d / "manifest.yaml").read_text() == path.read_text() and (d / "logs").is_dir()
    assert not (d / "jobs.json").exists()
    text = {j: (d / f"{j}.sbatch").read_text() for j in JOBS}
    opts = {j: sbatch_lines(t) for j, t in text.items()}
    for j in JOBS:
        o = opts[j]
        assert (o["partition"], o["account"], o["cpus-per-task"], o["mem"]) == ("gpu", "lab", "12", "96G")
        assert o["job-name"] == f"sae-{j}" and o["chdir"] == str(tmp_path)
        assert o["qos"] == "high" and o["constraint"] == "ib"
        assert text[j].index("module load cuda/12.4") < text[j].index(f"run {d / 'manifest.yaml'} --stage {j}")
        assert text[j].startswith("#!/bin/bash\n")
    assert opts["train"]["time"] == "1-12:00:00" and opts["harvest"]["time"] == "12:00:00"
    assert opts["harvest"]["array"] == "0-7%3" and "array" not in opts["init"]
    assert opts["harvest"]["output"].endswith("logs/%x-%A_%a.out") and opts["eval"]["output"].endswith("%x-%j.out")
    assert (opts["harvest"]["gres"], opts["train"]["gres"], opts["eval"]["gres"]) == (
        "gpu:a100:1",
        "gpu:a100:4",
        "gpu:a100:1",
    )
    assert "gres" not in opts["finalize"] and "gres" not in opts["init"]  # model_dtype is explicit here
    assert '--stage harvest --shard "${SLURM_ARRAY_TASK_ID}/8"' in text["harvest"]
    assert "--stage init" in text["init"] and "--stage finalize" in text["finalize"] and "--stage eval" in text["eval"]
    assert "torchrun --standalone --nproc_per_node=4 -m sae.cli run" in text["train"]
    # The chain: each job after the previous, afterok.
    out = r.output
    assert "init      sbatch --parsable " in out
    for prev, job in zip(JOBS, JOBS[1:], strict=False):
        dep = f"--dependency=afterok:<{prev}> --kill-on-invalid-dep=yes"
        assert f"{job:9s} sbatch --parsable {dep} {d}/{job}.sbatch" in out


def test_cpu_and_single_gpu_jobs_run_plain_sae_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for gpus, gres in ((0, None), (1, "gpu:1")):
        path = manifest(tmp_path, tmp_path / "model", f"runs/g{gpus}", harvest={"model_dtype": "auto"}, gpus=gpus)
        m = load_manifest(path)
        assert CliRunner().invoke(main, ["submit", str(path), "--scheduler", "slurm", "--dry-run"]).exit_code == 0
        train = (m.run_dir / "slurm/train.sbatch").read_text()
        assert "torchrun" not in train and "--stage train" in train
        assert sbatch_lines(train).get("gres") == gres
        # With model_dtype auto, init runs where the tasks run, so it records the dtype they will use.
        assert sbatch_lines((m.run_dir / "slurm/init.sbatch").read_text()).get("gres") == gres


def test_submit_without_sbatch_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    path = manifest(tmp_path, tmp_path / "model", "runs/b")
    r = CliRunner().invoke(main, ["submit", str(path), "--scheduler", "slurm"])
    assert r.exit_code == 2 and "`sbatch` not found" in r.output and "--dry-run" in r.output
    assert not (tmp_path / "runs/b/slurm").exists()  # refused before writing the scripts


def test_submit_of_a_finished_run_needs_no_sbatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    path = manifest(tmp_path, tmp_path / "model", "runs/done")
    monkeypatch.setattr(slurm, "done_stages", lambda m: set(STAGES))  # as for a run whose every output is complete
    r = CliRunner().invoke(main, ["submit", str(path), "--scheduler", "slurm"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("nothing to submit: every job of ") and "not found" not in r.output, r.output
    assert not (tmp_path / "runs/done/slurm").exists()


def test_stand_in_sbatch_run_equals_sae_run(tmp_path, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH.replace("PYTHON", sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    # the jobs' `sae` is this interpreter's (a `sae` found on PATH may belong to another environment)
    (bin_dir / "sae").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sae.cli "$@"\n')
    (bin_dir / "sae").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(tmp_path / "slurm-state.json"))

    local = manifest(tmp_path, model_dir, "runs/local")
    r = CliRunner().invoke(main, ["run", str(local)])
    assert r.exit_code == 0, r.output

    cluster = manifest(tmp_path, model_dir, "runs/cluster")
    r = CliRunner().invoke(main, ["submit", str(cluster), "--scheduler", "slurm"])
    logs = {p.name: p.read_text() for p in (tmp_path / "runs/cluster/slurm/logs").glob("*")}
    assert r.exit_code == 0, (r.output, logs)
    jobs = json.loads((tmp_path / "slurm-state.json").read_text())["jobs"]
    assert [j["script"] for j in jobs] == [f"{j}.sbatch" for j in JOBS]
    assert all(j["ok"] for j in jobs), (jobs, logs)
    assert jobs[1]["options"]["array"] == "0-2" and len(jobs[1]["returncodes"]) == 3
    for prev, job in zip(jobs, jobs[1:], strict=False):
        assert job["options"]["dependency"] == f"afterok:{prev['id']}"
    assert "--dependency" not in " ".join(jobs[0]["cli"])
    ids = json.loads((tmp_path / "runs/cluster/slurm/jobs.json").read_text())
    assert ids == {j: job["id"] for j, job in zip(JOBS, jobs, strict=True)}
    assert all(f"{j:9s} job {ids[j]}" in r.output for j in JOBS)
    # The three array tasks each wrote their own shards (none did all the work).
    task_logs = [v for k, v in logs.items() if k.startswith("sae-harvest-")]
    assert len(task_logs) == 3 and all("task" in t for t in task_logs)

    # Same store: plan, manifest (checksums of every shard, statistics) and arrays.
    a, b = (tmp_path / f"runs/{n}/store.zarr" for n in ("local", "cluster"))
    assert store.read_plan(a) == store.read_plan(b)
    assert store.read_manifest(a) == store.read_manifest(b)
    sa, sb = store.Store.open(a), store.Store.open(b)
    for name in (SITE, *store.META_ARRAYS, "input_ids"):
        np.testing.assert_array_equal(sa.array(name)[:], sb.array(name)[:])
    # Same SAEs and the same report.
    for d in load_manifest(local).eval.sae_dirs:
        wa = load_file(tmp_path / "runs/local/saes" / d.name / "sae_weights.safetensors")
        wb = load_file(tmp_path / "runs/cluster/saes" / d.name / "sae_weights.safetensors")
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    # Every number equal; only the paths name the other run directory.
    ra, rb = ((tmp_path / f"runs/{n}/report/report.json").read_text() for n in ("local", "cluster"))
    assert json.loads(ra.replace("runs/local/", "runs/cluster/")) == json.loads(rb) and len(json.loads(ra)) == 2

    # Everything is complete now: submitting again submits nothing, and says so.
    r = CliRunner().invoke(main, ["submit", str(cluster), "--scheduler", "slurm"])
    assert r.exit_code == 0 and "nothing to submit: every job of " in r.output, r.output
    assert len(json.loads((tmp_path / "slurm-state.json").read_text())["jobs"]) == 5
    # ... even where there is no sbatch at all (a finished run needs no scheduler)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = CliRunner().invoke(main, ["submit", str(cluster), "--scheduler", "slurm"])
    assert r.exit_code == 0 and "nothing to submit" in r.output and "not found" not in r.output, r.output


def test_every_slurm_key_is_documented():
    docs = (Path(__file__).parents[1] / "docs/cluster.md").read_text()
    fields = [f.name for f in dataclasses.fields(SlurmConfig)]
    assert not [f for f in fields if f"`{f}`" not in docs]
    assert all(field_docs(SlurmConfig).get(f) for f in fields)
