"""The `sae` command. Options are generated from the config dataclasses, so flags, manifests and defaults
share one schema; this is the only module that imports the stages (lazily, to keep `--help` fast)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from . import __version__
from .config import EvalConfig, HarvestConfig, TrainConfig, _strip_optional, default_of, field_docs, make
from .errors import SaeError

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
    """Config from CLI values: only what the user gave overrides the dataclass defaults."""
    given = {k: v for k, v in values.items() if v is not None and v != ()}
    return make(cls, given)


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except SaeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="sae")
def main() -> None:
    """Harvest LM activations into Zarr stores, train BatchTopK sparse autoencoders, evaluate them.

    \b
    Typical run (embedded SmolLM2-135M and the embedded Shakespeare corpus, no hub needed):
      sae harvest --site blocks.15.hook_resid_post --max-tokens 200000 --out runs/store.zarr
      sae train runs/store.zarr --site blocks.15.hook_resid_post --k 16,32,64 --out runs/saes
      sae eval runs/saes --out runs/report
    """


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


if __name__ == "__main__":
    main()
