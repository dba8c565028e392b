"""Whole-store work with dask: statistics (`sae stats`), validation (`sae validate`), concatenation (`sae concat`).

Everything runs on a small in-process LocalCluster by default, or on the dask scheduler at `scheduler` (its
workers must see the store's path). Arrays are read with dask chunks equal to the store's SHARD shape: one
task per shard file, read in one slice (smaller reads of a sharded array re-open and re-decode the shard file
many times, and a write smaller than a shard corrupts it). The format itself (checksums, markers, plan,
manifest, the whole-shard writer) stays in sae.store; this module only schedules it.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import torch

from . import progress, rowtypes, store
from .errors import SaeError
from .interrupt import interruptible


@contextlib.contextmanager
def dask_client(scheduler: str | None = None) -> Iterator[Any]:
    """A dask client: on the scheduler at `scheduler`, else on a small in-process LocalCluster."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    # Threads, not processes: the work is decompression and numpy, which release the GIL; no dashboard, so
    # two runs on one machine cannot fight over its port.
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


def compute(client: Any, tasks: Sequence[Any], stage: str, shards: Sequence[int]) -> list[Any]:
    """Futures of `tasks` on `client`, once every one has finished (or failed); `shards[i]` is the store shard that
    task i reads or writes. Progress counts shards, one done when all its tasks are, so every tool counts the
    same unit whatever the arrays it touches per shard (stats: the asked sites, validate: every array)."""
    from distributed import as_completed

    futures = client.compute(list(tasks))
    left = Counter(shards)
    shard_of = {id(f): s for f, s in zip(futures, shards, strict=True)}
    with progress.Progress(stage, len(left), "shards") as bar:
        for f in as_completed(futures):
            s = shard_of[id(f)]
            left[s] -= 1
            if not left[s]:
                bar.update(1)
    return futures


def shard_array(st: store.Store, name: str) -> da.Array:
    """Array `name` (a site, tokens, context or position) of `st` as a dask array with one chunk per shard."""
    arr = st.array(name)
    return da.from_zarr(arr, chunks=(st.shard_rows, *arr.shape[1:]))


# --------------------------------------------------------------------------------------------------
# sae stats


class SiteSummary(NamedTuple):
    """Statistics of one site over the whole store, recomputed from the activations."""

    n_rows: int
    """Rows covered."""
    mean: np.ndarray
    """Mean vector [d_model] (float64)."""
    mean_norm: float
    """Mean L2 norm of the rows."""
    variance: float
    """Total variance: mean squared distance of a row from the mean vector (as the manifest defines it)."""
    max: np.ndarray
    """Largest value of each dimension [d_model] (NaNs ignored)."""
    nonfinite: int
    """Number of NaN or ±Inf values."""
    norms: dict[str, Any] | None = None
    """Norm distribution and massive rows over the non-BOS rows (`sae.rowtypes.summarise`; None when the site
    has no non-BOS rows or holds NaN/Inf)."""


@np.errstate(invalid="ignore", over="ignore")  # NaN/Inf in the data are counted and reported, not warned about
def _shard_stats(x: np.ndarray, position: np.ndarray, tokens: np.ndarray, dtype: str) -> dict[str, Any]:
    out = store.shard_stats(x, dtype, position, tokens, extremes=True)
    # Occurrences of each token at non-BOS rows, for the massive tokens' share (the harvest reads them from the
    # store instead: sae.store.token_counts).
    ids, counts = np.unique(tokens[position != 0], return_counts=True)
    out["tokens"] = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    return out


def _site_summary(parts: Sequence[dict[str, Any]], factor: float, skip_bos: bool) -> SiteSummary:
    totals: Counter[int] = Counter()
    for p in parts:
        totals.update(p["tokens"])
    s = store.site_stats(list(parts), factor, lambda ids: totals)
    r, nb = s["no_bos" if skip_bos else "all"], s["no_bos"]
    norms = s["norms"] if nb["n_rows"] and math.isfinite(nb["mean_norm"]) else None
    return SiteSummary(
        r["n_rows"], np.asarray(r["mean"]), r["mean_norm"], r["variance"], r["max"], r["nonfinite"], norms
    )


def store_stats(
    path: str | Path,
    *,
    sites: Sequence[str] = (),
    skip_bos: bool = False,
    massive_factor: float | None = None,
    scheduler: str | None = None,
) -> dict[str, SiteSummary]:
    """Recompute the statistics of `sites` (default: all) of the finalized store at `path` with dask, the
    norm distribution and massive rows (norm > `massive_factor` × median; default: the store's setting, else
    `sae.rowtypes.DEFAULT_MASSIVE_FACTOR`) among them. Stores finalized before norm statistics existed get them
    here too."""
    progress.begin("stats")
    st = store.Store.open(path)
    for s in sites:
        if s not in st.sites:
            raise SaeError(f"store {st.path} has no site {s!r}; its sites: {', '.join(st.sites)}")
    if massive_factor is not None and not massive_factor > 0:
        raise SaeError(f"--massive-factor must be positive, got {massive_factor}")
    factor = massive_factor or float(st.attrs.get("massive_factor") or rowtypes.DEFAULT_MASSIVE_FACTOR)
    position = shard_array(st, "position").to_delayed().ravel()
    tokens = shard_array(st, "tokens").to_delayed().ravel()
    names = list(sites or st.sites)
    tasks = []
    for site in names:
        blocks = shard_array(st, site).to_delayed().ravel()
        tasks += [
            dask.delayed(_shard_stats)(b, p, t, st.dtype) for b, p, t in zip(blocks, position, tokens, strict=True)
        ]
    n = len(position)
    with dask_client(scheduler) as client:
        parts = client.gather(compute(client, tasks, "stats", [s for _ in names for s in range(n)]))
    return {site: _site_summary(parts[i * n : (i + 1) * n], factor, skip_bos) for i, site in enumerate(names)}


def store_decoder(path: str | Path) -> Any:
    """The decode function of the store's tokenizer when it is on this machine already (the embedded model's
    converted directory, a local model directory, or a hub model in the local cache), else None: `sae stats`
    never downloads a model to name tokens."""
    try:
        model = store.read_attrs(Path(path)).get("model") or {}
        name = str(model.get("id") or "")
        from transformers import AutoTokenizer

        from .embedded import sae_home
        from .models import DEFAULT_MODEL

        if name == DEFAULT_MODEL:
            sha = str(model.get("sha256") or "")
            dirs = sorted((sae_home() / "models").glob(f"{DEFAULT_MODEL}-{sha[:12]}*")) if sha else []
            if not dirs:
                return None
            return AutoTokenizer.from_pretrained(dirs[0]).decode
        if Path(name).expanduser().is_dir():
            return AutoTokenizer.from_pretrained(Path(name).expanduser()).decode
        return AutoTokenizer.from_pretrained(name, revision=model.get("revision"), local_files_only=True).decode
    except Exception:  # no tokenizer here: token ids are shown alone
        return None


def format_stats(path: str | Path, stats: dict[str, SiteSummary], *, skip_bos: bool = False, decode: Any = None) -> str:
    """Human-readable summary of `store_stats` (`decode` turns token ids into text)."""
    lines = []
    for site, s in stats.items():
        mx = s.max
        lines += [
            f"{site} ({'rows after BOS' if skip_bos else 'all rows'}: {s.n_rows:,}, d_model {len(s.mean)}) in {path}",
            f"  mean norm      {s.mean_norm:.6g}",
            f"  variance       {s.variance:.6g}   (mean squared distance from the mean vector)",
            f"  mean vector    norm {np.linalg.norm(s.mean):.6g}; min {s.mean.min():.4g} (dim {s.mean.argmin()}), "
            f"max {s.mean.max():.4g} (dim {s.mean.argmax()})",
            f"  per-dim max    largest {np.nanmax(mx):.4g} (dim {np.nanargmax(mx)}), median {np.nanmedian(mx):.4g}, "
            f"smallest {np.nanmin(mx):.4g} (dim {np.nanargmin(mx)})",
            f"  NaN/Inf        {s.nonfinite:,}",
        ]
        if s.norms is not None:
            lines += rowtypes.describe_norms(s.norms, decode)
    return "\n".join(lines)


def stats_json(stats: dict[str, SiteSummary]) -> dict[str, Any]:
    """JSON-ready form of `store_stats` (NaN and Inf become null)."""

    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    return {
        site: {
            "n_rows": s.n_rows,
            "mean_norm": num(s.mean_norm),
            "variance": num(s.variance),
            "nonfinite": s.nonfinite,
            "mean": [num(v) for v in s.mean],
            "max": [num(v) for v in s.max],
            "norms": s.norms,
        }
        for site, s in stats.items()
    }


# --------------------------------------------------------------------------------------------------
# sae validate


def validate_store(path: str | Path, *, scheduler: str | None = None) -> list[str]:
    """Check the store at `path` against its plan and manifest: every shard has a marker covering the planned
    rows, array lengths match the row counts, and every shard's recomputed checksum matches its marker and
    the manifest. Returns the problems found (empty: valid)."""
    progress.begin("validate")
    path = Path(path)
    attrs = store.read_attrs(path)
    plan = store.read_plan(path)
    if plan is None:
        return ["no plan.json: the store's init never finished (rerun `sae harvest`)"]
    problems: list[str] = []
    manifest = store.read_manifest(path)
    if manifest is None:
        problems.append("no manifest.json: the store was never finalized (`sae harvest --finalize`)")
    st = store.Store.open(path, finalized=False)
    n_rows, n_shards, shard_rows = plan["n_rows"], plan["n_shards"], st.shard_rows

    # Row counts.
    if n_rows != plan["n_contexts"] * st.seq_len:
        problems.append(f"plan: n_rows {n_rows} is not n_contexts {plan['n_contexts']} × seq_len {st.seq_len}")
    if n_shards != -(-n_rows // shard_rows):
        problems.append(f"plan: {n_shards} shards cannot hold {n_rows} rows of {shard_rows} per shard")
    if manifest is not None:
        for key in ("n_rows", "n_contexts"):
            if manifest.get(key) != plan[key]:
                problems.append(f"manifest: {key} is {manifest.get(key)}, the plan says {plan[key]}")
    names = [*attrs["sites"], *store.META_ARRAYS]
    for name in names:
        if st.array(name).shape[0] != n_rows:
            problems.append(f"{name}: {st.array(name).shape[0]} rows, the plan says {n_rows}")
    if st.input_ids.shape[0] != plan["n_contexts"]:
        problems.append(f"input_ids: {st.input_ids.shape[0]} contexts, the plan says {plan['n_contexts']}")

    # Markers and the manifest's shard list.
    listed = {s["index"]: s for s in manifest["shards"]} if manifest is not None else {}
    if manifest is not None and sorted(listed) != list(range(n_shards)):
        extra = sorted(set(listed) - set(range(n_shards)))
        absent = sorted(set(range(n_shards)) - set(listed))
        problems.append(f"manifest: lists shards {_few(extra)} beyond the plan" if extra else "")
        problems.append(f"manifest: does not list shards {_few(absent)}" if absent else "")
    expected: dict[int, dict[str, str]] = {}
    for s in range(n_shards):
        start, stop = s * shard_rows, min((s + 1) * shard_rows, n_rows)
        marker = store.read_marker(path, s)
        if marker is None:
            problems.append(f"shard {s}: no marker ({store.marker_path(path, s).name}); rerun its harvest task")
        elif (marker["start"], marker["stop"]) != (start, stop):
            problems.append(f"shard {s}: marker covers rows {marker['start']}..{marker['stop']}, plan {start}..{stop}")
        entry = listed.get(s)
        if entry is not None and (entry["start"], entry["stop"]) != (start, stop):
            problems.append(f"shard {s}: manifest lists rows {entry['start']}..{entry['stop']}, plan {start}..{stop}")
        if marker is not None and entry is not None and marker["checksums"] != entry["checksums"]:
            problems.append(f"shard {s}: the manifest's checksums differ from the marker's")
        if marker is not None or entry is not None:
            expected[s] = (marker or entry)["checksums"]
    stray = sorted(s for s in store.done_shards(path) if s >= n_shards)
    if stray:
        problems.append(f"markers of shards {_few(stray)} lie beyond the plan's {n_shards} shards")

    # Recompute every checksum: one dask task per (array, shard), whole-shard reads.
    tasks, keys = [], []
    for name in names:
        blocks = shard_array(st, name).to_delayed().ravel()
        for s, block in enumerate(blocks[:n_shards]):
            if s in expected and name in expected[s]:
                tasks.append(dask.delayed(store.checksum)(block))
                keys.append((name, s))
    with dask_client(scheduler) as client:
        futures = compute(client, tasks, "validate", [s for _, s in keys])
        for (name, s), f in zip(keys, futures, strict=True):
            if f.status == "error":
                problems.append(f"shard {s} of {name}: unreadable ({type(f.exception()).__name__}: {f.exception()})")
            elif f.result() != expected[s][name]:
                problems.append(f"shard {s} of {name}: checksum mismatch (the data differs from what was written)")
    return [p for p in problems if p]


def _few(xs: Sequence[int]) -> str:
    return ", ".join(map(str, xs[:20])) + (" ..." if len(xs) > 20 else "")


# --------------------------------------------------------------------------------------------------
# sae concat


@interruptible("concat", lambda paths, out, **kw: store.kept_on_interrupt(out))
def concat_stores(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    chunk_rows: int | None = None,
    shard_chunks: int | None = None,
    overwrite: bool = False,
    scheduler: str | None = None,
) -> Path:
    """Write one store holding the rows of the finalized stores `paths`, in that order (contexts renumbered).

    The parts must share model, sites, d_model, dtype and seq_len (e.g. the same harvest over several corpora).
    The new store takes the first part's codec, chunk and shard sizes unless `chunk_rows` / `shard_chunks`
    are given (so one input with other sizes is a reshard). Its own shards get their own seeded row order,
    markers and manifest; rerunning an interrupted concat continues it.
    """
    progress.begin("concat")
    out = Path(out)
    if not paths:
        raise SaeError("concat needs at least one store")
    parts = [store.Store.open(p) for p in paths]
    for p in parts:
        if p.path.resolve() == out.resolve():
            raise SaeError(f"--out {out} is one of the input stores; choose a new path")
    first = parts[0]
    for p in parts[1:]:
        diff = [k for k in ("model", "sites", "d_model", "dtype", "seq_len") if p.attrs.get(k) != first.attrs.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {first.attrs.get(k)!r} vs {p.attrs.get(k)!r}" for k in diff)
            raise SaeError(f"cannot concatenate {first.path} and {p.path}: they differ in {shown}")
    cr = chunk_rows or first.chunk_rows
    sr = cr * (shard_chunks or first.shard_rows // first.chunk_rows)
    meta = {k: v for k, v in first.attrs.items() if k not in ("format_version", "tool_version")}
    meta.update(
        corpus={"concat": [p.attrs["corpus"] for p in parts]},
        sources=[{"path": str(p.path.absolute()), "n_contexts": p.n_contexts} for p in parts],
        n_contexts_max=sum(p.n_contexts for p in parts),
        chunk_rows=cr,
        shard_rows=sr,
    )

    def contexts() -> Iterator[np.ndarray]:
        for p in parts:
            step = max(1, (1 << 22) // (4 * p.seq_len))
            for i in range(0, p.n_contexts, step):
                yield from np.asarray(p.input_ids[i : i + step])

    writer = store.init_store(out, meta, contexts(), overwrite=overwrite)

    # Output rows [a, b) come from part q's local rows [a - offset_q, b - offset_q); those sit in the part's
    # shards, stored in their own within-shard order, which `context` and `position` undo.
    offsets = np.cumsum([0] + [p.n_rows for p in parts])
    names = [*first.sites, *store.META_ARRAYS]
    blocks = [{n: shard_array(p, n).to_delayed().ravel() for n in names} for p in parts]
    tasks, todo = [], sorted(set(range(writer.n_shards)) - writer.done())
    for s in todo:
        a, b = writer.shard_range(s)
        pieces = []
        for q, p in enumerate(parts):
            lo, hi = max(a, offsets[q]) - offsets[q], min(b, offsets[q + 1]) - offsets[q]
            for ps in range(lo // p.shard_rows, -(-hi // p.shard_rows)) if hi > lo else ():
                p0 = ps * p.shard_rows
                want = (max(lo, p0) - p0, min(hi, p0 + p.shard_rows) - p0)
                pieces.append((p0, want, {n: blocks[q][n][ps] for n in names}))
        tasks.append(dask.delayed(_write_concat_shard)(str(out), s, pieces, first.sites, first.seq_len))
    with dask_client(scheduler) as client:
        client.gather(compute(client, tasks, "concat", todo))
    store.finalize(out)
    return out


def _write_concat_shard(out: str, s: int, pieces: list, sites: list[str], seq_len: int) -> int:
    writer = store.StoreWriter(Path(out))
    acts: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    tokens = []
    for p0, (lo, hi), arrays in pieces:
        # Planned (context-major) order of the part shard's stored rows.
        order = np.argsort(arrays["context"] * seq_len + arrays["position"] - p0, kind="stable")[lo:hi]
        tokens.append(arrays["tokens"][order])
        for site in sites:
            acts[site].append(store.from_storage(arrays[site][order], writer.meta["dtype"]))
    writer.write_shard(s, {site: torch.cat(x) for site, x in acts.items()}, np.concatenate(tokens))
    return s
