"""`sae inspect` throughput and memory (named inspect_pass.py: a script named inspect.py would shadow the standard
library's `inspect` for everything it imports) against the trainer's reader, on the same store in one run.

Measures, for an SAE of F = 8·d latents (all of them inspected), in interleaved rounds:
  reader    the trainer's shuffled chunk reader alone (rows/s): the rate training consumes the same store at
  encode    the encode GEMM alone, x·W_enc on resident batches (rows/s): the floor no pass over this SAE can beat
  inspect   the streaming pass of `sae inspect` (read, encode, per-latent state), rows/s; goal ≥ 0.5× reader
  whole     the whole command (both passes, logit effects off, pages written), seconds
Peak memory: the largest resident set of an `sae inspect` subprocess, and the bytes of the per-latent state.

    python benchmarks/inspect_pass.py --store runs/smollm2-demo/store.zarr --site blocks.15.hook_resid_post --write

Without --store it writes a store of Gaussian rows with SmolLM2-like norms (d=576) into a temporary folder.
`--write` replaces the "Inspect" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, machine, write_section

from sae.config import InspectConfig
from sae.device import resolve_device
from sae.evaluate.dashboard import read_index
from sae.evaluate.inspect import first_pass, row_kinds
from sae.evaluate.rows import StoreRows
from sae.saedir import SaeConfig, load_sae, save_sae
from sae.store import Store
from sae.train.reader import ChunkReader
from train import gaussian_store

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Inspect"


def make_sae(path: Path, store: Store, site: str, expansion: int, k: int, seed: int = 0) -> Path:
    """A BatchTopK-exported SAE of random unit directions, θ set so that θ-mode L0 ≈ k on the first chunk's
    non-BOS rows."""
    d, f = store.d_model, expansion * store.d_model
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(f, d, generator=g), dim=1)
    first = store.complete_chunks()[0]
    x = store.chunk(site, first).float()[torch.from_numpy(store.chunk_meta(first).position != 0)]  # no BOS
    b_dec = x.mean(0)
    pre = (x - b_dec) @ w_dec.T
    theta = float(pre.flatten().topk(k * x.shape[0]).values.min())
    weights = {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(f), "W_dec": w_dec, "b_dec": b_dec,
               "threshold": torch.full((f,), theta)}  # fmt: skip
    meta = {"keep_bos": False, "store": str(store.path)}
    cfg = SaeConfig(architecture="jumprelu", d_in=d, d_sae=f, k=k, hook_name=site, training_architecture="batchtopk",
                    theta=theta, complete=True, metadata=meta)  # fmt: skip
    return save_sae(weights, cfg, path)


def time_reader(store: Store, site: str, rows: int, batch: int, device: torch.device) -> float:
    with ChunkReader(store, site, batch_size=batch, val_chunks=0, device=device) as reader:
        reader.next_batch()  # the first fill is part of any run; time the steady stream after it
        n, t0 = 0, time.perf_counter()
        while n < rows:
            b = reader.next_batch()
            n += b.x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n / (time.perf_counter() - t0)


def time_encode(sae, store: Store, site: str, batch: int, device: torch.device, rounds: int = 3) -> float:
    x = store.chunk(site, store.complete_chunks()[0]).float()[:batch].to(device)
    with torch.no_grad():
        sae.pre_acts(x)
        t0 = time.perf_counter()
        for _ in range(rounds):
            sae.pre_acts(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return rounds * x.shape[0] / (time.perf_counter() - t0)


def time_inspect(sae, store: Store, site: str, cfg: InspectConfig, device: torch.device) -> tuple[float, int]:
    source = StoreRows(store, site, device, cfg.max_rows)
    t0 = time.perf_counter()
    kinds = row_kinds(cfg, sae, site, store)
    state, _, used = first_pass(source, sae, torch.arange(sae.cfg.d_sae).numpy(), cfg, kinds)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    tensors = (*state.top, *state.top_typical, *state.reservoir, state.hist, state.count, state.massive_count,
               state.total, state.massive_total, state.exponent)  # fmt: skip
    size = sum(t.numel() * t.element_size() for t in tensors)
    return source.n_rows / dt, size


def whole_command(sae_dir: Path, store: Path, out: Path, device: str, max_rows: int | None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of `sae inspect` in a subprocess."""
    cmd = [sys.executable, "-m", "sae.cli", "inspect", str(sae_dir), "--store", str(store), "--out", str(out),
           "--device", device, "--model", "none"]  # fmt: skip
    if max_rows:
        cmd += ["--max-rows", str(max_rows)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="store to read; default: a Gaussian store in a temporary folder")
    ap.add_argument("--site", help="site of --store (default: its first)")
    ap.add_argument("--rows", type=int, default=65536, help="rows of the Gaussian store / rows read per round")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--write", action="store_true", help="replace the Inspect section of docs/benchmarks.md")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or gaussian_store(Path(tmp) / "store.zarr", 576, args.rows)
        store = Store.open(path)
        site = args.site or store.sites[0]
        rows = min(args.rows, store.n_rows)
        sae_dir = make_sae(Path(tmp) / "sae", store, site, args.expansion, args.k)
        sae = load_sae(sae_dir, device=device)
        cfg = InspectConfig(sae_dir=sae_dir, max_rows=rows, batch_size=args.batch_size, device=str(device))
        reader, encode, insp = [], [], []
        for _ in range(args.rounds):
            reader.append(time_reader(store, site, rows, args.batch_size, device))
            encode.append(time_encode(sae, store, site, args.batch_size, device))
            r, state_bytes = time_inspect(sae, store, site, cfg, device)
            insp.append(r)
        wall, rss = whole_command(sae_dir, path, Path(tmp) / "site", str(device), rows)
        l0 = None
        index = read_index(Path(tmp) / "site")
        l0 = sum(index["columns"]["count"]) / index["rows_used"]
    med = {k: statistics.median(v) for k, v in (("reader", reader), ("encode", encode), ("inspect", insp))}
    ratio = med["inspect"] / med["reader"]
    d, f = store.d_model, args.expansion * store.d_model
    cmd = "python benchmarks/inspect_pass.py" + "".join(
        f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items() if v not in (None, False)
        and k != "write"
    )  # fmt: skip
    source = f"store `{args.store}` ({site})" if args.store else f"a Gaussian store (d={d}, BOS rows 30× larger)"
    lines = [
        SECTION,
        "",
        f"`{cmd}` — {machine()}. {source}, {rows:,} rows, SAE with F = {args.expansion}·d = {f} latents, θ set for "
        f"L0 ≈ {args.k} (measured θ-mode L0 {l0:.1f}), all latents inspected, batches of {args.batch_size} rows; "
        f"median of {args.rounds} interleaved rounds.",
        "",
        "| what | rows/s | vs reader |",
        "|---|---:|---:|",
        f"| trainer's reader (`ChunkReader`, read + decode only) | {med['reader']:,.0f} | 1.00× |",
        f"| encode GEMM alone (x·W_enc, resident batch) | {med['encode']:,.0f} "
        f"| {med['encode'] / med['reader']:.3f}× |",
        f"| `sae inspect` streaming pass (read, encode, per-latent state) | {med['inspect']:,.0f} | **{ratio:.3f}×** |",
        "",
        f"Whole command (both passes and the pages, no model loaded): {wall:.1f} s; peak resident memory "
        f"{rss:,.0f} MiB; the per-latent state of all {f} latents is {state_bytes / 2**20:.1f} MiB whatever the "
        "row count (top-20 over all rows and over typical rows, 64-bin histograms, 4-example reservoirs per bin).",
        "",
        f"The goal is ≥ 0.5× the reader: {'met' if ratio >= 0.5 else 'not met'} here. "
        + (
            "On a CPU the encode GEMM (2·d·F FLOPs per row) alone is slower than the reader, so no pass that encodes "
            f"every row can reach it. The pass runs at {med['inspect'] / med['encode']:.2f}× the bare GEMM: the rest "
            "is the threshold comparison over B×F, extracting the nonzeros and the state updates (sorting merges, "
            "costliest while the top lists and reservoirs fill; later rows rarely enter them). "
            "No GPU was available to measure the ratio where the GEMM is cheap."
            if med["encode"] < med["reader"]
            else ""
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(DOC, SECTION.removeprefix("## "), text)


if __name__ == "__main__":
    main()
