"""Harvest throughput and storage, measured side by side with the bare forward pass in one run.

(a) bare: the forward of SmolLM2 over the same contexts in the same batches, stopped after the site's layer
    (`sae.sites.capture`), results thrown away: the floor any harvest pays.
(b) harvest: `sae.harvest.harvest` end to end for the same tokens (model load, corpus packing, forward, shard
    permutation, compression, checksums, statistics, finalize) into a fresh store.

Repetitions alternate the order (a b, b a, ...) so drift in machine load hits both sides alike; the throughput
ratio is total bare time over total harvest time. Bytes per token are compared with 4·d, what a float32
activation cache (SAELens' `CacheActivationsRunner`) takes. Prints a Markdown table and rewrites the "Harvest"
section of docs/benchmarks.md.

    python benchmarks/harvest.py                      # the documented run (a few minutes on 2 cores)
    python benchmarks/harvest.py --tokens 16384 --reps 1 --no-doc   # a quick look
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, write_section

from sae import store
from sae.config import HarvestConfig
from sae.corpus import iter_contexts
from sae.harvest import harvest
from sae.models import load_model
from sae.sites import capture, parse_site

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
TRAIN = str(Path(__file__).resolve().parents[2] / "shared" / "corpus" / "train.jsonl.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per repetition (whole contexts)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each side, interleaved")
    ap.add_argument("--site", default="blocks.15.hook_resid_post")
    ap.add_argument("--dataset", default=TRAIN)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-chunks", type=int, default=2, help="small shards, so the run has several of them")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    command = " ".join(["python benchmarks/harvest.py", *map(shlex.quote, sys.argv[1:])])

    t = time.perf_counter()
    model, tokenizer, info = load_model("smollm2-135m", device="cpu")
    load_s = time.perf_counter() - t
    site = parse_site(args.site, model)
    ids = np.stack(list(iter_contexts(args.dataset, tokenizer, seq_len=args.seq_len, max_tokens=args.tokens)))
    n_tokens = ids.size

    @torch.inference_mode()
    def bare() -> None:
        for b in range(0, len(ids), args.batch_size):
            capture(model, [site], torch.from_numpy(ids[b : b + args.batch_size]).long())

    tmp = Path(tempfile.mkdtemp(prefix="sae-bench-"))
    cfg = HarvestConfig(
        out=tmp / "store.zarr",
        sites=(site.name,),
        dataset=args.dataset,
        seq_len=args.seq_len,
        max_tokens=args.tokens,
        batch_size=args.batch_size,
        shard_chunks=args.shard_chunks,
        device="cpu",
        overwrite=True,
    )
    sizes: dict[str, float] = {}

    def full() -> None:
        harvest(cfg)
        st = store.Store.open(cfg.out)
        assert st.n_rows == n_tokens, (st.n_rows, n_tokens)
        sizes.update(disk=st.disk_bytes(), acts=st.disk_bytes(site.name), d=st.d_model)
        sizes["shards"] = len(st.manifest["shards"])

    wall: dict[str, list[float]] = {"bare": [], "full": []}
    load = [os.getloadavg()[0]]
    try:
        with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
            capture(model, [site], torch.from_numpy(ids[: args.batch_size]).long())
        for rep in range(args.reps):
            for fn in (bare, full) if rep % 2 == 0 else (full, bare):
                t = time.perf_counter()
                fn()
                wall[fn.__name__].append(time.perf_counter() - t)
                load.append(os.getloadavg()[0])
                print(f"rep {rep} {fn.__name__}: {wall[fn.__name__][-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare_s, harvest_s = wall["bare"], wall["full"]

    d = int(sizes["d"])
    bare_tps = n_tokens * args.reps / sum(bare_s)
    harvest_tps = n_tokens * args.reps / sum(harvest_s)
    ratio = harvest_tps / bare_tps
    pair = [a / b for a, b in zip(bare_s, harvest_s, strict=True)]
    per_token = sizes["disk"] / n_tokens
    compression = n_tokens * d * 2 / sizes["acts"]
    rows = [
        ("tokens per repetition × repetitions", f"{n_tokens:,} × {args.reps}", ""),
        ("(a) bare forward to the site, tokens/s", f"{bare_tps:,.0f}", ""),
        ("(b) `sae harvest` end to end, tokens/s", f"{harvest_tps:,.0f}", ""),
        ("throughput ratio (b)/(a)", f"{ratio:.3f}", "≥ 0.90"),
        ("per-repetition ratios (median)", f"{', '.join(f'{r:.3f}' for r in pair)} ({np.median(pair):.3f})", ""),
        ("1-min load average during the run", f"{min(load):.1f}–{max(load):.1f}", "≤ 2 is a quiet 2-core box"),
        ("model load (inside every (b))", f"{load_s:.1f} s", ""),
        ("bytes on disk per token (whole store)", f"{per_token:,.0f}", ""),
        ("… versus 4·d = float32 cache", f"{per_token / (4 * d):.3f}", "≤ 0.38"),
        ("activation compression vs raw bfloat16", f"{compression:.2f}×", ""),
        ("activation compression vs float32", f"{2 * compression:.2f}×", ""),
        ("shards per store", f"{sizes['shards']:.0f}", ""),
    ]
    table = "| measure | value | goal |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(table)
    if not args.no_doc:
        write_doc(table, command, args, info, site.name, max(load))


def write_doc(table: str, command: str, args: argparse.Namespace, info, site: str, load: float) -> None:
    busy = (
        f" The machine was shared with other jobs during the run (1-min load average up to {load:.1f} on "
        f"{os.cpu_count()} cores), so absolute tokens/s are well below a quiet run's; both sides saw the same load, "
        "and the goal is about their ratio."
        if load > (os.cpu_count() or 1)
        else ""
    )
    section = f"""## Harvest

Command: `{command}`

SmolLM2-135M (`smollm2-135m`, float32 on CPU), site `{site}`, corpus `{args.dataset}`, seq_len
{args.seq_len}, batches of {args.batch_size} contexts, bfloat16 storage, default codec (Blosc zstd 1, byte
shuffle) and chunks ({store.default_chunk_rows(info.d_model)} rows), shards of {args.shard_chunks} chunks so the
run has several. (a) is the bare forward over the same contexts in the same batches, stopped after the site's
layer; (b) is `sae.harvest.harvest` end to end into a fresh store: model load, corpus packing, forward,
within-shard permutation, compression, checksums, statistics and finalize, with shard s written by a background
thread while shard s+1 is computed. Repetitions alternate the order of (a) and (b); the ratio is total (a) time
over total (b) time. 4·d bytes per token is what a float32 activation cache (SAELens) takes.

Machine: {machine()}; measured {time.strftime("%Y-%m-%d")}.{busy}

{table}
"""
    write_section(DOC, "Harvest", section)
    print(f"wrote the Harvest section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
