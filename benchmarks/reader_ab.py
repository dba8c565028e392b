"""Two versions of train/reader.py side by side: rows/s of each in interleaved rounds, same stores, same process.

    git show <commit>:train/reader.py > /tmp/old_reader.py
    python benchmarks/reader_ab.py --old /tmp/old_reader.py

Gaussian stores as in `benchmarks/train.py --reader` (Blosc zstd-1 and `--codec none`, 32 chunks of 8192 rows,
d = 576, bfloat16). Each measurement opens the store afresh, draws `--warm` batches of 4096 rows (the first epoch:
arena filled, chunks scanned), then times `--batches` batches (whole epochs, so the window starts and ends at
the same point of the reading ahead).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from common import machine

import sae.train.reader as new
from sae.store import Store
from train import gaussian_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other reader.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=64, help="batches drawn before timing")
    ap.add_argument("--batches", type=int, default=128, help="batches timed (whole epochs: 64 each)")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("old_reader", args.old)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    threads = [int(t) for t in args.threads.split(",")]
    res: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {c: gaussian_store(Path(tmp) / f"{c}.zarr", 576, 32 * 8192, codec=c) for c in ("none", "blosc-zstd")}

        def rate(mod, codec: str, f32: bool, n: int, seed: int) -> float:
            cls = type("Reader", (mod.ChunkReader,), {"_host_float32": f32})
            st = Store.open(paths[codec])
            with cls(st, st.sites[0], batch_size=4096, seed=seed, threads=n, buffer_mb=0) as r:
                for _ in range(args.warm):
                    r.next_batch()
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    r.next_batch()
                return args.batches * 4096 / (time.perf_counter() - t0)

        cases = [(c, f, n, m) for c in paths for f in (False, True) for n in threads for m in ("old", "new")]
        for rnd in range(args.rounds):
            for c, f, n, m in cases if rnd % 2 == 0 else cases[::-1]:
                res.setdefault((c, f, n, m), []).append(rate(old if m == "old" else new, c, f, n, rnd))
    print(f"{machine()}; medians of {args.rounds} rounds, {args.batches} batches of 4096 after {args.warm}")
    print("| store | batches | threads | old rows/s | new rows/s | new / old |")
    print("|---|---|---:|---:|---:|---:|")
    for c, f, n, _ in cases[::2]:
        o, w = (statistics.median(res[(c, f, n, m)]) for m in ("old", "new"))
        print(f"| {c} | {'float32' if f else 'bf16'} | {n} | {o:,.0f} | {w:,.0f} | {w / o:.2f}× |")


if __name__ == "__main__":
    main()
