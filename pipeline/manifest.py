"""Run manifests: one YAML file describes a whole run (harvest → train → eval [→ inspect], plus cluster settings).

```yaml
run_dir: runs/demo                # required; the defaults below live inside it
description: free text            # optional
harvest: {sites: blocks.15.hook_resid_post, max_tokens: 200000}    # HarvestConfig fields
train: {arch: [batchtopk, topk], k: 32}                              # TrainConfig fields
eval: {max_tokens: 16384}                                            # EvalConfig fields
inspect: {top: 20}                # optional: InspectConfig fields; without the section the stage is off
slurm: {partition: gpu, harvest_tasks: 8, gpus: 4}                   # SlurmConfig fields (below)
```
The sections are the very dataclasses behind the CLI flags, built with `sae.config.make`, so a manifest key, its
flag, its default and its help text cannot drift apart. Derived when not given: `harvest.out` =
run_dir/store.zarr, `train.out` = run_dir/saes, `eval.out` = run_dir/report, `train.store` = `harvest.out`,
`train.site` = the harvest's only site, `eval.sae_dirs` = the SAE directories of the training sweep; the inspect
stage pages every SAE of the sweep (or `inspect.sae_dir` alone) into `inspect.out`/<SAE name>, `inspect.out`
defaulting to run_dir/inspect. Relative paths
are relative to the working directory, as on the command line. Keys that a runner sets per invocation
(`harvest.shard`, `harvest.init`, `harvest.finalize`, `harvest.overwrite`, `train.resume`) are refused.

`run` executes the stages locally and skips every stage whose output is complete, so rerunning after a crash
continues where the run stopped (harvest skips finished shards and training resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from . import outputs
from .config import (
    RESUMABLE_CHANGES,
    ConfigError,
    EvalConfig,
    HarvestConfig,
    InspectConfig,
    TrainConfig,
    UnknownKeyError,
    make,
    to_dict,
    unknown_key,
)
from .errors import SaeError
from .outputs import setting_changes

STAGES = ("init", "harvest", "finalize", "train", "eval", "inspect")
"""The stages of a run, in dependency order: what `sae run --stage` accepts (besides `all`) and the jobs that
`sae submit` chains. init/harvest/finalize are the parts of the harvest that array jobs run separately; `harvest`
without `--shard` is the whole harvest. `inspect` is optional: it runs only when the manifest has an `inspect`
section (and counts as complete otherwise)."""

HARVEST_STAGES = STAGES[:3]
"""The stages that `sae harvest` runs (`--init`, `--shard`, `--finalize`)."""


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

    inspect_time: str = "02:00:00"
    """Time limit of the inspect job (when the manifest has an `inspect` section)."""

    extra: tuple[str, ...] = ()
    """Extra `#SBATCH` lines for every job, e.g. `--qos=high` or `--constraint=a100` (a YAML list)."""

    setup: tuple[str, ...] = ()
    """Shell lines every job runs first, e.g. `module load cuda` or `source ~/venvs/sae/bin/activate` (a YAML list)."""

    job_name: str = "sae"
    """Prefix of the job names (`<prefix>-init`, `<prefix>-harvest`, ...)."""


# SLURM's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds.
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
TIME_FIELDS = ("init_time", "harvest_time", "finalize_time", "train_time", "eval_time", "inspect_time")


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
    if cfg.gpus and cfg.nproc is not None and cfg.nproc > cfg.gpus:
        raise ConfigError(
            f"nproc: {cfg.nproc} training processes for gpus: {cfg.gpus}; each process needs a GPU of its own "
            "(or set gpus: 0 to train on CPUs)"
        )
    for line in cfg.extra:
        if not line.removeprefix("#SBATCH").strip().startswith("-"):
            raise ConfigError(f"extra: {line!r} is not an sbatch option (such as --qos=high)")


SECTIONS: dict[str, type] = {
    "harvest": HarvestConfig, "train": TrainConfig, "eval": EvalConfig, "inspect": InspectConfig, "slurm": SlurmConfig,
}  # fmt: skip
"""Manifest section → the config dataclass its keys are the fields of."""

TOP_LEVEL = ("run_dir", "description", *SECTIONS)
"""Keys allowed at the top of a manifest."""

RUNNER_KEYS = {
    "harvest": ("shard", "init", "finalize", "overwrite"),
    "train": ("resume",),
}
"""Fields that `sae run` / `sae submit` set per invocation; a manifest may not fix them."""


class Manifest(NamedTuple):
    """A validated run manifest."""

    path: Path
    """The YAML file it was read from (absolute)."""
    run_dir: Path
    """Folder that holds the run's store, SAEs, report and cluster scripts."""
    description: str
    """Free text from the manifest."""
    harvest: HarvestConfig
    """Settings of `sae harvest`."""
    train: TrainConfig
    """Settings of `sae train` (store, site and out filled in)."""
    eval: EvalConfig
    """Settings of `sae eval` (sae_dirs and out filled in)."""
    slurm: SlurmConfig
    """Settings of `sae submit --scheduler slurm`."""
    inspect: InspectConfig | None = None
    """Settings of `sae inspect` (out: the folder of the per-SAE sites); None when the manifest has no `inspect`
    section, which turns the stage off."""


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; ConfigError naming the offending key (and the allowed keys or values)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SaeError(f"cannot read manifest {path}: {e.strerror or e}") from None
    try:
        # safe_load: a manifest is data; tags such as !!python/object are refused, never executed.
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    try:
        return parse_manifest(data, path=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_manifest(data: Any, *, path: Path = Path("manifest.yaml")) -> Manifest:
    """Validate manifest `data` (the parsed YAML mapping) and derive the unset paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"a manifest is a mapping with keys {', '.join(TOP_LEVEL)}; got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TOP_LEVEL)
    if unknown:
        raise unknown_key(unknown[0], TOP_LEVEL)
    if not data.get("run_dir"):
        raise ConfigError("run_dir: required (the folder that holds the run's store, SAEs and report)")
    run_dir = Path(str(data["run_dir"]))
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file, not a folder")

    sections: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = data.get(name)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: a mapping of settings (key: value, keys as in --help); got {section!r}")
        for key in RUNNER_KEYS.get(name, ()):
            if key in section:
                raise ConfigError(
                    f"{name}.{key}: set by `sae run` / `sae submit` for each job; remove it from the manifest"
                )
        sections[name] = dict(section)
        names = [f.name for f in dataclasses.fields(SECTIONS[name])]
        typo = next((str(k) for k in section if k not in names), None)
        if typo is not None:  # before anything is derived, so a typo is named as such
            raise ConfigError(f"{name}: {unknown_key(typo, sorted(set(names) - set(RUNNER_KEYS.get(name, ()))))}")

    h, t, e = sections["harvest"], sections["train"], sections["eval"]
    h.setdefault("out", run_dir / "store.zarr")
    t.setdefault("out", run_dir / "saes")
    e.setdefault("out", run_dir / "report")
    harvest = _make("harvest", HarvestConfig, h)
    t.setdefault("store", harvest.out)
    if not t.get("site"):
        if len(harvest.sites) != 1:
            raise ConfigError(
                "train.site: required when harvest.sites does not name exactly one site "
                f"(harvest.sites: {', '.join(harvest.sites) or 'none'})"
            )
        t["site"] = harvest.sites[0]
    train = _make("train", TrainConfig, t)
    if Path(train.store) == Path(harvest.out) and harvest.sites and train.site not in harvest.sites:
        raise ConfigError(f"train.site: {train.site!r} is not one of harvest.sites: {', '.join(harvest.sites)}")
    # The eval stage loads the same model; the manifest's one permission for remote code covers both.
    e.setdefault("trust_remote_code", harvest.trust_remote_code)
    evaluate = _make("eval", EvalConfig, e)
    if not evaluate.sae_dirs:
        evaluate = dataclasses.replace(evaluate, sae_dirs=tuple(sae_dirs(train)))
    try:
        slurm = slurm_config(sections["slurm"])
    except ConfigError as err:
        raise ConfigError(f"slurm{': ' if isinstance(err, UnknownKeyError) else '.'}{err}") from None
    inspect = None
    if data.get("inspect") is not None:
        i = sections["inspect"]
        i.setdefault("out", run_dir / "inspect")
        i.setdefault("trust_remote_code", harvest.trust_remote_code)
        inspect = _make("inspect", InspectConfig, i)
    m = Manifest(path.absolute(), run_dir, str(data.get("description") or ""), harvest, train, evaluate, slurm)
    return m._replace(inspect=inspect)


def _make(section: str, cls: type, values: dict[str, Any]) -> Any:
    try:
        return make(cls, values, unlisted=RUNNER_KEYS.get(section, ()))
    except ConfigError as e:
        raise ConfigError(f"{section}{': ' if isinstance(e, UnknownKeyError) else '.'}{e}") from None


# --------------------------------------------------------------------------------------------------
# What a finished stage leaves behind.


def sae_dirs(cfg: TrainConfig) -> list[Path]:
    """The SAE directories the sweep of `cfg` writes (one per combination), named as `sae train` names them."""
    from .saedir import sweep_names  # the naming convention lives with the SAE directory format

    return [Path(cfg.out) / name for name in sweep_names(cfg)]


def harvest_done(cfg: HarvestConfig) -> bool:
    """The store at `cfg.out` is finalized (it has manifest.json) and was made for these sites and settings;
    SaeError when it is finished but made with other settings."""
    out = Path(cfg.out)
    if not (out / "manifest.json").is_file():
        return False
    from .store import read_attrs

    attrs = read_attrs(out)
    have = {**attrs, "sites": sorted(set(attrs.get("sites", ())))}  # harvest orders sites by depth
    wanted = {
        "sites": sorted(set(cfg.sites)), "seq_len": cfg.seq_len, "dtype": cfg.dtype, "codec": cfg.codec,
        "shuffle_buffer": cfg.shuffle_buffer,
    }  # fmt: skip
    have.setdefault("shuffle_buffer", 0)  # stores from before the shuffle read their corpus in order
    if cfg.chunk_rows is not None:
        wanted["chunk_rows"] = cfg.chunk_rows
    diff = [f"{k}: store has {have.get(k)!r}, manifest {v!r}" for k, v in wanted.items() if have.get(k) != v]
    if diff:
        raise SaeError(
            f"{out} is a finished store made with other settings ({'; '.join(diff)}); `sae run --stage harvest "
            "--redo` harvests it anew, or choose another run_dir"
        )
    return True


def _train_config(cfg: TrainConfig) -> dict[str, Any]:
    """`cfg` as `sae train` records it in run.json."""
    return to_dict(cfg)


def train_done(cfg: TrainConfig) -> bool:
    """Every SAE directory of the sweep holds its final cfg.json and weights, and training finished with these
    settings; SaeError when the finished SAEs were trained with other settings."""
    from .saedir import RUN_FILE, is_complete

    if not all(is_complete(d) for d in sae_dirs(cfg)):
        return False
    try:
        old = json.loads((Path(cfg.out) / RUN_FILE).read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        old = None  # SAEs from elsewhere, or a run that predates run.json: nothing to compare
    diff = [] if old is None else setting_changes(old, _train_config(cfg), RESUMABLE_CHANGES)
    if diff:
        shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in diff)
        raise SaeError(
            f"{cfg.out} holds SAEs trained with other settings ({shown}); `sae run --stage train --redo` trains "
            "them anew, or choose another run_dir"
        )
    return True


def eval_changes(cfg: EvalConfig) -> list[str] | None:
    """[] when the report in `cfg.out` is current, the differences when it is stale, None when there is none."""
    if not (Path(cfg.out) / "report.json").is_file():
        return None
    return outputs.changes(Path(cfg.out), outputs.eval_record(cfg))


def eval_done(cfg: EvalConfig) -> bool:
    """The report exists and was made with these settings from these SAEs."""
    return eval_changes(cfg) == []


def inspect_configs(m: Manifest) -> list[InspectConfig]:
    """One `sae inspect` per SAE the inspect stage pages: `inspect.sae_dir` when the manifest sets it, else every
    SAE of the sweep, each into `inspect.out`/<SAE directory name>."""
    if m.inspect is None:
        return []
    dirs = [Path(m.inspect.sae_dir)] if m.inspect.sae_dir is not None else sae_dirs(m.train)
    out = Path(m.inspect.out or Path(m.run_dir) / "inspect")
    return [dataclasses.replace(m.inspect, sae_dir=d, out=out / d.name) for d in dirs]


def inspect_changes(cfg: InspectConfig) -> list[str] | None:
    """As `eval_changes`, for the site of one `sae inspect`."""
    return outputs.changes(Path(cfg.out), outputs.inspect_record(cfg)) if cfg.out is not None else None


def inspect_done(m: Manifest) -> bool:
    """Every site of the inspect stage is written with these settings (or the manifest has no inspect stage)."""
    return all(inspect_changes(c) == [] for c in inspect_configs(m))


def checkpoint_exists(cfg: TrainConfig) -> bool:
    """A training checkpoint to resume from lies in `cfg.out`."""
    from .saedir import checkpoint_path

    return checkpoint_path(cfg.out).exists()


# --------------------------------------------------------------------------------------------------
# Running a manifest locally.


class Stages(NamedTuple):
    """The stage entry points (injected by the CLI: pipeline/ never imports a stage)."""

    harvest: Callable[[HarvestConfig], Any]
    """`sae.harvest.harvest`."""
    train: Callable[[TrainConfig], Any]
    """`sae.train.train`."""
    evaluate: Callable[[EvalConfig], Any]
    """`sae.evaluate.evaluate`."""
    inspect: Callable[[InspectConfig], Any] | None = None
    """`sae.evaluate.inspect.inspect`."""


REDO_STAGES = ("harvest", "train", "eval", "inspect")
"""The stages `sae run --stage S --redo` reruns on purpose."""


def _why(diff: list[str]) -> str:
    return "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")


def run(
    m: Manifest,
    stages: Stages,
    *,
    stage: str = "all",
    shard: str | None = None,
    redo: bool = False,
    echo: Callable[[str], Any] = print,
) -> None:
    """Run `stage` of manifest `m` (`all`: harvest, train, eval, and inspect when the manifest has it), skipping
    what is already complete, then print what each stage did, how long it took and where its output is.

    `shard` (`i/N`) limits the harvest to array task i of N, as a cluster array job does. `redo` reruns `stage`
    (one of REDO_STAGES) even when its output is complete: the store or the SAEs are deleted and made anew, a
    report or a site is rewritten. An eval or inspect output made with other settings or from other SAEs is
    redone without asking (it only derives from them); a store or SAEs made with other settings are refused.
    """
    if stage not in ("all", *STAGES):
        raise SaeError(f"unknown stage {stage!r}; one of all, {', '.join(STAGES)}")
    if shard is not None and stage != "harvest":
        raise SaeError("--shard applies to --stage harvest only")
    if redo and stage not in REDO_STAGES:
        raise SaeError(f"--redo reruns one stage: give --stage {'|'.join(REDO_STAGES)} with it")
    if redo and shard is not None:
        raise SaeError("--redo with --shard would delete the other array tasks' shards; redo the whole harvest")
    done: list[tuple[str, str, float | None, str]] = []  # stage, what happened, seconds, output

    def timed(name: str, how: str, out: Any, fn: Callable[[], Any]) -> None:
        t = time.monotonic()
        fn()
        done.append((name, how, time.monotonic() - t, str(out)))

    if stage in ("all", *HARVEST_STAGES):
        h = m.harvest
        if redo:
            timed("harvest", "redone", h.out, lambda: stages.harvest(dataclasses.replace(h, overwrite=True)))
        elif harvest_done(h):
            echo(f"harvest: {h.out} is complete; skipping")
            done.append(("harvest", "complete, skipped", None, str(h.out)))
        elif stage == "init":
            timed("init", "ran", h.out, lambda: stages.harvest(dataclasses.replace(h, init=True)))
        elif stage == "finalize":
            timed("finalize", "ran", h.out, lambda: stages.harvest(dataclasses.replace(h, finalize=True)))
        else:
            timed("harvest", "ran", h.out, lambda: stages.harvest(dataclasses.replace(h, shard=shard)))

    if stage in ("all", "train"):
        t = m.train
        if redo:
            _remove_train_run(t)
            timed("train", "redone", t.out, lambda: stages.train(t))
        elif train_done(t):
            echo(f"train: every SAE of the sweep is complete in {t.out}; skipping")
            done.append(("train", "complete, skipped", None, str(t.out)))
        else:
            resume = checkpoint_exists(t)
            if resume:
                echo(f"train: resuming from the checkpoint in {t.out}")
            go = dataclasses.replace(t, resume=resume)
            timed("train", "resumed" if resume else "ran", t.out, lambda: stages.train(go))

    if stage in ("all", "eval"):
        e = m.eval
        report = Path(e.out) / "report.md"
        diff = None if redo else eval_changes(e)
        if diff == []:
            echo(f"eval: {Path(e.out) / 'report.json'} is current; skipping")
            done.append(("eval", "complete, skipped", None, str(report)))
        else:
            if diff:
                echo(f"eval: {e.out} was made with other settings or SAEs ({_why(diff)}); redoing it")
            how = "redone" if redo or diff else "ran"
            timed("eval", how, report, lambda: stages.evaluate(e))

    if stage in ("all", "inspect"):
        if m.inspect is None:
            if stage == "inspect":
                raise SaeError(f"{m.path} has no inspect section; add one (`inspect: {{}}` for the defaults)")
        elif stages.inspect is None:
            raise SaeError("this runner has no inspect stage")
        for cfg in inspect_configs(m):
            diff = None if redo else inspect_changes(cfg)
            page = Path(cfg.out) / "index.html"
            if diff == []:
                echo(f"inspect: {cfg.out} is current; skipping")
                done.append(("inspect", "complete, skipped", None, str(page)))
                continue
            if diff:
                echo(f"inspect: {cfg.out} was made with other settings or another SAE ({_why(diff)}); redoing it")
            timed("inspect", "redone" if redo or diff else "ran", page, lambda cfg=cfg: stages.inspect(cfg))
    if done:
        _summary(m, done, echo)


def _remove_train_run(cfg: TrainConfig) -> None:
    """Delete the training run in `cfg.out` (for --redo): only a folder `sae train` made (it holds run.json)."""
    from .saedir import RUN_FILE

    out = Path(cfg.out)
    if not out.exists():
        return
    if not (out / RUN_FILE).is_file():
        raise SaeError(f"--redo: {out} holds no training run of ours ({RUN_FILE} is missing); delete it yourself")
    shutil.rmtree(out)


def _summary(m: Manifest, done: list[tuple[str, str, float | None, str]], echo: Callable[[str], Any]) -> None:
    """The run's closing paragraph: each stage, what happened, its time and its output."""
    from .progress import duration

    ran = sum(s for _, _, s, _ in done if s is not None)
    echo(f"run: {m.run_dir} ({m.path.name}) done in {duration(ran)}")
    width = max(len(f"{how} in {duration(s)}" if s is not None else how) for _, how, s, _ in done)
    for name, how, seconds, out in done:
        what = f"{how} in {duration(seconds)}" if seconds is not None else how
        echo(f"  {name:<8} {what:<{width}}  {out}")


def status(m: Manifest) -> dict[str, bool]:
    """Which commands of `m` (harvest, train, eval, inspect) are complete."""
    return {
        "harvest": harvest_done(m.harvest),
        "train": train_done(m.train),
        "eval": eval_done(m.eval),
        "inspect": inspect_done(m),
    }


def done_stages(m: Manifest) -> set[str]:
    """The STAGES of `m` whose outputs are complete (the harvest's three when the store is finalized)."""
    done = status(m)
    return {s for s in STAGES if done["harvest" if s in HARVEST_STAGES else s]}
