"""The harvest loop: contexts from the store's plan → LM forward stopped after the deepest site → whole shards.

One call of `harvest` initialises the store (or reopens it to resume), then harvests the shards of its task
that have no marker yet, and, when it is not one task of an array job, finalizes. Shards are computed one after
the other; a single background thread writes (permutes, compresses, checksums) shard s while the model runs on
shard s+1. A shard's contexts and their batching depend only on the shard, so a resumed run or an array task
writes exactly the bytes a single uninterrupted run would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae import progress, rowtypes, store
from sae.config import HarvestConfig, check_values
from sae.corpus import check_corpus, corpus_info, iter_contexts
from sae.errors import SaeError
from sae.interrupt import interruptible
from sae.models import check_model_name, load_model, skeleton
from sae.sites import Site, capture, check_site_names, describe_sites, parse_site, site_width

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@interruptible("harvest", lambda cfg: store.kept_on_interrupt(cfg.out))
def harvest(cfg: HarvestConfig) -> Path:
    """Run `sae harvest`: write (or finish) the store at `cfg.out` and return its path."""
    t0 = time.perf_counter()
    progress.begin("harvest")
    out = Path(cfg.out)
    task = shard_task(cfg.shard, os.environ)
    if cfg.finalize:
        if cfg.shard is not None or cfg.overwrite or cfg.init:
            raise SaeError(
                "--finalize only checks the shard markers and writes the manifest; drop --shard/--overwrite/--init"
            )
        st = store.finalize(out)
        progress.summary("harvest", summary(st.path, time.perf_counter() - t0, 0))
        return out
    if cfg.overwrite and task is not None:
        raise SaeError(
            f"--overwrite with an array task ({task[0]}/{task[1]}) would delete the other tasks' shards; "
            "delete the store once before the array job starts, or run without --shard"
        )
    if cfg.init and (task is not None or cfg.overwrite):
        raise SaeError("--init only creates the store and its plan; drop --shard/--overwrite")
    # What can be checked without the model is checked before loading it (a download, or a minute on a CPU).
    check_values(cfg)
    check_model_name(cfg.model, revision=cfg.revision)
    check_site_names(cfg.sites, skeleton(cfg.model, revision=cfg.revision))
    if not store.check_target(out, overwrite=cfg.overwrite):  # a resumed store takes its contexts from its plan
        check_corpus(cfg.dataset, split=cfg.split, text_column=cfg.text_column)

    model, tokenizer, info = load_model(
        cfg.model,
        revision=cfg.revision,
        device=cfg.device,
        dtype=cfg.model_dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
    sites = resolve_sites(cfg.sites, model)
    d_model = site_width(model, sites[0])
    chunk_rows = cfg.chunk_rows or store.default_chunk_rows(d_model)
    meta = {
        "model": {"id": info.id, "revision": info.revision, "sha256": info.sha256, "dtype": info.dtype},
        "corpus": corpus_info(cfg.dataset, split=cfg.split, text_column=cfg.text_column),
        "seq_len": cfg.seq_len,
        "n_contexts_max": None if cfg.max_tokens is None else cfg.max_tokens // cfg.seq_len,
        "sites": [s.name for s in sites],
        "d_model": d_model,
        "dtype": cfg.dtype,
        "codec": cfg.codec,
        "chunk_rows": chunk_rows,
        "shard_rows": chunk_rows * cfg.shard_chunks,
        "seed": cfg.seed,
        "shuffle_buffer": cfg.shuffle_buffer,
        "massive_factor": cfg.massive_factor,
    }
    # Lazy: only a new store reads the corpus; a resumed one takes its contexts from the plan.
    contexts = iter_contexts(
        cfg.dataset,
        tokenizer,
        seq_len=cfg.seq_len,
        split=cfg.split,
        text_column=cfg.text_column,
        max_tokens=cfg.max_tokens,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
    )
    contexts = _tokenizing(contexts, meta["n_contexts_max"], cfg.seq_len)
    writer = store.init_store(out, meta, contexts, overwrite=cfg.overwrite)
    if cfg.init:
        _echo(f"{out}: initialised with {writer.n_shards} shards; run the array tasks (--shard i/N), then --finalize")
        return out
    mine = writer.task_shards(*task) if task is not None else list(range(writer.n_shards))
    done = writer.done()
    todo = [s for s in mine if s not in done]
    n_tokens = harvest_shards(model, sites, writer, todo, batch_size=cfg.batch_size)
    if task is None:
        store.finalize(out)
    progress.summary("harvest", summary(out, time.perf_counter() - t0, n_tokens, task=task, decode=tokenizer.decode))
    return out


def _tokenizing(contexts: Iterator[np.ndarray], n_contexts: int | None, seq_len: int) -> Iterator[np.ndarray]:
    """`contexts`, with progress lines while the new store's plan is made (reading and tokenizing the corpus,
    the init step of an array job). A generator: a resumed store never starts it, so it reports nothing."""
    total = None if n_contexts is None else n_contexts * seq_len
    with progress.Progress("tokenize", total, "tok") as bar:
        for ctx in contexts:
            bar.update(len(ctx))
            if bar.n == total:  # the plan stops asking at the total, so this generator would end only when freed
                bar.close()
            yield ctx


def shard_task(shard: str | None, env: Mapping[str, str]) -> tuple[int, int] | None:
    """(task, n_tasks) from `--shard i/N`, else from a SLURM array's environment, else None (all shards)."""
    if shard is not None:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise SaeError(f"--shard {shard!r}: expected i/N, e.g. 0/8 for the first of 8 array tasks") from None
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # `--array=1-8` or `--array=0-14:2` number tasks from MIN in steps of STEP.
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        i = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))) // step
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        return None
    if n < 1 or not 0 <= i < n:
        raise SaeError(f"array task {i} of {n}: the task must be in 0..N-1 and N at least 1")
    return i, n


def resolve_sites(names: Sequence[str], model: Any) -> list[Site]:
    """The validated sites, duplicates dropped, in the order given (the store lists them in that order)."""
    if not names:
        raise SaeError(f"no --site given; {describe_sites(model)}")
    return list(dict.fromkeys(parse_site(n, model) for n in names))


def harvest_shards(
    model: Any, sites: Sequence[Site], writer: store.StoreWriter, shards: Sequence[int], *, batch_size: int
) -> int:
    """Compute and write `shards` of the store; returns the tokens written. Shard s is written by a background
    thread while the forward of shard s+1 runs; at most two shards are in memory."""
    total = sum(b - a for a, b in map(writer.shard_range, shards))
    bar = progress.Progress("harvest", total, "tok")
    pending: Future | None = None
    # On an error (or Ctrl-C) leaving the `with` still waits for the shard being written, so it gets its marker.
    with ThreadPoolExecutor(1, thread_name_prefix="sae-shard-writer") as pool, bar:
        for i, s in enumerate(shards):
            bar.figures(shard=f"{i + 1} of {len(shards)} (#{s})")
            acts, tokens = compute_shard(model, sites, writer, s, batch_size=batch_size, bar=bar)
            if pending is not None:
                pending.result()  # surface a failed write now, and hold at most two shards in memory
            pending = pool.submit(writer.write_shard, s, acts, tokens)
            del acts
        if pending is not None:
            pending.result()
    return total


@torch.inference_mode()
def compute_shard(
    model: Any,
    sites: Sequence[Site],
    writer: store.StoreWriter,
    s: int,
    *,
    batch_size: int,
    bar: progress.Progress | None = None,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Activations [rows, d] per site (in the storage dtype) and token ids of shard s, in planned row order."""
    start, stop = writer.shard_range(s)
    n = stop - start
    ids, offset = writer.shard_contexts(s)  # contexts covering the shard; its first row is row `offset` of them
    seq_len = ids.shape[1]
    dtype = _TORCH_DTYPES[writer.meta["dtype"]]
    d = writer.meta["d_model"]
    device = next(model.parameters()).device
    # On a GPU the rows go to pinned host memory by non-blocking copies on a side stream: batch b's copy overlaps
    # batch b+1's forward, and the host waits once per shard, not once per batch.
    copier = torch.cuda.Stream(device) if device.type == "cuda" else None
    bufs = {site.name: torch.empty(n, d, dtype=dtype, pin_memory=copier is not None) for site in sites}
    for b in range(0, len(ids), batch_size):
        batch = torch.from_numpy(ids[b : b + batch_size]).to(device=device, dtype=torch.long)
        acts = capture(model, sites, batch)
        # Rows of this batch, in shard coordinates, clipped to the shard (its first/last context may be shared).
        lo = b * seq_len - offset
        a, z = max(lo, 0), min(lo + batch.numel(), n)
        for name, x in acts.items():
            rows = x.reshape(-1, d)[a - lo : z - lo]
            if copier is None:
                bufs[name][a:z].copy_(rows)
            else:
                copier.wait_stream(torch.cuda.current_stream(device))  # the forward that made `rows` is done
                with torch.cuda.stream(copier):
                    bufs[name][a:z].copy_(rows.to(dtype), non_blocking=True)
                rows.record_stream(copier)  # its memory is not reused by the next forward before the copy ends
        if bar is not None:
            bar.update(z - a)
    if copier is not None:
        copier.synchronize()
    tokens = ids.reshape(-1)[offset : offset + n]
    return bufs, tokens


def summary(
    path: Path, seconds: float, n_tokens: int, *, task: tuple[int, int] | None = None, decode: Any = None
) -> list[str]:
    """The lines of the closing paragraph on the store at `path` and this run: tokens, sites and state; bytes and
    compression; this run's tokens and wall time; then, once finalized, each site's norm distribution and massive
    rows (token ids named through `decode`)."""
    st = store.Store.open(path, finalized=False)
    writer = store.StoreWriter(path)
    done = writer.done()
    rows = sum(b - a for a, b in map(writer.shard_range, done))
    n_sites = len(st.sites)
    disk = st.disk_bytes()
    act_disk = st.disk_bytes(*st.sites)
    values = rows * st.d_model * n_sites
    raw = values * _TORCH_DTYPES[st.dtype].itemsize
    f32 = values * 4
    n_shards = writer.n_shards
    state = (
        "finalized (manifest.json written)"
        if st.manifest is not None
        else f"{len(done)} of {n_shards} shards done"
        + (f", this was task {task[0]}/{task[1]}; run `sae harvest --finalize` after the last task" if task else "")
    )
    # One rate per summary: the header's tok/s (sae.progress.summary), over the time of the forward passes and
    # shard writes; the wall time here also holds the model's loading and the corpus's planning.
    run = f"this run harvested {n_tokens:,} tokens in {seconds:.1f} s wall" + (
        ", model loading included (the rate above counts the forward passes and shard writes only)" if n_tokens else ""
    )
    return [
        f"{path}: {rows:,} of {st.n_rows:,} tokens × {n_sites} site{'s' * (n_sites > 1)} "
        f"({', '.join(st.sites)}; d_model {st.d_model}, {st.dtype}, codec {st.attrs['codec']}), {state}.",
        f"{disk / 1e6:,.1f} MB on disk, {disk / max(rows, 1):,.0f} bytes/token; activations compressed "
        f"{raw / max(act_disk, 1):.2f}× vs raw {st.dtype} and {f32 / max(act_disk, 1):.2f}× vs float32.",
        f"{run}.",
    ] + [
        line
        for site in st.sites
        if (norms := st.norm_stats(site)) is not None
        for line in (f"{site}:", *("  " + n for n in rowtypes.describe_norms(norms, decode)))
    ]


def _echo(text: str) -> None:
    print(text, flush=True)
