"""`sae submit --scheduler slurm`: a manifest → five sbatch scripts chained by `afterok` dependencies.

```
init      pre-allocate the store, write its plan (tokenizes the corpus once)  sae run M --stage init
harvest   array job; task i of N writes its fixed, shard-aligned slice        sae run M --stage harvest --shard i/N
finalize  check every shard marker, write manifest.json                       sae run M --stage finalize
train     the whole sweep; torchrun, one process per GPU, when several        sae run M --stage train
eval      splice the SAEs into the model, write the report                    sae run M --stage eval
```
Every job re-invokes the CLI on a copy of the manifest kept in run_dir/slurm/, and `sae run` skips finished
work, so resubmitting a partly finished run (or one array task, `sbatch --array=3 harvest.sbatch`) is safe.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import atomic
from .config import ConfigError, make
from .errors import SaeError

if TYPE_CHECKING:
    from .manifest import Manifest


@dataclass
class SlurmConfig:
    """The `slurm:` section of a manifest: resources of the jobs `sae submit --scheduler slurm` writes."""

    partition: str | None = None
    """Partition (`--partition`); default: the cluster's default partition."""

    account: str | None = None
    """Account charged for the jobs (`--account`)."""

    gpus: int = 1
    """GPUs of the training job (torchrun runs one process per GPU); harvest tasks and eval use one each, none if 0."""

    gpu_type: str | None = None
    """GPU type in the request, `--gres=gpu:TYPE:N` (e.g. `a100`); default: any."""

    nproc: int | None = None
    """Training processes per node (torchrun --nproc_per_node); default: `gpus`. With 1, plain `sae train` runs."""

    cpus: int = 8
    """CPU cores of each job (`--cpus-per-task`)."""

    mem: str | None = None
    """Memory of each job (`--mem`, e.g. `64G`); default: the partition's."""

    harvest_tasks: int = 1
    """Harvest array size N: task i of N writes a fixed, shard-aligned slice of the store."""

    harvest_max_running: int | None = None
    """At most this many harvest tasks at once (`--array=0-(N-1)%M`); default: no limit."""

    init_time: str = "02:00:00"
    """Time limit of the init job (tokenizes the corpus and writes the plan). Quote it in YAML: '02:00:00'."""

    harvest_time: str = "12:00:00"
    """Time limit of each harvest array task."""

    finalize_time: str = "00:30:00"
    """Time limit of the finalize job."""

    train_time: str = "24:00:00"
    """Time limit of the training job (it checkpoints on SIGTERM; resubmit to continue)."""

    eval_time: str = "02:00:00"
    """Time limit of the eval job."""

    extra: tuple[str, ...] = ()
    """Extra `#SBATCH` lines for every job, e.g. `--qos=high` or `--constraint=a100` (a YAML list)."""

    setup: tuple[str, ...] = ()
    """Shell lines every job runs first, e.g. `module load cuda` or `source ~/venvs/sae/bin/activate` (a YAML list)."""

    job_name: str = "sae"
    """Prefix of the job names (`<prefix>-init`, `<prefix>-harvest`, ...)."""


# SLURM's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds.
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
TIME_FIELDS = ("init_time", "harvest_time", "finalize_time", "train_time", "eval_time")


def slurm_config(values: dict[str, Any]) -> SlurmConfig:
    """SlurmConfig from a manifest's `slurm:` mapping; ConfigError naming the key."""
    for name in TIME_FIELDS:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 4:00:00 as the base-60 integer 14400, which SLURM would take as minutes.
            raise ConfigError(
                f"{name}: {value!r} is a number, not a SLURM time; quote it in YAML: '04:00:00' (an unquoted "
                "H:MM:SS is read as seconds)"
            )
    cfg = make(SlurmConfig, values)
    check_slurm(cfg)
    return cfg


def check_slurm(cfg: SlurmConfig) -> None:
    """Values `make` cannot check by type alone; ConfigError naming the key."""
    for name in TIME_FIELDS:
        value = getattr(cfg, name)
        if not _TIME.match(value):
            raise ConfigError(f"{name}: {value!r} is not a SLURM time; use 'HH:MM:SS', 'MM', 'D-HH' or 'D-HH:MM:SS'")
    for name, low in (("gpus", 0), ("cpus", 1), ("harvest_tasks", 1), ("nproc", 1), ("harvest_max_running", 1)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"{name}: {value} is below {low}")
    for line in cfg.extra:
        if not line.removeprefix("#SBATCH").strip().startswith("-"):
            raise ConfigError(f"extra: {line!r} is not an sbatch option (such as --qos=high)")


class Job(NamedTuple):
    """One sbatch script of a run."""

    name: str
    """Stage: init, harvest, finalize, train or eval."""
    script: Path
    """The script written into run_dir/slurm/."""
    array: str | None
    """The `--array` range of an array job."""


JOBS = ("init", "harvest", "finalize", "train", "eval")
"""The jobs of a run, in dependency order (each waits for the previous with afterok)."""


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
    }  # fmt: skip
    out = {}
    for job, (what, time, gpus, arr, cmd) in plan.items():
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
    """Write the five scripts, a copy of the manifest and the logs folder into run_dir/slurm/."""
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
    from .manifest import status

    jobs = write_scripts(m)
    done = status(m)
    skip = {"init", "harvest", "finalize"} if done["harvest"] else set()
    skip |= {j for j in ("train", "eval") if done[j]}
    if not dry_run and not shutil.which(sbatch):
        raise SaeError(f"`{sbatch}` not found: run `sae submit` on a SLURM login node, or pass --dry-run")
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
    "JOBS",
    "Job",
    "SlurmConfig",
    "check_slurm",
    "slurm_config",
    "scripts",
    "slurm_dir",
    "submit",
    "write_scripts",
]
