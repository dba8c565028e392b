"""Two versions of train/reader.py side by side: rows/s of each in interleaved rounds, same stores, same process.

    git show <commit>:train/reader.py > /tmp/old_reader.py
    python benchmarks/reader_ab.py --old /tmp/old_reader.py

`--old` is a reader from before the single-path reader (commit 218e6b8 or earlier), which offered store-dtype
batches and the host's share of a GPU reader only through private flags and methods: the `OLD` table below says
how this script drives it. The current reader (`sae.train.reader`) is driven through its public API:
`next_batch(float32=False)` and `device="meta"`. The host's share of a GPU reader: *host share* runs, for the old
reader, the calls its GPU path made for each batch on the meta device too (like for like); *host share, bare*
leaves them out, as the old reader's own benchmarks did (the current reader's figure is the same in both rows).

Gaussian stores as in `benchmarks/train.py --reader` (Blosc zstd-1 and `--codec none`, 32 chunks of 8192 rows,
d = 576, bfloat16, 1/128 of the rows BOS). Each measurement opens the store afresh and times the first epoch from
the reader's start, then `--batches` batches of 4096 rounded to whole epochs (the *rows/s* column: the window
starts and ends at the same point of the reading ahead). Raw Blosc decode on 1 and 2 threads at once and a memcpy
of raw chunks run in the same rounds, as in `benchmarks/train.py --reader`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine

import sae.train.reader as new
from sae.store import Store
from train import gaussian_store

MODES = ("float32", "bf16", "host share", "host share, bare")


def old_reader(mod: Any, mode: str) -> tuple[type, dict]:
    """The old module's reader class for `mode`, and its keyword arguments (private hooks, as its own benchmarks
    used them)."""
    if mode == "float32":
        return mod.ChunkReader, {}
    if mode == "bf16":
        return type("Bf16", (mod.ChunkReader,), {"_host_float32": False}), {}

    class HostShare(mod.ChunkReader):  # its benchmarks/common.py `DeviceArenaHost`: a batch is its arena rows
        _device_arena, _host_float32 = True, False

        def _upload(self, dest: Any, stage: Any, done: Any) -> None:
            pass

        def _to_device(self, part: Any) -> Any:
            at = np.concatenate([plan.at[a:b] for plan, a, b in part])
            rows = torch.from_numpy(np.concatenate([plan.rows[a:b] for plan, a, b in part]))
            if mode == "host share, bare":
                return torch.from_numpy(at), rows
            # the calls its GPU path made for each batch (`_device_gather`, then `CudaFeed.next`), on the meta
            # device as the current reader's are
            if not hasattr(self, "meta"):
                self.meta = torch.empty(self._arena.shape, dtype=self._arena.dtype, device="meta")
            return self.meta.index_select(0, torch.from_numpy(at).to("meta", non_blocking=True)).float(), rows

    return HostShare, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other reader.py")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=128, help="batches timed after the first epoch (whole epochs)")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("old_reader", args.old)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    threads = [int(t) for t in args.threads.split(",")]
    wall: dict[tuple, list[float]] = {}
    cpu: dict[tuple, list[float]] = {}
    b = 4096
    with tempfile.TemporaryDirectory() as tmp:
        print("writing two Gaussian stores ...", file=sys.stderr)
        paths = {c: gaussian_store(Path(tmp) / f"{c}.zarr", 576, 32 * 8192, codec=c) for c in ("blosc-zstd", "none")}
        site = Store.open(paths["none"]).sites[0]
        mapped = {c: Store.open(p).mapped(site) for c, p in paths.items()}
        chunks = Store.open(paths["none"]).complete_chunks()

        def timed(key: tuple, rows: int, fn: Any) -> None:
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.setdefault(key, []).append(rows / (time.perf_counter() - w0))
            cpu.setdefault(key, []).append(rows / (time.process_time() - c0))

        def t_decode(n: int) -> None:
            bufs = [np.empty((8192, 576), np.uint16) for _ in range(n)]

            def work(k: int) -> None:
                for j in range(4):
                    mapped["blosc-zstd"].chunk(chunks[(4 * k + j) % len(chunks)], bufs[k])

            def run() -> None:
                ths = [threading.Thread(target=work, args=(k,)) for k in range(n)]
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()

            timed(("decode", n), n * 4 * 8192, run)

        def t_memcpy() -> None:
            buf = np.empty((8192, 576), np.uint16)
            timed(("memcpy",), 8 * 8192, lambda: [np.copyto(buf, mapped["none"].chunk(c)) for c in chunks[:8]])

        def t_reader(which: str, codec: str, mode: str, n: int) -> None:
            key = (which, codec, mode, n)
            seed = len(wall.get(key, []))
            if which == "new" and mode == "host share, bare":
                return  # the same measurement as "host share"
            if which == "old":
                cls, kw = old_reader(old, mode)
                take = lambda r: r.next_batch()  # noqa: E731
            else:
                cls, kw = new.ChunkReader, {"device": "meta"} if mode == "host share" else {}
                take = (lambda r: r.next_batch(float32=False)) if mode == "bf16" else (lambda r: r.next_batch())
            w0 = time.perf_counter()
            with cls(Store.open(paths[codec]), site, batch_size=b, seed=seed, threads=n, buffer_mb=0, **kw) as r:
                first = -(-r.train_rows // b)
                for _ in range(first):
                    take(r)
                wall.setdefault(key + ("first",), []).append(first * b / (time.perf_counter() - w0))
                steady = first * max(1, round(args.batches / first))

                def drain() -> None:
                    for _ in range(steady):  # each batch dropped at once, as a trainer does
                        take(r)

                timed(key, steady * b, drain)

        tasks: list[Any] = [t_memcpy] + [lambda n=n: t_decode(n) for n in threads]
        for codec in paths:
            for mode in MODES:
                for n in threads:
                    tasks += [lambda w=w, c=codec, m=mode, n=n: t_reader(w, c, m, n) for w in ("old", "new")]
        for t in tasks:  # warm-up (page cache, allocator, thread pools), not counted
            t()
        wall.clear()
        cpu.clear()
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
            for t in tasks if rnd % 2 == 0 else tasks[::-1]:
                t()
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    load = os.getloadavg()[0]
    print(f"{machine()}; medians of {args.rounds} interleaved rounds; 1-min load average at the end {load:.1f}")
    print(
        f"raw limits: Blosc decode {med[('decode', 1)]:,.0f} rows/s on 1 thread, "
        + ", ".join(f"{med[('decode', n)]:,.0f} on {n} at once" for n in threads[1:])
        + f"; memcpy {med[('memcpy',)]:,.0f}"
    )
    print()
    print("| store | batches | threads | old rows/s | new rows/s | new / old | old, new: first epoch | "
          "old, new: rows per CPU s | new vs raw limit |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for codec in paths:
        for mode in MODES:
            for n in threads:
                same = "host share" if mode == "host share, bare" else mode
                o, w = med[("old", codec, mode, n)], med[("new", codec, same, n)]
                fo, fw = med[("old", codec, mode, n, "first")], med[("new", codec, same, n, "first")]
                co, cw = cmed[("old", codec, mode, n)], cmed[("new", codec, same, n)]
                if codec == "none":
                    limit = f"{w / med[('memcpy',)]:.2f}× memcpy"
                else:
                    limit = f"{w / med[('decode', 1)]:.2f}× decode on 1 thread"
                print(
                    f"| {codec} | {mode} | {n} | {o:,.0f} | {w:,.0f} | {w / o:.2f}× | {fo:,.0f}, {fw:,.0f} | "
                    f"{co:,.0f}, {cw:,.0f} | {limit} |"
                )


if __name__ == "__main__":
    main()
