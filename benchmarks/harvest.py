"""Harvest throughput and storage, measured side by side with the bare forward pass in one run.

(a) bare: the forward of SmolLM2 over the same contexts in the same batches, stopped after the site's layer
    (`sae.sites.capture`), results thrown away: the floor any harvest pays.
(b) harvest: `sae.harvest.harvest` end to end for the same tokens (model load, corpus packing, forward, shard
    permutation, compression, checksums, statistics, finalize) into a fresh store.
(c) with `--before REV`: (b) with the harvest code of git revision REV (harvest/loop.py, pipeline/store.py,
    pipeline/sites.py, loaded beside the working tree's), so a change is measured before/after in one run.

Every repetition runs each variant once, in an order rotated from one repetition to the next, so drift in the
machine's load hits all of them alike. The headline ratio is the median over repetitions of (a) time / (b) time:
robust to a burst of load from other jobs during one of them. CPU time (the whole process: every thread) is
reported beside wall time. Bytes per token are compared with 4·d, what a float32 activation cache (SAELens'
`CacheActivationsRunner`) takes. Prints a Markdown table and rewrites the "Harvest" section of
docs/benchmarks.md (not with --before: that was the profile's measurement, docs/benchmarks.md "Profile").

    python benchmarks/harvest.py                      # the documented run (about 15 minutes on 2 cores)
    python benchmarks/harvest.py --tokens 16384 --reps 1 --no-doc   # a quick look
    python benchmarks/harvest.py --before HEAD --no-doc             # the working tree against the last commit
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, machine, modules_at, write_section

import sae.harvest.loop
from sae import store
from sae.config import HarvestConfig
from sae.corpus import iter_contexts
from sae.models import ModelInfo, load_model
from sae.sites import Site, capture, parse_site

DOC = ROOT / "docs" / "benchmarks.md"
TRAIN = str(Path(__file__).resolve().parents[2] / "shared" / "corpus" / "train.jsonl.gz")
HARVEST_MODULES = ("sae.sites", "sae.store", "sae.harvest.loop")
"""The modules a before/after comparison swaps, in import order (later ones import the earlier ones)."""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per repetition (whole contexts)")
    # One repetition swings by ±15 % with the load of other jobs (see docs/benchmarks.md); eight give a steady median.
    ap.add_argument("--reps", type=int, default=8, help="repetitions of each variant, interleaved")
    ap.add_argument("--site", default="blocks.15.hook_resid_post")
    ap.add_argument("--dataset", default=TRAIN)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-chunks", type=int, default=2, help="small shards, so the run has several of them")


def harvest_at(rev: str) -> Callable[[HarvestConfig], Path]:
    """`sae.harvest.harvest` as of git revision `rev`."""
    return modules_at(rev, HARVEST_MODULES)["sae.harvest.loop"].harvest


@dataclass
class Bench:
    """The shared setup: the model for (a), the contexts, and fresh-store configs for the harvest variants."""

    args: argparse.Namespace
    model: Any
    info: ModelInfo
    site: Site
    ids: np.ndarray
    load_s: float
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sae-bench-")))
    sizes: dict[str, float] = field(default_factory=dict)

    @classmethod
    def setup(cls, args: argparse.Namespace) -> Bench:
        t = time.perf_counter()
        model, tokenizer, info = load_model("smollm2-135m", device="cpu")
        load_s = time.perf_counter() - t
        site = parse_site(args.site, model)
        ids = np.stack(list(iter_contexts(args.dataset, tokenizer, seq_len=args.seq_len, max_tokens=args.tokens)))
        with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
            capture(model, [site], torch.from_numpy(ids[: args.batch_size]).long())
        return cls(args, model, info, site, ids, load_s)

    @property
    def n_tokens(self) -> int:
        return self.ids.size

    def config(self) -> HarvestConfig:
        a = self.args
        return HarvestConfig(
            out=self.tmp / "store.zarr",
            sites=(self.site.name,),
            dataset=a.dataset,
            seq_len=a.seq_len,
            max_tokens=a.tokens,
            batch_size=a.batch_size,
            shard_chunks=a.shard_chunks,
            device="cpu",
            overwrite=True,
        )

    @torch.inference_mode()
    def bare(self) -> None:
        bs = self.args.batch_size
        for b in range(0, len(self.ids), bs):
            capture(self.model, [self.site], torch.from_numpy(self.ids[b : b + bs]).long())

    def harvest_with(self, harvest: Callable[[HarvestConfig], Path]) -> Callable[[], None]:
        def run() -> None:
            with contextlib.redirect_stdout(sys.stderr):  # harvest prints its summary
                harvest(self.config())

        return run

    def check(self) -> None:
        """The store the last harvest wrote holds every token; remember its sizes."""
        st = store.Store.open(self.tmp / "store.zarr")
        assert st.n_rows == self.n_tokens, (st.n_rows, self.n_tokens)
        self.sizes.update(disk=st.disk_bytes(), acts=st.disk_bytes(self.site.name), d=st.d_model)
        self.sizes["shards"] = len(st.manifest["shards"])

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Timings:
    """Wall and process CPU seconds of every variant per repetition, and the 1-min load average seen."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=lambda: [os.getloadavg()[0]])

    def ratios(self, base: str, other: str, clock: str = "wall") -> list[float]:
        """Per repetition: `base` time / `other` time, i.e. `other`'s throughput relative to `base`'s."""
        t = getattr(self, clock)
        return [a / b for a, b in zip(t[base], t[other], strict=True)]


def interleave(variants: dict[str, Callable[[], None]], reps: int, after: Callable[[str], None]) -> Timings:
    """Run every variant once per repetition, the order rotated by one each repetition; `after(name)` runs
    untimed after each variant."""
    out = Timings({n: [] for n in variants}, {n: [] for n in variants})
    names = list(variants)
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            w, c = time.perf_counter(), time.process_time()
            variants[name]()
            out.wall[name].append(time.perf_counter() - w)
            out.cpu[name].append(time.process_time() - c)
            out.load.append(os.getloadavg()[0])
            after(name)
            print(
                f"rep {rep} {name}: {out.wall[name][-1]:.1f} s wall, {out.cpu[name][-1]:.1f} s CPU, "
                f"load {out.load[-1]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    return out


@contextlib.contextmanager
def bench(args: argparse.Namespace) -> Iterator[Bench]:
    b = Bench.setup(args)
    try:
        yield b
    finally:
        b.close()


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--before", metavar="REV", help="also time the harvest code of git revision REV")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    command = " ".join(["python benchmarks/harvest.py", *map(shlex.quote, sys.argv[1:])])

    with bench(args) as b:
        variants = {"bare": b.bare, "harvest": b.harvest_with(sae.harvest.loop.harvest)}
        if args.before:
            variants["before"] = b.harvest_with(harvest_at(args.before))
        t = interleave(variants, args.reps, lambda name: None if name == "bare" else b.check())

    n, reps = b.n_tokens, args.reps
    d = int(b.sizes["d"])
    wall_ratio, cpu_ratio = t.ratios("bare", "harvest"), t.ratios("bare", "harvest", "cpu")
    total_ratio = sum(t.wall["bare"]) / sum(t.wall["harvest"])
    per_token = b.sizes["disk"] / n
    compression = n * d * 2 / b.sizes["acts"]
    rows = [
        ("tokens per repetition × repetitions", f"{n:,} × {reps}", ""),
        ("(a) bare forward to the site, tokens/s", f"{n * reps / sum(t.wall['bare']):,.0f}", ""),
        ("(b) `sae harvest` end to end, tokens/s", f"{n * reps / sum(t.wall['harvest']):,.0f}", ""),
        ("throughput ratio (b)/(a), median of the repetitions", f"{np.median(wall_ratio):.3f}", "≥ 0.90"),
        ("… per repetition; ratio of the totals", f"{fmt(wall_ratio)}; {total_ratio:.3f}", ""),
        ("tokens per CPU second (b)/(a), median (per rep.)", f"{np.median(cpu_ratio):.3f} ({fmt(cpu_ratio)})", ""),
    ]
    if args.before:
        before_ratio = t.ratios("bare", "before")
        rows += [
            (f"(c) `sae harvest` as of {args.before}: ratio (c)/(a), median", f"{np.median(before_ratio):.3f}", ""),
            ("… per repetition", fmt(before_ratio), ""),
        ]
    rows += [
        ("1-min load average during the run", f"{min(t.load):.1f}–{max(t.load):.1f}", "≤ 2 is a quiet 2-core box"),
        ("model load (inside every (b))", f"{b.load_s:.1f} s", ""),
        ("bytes on disk per token (whole store)", f"{per_token:,.0f}", ""),
        ("… versus 4·d = float32 cache", f"{per_token / (4 * d):.3f}", "≤ 0.38"),
        ("activation compression vs raw bfloat16", f"{compression:.2f}×", ""),
        ("activation compression vs float32", f"{2 * compression:.2f}×", ""),
        ("shards per store", f"{b.sizes['shards']:.0f}", ""),
    ]
    table = "| measure | value | goal |\n|---|---|---|\n" + "\n".join(f"| {a} | {v} | {g} |" for a, v, g in rows)
    print(table)
    if not args.no_doc and not args.before:
        write_doc(table, command, args, b.info, b.site.name, max(t.load))


def write_doc(table: str, command: str, args: argparse.Namespace, info: ModelInfo, site: str, load: float) -> None:
    busy = (
        f" The machine was shared with other jobs during the run (1-min load average up to {load:.1f} on "
        f"{os.cpu_count()} cores), so absolute tokens/s are well below a quiet run's; every variant saw the same "
        "load, and the goal is about their ratio."
        if load > (os.cpu_count() or 1)
        else ""
    )
    section = f"""## Harvest

Command: `{command}`

SmolLM2-135M-Instruct (`smollm2-135m`: Q4_1 GGUF dequantised to float32, on CPU), site `{site}`,
corpus `{args.dataset}`, seq_len
{args.seq_len}, batches of {args.batch_size} contexts, bfloat16 storage, default codec (Blosc zstd 1, byte
shuffle) and chunks ({store.default_chunk_rows(info.d_model)} rows), shards of {args.shard_chunks} chunks so the
run has several. (a) is the bare forward over the same contexts in the same batches, stopped after the site's
layer; (b) is `sae.harvest.harvest` end to end into a fresh store: model load, corpus packing, forward,
within-shard permutation, compression, checksums, statistics and finalize, with shard s written by a background
thread while shard s+1 is computed. Repetitions alternate the order of (a) and (b); the headline ratio is the
median over repetitions of (a) time / (b) time, robust to a burst of load from other jobs during one of them.
CPU time counts every thread of the process. 4·d bytes per token is what a float32 activation cache (SAELens)
takes. Where harvest's time beyond the forward goes: the Profile section below.

Machine: {machine()}; measured {time.strftime("%Y-%m-%d")}.{busy}

{table}
"""
    write_section(DOC, "Harvest", section)
    print(f"wrote the Harvest section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
