"""The `sae` command. Options are generated from the config dataclasses, so flags, manifests and defaults
share one schema; this is the only module that imports the stages (lazily, to keep `--help` fast)."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from . import __version__
from .config import (
    ConfigError,
    EvalConfig,
    HarvestConfig,
    InspectConfig,
    TrainConfig,
    _strip_optional,
    coerce,
    default_of,
    field_docs,
    make,
)
from .errors import SaeError
from .interrupt import EXIT_CODE, NOTHING_KEPT, RERUN, Interrupted, received, signals_raise
from .manifest import STAGES

# OpenMP threads that spin while waiting for each other steal the very cores they wait for when other jobs share
# the machine (a login node, a busy workstation): there, two spinning torch threads ran slower than one, while
# passive waiting kept both useful. Set before torch loads; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Fields that are positional arguments or that read better under another flag name.
_FLAG_NAMES = {"sites": "--site"}


def config_options(cls: type, *, arguments: dict[str, dict[str, Any]] | None = None) -> Callable:
    """Decorate a click command with one option per field of dataclass `cls` (help text = field docstring)."""
    arguments = arguments or {}
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)

    def decorate(f: Callable) -> Callable:
        for fld in reversed(dataclasses.fields(cls)):
            name = fld.name
            if name in arguments:
                f = click.argument(name, **arguments[name])(f)
                continue
            tp, _ = _strip_optional(hints[name])
            default = default_of(cls, name)
            flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            help_text = docs.get(name, "")
            if tp is bool:
                f = click.option(flag, name, is_flag=True, default=None, help=help_text)(f)
                continue
            kwargs: dict[str, Any] = {"default": None, "help": help_text}
            if typing.get_origin(tp) is tuple and name in _FLAG_NAMES:
                kwargs["multiple"] = True
            elif typing.get_origin(tp) is tuple:
                item = typing.get_args(tp)[0]
                choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
                shown = ",".join(map(str, default)) if default else "none"
                kwargs["help"] = f"{help_text} Comma-separated. [default: {shown}]"
                kwargs["metavar"] = "|".join(choices) if choices else item.__name__.upper() + "[,...]"
            elif typing.get_origin(tp) is Literal:
                kwargs["type"] = click.Choice(typing.get_args(tp))
                kwargs["help"] = f"{help_text} [default: {default}]"
            else:
                kwargs["metavar"] = {int: "INT", float: "FLOAT", Path: "PATH", str: "TEXT"}.get(tp, "VALUE")
                if default not in (None, ""):
                    kwargs["help"] = f"{help_text} [default: {default}]"
            f = click.option(flag, name, **kwargs)(f)
        return f

    return decorate


def build(cls: type, values: dict[str, Any]) -> Any:
    """Config from CLI values: only what the user gave overrides the dataclass defaults. A bad value is named
    by its flag (`--max-tokens: 'many' is not an integer`)."""
    given = {k: v for k, v in values.items() if v is not None and v != ()}
    for name, value in given.items():
        try:
            coerce(cls, name, value)
        except ConfigError as e:
            flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            raise ConfigError(flag + str(e).removeprefix(name)) from None
    return make(cls, given)


def _run(fn: Callable[[], Any]) -> Any:
    """`fn()`; bad input (SaeError) is one `error:` line and exit 2. A stopped stage (Interrupted) goes on to
    `_Cli.invoke`, which reports every interruption alike."""
    try:
        return fn()
    except Interrupted:
        raise
    except SaeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


class _OneLineError(click.ClickException):
    """A click usage error shown as one line, like every other error of `sae` (batch logs stay grep-able)."""

    exit_code = 2

    def __init__(self, err: click.UsageError) -> None:
        where = err.ctx.command_path if err.ctx is not None else "sae"
        super().__init__(f"{' '.join(err.format_message().split())} (see `{where} --help`)")

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Cli(click.Group):
    """The `sae` group: usage errors of the group and of every command print one line and exit 2; SIGINT and
    SIGTERM stop every command alike (sae.interrupt): one `interrupted:` line saying what was kept and how to
    continue, and exit EXIT_CODE."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise _OneLineError(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with signals_raise():
                return super().invoke(ctx)
        except click.UsageError as e:
            raise _OneLineError(e) from None
        except KeyboardInterrupt:  # a stage that did not say what it kept, or a signal while loading
            command = ctx.invoked_subcommand or "sae"  # (set by the group's invoke)
            click.echo(Interrupted(f"{command} stopped by {received()}", NOTHING_KEPT).line(), err=True)
            sys.exit(EXIT_CODE)
        except Interrupted as e:
            # `sae run` resumes each stage by itself (training from its checkpoint): rerunning it is the advice
            click.echo(e.line(RERUN if ctx.invoked_subcommand == "run" else None), err=True)
            sys.exit(EXIT_CODE)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="sae")
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Seconds between progress lines when stderr is not a terminal (batch logs). "
    "[default: $SAE_PROGRESS_INTERVAL or 30]",
)
def main(progress_interval: float | None) -> None:
    """Harvest LM activations into Zarr stores, train BatchTopK sparse autoencoders, evaluate them.

    \b
    The README's demo (embedded SmolLM2-135M-Instruct and Shakespeare corpus, no hub needed), in one command:
      sae run manifests/smollm2-demo.yaml
    \b
    The same run, stage by stage:
      sae harvest --site blocks.6.hook_resid_post --max-tokens 98304 --shard-chunks 4 --out runs/demo/store.zarr
      sae train runs/demo/store.zarr --site blocks.6.hook_resid_post --arch batchtopk,topk --k 32 --expansion 4 \\
        --batch-size 1024 --out runs/demo/saes
      sae eval runs/demo/saes --max-tokens 4096 --out runs/demo/report
    """
    from .progress import interval, set_interval

    if progress_interval is not None:
        set_interval(progress_interval)
    _run(interval)  # a malformed $SAE_PROGRESS_INTERVAL fails now, not after the model has loaded


@main.command()
@config_options(HarvestConfig)
def harvest(**kwargs: Any) -> None:
    """Run a causal LM over a corpus and write the activations of the --site hooks into a Zarr v3 store.

    Resumable: rerunning the same command skips finished shards. For array jobs, each task runs with
    --shard i/N and a last step runs --finalize.
    """
    cfg = _run(lambda: build(HarvestConfig, kwargs))
    from .harvest import harvest as run_harvest

    _run(lambda: run_harvest(cfg))


@main.command()
@config_options(TrainConfig, arguments={"store": {"type": click.Path(path_type=Path)}})
def train(**kwargs: Any) -> None:
    """Train sparse autoencoders on one site of STORE; a sweep (comma lists) reads the data once."""
    cfg = _run(lambda: build(TrainConfig, kwargs))
    from .train import train as run_train

    _run(lambda: run_train(cfg))


@main.command(name="eval")
@config_options(EvalConfig, arguments={"sae_dirs": {"nargs": -1, "required": True, "type": click.Path(path_type=Path)}})
def eval_(**kwargs: Any) -> None:
    """Splice SAE_DIRS into the LM on held-out text; write report.json, report.md and plots to --out."""
    cfg = _run(lambda: build(EvalConfig, kwargs))
    from .evaluate import evaluate as run_eval

    _run(lambda: run_eval(cfg))


@main.command()
@config_options(InspectConfig, arguments={"sae_dir": {"type": click.Path(path_type=Path)}})
def inspect(**kwargs: Any) -> None:
    """Feature pages of SAE_DIR from one streaming pass over its store (no LM): density, histogram, top and
    quantile examples in context, logit effects, similar latents. Writes a static site (index.html) to --out."""
    cfg = _run(lambda: build(InspectConfig, kwargs))
    from .evaluate.inspect import inspect as run_inspect

    _run(lambda: run_inspect(cfg))


# --------------------------------------------------------------------------------------------------
# Whole runs from a manifest (sae.manifest, sae.slurm) and whole-store tools on dask (sae.storetools).

_SCHEDULER_HELP = "dask scheduler address (host:port); default: a local cluster of 2 threads."


def _header(stage: str, text: str) -> None:
    """The line `sae run` prints before each stage it runs, so a batch log reads as a list of stages."""
    click.echo(f"== {stage}: {text}")


def _stages() -> Any:
    from .manifest import Stages

    def harvest(cfg: HarvestConfig) -> Any:
        from .harvest import harvest

        step = "init" if cfg.init else "finalize" if cfg.finalize else f"task {cfg.shard}" if cfg.shard else ""
        tokens = f"{cfg.max_tokens:,} tokens" if cfg.max_tokens else "the whole corpus"
        _header(
            f"harvest ({step})" if step else "harvest",
            f"{', '.join(cfg.sites)} of {cfg.model} on {tokens} of {cfg.dataset} ({cfg.split}) → {cfg.out}",
        )
        return harvest(cfg)

    def train(cfg: TrainConfig) -> Any:
        from .saedir import sweep_names
        from .train import train

        names = sweep_names(cfg)
        saes = f"{len(names)} SAE{'s' * (len(names) > 1)} ({', '.join(names)})"
        _header("train", f"{saes} on {cfg.site} of {cfg.store} → {cfg.out}" + (" (resuming)" if cfg.resume else ""))
        return train(cfg)

    def evaluate(cfg: EvalConfig) -> Any:
        from .evaluate import evaluate

        n = len(cfg.sae_dirs)
        _header("eval", f"{n} SAE{'s' * (n > 1)} on {cfg.max_tokens:,} eval tokens → {cfg.out}")
        return evaluate(cfg)

    def inspect(cfg: InspectConfig) -> Any:
        from .evaluate.inspect import inspect

        _header("inspect", f"feature pages of {cfg.sae_dir} ({cfg.latents} latents) → {cfg.out}")
        return inspect(cfg)

    return Stages(harvest, train, evaluate, inspect)


@main.command(name="run")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--stage",
    type=click.Choice(["all", *STAGES]),
    default="all",
    show_default=True,
    help="Run one stage only (init/finalize and harvest --shard are the steps of a cluster array job).",
)
@click.option("--shard", metavar="I/N", help="With --stage harvest: do only array task I of N.")
@click.option(
    "--redo",
    is_flag=True,
    help="With --stage harvest|train|eval|inspect: run that stage anew even though its output is complete "
    "(the store or the SAEs are deleted first).",
)
def run_manifest(manifest: Path, stage: str, shard: str | None, redo: bool) -> None:
    """Run the run MANIFEST describes (harvest → train → eval, then inspect when it has that section) here.

    Stages whose outputs are complete are skipped, so rerunning after a crash continues the run. A report or
    feature pages made with other settings (or from SAEs trained since) are redone; a store or SAEs made with
    other settings are refused with a line naming them (--redo makes them anew).
    """
    from .manifest import load_manifest, run

    _run(lambda: run(load_manifest(manifest), _stages(), stage=stage, shard=shard, redo=redo, echo=click.echo))


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--scheduler", type=click.Choice(["slurm"]), required=True, help="Batch system to submit to.")
@click.option("--dry-run", is_flag=True, help="Only write the scripts into RUN_DIR/slurm/; show the sbatch commands.")
def submit(manifest: Path, scheduler: str, dry_run: bool) -> None:
    """Write the cluster jobs of MANIFEST (init, harvest array, finalize, train, eval) and submit them in a chain."""
    from .manifest import load_manifest
    from .slurm import submit as submit_slurm

    _run(lambda: submit_slurm(load_manifest(manifest), dry_run=dry_run, echo=click.echo))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--site", "sites", multiple=True, help="Site(s) to summarise; default: all.")
@click.option("--skip-bos", is_flag=True, help="Leave out the BOS rows (position 0).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, with the full mean and max vectors.")
@click.option(
    "--massive-factor",
    type=float,
    help="A row is massive when its norm exceeds this × the median non-BOS norm; default: the store's setting (3).",
)
@click.option("--scheduler", metavar="ADDRESS", help=_SCHEDULER_HELP)
def stats(
    store: Path, sites: tuple[str, ...], skip_bos: bool, as_json: bool, massive_factor: float | None,
    scheduler: str | None,
) -> None:  # fmt: skip
    """Recompute STORE's statistics from its activations: mean vector, mean norm, variance, per-dimension max,
    NaN/Inf count, and over non-BOS rows the norm distribution and the massive rows (count, share of the
    variance, positions, tokens)."""
    import json

    from .progress import summary
    from .storetools import format_stats, stats_json, store_decoder, store_stats

    result = _run(
        lambda: store_stats(store, sites=sites, skip_bos=skip_bos, massive_factor=massive_factor, scheduler=scheduler)
    )
    if as_json:
        click.echo(json.dumps(stats_json(result)))
    else:
        summary("stats", format_stats(store, result, skip_bos=skip_bos, decode=store_decoder(store)).splitlines())


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--scheduler", metavar="ADDRESS", help=_SCHEDULER_HELP)
def validate(store: Path, scheduler: str | None) -> None:
    """Check every shard of STORE: marker, row range, row counts, checksum against the marker and manifest.

    Exits 1 and lists the problems when something is wrong.
    """
    from .progress import summary
    from .storetools import validate_store

    problems = _run(lambda: validate_store(store, scheduler=scheduler))
    if problems:
        click.echo(f"{store}: {len(problems)} problem{'s' * (len(problems) > 1)}", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        sys.exit(1)
    summary("validate", [f"{store}: valid (every shard's marker, row range and checksum agree with the manifest)"])


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The new store.")
@click.option("--chunk-rows", type=int, help="Rows per chunk of the new store; default: the first input's.")
@click.option("--shard-chunks", type=int, help="Chunks per shard of the new store; default: the first input's.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out first.")
@click.option("--scheduler", metavar="ADDRESS", help=_SCHEDULER_HELP)
def concat(
    stores: tuple[Path, ...],
    out: Path,
    chunk_rows: int | None,
    shard_chunks: int | None,
    overwrite: bool,
    scheduler: str | None,
) -> None:
    """Merge finalized STORES of the same model, sites, dtype and seq_len (e.g. several corpora) into --out.

    With one input and new --chunk-rows/--shard-chunks this reshards a store.
    """
    from .progress import summary
    from .store import Store
    from .storetools import concat_stores

    _run(
        lambda: concat_stores(
            stores, out, chunk_rows=chunk_rows, shard_chunks=shard_chunks, overwrite=overwrite, scheduler=scheduler
        )
    )
    st = _run(lambda: Store.open(out))
    parts = f"{len(stores)} store{'s' * (len(stores) > 1)}"
    summary("concat", [f"{out}: {st.n_rows:,} rows of {', '.join(st.sites)} from {parts}; written and finalized"])


# `sae --help` lists each command with its whole first paragraph, not a summary cut at ~45 characters.
for _command in main.commands.values():
    _command.short_help = " ".join((_command.help or "").split("\n\n")[0].split())


if __name__ == "__main__":
    main()
