"""Where one reader worker's time goes: thread CPU time in chunk decode, chunk reads, batch gathers and plans.

    python benchmarks/reader_profile.py [--codec blosc-zstd|none] [--threads 1] [--float32] [--device-arena]

Gaussian store as in `benchmarks/train.py --reader` (32 chunks of 8192 rows, d = 576, bfloat16). The reader's
functions are wrapped to sum their thread CPU time; each round opens the store afresh, draws `--warm` batches of
4096 rows (the first epoch: arena filled, chunks scanned), then times `--batches` batches (two epochs: whole
epochs start and end at the same point of the reading ahead). Each figure is that function's CPU time over the
wall time (decode is part of read). `--device-arena`: the host's share of a GPU reader with a device arena (see
`DeviceArenaHost` in common.py: decode or copy into staging; no gather).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import DeviceArenaHost, machine

import sae.store as store_mod
import sae.train.reader as reader_mod
from sae.store import Store
from train import gaussian_store

spent: dict[str, float] = {}


def timed(name: str, fn: Callable) -> Callable:
    def run(*a: Any, **k: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.thread_time() - t

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default="blosc-zstd", choices=("blosc-zstd", "none"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--float32", action="store_true", help="float32 batches (the CPU trainer's), not bf16")
    ap.add_argument("--device-arena", action="store_true", help="the host's share with a device arena")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=64)
    ap.add_argument("--batches", type=int, default=128)
    args = ap.parse_args()
    reader_mod._gather = timed("gather", reader_mod._gather)
    reader_mod.read_rows = timed("read", reader_mod.read_rows)
    reader_mod._Lane._plan = timed("plan", reader_mod._Lane._plan)
    store_mod.MappedArray.chunk = timed("decode", store_mod.MappedArray.chunk)
    base = DeviceArenaHost if args.device_arena else reader_mod.ChunkReader
    cls = type("Reader", (base,), {"_host_float32": args.float32})
    what = "device arena (host share)" if args.device_arena else f"{'float32' if args.float32 else 'bf16'} batches"
    print(f"{machine()}; {args.codec}, {what}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        path = gaussian_store(Path(tmp) / "s.zarr", 576, 32 * 8192, codec=args.codec)
        for rnd in range(args.rounds):
            st = Store.open(path)
            with cls(st, st.sites[0], batch_size=4096, seed=rnd, threads=args.threads, buffer_mb=0) as r:
                for _ in range(args.warm):
                    r.next_batch()
                spent.clear()
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.batches):
                    r.next_batch()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            parts = ", ".join(f"{k} {v / wall:.2f}" for k, v in sorted(spent.items()))
            print(f"round {rnd + 1}: {args.batches * 4096 / wall:,.0f} rows/s; process CPU {cpu / wall:.2f}; {parts}")


if __name__ == "__main__":
    main()
