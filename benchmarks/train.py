"""Training throughput, side by side in one process (interleaved rounds, so machine load hits all alike).

Measures, at SmolLM2-135M-Instruct shapes (d=576, F=4608, k=32, B=4096) by default:
  reader      the shuffled chunk reader alone (tokens/s), against the trainer's consumption (goal ≥ 3×)
  matmul      this machine's dense fp32 matmul FLOP/s on the step's own GEMM shapes
  dense       our BatchTopK step with the dense decoder: tokens/s and FLOP/s against `matmul` (goal ≥ 0.75)
  sparse      the same step with the sparse decoder (goal ≥ 2× dense)
  sae-lens    the installed sae-lens `SAETrainer.step` on the same batches and config (goal: ours ≥ 3×)

    python benchmarks/train.py --store runs/store.zarr --site blocks.15.hook_resid_post --write

`--matryoshka` measures instead a Matryoshka BatchTopK step against a BatchTopK step of the same shapes, side by
side in the same rounds, with each decoder (section "Train: Matryoshka vs BatchTopK").

Without --store it writes a small store of Gaussian rows with SmolLM2-like norms into a temporary folder.
`--write` replaces the "Train" section of docs/benchmarks.md with the table.

    python benchmarks/train.py --reader --write

measures the reader alone instead ("Reader" section): the same Gaussian rows stored with Blosc and with
`--codec none`, the reader at 1, 2, 4 (and up to the core count) threads beside the raw limits, Blosc decode of
the mapped chunks on as many threads and memcpy, interleaved in the same rounds, and the host's share of a GPU
reader from each store (`device="meta"`: decode or copy into staging; the upload and the gather are left out).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, machine
from common import write_section as write_doc_section

from sae.config import TrainConfig
from sae.saedir import sweep
from sae.store import Store, finalize, init_store
from sae.train.reader import ChunkReader
from sae.train.trainer import make_plan, make_run, resolve_device, train_step

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Train"
MATRYOSHKA_SECTION = "## Train: Matryoshka vs BatchTopK"


def gaussian_store(path: Path, d: int, n_rows: int, seed: int = 0, codec: str = "blosc-zstd") -> Path:
    """Rows ~ N(μ, σ²) with ‖x‖ ≈ 60 like SmolLM2's mid-layer residual stream, BOS rows 30× larger."""
    seq_len, chunk_rows = 128, 8192
    meta = {
        "model": {"id": "gaussian"}, "corpus": {"id": "gaussian"}, "seq_len": seq_len,
        "n_contexts_max": n_rows // seq_len, "sites": ["blocks.0.hook_resid_post"], "d_model": d,
        "dtype": "bfloat16", "codec": codec, "chunk_rows": chunk_rows, "shard_rows": chunk_rows * 4,
        "seed": seed,
    }  # fmt: skip
    w = init_store(path, meta, (np.zeros(seq_len, np.int32) for _ in range(n_rows // seq_len)))
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    for s in range(w.n_shards):
        a, b = w.shard_range(s)
        x = mu + 2.4 * torch.randn(b - a, d, generator=g)
        x[torch.from_numpy(np.arange(a, b) % seq_len == 0)] *= 30
        w.write_shard(s, {"blocks.0.hook_resid_post": x}, np.zeros(b - a, np.int32))
    finalize(path)
    return path


def src_path(corpus: dict) -> str:
    paths = corpus.get("paths") or ["?"]
    return paths[0] if len(paths) == 1 else str(Path(paths[0]).parent)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(b: int, d: int, f: int, k: int, decoder: str) -> float:
    """FLOPs our BatchTopK step executes (multiply-add = 2). Encoder: the dense forward GEMM; its backward
    only touches the k·B selected entries (∇W_enc, ∇b_dec). Decoder: dense = forward GEMM + two backward
    GEMMs; sparse = three products over the k·B non-zeros. Elementwise work (Adam, norms) is not counted."""
    n = k * b
    enc = 2 * b * d * f + 2 * n * d + 2 * d * f
    dec = 3 * 2 * b * f * d if decoder == "dense" else 3 * 2 * n * d
    return enc + dec


class SaeLens:
    """sae-lens' own trainer, driven one `step` at a time (as its `fit` loop does) on our batches."""

    def __init__(self, d: int, f: int, k: int, b: int, lr: float, device: torch.device, steps: int):
        import logging

        logging.getLogger("sae_lens").setLevel(logging.WARNING)
        from sae_lens import __version__
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.version = __version__
        cfg = BatchTopKTrainingSAEConfig(d_in=d, d_sae=f, k=k, dtype="float32", device=str(device))
        self.sae = BatchTopKTrainingSAE(cfg)
        tcfg = SAETrainerConfig(
            total_training_samples=steps * b,
            train_batch_size_samples=b,
            lr=lr,
            lr_end=lr,  # constant lr, as sae-lens' own runner sets it by default
            device=str(device),
            autocast=device.type == "cuda",
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.trainer = SAETrainer(cfg=tcfg, sae=self.sae, data_provider=iter(()))

    def step(self, x: torch.Tensor) -> float:
        out = self.trainer.step(x)
        self.trainer.n_training_steps += 1
        return out.loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="a harvested store (default: Gaussian rows in a temp dir)")
    ap.add_argument("--site", default=None)
    ap.add_argument("--d", type=int, default=576, help="d_model of the Gaussian store")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--steps", type=int, default=3, help="steps of each trainer per round")
    ap.add_argument("--reader-batches", type=int, default=60, help="batches the reader delivers per round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-sae-lens", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace the Train section of docs/benchmarks.md")
    ap.add_argument("--matryoshka", action="store_true", help="Matryoshka vs BatchTopK steps only")
    ap.add_argument("--widths", default="0.0625,0.125,0.25,0.5,1", help="--matryoshka-widths of the Matryoshka SAE")
    ap.add_argument("--reader", action="store_true", help="measure the reader alone (the Reader section)")
    ap.add_argument("--reader-threads", default=None, help="thread counts for --reader (default 1,2,4,cores)")
    args = ap.parse_args()
    if args.reader:
        return reader_main(args)
    device = resolve_device(args.device)
    b, k = args.batch_size, args.k

    with tempfile.TemporaryDirectory() as tmp:
        if args.store is None:
            print("writing a Gaussian store ...", file=sys.stderr)
            path = gaussian_store(Path(tmp) / "gauss.zarr", args.d, 32 * 8192)
            data = f"Gaussian rows (‖x‖≈60, bf16 store, {32 * 8192:,} rows)"
        else:
            path = args.store
        store = Store.open(path)
        site = args.site or store.sites[0]
        d = store.d_model
        f = args.expansion * d
        if args.store is not None:
            corpus = store.attrs.get("corpus") or {}
            src = corpus.get("id") or ", ".join(Path(p).name for p in corpus.get("paths", [])) or "?"
            data = (
                f"{store.attrs['model']['id']} {site} activations of {src} ({store.n_rows:,} rows, "
                f"{store.dtype} store, {store.n_chunks} chunks of {store.chunk_rows}), harvested with `sae harvest "
                f"--model {store.attrs['model']['id']} --site {site} --dataset {corpus.get('id') or src_path(corpus)} "
                f"--seq-len {store.seq_len} --max-tokens {store.n_rows} --out {args.store}`"
            )
        cfg = TrainConfig(
            store=path, site=site, out=Path(tmp) / "out", k=(k,), expansion=(args.expansion,), batch_size=b
        )
        stats = store.stats(site, skip_bos=True)
        scale = math.sqrt(d) / stats.mean_norm
        variance = stats.variance * scale**2
        plan = make_plan(cfg, 10**9, scale)
        if args.matryoshka:
            text = compare_matryoshka(args, cfg, store, site, d, device, scale, variance, plan, data)
            print(text)
            if args.write:
                write_section(text, MATRYOSHKA_SECTION)
            return
        (point,) = sweep(cfg)
        runs = {}
        for decoder in ("sparse", "dense"):
            torch.manual_seed(0)
            dcfg = TrainConfig(**{**cfg.__dict__, "decoder": decoder})
            runs[decoder] = make_run(dcfg, point, d, device, scale, variance)
        lr = runs["dense"].lr
        total_steps = args.rounds * args.steps + 4
        lens = None if args.no_sae_lens else SaeLens(d, f, k, b, lr, device, total_steps)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        feed = ChunkReader(store, site, batch_size=b, device=device, seed=1)
        x0 = feed.next_batch().x * scale
        for r in runs.values():
            r.sae.init_from_sample(x0)
        times: dict[str, list[float]] = {
            k_: [] for k_ in ("reader", "reader-start", "sparse", "dense", "sae-lens", "matmul")
        }
        shapes = [(b, d, f), (b, f, d), (b, d, f), (f, b, d)]  # enc fwd, dec fwd, dec ∇a, dec ∇W

        def t_reader() -> None:
            # Sustained rate: the first batch waits for the first half-buffer of chunks (a one-off start-up
            # cost, reported apart), then background threads refill while batches are drawn.
            t0 = time.perf_counter()
            with ChunkReader(store, site, batch_size=b, device=device, seed=len(times["reader"])) as r:
                r.next_batch()
                sync(device)
                t1 = time.perf_counter()
                for _ in range(args.reader_batches):
                    r.next_batch()
                sync(device)
                t2 = time.perf_counter()
            times["reader-start"].append(t1 - t0)
            times["reader"].append((t2 - t1) / args.reader_batches)

        def t_ours(decoder: str) -> None:
            step = len(times[decoder]) * args.steps
            for i in range(args.steps):
                x = feed.next_batch().x * scale
                sync(device)
                t0 = time.perf_counter()
                train_step(runs[decoder], x, lr, step + i, plan, cfg, autocast)
                sync(device)
                times[decoder].append(time.perf_counter() - t0)

        def t_lens() -> None:
            for _ in range(args.steps):
                x = feed.next_batch().x * scale
                sync(device)
                t0 = time.perf_counter()
                lens.step(x)
                sync(device)
                times["sae-lens"].append(time.perf_counter() - t0)

        mats = [(torch.randn(m, n, device=device), torch.randn(n, p, device=device)) for m, n, p in shapes]

        def t_matmul() -> None:
            for (a, w), (m, n, p) in zip(mats, shapes, strict=True):
                sync(device)
                t0 = time.perf_counter()
                torch.mm(a, w)
                sync(device)
                times["matmul"].append((time.perf_counter() - t0) / (2 * m * n * p))  # s per FLOP

        tasks = [t_reader, lambda: t_ours("sparse"), lambda: t_ours("dense"), t_matmul]
        if lens is not None:
            tasks.insert(3, t_lens)
        # one warm-up pass, not counted
        for t in tasks:
            t()
        for v in times.values():
            v.clear()
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
            for t in tasks if rnd % 2 == 0 else tasks[::-1]:
                t()
        feed.close()

    med = {k_: statistics.median(v) for k_, v in times.items() if v}
    tok = {k_: b / med[k_] for k_ in med if k_ not in ("matmul", "reader-start")}
    mm_flops = 1 / med["matmul"]
    fl = {dec: step_flops(b, d, f, k, dec) / med[dec] for dec in ("dense", "sparse")}
    best = max(tok["sparse"], tok["dense"])
    reader_ratio = f"{tok['reader'] / best:.1f}× trainer consumption (goal ≥ 3×)"
    dense_ratio = f"{fl['dense'] / mm_flops:.2f}× matmul FLOP/s (goal ≥ 0.75)"
    sparse_ratio = f"{tok['sparse'] / tok['dense']:.2f}× dense (goal ≥ 2×)"
    rows = [
        (
            f"shuffled reader alone (after a {med['reader-start']:.1f} s start)",
            f"{tok['reader']:,.0f}",
            "",
            reader_ratio,
        ),
        ("dense fp32 matmul, step GEMM shapes", "", f"{mm_flops / 1e9:,.1f}", "reference"),
        ("ours, dense decoder", f"{tok['dense']:,.0f}", f"{fl['dense'] / 1e9:,.1f}", dense_ratio),
        ("ours, sparse decoder", f"{tok['sparse']:,.0f}", f"{fl['sparse'] / 1e9:,.1f}", sparse_ratio),
    ]
    if lens is not None:
        rows.append(
            (f"sae-lens {lens.version} SAETrainer", f"{tok['sae-lens']:,.0f}", "",
             f"ours {best / tok['sae-lens']:.2f}× (goal ≥ 3×)")
        )  # fmt: skip
    cmd = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = [
        f"BatchTopK training step, d={d}, F={f}, k={k}, B={b}, fp32 on {device}; {data}. Medians of "
        f"{args.rounds} interleaved rounds ({args.steps} steps of each trainer, {args.reader_batches} reader "
        f"batches, the 4 GEMMs per round). Machine: {machine()}; 1-min load average at the end {load:.1f}.",
        "",
        f"Command: `{cmd}`",
        "",
        "| what | tokens/s | GFLOP/s | ratio |",
        "|---|---:|---:|---|",
        *[f"| {a} | {t} | {g} | {r} |" for a, t, g, r in rows],
        "",
        "FLOPs counted: " + step_flops.__doc__.split(". ", 1)[1].replace("\n   ", "").replace("  ", " ").strip(),
        "",
        "Each ratio compares figures taken in the same rounds, so load from other processes (see the load average)"
        " lowers every absolute figure alike but leaves the ratios fair.",
    ]
    text = "\n".join(table)
    print(text)
    if args.write:
        write_section(text)


def compare_matryoshka(args, cfg, store, site, d, device, scale, variance, plan, data) -> str:
    """Median step times of BatchTopK and Matryoshka BatchTopK SAEs of the same shapes, each decoder, trained on
    the same batches in interleaved rounds; the markdown section."""
    b, k = args.batch_size, args.k
    widths = tuple(float(w) for w in args.widths.split(","))
    cfg = TrainConfig(**{**cfg.__dict__, "arch": ("batchtopk", "matryoshka"), "matryoshka_widths": widths})
    runs = {}
    for decoder in ("sparse", "dense"):
        for point in sweep(cfg):
            torch.manual_seed(0)
            dcfg = TrainConfig(**{**cfg.__dict__, "decoder": decoder})
            runs[point.arch, decoder] = make_run(dcfg, point, d, device, scale, variance)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with ChunkReader(store, site, batch_size=b, device=device, seed=1) as feed:
        x0 = feed.next_batch().x * scale
        for r in runs.values():
            r.sae.init_from_sample(x0)
        keys = list(runs)
        for rnd in range(args.rounds + 1):  # the first round warms up and is not counted
            print(f"round {rnd}/{args.rounds}", file=sys.stderr)
            for key in keys if rnd % 2 == 0 else keys[::-1]:
                for i in range(args.steps):
                    x = feed.next_batch().x * scale
                    sync(device)
                    t0 = time.perf_counter()
                    train_step(runs[key], x, runs[key].lr, rnd * args.steps + i, plan, cfg, autocast)
                    sync(device)
                    if rnd > 0:
                        times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    m = runs["matryoshka", "sparse"].sae
    cmd = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"One training step (forward, backward, Adam, bookkeeping), d={d}, F={m.d_sae}, k={k}, B={b}, fp32 on "
        f"{device}; Matryoshka prefixes {', '.join(map(str, m.widths))}; {data}. Medians of {args.rounds} "
        f"interleaved rounds of {args.steps} steps of each SAE on the same batches. Machine: {machine()}; 1-min "
        f"load average at the end {load:.1f}.",
        "",
        f"Command: `{cmd}`",
        "",
        "| decoder | BatchTopK ms/step | Matryoshka ms/step | Matryoshka / BatchTopK |",
        "|---|---:|---:|---:|",
    ]
    for decoder in ("sparse", "dense"):
        a, z = med["batchtopk", decoder], med["matryoshka", decoder]
        lines.append(f"| {decoder} | {1e3 * a:,.1f} | {1e3 * z:,.1f} | {z / a:.2f}× |")
    lines += [
        "",
        "Matryoshka decodes its prefixes in one sparse product over the selected entries (each entry moved to its "
        "row's prefix group) and sums the groups cumulatively; the dense path multiplies each column group by its "
        "block of W_dec. Both cost one decode; the extra work is elementwise: the P reconstructions and their loss "
        "terms over [B, P, d], forward and backward.",
    ]
    return "\n".join(lines)


def reader_main(args: argparse.Namespace) -> None:
    """The Reader section: the shuffled reader over a Blosc store and a `--codec none` store of the same rows,
    against raw Blosc decode on as many threads and memcpy, side by side in interleaved rounds."""
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.reader_threads.split(",")] if args.reader_threads else sorted({1, 2, 4, cores})
    d, b, n_rows = args.d, args.batch_size, 32 * 8192
    # what the reader delivers: float32 batches (the CPU trainer's), batches in the store's dtype (the host gather
    # alone) and, on the meta device, the host's share of a GPU reader
    outs = {
        "float32": "float32 batches",
        "bf16": "bf16 batches gathered on the host",
        "meta": "the host's share of a GPU reader (chunks to a device arena, gathered there)",
    }
    variants = [(codec, out) for codec in ("blosc-zstd", "none") for out in outs]
    with tempfile.TemporaryDirectory() as tmp:
        print("writing two Gaussian stores ...", file=sys.stderr)
        paths = {c: gaussian_store(Path(tmp) / f"{c}.zarr", d, n_rows, codec=c) for c in ("blosc-zstd", "none")}
        stores = {c: Store.open(p) for c, p in paths.items()}
        site = stores["none"].sites[0]
        chunks = stores["none"].complete_chunks()
        chunk_rows = stores["none"].chunk_rows
        mapped = {c: st.mapped(site) for c, st in stores.items()}
        wall: dict[str, list[float]] = {}  # seconds per row
        cpu: dict[str, list[float]] = {}  # CPU seconds (all threads) per row

        def timed(key: str, rows: int, fn: Any) -> None:
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.setdefault(key, []).append((time.perf_counter() - w0) / rows)
            cpu.setdefault(key, []).append((time.process_time() - c0) / rows)

        def t_decode(n: int) -> None:
            # n threads at once, each decoding whole chunks from the mapped shard bytes into its own buffer
            per = 4
            bufs = [np.empty((chunk_rows, d), np.uint16) for _ in range(n)]

            def work(k: int) -> None:
                for j in range(per):
                    mapped["blosc-zstd"].chunk(chunks[(k * per + j) % len(chunks)], bufs[k])

            def run() -> None:
                ths = [threading.Thread(target=work, args=(k,)) for k in range(n)]
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()

            timed(f"decode/{n}", n * per * chunk_rows, run)

        def drain(r: ChunkReader, n: int, float32: bool) -> None:
            for _ in range(n):  # each batch dropped at once, as a trainer does: its memory is recycled
                r.next_batch(float32)

        def t_memcpy() -> None:
            buf = np.empty((chunk_rows, d), np.uint16)
            timed("memcpy", 8 * chunk_rows, lambda: [np.copyto(buf, mapped["none"].chunk(c)) for c in chunks[:8]])

        def t_reader(codec: str, out: str, n: int) -> None:
            key = f"{codec}/{out}/{n}"
            seed = len(wall.get(key, []))
            # A fresh Store each time: its shard maps are new and the reader scans every chunk for NaN/Inf, as in
            # the first epoch of a run.
            # The first epoch fills the reader's arena (fresh pages) and scans each chunk for NaN/Inf; later epochs
            # reuse both. A store much larger than the buffer is mostly like the later epochs plus the scan.
            w0, c0 = time.perf_counter(), time.process_time()  # the first epoch from the start: every chunk read
            device, f32 = ("meta", True) if out == "meta" else ("cpu", out == "float32")
            with ChunkReader(
                Store.open(paths[codec]), site, batch_size=b, seed=seed, threads=n, buffer_mb=0, device=device
            ) as r:
                first = -(-r.train_rows // b)
                drain(r, first, f32)
                wall.setdefault(f"{key}/first", []).append((time.perf_counter() - w0) / (first * b))
                cpu.setdefault(f"{key}/first", []).append((time.process_time() - c0) / (first * b))
                # whole epochs, so the window starts and ends at the same point of the reading ahead (up to a
                # group beside the batches drawn)
                steady = first * max(1, round(args.reader_batches / first))
                timed(key, steady * b, lambda: drain(r, steady, f32))

        tasks = [t_memcpy] + [lambda n=n: t_decode(n) for n in threads]
        tasks += [lambda c=c, k=k, n=n: t_reader(c, k, n) for c, k in variants for n in threads]
        for t in tasks:  # warm-up (page cache, allocator, thread pools), not counted
            t()
        wall.clear()
        cpu.clear()
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
            for t in tasks if rnd % 2 == 0 else tasks[::-1]:
                t()
        per_token = {c: st.disk_bytes(site) / st.n_rows for c, st in stores.items()}
        n_chunks = stores["none"].n_chunks
    rate = {k: 1 / statistics.median(v) for k, v in wall.items()}
    crate = {k: 1 / statistics.median(v) for k, v in cpu.items()}
    dec1, mem = rate["decode/1"], rate["memcpy"]
    rows = [("memcpy of raw chunks (mapped, page cache warm)", 1, "memcpy", "reference")]
    rows += [
        (f"raw Blosc decode of mapped chunks, {n} thread(s) at once", n, f"decode/{n}",
         f"{rate[f'decode/{n}'] / dec1:.2f}× one thread") for n in threads
    ]  # fmt: skip
    for codec, kind in variants:
        out = outs[kind]
        for n in threads:
            key = f"{codec}/{kind}/{n}"
            f1 = rate[f"{key}/first"]
            if codec == "none":
                what = f"reader, `--codec none` store, memory-mapped ({per_token['none']:.0f} bytes/token), {out}"
                ratio = f"{rate[key] / mem:.2f}× memcpy (goal ≥ 0.3); first epoch {f1 / mem:.2f}×"
            else:
                what = f"reader, Blosc zstd-1 store ({per_token['blosc-zstd']:.0f} bytes/token), {out}"
                ratio = (
                    f"{rate[key] / (dec1 * n):.2f}× (decode on 1 thread × {n}) (goal ≥ 0.7), first epoch "
                    f"{f1 / (dec1 * n):.2f}×; {rate[key] / rate[f'decode/{n}']:.2f}× decode on {n} thread(s) at "
                    f"once; per CPU second {crate[key] / crate['decode/1']:.2f}× decode's"
                )
            rows.append((what, n, key, ratio))
    cmd = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def first(k: str) -> str:
        return f"{rate[k + '/first']:,.0f}" if k + "/first" in rate else "—"

    text = "\n".join(
        [
            "## Reader",
            "",
            f"Command: `{cmd}` (benchmarks/train.py). Gaussian rows (‖x‖≈60, BOS rows 30× larger), d={d}, "
            f"bfloat16, {n_chunks} chunks of {chunk_rows} rows, written twice: Blosc zstd-1 with byte shuffle (the "
            f"default) and `--codec none`. The reader draws batches of {b} rows on the CPU with a 32-chunk "
            "buffer, from a freshly opened store each time (new shard maps). Its first epoch is timed apart from "
            "the reader's start (the *first epoch* column: every chunk read once and scanned for NaN/Inf, the "
            "reader's arena of chunk slots faulted in), then "
            f"about {args.reader_batches} batches of the later epochs, rounded to whole epochs so that the window "
            "starts and ends at the same point of the reader's reading ahead (the *rows/s* column, which the "
            "ratios use). A "
            "store many times the buffer behaves like the later epochs plus the scan. Every chunk goes whole into "
            "the reader's arena (decoded, or copied from the mapped file if raw) on the reader's worker threads "
            "(the *threads* column); one feed thread gathers each batch from it in the store's dtype (`next_batch"
            "(float32=False)`: the bf16 rows) and `next_batch()` makes it float32 on the calling thread (what the "
            "CPU trainer gets). A GPU reader's arena is on the device and its batches are gathered there: the "
            '*host\'s share* rows run that path with `device="meta"`, which leaves out the copy to the device '
            "(a DMA, which costs the host no cycles) and the gather there (the GPU's work). The raw limits run in "
            "the same rounds: Blosc "
            "decoding whole chunks from the mapped shard bytes into preallocated buffers on n threads at once, "
            f"and a memcpy of the raw store's chunks. Medians of {args.rounds} interleaved rounds. Machine: "
            f"{machine()}; 1-min load "
            f"average at the end {load:.1f}.",
            "",
            "| what | threads | rows/s | first epoch rows/s | rows per CPU s | ratio |",
            "|---|---:|---:|---:|---:|---|",
            *[f"| {a} | {n} | {rate[k]:,.0f} | {first(k)} | {crate[k]:,.0f} | {q} |" for a, n, k, q in rows],
        ]
    )
    print(text)
    if args.write:
        write_doc_section(DOC, "Reader", text)


def write_section(body: str, section: str = SECTION) -> None:
    """Replace (or append) `section` of docs/benchmarks.md, leaving the other sections alone."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    old = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    lines = old.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == section)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    except StopIteration:
        start = end = len(lines)
        lines += [""]
        start = end = len(lines)
    new = lines[:start] + [section, "", *body.splitlines(), ""] + lines[end:]
    DOC.write_text("\n".join(new).rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
