"""`sae submit --scheduler slurm`: a manifest → six sbatch scripts chained by `afterok` dependencies.

```
init      pre-allocate the store, write its plan (tokenizes the corpus once)  sae run M --stage init
harvest   array job; task i of N writes its fixed, shard-aligned slice        sae run M --stage harvest --shard i/N
finalize  check every shard marker, write manifest.json                       sae run M --stage finalize
train     the whole sweep; torchrun, one process per GPU, when several        sae run M --stage train
eval      splice the SAEs into the model, write the report                    sae run M --stage eval
inspect   feature pages of the SAEs; submitted only with an inspect section   sae run M --stage inspect
```
Every job re-invokes the CLI on a copy of the manifest kept in run_dir/slurm/, and `sae run` skips finished
work, so resubmitting a partly finished run (or one array task, `sbatch --array=3 harvest.sbatch`) is safe.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from . import atomic
from .errors import SaeError
from .manifest import STAGES, Manifest, SlurmConfig, check_slurm, done_stages, slurm_config


class Job(NamedTuple):
    """One sbatch script of a run."""

    name: str
    """Its stage, one of sae.manifest.STAGES."""
    script: Path
    """The script written into run_dir/slurm/."""
    array: str | None
    """The `--array` range of an array job."""


def slurm_dir(m: Manifest) -> Path:
    """Where the scripts, logs, the manifest copy and jobs.json go."""
    return Path(m.run_dir).absolute() / "slurm"


def _header(m: Manifest, job: str, *, time: str, gpus: int, array: str | None) -> list[str]:
    s = m.slurm
    logs = slurm_dir(m) / "logs"
    lines = [f"--job-name={s.job_name}-{job}"]
    lines += [f"--partition={s.partition}"] if s.partition else []
    lines += [f"--account={s.account}"] if s.account else []
    lines += [f"--time={time}", "--nodes=1", "--ntasks=1", f"--cpus-per-task={s.cpus}"]
    lines += [f"--mem={s.mem}"] if s.mem else []
    if gpus:
        lines.append(f"--gres=gpu:{s.gpu_type + ':' if s.gpu_type else ''}{gpus}")
    if array:
        lines.append(f"--array={array}")
    # Jobs run where `sae submit` ran, so relative paths in the manifest mean what they meant there.
    lines.append(f"--chdir={Path.cwd()}")
    lines.append(f"--output={logs / ('%x-%A_%a.out' if array else '%x-%j.out')}")
    lines += [line.removeprefix("#SBATCH").strip() for line in s.extra]
    return ["#SBATCH " + line for line in lines]


def scripts(m: Manifest) -> dict[str, tuple[str, str | None]]:
    """Text and array range of each job's script, by job name (nothing is written)."""
    s = m.slurm
    manifest = shlex.quote(str(slurm_dir(m) / "manifest.yaml"))
    n = s.harvest_tasks
    array = f"0-{n - 1}" + (f"%{s.harvest_max_running}" if s.harvest_max_running else "")
    nproc = s.nproc if s.nproc is not None else max(s.gpus, 1)
    one_gpu = min(s.gpus, 1)
    train_cmd = f"sae run {manifest} --stage train"
    if nproc > 1:
        # One process per GPU on this node; --standalone picks a free rendezvous port, so jobs sharing a node
        # do not collide.
        train_cmd = f"torchrun --standalone --nproc_per_node={nproc} -m sae.cli run {manifest} --stage train"
    # The store records the dtype the model ran in, and `auto` resolves by device: an init without the tasks'
    # GPU would record float32 where the tasks run bfloat16, and they would refuse the store.
    init_gpu = one_gpu if m.harvest.model_dtype == "auto" else 0
    plan = {
        "init": ("pre-allocate the store and write its plan", s.init_time, init_gpu, None,
                 f"sae run {manifest} --stage init"),
        "harvest": (
            f"array task i of {n} writes its shard-aligned slice of the store",
            s.harvest_time,
            one_gpu,
            array,
            f'sae run {manifest} --stage harvest --shard "${{SLURM_ARRAY_TASK_ID}}/{n}"',
        ),
        "finalize": ("check every shard marker, write manifest.json", s.finalize_time, 0, None,
                     f"sae run {manifest} --stage finalize"),
        "train": ("train the sweep (resumes from its checkpoint)", s.train_time, s.gpus, None, train_cmd),
        "eval": ("splice the SAEs into the model, write the report", s.eval_time, one_gpu, None,
                 f"sae run {manifest} --stage eval"),
        "inspect": ("write the feature pages of the SAEs (only with an inspect section)", s.inspect_time, one_gpu,
                    None, f"sae run {manifest} --stage inspect"),
    }  # fmt: skip
    out = {}
    for job in STAGES:  # in dependency order: `submit` chains them so
        if job == "inspect" and m.inspect is None:
            continue  # the optional stage: no job without the manifest's inspect section
        what, time, gpus, arr, cmd = plan[job]
        text = "\n".join(
            [
                "#!/bin/bash",
                f"# {job}: {what}.",
                f"# Written by `sae submit` for {m.path}. Finished work is skipped, so resubmitting is safe.",
                *_header(m, job, time=time, gpus=gpus, array=arr),
                "",
                "set -eo pipefail",
                *s.setup,
                cmd,
                "",
            ]
        )
        out[job] = (text, arr)
    return out


def write_scripts(m: Manifest) -> list[Job]:
    """Write the six scripts, a copy of the manifest and the logs folder into run_dir/slurm/."""
    d = slurm_dir(m)
    for p in (d, Path.cwd()):
        # sbatch reads #SBATCH lines itself, without a shell: a path with whitespace cannot be written there.
        if any(c.isspace() for c in str(p)):
            raise SaeError(f"{p} contains whitespace, which #SBATCH lines cannot hold; use a path without it")
    (d / "logs").mkdir(parents=True, exist_ok=True)
    # The jobs read this copy, so editing the original while jobs wait cannot change a run halfway.
    atomic.write_bytes(d / "manifest.yaml", Path(m.path).read_bytes())
    jobs = []
    for job, (text, arr) in scripts(m).items():
        path = d / f"{job}.sbatch"
        atomic.write_bytes(path, text.encode())
        path.chmod(0o755)
        jobs.append(Job(job, path, arr))
    return jobs


def submit(
    m: Manifest,
    *,
    dry_run: bool = False,
    sbatch: str = "sbatch",
    echo: Callable[[str], Any] = print,
) -> dict[str, str]:
    """Write the scripts and submit the jobs not yet complete, each depending on the previous (afterok).

    Returns job name → job id (`dry-run` when only written). Stages whose outputs are complete are left out.
    """
    # What is done is decided first: a finished run needs no scheduler, and a refusal writes nothing.
    skip = done_stages(m)
    names = list(scripts(m))
    if not dry_run and set(names) <= skip:
        echo(f"nothing to submit: every job of {m.path} ({', '.join(names)}) is complete")
        return {}
    if not dry_run and not shutil.which(sbatch):
        raise SaeError(f"`{sbatch}` not found: run `sae submit` on a SLURM login node, or pass --dry-run")
    jobs = write_scripts(m)
    ids: dict[str, str] = {}
    previous: str | None = None
    for job in jobs:
        if job.name in skip:
            echo(f"{job.name:9s} complete, not submitted")
            continue
        cmd = [sbatch, "--parsable"]
        if previous:
            # Without kill-on-invalid-dep a job whose dependency failed would wait in the queue forever.
            cmd += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
        cmd.append(str(job.script))
        if dry_run:
            ids[job.name] = previous = f"<{job.name}>"
            echo(f"{job.name:9s} {' '.join(cmd)}")
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            done_ids = ", ".join(f"{k} {v}" for k, v in ids.items()) or "none"
            raise SaeError(
                f"sbatch refused {job.script.name}: {(r.stderr or r.stdout).strip()}. Already submitted: "
                f"{done_ids} (scancel them, fix the manifest's slurm section, submit again)"
            )
        ids[job.name] = previous = r.stdout.strip().split(";")[0]
        echo(f"{job.name:9s} job {previous}" + (f" (array {job.array})" if job.array else ""))
    if not dry_run:
        atomic.write_json(slurm_dir(m) / "jobs.json", ids)
    echo(f"scripts and logs: {slurm_dir(m)}")
    return ids


__all__ = [
    "Job",
    "SlurmConfig",
    "check_slurm",
    "slurm_config",
    "scripts",
    "slurm_dir",
    "submit",
    "write_scripts",
]
