"""The GPU trainer and its data path, measured on a CUDA device at GPT-2-small shapes (d=768, F=12,288, k=32,
B=4,096 by default).

    python benchmarks/gpu.py --write

On the device it measures, in interleaved rounds:
  gemm        the encoder GEMM ([B, d] × [d, F]) alone in fp32, TF32 and bf16: the FLOP limit of each mode
  step        our BatchTopK training step on batches already on the device, in fp32, TF32 and bf16 autocast
  reader      the shuffled reader alone onto the device (Blosc and `--codec none` stores of the same Gaussian
              rows: chunks decoded or copied, copied whole to an arena on the device and gathered there), with as
              many worker threads as the machine has cores
  train       step + reader together, from each store: tokens/s, and the fraction of the step time spent
              waiting for data
and writes the "GPU" section of docs/benchmarks.md. Without CUDA it says so and exits (status 1), measuring nothing.

    python benchmarks/gpu.py --projection --write

runs anywhere: it measures the reader's rows/s per core on this machine and sets them against the rows/s a GPU
trainer would consume by FLOP count at those shapes (datasheet peaks), writing the "GPU projection" section.
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
import time
from pathlib import Path

import torch
from common import machine, write_section

from sae.config import TrainConfig
from sae.saedir import sweep
from sae.store import Store
from sae.train.reader import ChunkReader
from sae.train.trainer import make_plan, make_run, train_step
from train import gaussian_store, step_flops

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# Dense peak FLOP/s of NVIDIA's datasheets (no sparsity), for the projection only.
# The host link's peak per direction (PCIe Gen5 / Gen4 x16), which every row crosses once as bf16.
LINK = {"H100 SXM": 64e9, "A100 SXM": 32e9}
PEAKS = {
    "H100 SXM": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100 SXM": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}
MODES = ("fp32", "tf32", "bf16")


def per_row_flops(d: int, f: int, k: int, b: int) -> float:
    """FLOPs of one training row at these shapes: the step's (sparse decoder, see benchmarks/train.py) over B."""
    return step_flops(b, d, f, k, "sparse") / b


def cmd_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])


def reader_rate(
    store: Store, b: int, batches: int, threads: int, device: str, warm: bool = False
) -> tuple[float, float]:
    """Rows/s of a reader on `device` over `store` through about `batches` batches rounded to whole epochs, and rows
    per CPU second of the process (all its threads) meanwhile: from its start (every chunk read and scanned for
    NaN/Inf, the start and the reading ahead into the next epoch counted), or with `warm` after a first epoch."""
    with ChunkReader(store, store.sites[0], batch_size=b, threads=threads, buffer_mb=0, device=device) as r:
        epoch = -(-r.train_rows // b)
        for _ in range(epoch if warm else 0):
            r.next_batch()
        if warm and device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        batches = epoch * max(1, round(batches / epoch))
        for _ in range(batches):
            x = r.next_batch().x
        if device == "cuda":
            x.sum().item()  # the last batch is on the device
        return batches * b / (time.perf_counter() - t0), batches * b / (time.process_time() - c0)


@contextlib.contextmanager
def tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast(mode: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def gpu_main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py: no CUDA device is visible (torch.cuda.is_available() is False), so nothing was "
            "measured. Run it on a GPU node, or pass --projection for the FLOP-count projection."
        )
    device = torch.device("cuda")
    d, f, k, b = args.d, args.d * args.expansion, args.k, args.batch_size
    cores = os.cpu_count() or 1
    threads = args.threads or cores
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731

    def cuda_time(fn, reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        a, z = ev(), ev()
        a.record()
        for _ in range(reps):
            fn()
        z.record()
        z.synchronize()
        return a.elapsed_time(z) / 1e3 / reps

    with tempfile.TemporaryDirectory() as tmp:
        print("writing Gaussian stores ...", file=sys.stderr)
        paths = {c: gaussian_store(Path(tmp) / f"{c}.zarr", d, args.rows, codec=c) for c in ("blosc-zstd", "none")}
        store = Store.open(paths["none"])
        site = store.sites[0]
        cfg = TrainConfig(store=paths["none"], site=site, out=Path(tmp) / "out", k=(k,), expansion=(args.expansion,),
                          batch_size=b, decoder="sparse")  # fmt: skip
        stats = store.stats(site, skip_bos=True)
        scale = math.sqrt(d) / stats.mean_norm
        plan = make_plan(cfg, 10**9, scale)
        (point,) = sweep(cfg)
        runs = {}
        for mode in MODES:
            torch.manual_seed(0)
            runs[mode] = make_run(cfg, point, d, device, scale, stats.variance * scale**2)
        lr = runs["fp32"].lr
        with ChunkReader(store, site, batch_size=b, device="cuda", seed=1, threads=threads) as feed:
            x0 = feed.next_batch().x * scale
            for r in runs.values():
                r.sae.init_from_sample(x0)
        a = torch.randn(b, d, device=device)
        w = torch.randn(d, f, device=device)
        res: dict[str, list[float]] = {}
        batches = [x0 * (1 + 0.01 * i) for i in range(4)]
        steps_done = dict.fromkeys(MODES, 0)

        def step(mode: str, x: torch.Tensor) -> None:
            with tf32(mode == "tf32"):
                train_step(runs[mode], x, lr, steps_done[mode], plan, cfg, autocast(mode))
            steps_done[mode] += 1

        for rnd in range(args.rounds + 1):  # round 0 is a warm-up
            print(f"round {rnd}/{args.rounds}", file=sys.stderr)
            out: dict[str, float] = {}
            for mode in MODES:
                with tf32(mode == "tf32"), autocast(mode):
                    out[f"gemm/{mode}"] = 2 * b * d * f / cuda_time(lambda: torch.mm(a, w), 20)
                it = iter(range(10**9))
                out[f"step/{mode}"] = b / cuda_time(lambda m=mode, it=it: step(m, batches[next(it) % 4]), args.steps)
                # step + reader: the trainer's loop as it runs (reader on the cores; uploads and the gathers from
                # the device arena on a side stream)
                for codec, p in paths.items():
                    with ChunkReader(Store.open(p), site, batch_size=b, device="cuda", seed=rnd,
                                    threads=threads) as r:  # fmt: skip
                        r.next_batch()
                        torch.cuda.synchronize()
                        waited, t0 = r.wait_seconds, time.perf_counter()
                        for _ in range(args.steps):
                            step(mode, r.next_batch().x * scale)
                        torch.cuda.synchronize()
                        total = time.perf_counter() - t0
                        out[f"train/{codec}/{mode}"] = args.steps * b / total
                        out[f"wait/{codec}/{mode}"] = (r.wait_seconds - waited) / total
            for codec, p in paths.items():
                out[f"reader/{codec}"] = reader_rate(Store.open(p), b, args.reader_batches, threads, "cuda")[0]
            if rnd:
                for key, v in out.items():
                    res.setdefault(key, []).append(v)
        n_rows = store.n_rows
    med = {key: statistics.median(v) for key, v in res.items()}
    flops_row = per_row_flops(d, f, k, b)
    rows = []
    for mode in MODES:
        gemm = med[f"gemm/{mode}"]
        limit = gemm / (2 * d * f)  # rows/s if the encoder GEMM ran alone at its measured rate
        rows.append(
            (f"trainer step, {mode}" + (" autocast" if mode == "bf16" else ""), med[f"step/{mode}"],
             f"{gemm / 1e12:,.1f}", f"{med[f'step/{mode}'] / limit:.2f}× the encoder-GEMM limit ({limit:,.0f})")
        )  # fmt: skip
        for codec in paths:
            rows.append(
                (f"trainer + reader ({threads} threads, {codec} store), {mode}", med[f"train/{codec}/{mode}"], "",
                 f"{med[f'wait/{codec}/{mode}']:.1%} of the time waiting for data; "
                 f"{med[f'train/{codec}/{mode}'] / med[f'step/{mode}']:.2f}× the step alone")
            )  # fmt: skip
    for codec in paths:
        rows.append((f"reader alone, {codec} store, {threads} threads, to the device", med[f"reader/{codec}"], "",
                     f"{med[f'reader/{codec}'] / cores:,.0f} rows/s per core"))  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        "## GPU",
        "",
        f"Command: `{cmd_line()}` (benchmarks/gpu.py). Device: {torch.cuda.get_device_name()}; {machine()}. "
        f"d={d}, F={f}, k={k}, B={b}, BatchTopK with the sparse decoder; Gaussian rows (‖x‖≈60, bf16, {n_rows:,} "
        f"rows). Medians of {args.rounds} rounds ({args.steps} steps per mode, {args.reader_batches} reader batches). "
        "The encoder-GEMM limit is the measured rate of the [B, d] × [d, F] product alone in the same mode, as rows "
        f"per second ({flops_row / 1e6:.1f} MFLOP per row in all counted by benchmarks/train.py's step_flops). "
        "Waiting for data: the share of the loop's wall time spent inside `next_batch` waiting for a batch not "
        f"ready yet. 1-min load average at the end {load:.1f}.",
        "",
        "| what | tokens/s | GEMM TFLOP/s | ratio |",
        "|---|---:|---:|---|",
        *[f"| {a} | {t:,.0f} | {g} | {q} |" for a, t, g, q in rows],
    ])  # fmt: skip
    print(text)
    if args.write:
        write_section(DOC, "GPU", text)


def projection_main(args: argparse.Namespace) -> None:
    """Rows/s per core of the reader here against what a GPU trainer consumes by FLOP count."""
    d, f, k, b = args.d, args.d * args.expansion, args.k, args.batch_size
    flops_row = per_row_flops(d, f, k, b)
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("writing Gaussian stores ...", file=sys.stderr)
        paths = {c: gaussian_store(Path(tmp) / f"{c}.zarr", d, args.rows, codec=c) for c in ("blosc-zstd", "none")}
        for rnd in range(args.rounds + 1):
            print(f"round {rnd}/{args.rounds}", file=sys.stderr)
            for codec, p in paths.items():
                # one worker thread: the rows/s one core gives, doing the host's work for a GPU (chunks decoded or
                # copied into staging; the meta device takes the copies and gathers at no cost), after a first
                # epoch and from the start
                for warm in (True, False):
                    wall, cpu = reader_rate(Store.open(p), b, args.reader_batches, 1, "meta", warm)
                    if rnd:
                        res.setdefault(codec + ("" if warm else "/start"), []).append(cpu)
                        res.setdefault(f"{codec}/wall" + ("" if warm else "/start"), []).append(wall)
    rate = {c: statistics.median(v) for c, v in res.items()}
    per_core = {c: rate[c] for c in paths}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## GPU projection",
        "",
        f"Command: `{cmd_line()}` (benchmarks/gpu.py; no GPU was lent, so the GPU section is not measured). "
        f"At d={d}, F={f}, k={k}, B={b} one training row costs {flops_row / 1e6:.1f} MFLOP (benchmarks/train.py's "
        "step_flops, sparse decoder; the dense encoder GEMM is nearly all of it). A GPU running that at its "
        "datasheet dense peak would consume peak / FLOP-per-row rows per second: an upper bound (the GEMM reaches "
        "perhaps 60-80 % of peak, and top-k, Adam and the sparse products add time). Every row crosses the host "
        "link once, as bf16 (2·d bytes), against the link's datasheet peak per direction (PCIe Gen5 x16, 64 GB/s, "
        "for the H100 SXM; Gen4 x16, 32 GB/s, for the A100 SXM). Reader rows/s per core: "
        "rows per CPU second (all threads of the process) of the reader with one worker thread on this machine, "
        "doing the host's work for a GPU (each chunk decoded, or copied from the mapped file if raw, into "
        'staging, and batches planned: `device="meta"`; the DMA to the device arena and the gather there cost '
        "the host no cycles and are left out), "
        f"medians of {args.rounds} rounds of about {args.reader_batches} batches (whole epochs) after a first "
        "epoch; CPU time, not wall time, because "
        f"this box is shared: {machine()}; 1-min load average {load:.1f}.",
        "",
        "| GPU, mode | peak TFLOP/s | rows/s consumed (upper bound) | host-to-device GB/s (share of the link) | "
        "cores to feed it, `--codec none` | cores to feed it, Blosc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for gpu, peaks in PEAKS.items():
        for mode in MODES:
            need = peaks[mode] / flops_row
            link = need * 2 * d
            lines.append(
                f"| {gpu}, {mode} | {peaks[mode] / 1e12:,.0f} | {need:,.0f} | {link / 1e9:,.1f} "
                f"({link / LINK[gpu]:.0%}) | {need / per_core['none']:,.1f} | "
                f"{need / per_core['blosc-zstd']:,.1f} |"
            )
    lines += [
        "",
        f"Reader rows per CPU second here: `--codec none` {per_core['none']:,.0f}, Blosc zstd-1 "
        f"{per_core['blosc-zstd']:,.0f} (wall rows/s at that load: {rate['none/wall']:,.0f} and "
        f"{rate['blosc-zstd/wall']:,.0f}). From the reader's start instead (the start, a scan of every chunk for "
        f"NaN/Inf, and the reading ahead into the next epoch counted): {rate['none/start']:,.0f} and "
        f"{rate['blosc-zstd/start']:,.0f} per CPU second, so the first pass over a store needs up to "
        f"{per_core['none'] / rate['none/start']:.1f}× and {per_core['blosc-zstd'] / rate['blosc-zstd/start']:.1f}× "
        "the cores of the table.",
    ]
    # what the table means against a typical node: 12-16 CPU cores per GPU
    h100 = PEAKS["H100 SXM"]
    reach = [
        f"{gpu} {mode}"
        for gpu, peaks in PEAKS.items()
        for mode in MODES
        if peaks[mode] / flops_row / per_core["none"] <= 16
    ]
    over = [
        f"{gpu} {mode}" for gpu, peaks in PEAKS.items() for mode in MODES if peaks[mode] / flops_row * 2 * d > LINK[gpu]
    ]
    lines += [
        "",
        "Beyond the link's peak, the link, not the reader, bounds the GPU: "
        + (", ".join(over) or "none of these")
        + " (at this d). "
        f"At this box's per-core rates a CPU reader feeds an H100 at its bf16 peak only with "
        f"{h100['bf16'] / flops_row / per_core['none']:.0f} cores reading `--codec none` shards "
        f"({h100['bf16'] / flops_row / per_core['blosc-zstd']:.0f} for Blosc), against the 12–16 cores per GPU of a "
        "typical 8-GPU node; within 16 cores with `--codec none`: " + (", ".join(reach) or "none of these") + ". "
        "The measured GPU figures (benchmarks/gpu.py on a CUDA machine: trainer tokens/s in fp32, TF32 and bf16 "
        'against the encoder-GEMM limit, the reader on that machine\'s cores, time waiting for data) go in a "GPU" '
        "section when a GPU is lent.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(DOC, "GPU projection", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=64 * 8192, help="rows of each Gaussian store")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="training steps per mode and round")
    ap.add_argument("--reader-batches", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="reader worker threads (default: the core count)")
    ap.add_argument("--projection", action="store_true", help="no GPU needed: the FLOP-count projection")
    ap.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = ap.parse_args()
    projection_main(args) if args.projection else gpu_main(args)


if __name__ == "__main__":
    main()
