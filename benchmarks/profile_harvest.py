"""Profile `sae harvest` with py-spy, before and after a change, and measure its throughput before and after.

1. Profiles: `sae harvest` (the CLI, in a child process) runs with the harvest code of git revision `--before`
   (default HEAD) and with the working tree's, and the bare forward of benchmarks/harvest.py runs too, each under
   `py-spy record --native --threads` (attached once the child has imported everything, so a harvest's profile
   covers model load → finalize), `--rounds` times each in rotated order. Every sample of every Python thread is
   put into one component by its stack (forward, model load, the shard writer's parts, zarr's threads, ...);
   samples where a thread waits (locks, queues, epoll) are left out, so the shares are of the time the
   interpreter's threads spent working (or runnable). py-spy sees only threads that run Python, so the CPU time
   of every thread (OpenMP/MKL workers, Blosc, the tokenizer's pool included) is also read from /proc while the
   child runs; and the shard writer's cost is measured directly, both versions rewriting the same shards.
2. Throughput: benchmarks/harvest.py's measurement with three variants interleaved in one process: the bare
   forward, the working tree's harvest and `--before`'s harvest (loaded from git beside it); and the bare
   forward with one torch thread against the default.

Writes the "Profile" section of docs/benchmarks.md (after "Harvest").

    python benchmarks/profile_harvest.py --save m.json   # the documented run (about an hour on 2 loaded cores)
    python benchmarks/profile_harvest.py --load m.json   # rewrite the section from saved measurements
    python benchmarks/profile_harvest.py --tokens 16384 --rounds 1 --reps 1 --no-doc   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, write_section

import sae.harvest
import sae.harvest.loop
import sae.store
from harvest import DOC, Bench, Timings, add_arguments, bench, code_at, fmt, harvest_at, interleave
from sae.sites import capture

# Components, first match wins: (label, thread-name prefix or None for any, regex on the joined stack).
COMPONENTS: list[tuple[str, str | None, str]] = [
    ("model load", "MainThread", r"load_model \("),
    ("corpus tokenization + store init", "MainThread", r"init_store \(|corpus_info \("),
    ("forward: spin-wait for the other OpenMP/MKL thread", "MainThread", r"capture \(.*(sched_yield|libgomp)[^;]*$"),
    ("forward: matrix multiplies (MKL sgemm)", "MainThread", r"capture \(.*gemm"),
    ("forward: other ops (attention, norms, elementwise, Python)", "MainThread", r"capture \("),
    ("main: batching, copies into the shard buffer", "MainThread", r"compute_shard \("),
    ("main: finalize + summary", "MainThread", r"finalize \(|summary \("),
    ("main: other (CLI, store setup, GC)", "MainThread", r""),
    ("writer: statistics (mean, norms)", "sae-shard-writer", r"shard_stats \("),
    ("writer: checksums", "sae-shard-writer", r"checksum \("),
    ("writer: zarr write (encode, shard assembly)", "sae-shard-writer", r"__setitem__ \(|_clear_shard \("),
    ("writer: permutation + other", "sae-shard-writer", r""),
    ("zarr threads: Blosc compression, shard assembly, file I/O", None, r"^thread \([0-9]+\): (zarr|asyncio)"),
    ("other threads", None, r""),
]
# A stack containing one of these is a thread waiting, not working.
IDLE = re.compile(
    r"PyThread_acquire_lock_timed|_queue_SimpleQueue_get|epoll_wait|Condition\.wait|Event\.wait|Future\.result"
    r"|take_gil|pthread_cond_|sem_clockwait|sem_wait|_wait_for_tstate_lock|select \(|TMonitor\.run"
)


def classify(raw: Path) -> tuple[collections.Counter, int]:
    """Samples per component from py-spy's raw output ("frame;frame;... count" per line), and idle samples."""
    counts: collections.Counter = collections.Counter()
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if IDLE.search(stack):
            idle += int(n)
            continue
        thread = re.sub(r"^thread \(\d+\):? ?", "", stack.split(";", 1)[0])
        for label, name, pattern in COMPONENTS:
            if (name is None or thread.startswith(name)) and re.search(pattern, stack):
                counts[label] += int(n)
                break
    return counts, idle


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of process `pid` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended between the listing and the read
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def python_threads(raw: Path) -> dict[int, str]:
    """Thread id → name of every thread py-spy saw run Python."""
    names = {}
    for line in raw.read_text().splitlines():
        m = re.match(r"thread \((\d+)\):? ?([^;]*)", line)
        if m:
            names[int(m.group(1))] = m.group(2) or "?"
    return names


def thread_role(name: str | None) -> str:
    if name is None:
        return "native threads (OpenMP/MKL workers, Blosc, tokenizer pool)"
    if name == "MainThread":
        return "main thread (forward, setup)"
    if name.startswith("sae-shard-writer"):
        return "shard writer thread"
    if name.startswith(("zarr", "asyncio")):
        return "zarr threads (event loop, codec pool)"
    return "other Python threads"


def profile(code: str, args: argparse.Namespace, work: Path, raw: Path) -> dict:
    """Run `code` ("bare", "work" or a git revision: see `child`) in a child process under py-spy; samples per
    component, CPU seconds per thread role, and the timed call's own wall and CPU seconds."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", code, "--store", str(work / "store.zarr"), *_shared_args(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the profiled child ({code}) failed before starting")
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(child.pid), "--native", "--threads", "--rate", str(args.rate),
         "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(3)  # let py-spy attach
    start = thread_cpu(child.pid)
    child.stdin.write("go\n")
    child.stdin.flush()
    last = dict(start)
    while child.poll() is None:
        last.update(thread_cpu(child.pid))
        time.sleep(0.2)
    result = json.loads(child.stdout.read().strip().splitlines()[-1])
    spy.wait(timeout=120)
    names = python_threads(raw)
    cpu: collections.Counter = collections.Counter()
    for tid, seconds in last.items():
        cpu[thread_role(names.get(tid))] += seconds - start.get(tid, 0.0)
    counts, idle = classify(raw)
    return {"counts": counts, "idle": idle, "threads": cpu, **result}


def _shared_args(args: argparse.Namespace) -> list[str]:
    return [
        "--tokens", str(args.tokens), "--site", args.site, "--dataset", args.dataset, "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--shard-chunks", str(args.shard_chunks),
    ]  # fmt: skip


def harvest_cli(args: argparse.Namespace, out: str) -> list[str]:
    """The `sae harvest` arguments the profiled harvests run with."""
    return [
        "harvest", "--model", "smollm2-135m", "--site", args.site, "--dataset", args.dataset,
        "--seq-len", str(args.seq_len), "--max-tokens", str(args.tokens), "--batch-size", str(args.batch_size),
        "--shard-chunks", str(args.shard_chunks), "--device", "cpu", "--out", out, "--overwrite",
    ]  # fmt: skip


def child(code: str, args: argparse.Namespace) -> None:
    """Once the parent says go (py-spy attached): `code` "bare" runs benchmarks/harvest.py's bare forward (model
    and contexts ready beforehand), any other `code` runs `sae harvest` through the CLI with the harvest code of
    the working tree ("work") or of that git revision. Prints the call's wall and CPU seconds, then exits at
    once (the interpreter's final garbage collection is no part of either)."""
    from sae.cli import main

    run = None
    if code == "bare":
        b = Bench.setup(args)
        run = b.bare
    elif code != "work":
        sae.harvest.harvest = harvest_at(code)  # what the CLI's `from .harvest import harvest` picks up
    print("ready", flush=True)
    sys.stdin.readline()
    w, c = time.perf_counter(), time.process_time()
    if run is None:
        sys.argv = ["sae", *harvest_cli(args, args.store)]
        with contextlib.redirect_stdout(sys.stderr):  # the harvest summary; stdout carries the result
            main(standalone_mode=False)
    else:
        run()
    print(json.dumps({"wall": time.perf_counter() - w, "cpu_s": time.process_time() - c}), flush=True)
    if code == "bare":
        b.close()
    os._exit(0)


def writer_cost(path: Path, rev: str, rounds: int) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Process CPU seconds, wall seconds and minor page faults of each `StoreWriter.write_shard` call, with
    `rev`'s store code and the working tree's, interleaved: every full shard of the store at `path` rewritten
    into a fresh store with the same settings, `rounds` times. Also returns the rows per shard."""
    st = sae.store.Store.open(path)
    meta = {k: v for k, v in st.attrs.items() if k not in ("format_version", "tool_version")}
    rows = st.shard_rows
    acts = {site: sae.store.from_storage(st.array(site)[:rows], st.dtype) for site in st.sites}
    tokens = np.asarray(st.array("tokens")[:rows])
    ids = np.asarray(st.input_ids[:])
    modules = {"before": code_at(rev)["sae.store"], "after": sae.store}
    out: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": [], "minflt": []} for n in modules}
    for r in range(rounds):
        for name in list(modules)[r % 2 :] + list(modules)[: r % 2]:
            with tempfile.TemporaryDirectory(prefix="sae-writer-") as tmp:
                writer = modules[name].init_store(Path(tmp) / "store.zarr", meta, iter(ids))
                for s in range(st.n_rows // rows):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    c0, w0 = time.process_time(), time.perf_counter()
                    writer.write_shard(s, acts, tokens)
                    out[name]["wall"].append(time.perf_counter() - w0)
                    out[name]["cpu"].append(time.process_time() - c0)
                    out[name]["minflt"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out, rows


def writer_table(cost: dict[str, dict[str, list[float]]], rev: str, rows: int, forward_cpu: float) -> str:
    """`forward_cpu`: the bare forward's CPU seconds per token, to put a shard write's CPU time in proportion."""
    lines = [f"| per shard write ({rows:,} rows), median | {rev} (before) | working tree (after) |", "|---|---:|---:|"]
    b, a = cost["before"], cost["after"]
    med = {k: (float(np.median(b[k])), float(np.median(a[k]))) for k in b}
    lines.append(f"| process CPU, ms (every thread) | {1000 * med['cpu'][0]:.0f} | {1000 * med['cpu'][1]:.0f} |")
    lines.append(f"| wall, ms | {1000 * med['wall'][0]:.0f} | {1000 * med['wall'][1]:.0f} |")
    lines.append(f"| minor page faults | {med['minflt'][0]:,.0f} | {med['minflt'][1]:,.0f} |")
    shard = forward_cpu * rows
    lines.append(f"| CPU vs the bare forward's CPU for those rows | {100 * med['cpu'][0] / shard:.1f} % | "
                 f"{100 * med['cpu'][1] / shard:.1f} % |")  # fmt: skip
    lines.append(f"| shard writes timed | {len(b['cpu'])} | {len(a['cpu'])} |")
    return "\n".join(lines)


THREAD_CHECK_BATCHES = 4


def thread_check(b: Bench, reps: int) -> tuple[dict[int, list[tuple[float, float]]], int]:
    """Wall and CPU seconds of the bare forward over (at most) the first THREAD_CHECK_BATCHES batches with 1 torch
    thread and with the default count, interleaved `reps` times: what the forward's spin-waiting costs. Also
    returns the tokens each pass covers."""
    default = torch.get_num_threads()
    bs = b.args.batch_size
    ids = b.ids[: THREAD_CHECK_BATCHES * bs]
    out: dict[int, list[tuple[float, float]]] = {1: [], default: []}
    try:
        with torch.inference_mode():
            for rep in range(reps):
                for k in list(out)[rep % 2 :] + list(out)[: rep % 2]:
                    torch.set_num_threads(k)
                    w, c = time.perf_counter(), time.process_time()
                    for i in range(0, len(ids), bs):
                        capture(b.model, [b.site], torch.from_numpy(ids[i : i + bs]).long())
                    out[k].append((time.perf_counter() - w, time.process_time() - c))
    finally:
        torch.set_num_threads(default)
    return out, ids.size


def merge(runs: list[dict]) -> dict:
    """One variant's profiles from several rounds, added up."""
    out: dict = {"counts": collections.Counter(), "threads": collections.Counter()}
    out.update(idle=0, wall=0.0, cpu_s=0.0)
    for r in runs:
        out["counts"].update(r["counts"])
        out["threads"].update(r["threads"])
        for k in ("idle", "wall", "cpu_s"):
            out[k] += r[k]
    return out


def share_table(profiles: dict[str, dict], titles: dict[str, str]) -> str:
    shares = {}
    for code, p in profiles.items():
        total = sum(p["counts"].values()) or 1
        shares[code] = {k: 100 * v / total for k, v in p["counts"].items()}
    rows = ["| component | " + " | ".join(titles[c] for c in profiles) + " |", "|---|" + "---:|" * len(profiles)]
    for label, _, _ in COMPONENTS:
        if any(sh.get(label, 0) >= 0.05 for sh in shares.values()):
            rows.append(f"| {label} | " + " | ".join(f"{shares[c].get(label, 0):.1f} %" for c in profiles) + " |")
    rows.append(
        "| samples: working (idle, left out) | "
        + " | ".join(f"{sum(p['counts'].values()):,} ({p['idle']:,})" for p in profiles.values())
        + " |"
    )
    return "\n".join(rows)


def cpu_table(profiles: dict[str, dict], titles: dict[str, str], n_tokens: int) -> str:
    roles = sorted({r for p in profiles.values() for r in p["threads"]}, key=lambda r: -max(
        p["threads"].get(r, 0) for p in profiles.values()))  # fmt: skip
    rows = ["| thread | " + " | ".join(titles[c] for c in profiles) + " |", "|---|" + "---:|" * len(profiles)]
    for role in roles:
        rows.append(f"| {role} | " + " | ".join(f"{p['threads'].get(role, 0):.1f}" for p in profiles.values()) + " |")
    rows.append("| all threads, CPU s per 1k tokens | " + " | ".join(
        f"{1000 * sum(p['threads'].values()) / n_tokens:.2f}" for p in profiles.values()) + " |")  # fmt: skip
    rows.append("| the calls, all rounds: wall s (tokens/s) | " + " | ".join(
        f"{p['wall']:.1f} ({n_tokens / p['wall']:,.0f})" for p in profiles.values()) + " |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--before", default="HEAD", metavar="REV", help="git revision of the 'before' harvest code")
    ap.add_argument("--rounds", type=int, default=2, help="profiles of each variant, in rotated order")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--raw-dir", help="keep py-spy's raw profiles here (default: a temporary folder)")
    ap.add_argument("--skip-throughput", action="store_true", help="profiles only")
    ap.add_argument("--save", metavar="JSON", help="also save the measurements here")
    ap.add_argument("--load", metavar="JSON", help="measure nothing: render the measurements saved by --save")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.set_defaults(reps=4)  # three variants per repetition here, against two in benchmarks/harvest.py
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    if args.load:
        m = json.loads(Path(args.load).read_text())
        args = argparse.Namespace(**{**vars(args), **m["args"]})
    else:
        m = measure(args)
        m["command"] = " ".join(["python benchmarks/profile_harvest.py", *map(shlex.quote, sys.argv[1:])])
        if args.save:
            Path(args.save).write_text(json.dumps(m, indent=1) + "\n")
    tables = render(m, args)
    print(*(t for t in tables if t), sep="\n\n")
    if not args.no_doc:
        write_doc(m, args, tables)


def measure(args: argparse.Namespace) -> dict:
    """Everything the section reports, as JSON-ready data."""
    codes = ["bare", args.before, "work"]
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {c: [] for c in codes}
    with tempfile.TemporaryDirectory(prefix="sae-profile-") as tmp:
        raw_dir = Path(args.raw_dir or tmp)
        raw_dir.mkdir(parents=True, exist_ok=True)
        for r in range(args.rounds):
            for code in codes[r % 3 :] + codes[: r % 3]:
                raw = raw_dir / f"{code.replace('/', '_')}-{r}.raw"
                runs[code].append(profile(code, args, Path(tmp), raw))
                load.append(os.getloadavg()[0])
                print(f"round {r} {code}: {runs[code][-1]['wall']:.1f} s wall", file=sys.stderr, flush=True)
        cost, shard_rows = writer_cost(Path(tmp) / "store.zarr", args.before, args.rounds)
    m: dict = {
        "args": {k: getattr(args, k) for k in ("tokens", "reps", "site", "dataset", "seq_len", "batch_size",
                                               "shard_chunks", "before", "rounds", "rate")},
        "profiles": {c: merge(runs[c]) for c in codes},
        "n_tokens": args.tokens // args.seq_len * args.seq_len * args.rounds,
        "cost": cost,
        "shard_rows": shard_rows,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    if not args.skip_throughput:
        with bench(args) as b:
            variants = {
                "bare": b.bare,
                "after": b.harvest_with(sae.harvest.loop.harvest),
                "before": b.harvest_with(harvest_at(args.before)),
            }
            t = interleave(variants, args.reps, lambda name: None if name == "bare" else b.check())
            m["threads"], m["thread_tokens"] = thread_check(b, args.reps)
        load += t.load
        m["timings"] = {"wall": t.wall, "cpu": t.cpu}
    m["load"] = load
    return m


def render(m: dict, args: argparse.Namespace) -> tuple[str, str, str, str, str]:
    """The section's tables: profile shares, CPU per thread, shard writes, throughput, torch threads."""
    rev = args.before
    titles = {"bare": "bare forward", rev: f"harvest, {rev} (before)", "work": "harvest, after"}
    profiles = {c: m["profiles"][c] for c in titles}
    shares = share_table(profiles, titles)
    cpus = cpu_table(profiles, titles, m["n_tokens"])
    bare_cpu = sum(profiles["bare"]["threads"].values()) / m["n_tokens"]
    writes = writer_table(m["cost"], rev, m["shard_rows"], bare_cpu)
    if "timings" not in m:
        return shares, cpus, writes, "", ""
    t = Timings(m["timings"]["wall"], m["timings"]["cpu"])
    rows = ["| harvest code | × bare forward, wall: median (per repetition) | × bare, CPU time: median |",
            "|---|---|---:|"]  # fmt: skip
    for name, label in (("before", f"{rev} (before)"), ("after", "working tree (after)")):
        wall, cpu = t.ratios("bare", name), t.ratios("bare", name, "cpu")
        rows.append(f"| {label} | {np.median(wall):.3f} ({fmt(wall)}) | {np.median(cpu):.3f} |")
    after_before = t.ratios("before", "after")
    rows.append(f"| after × before | {np.median(after_before):.3f} ({fmt(after_before)}) | "
                f"{np.median(t.ratios('before', 'after', 'cpu')):.3f} |")  # fmt: skip
    ratios = "\n".join(rows)
    n = m["thread_tokens"]
    rows = ["| torch threads | bare forward, tokens/s (median) | CPU s per 1k tokens (median) |", "|---|---:|---:|"]
    for k, times in m["threads"].items():
        wall, cpu = np.median([w for w, _ in times]), np.median([c for _, c in times])
        rows.append(f"| {k} | {n / wall:,.0f} | {1000 * cpu / n:.2f} |")
    return shares, cpus, writes, ratios, "\n".join(rows)


def write_doc(m: dict, args: argparse.Namespace, tables: tuple[str, str, str, str, str]) -> None:
    shares, cpus, writes, ratios, threads = tables
    profiles, cost, load = m["profiles"], m["cost"], m["load"]
    rev = args.before
    cli = "sae " + " ".join(map(shlex.quote, harvest_cli(args, "STORE")))

    def share(code: str, *prefixes: str) -> float:
        counts = profiles[code]["counts"]
        return 100 * sum(v for k, v in counts.items() if k.startswith(prefixes)) / (sum(counts.values()) or 1)

    spin = "forward: spin-wait"
    writer = {c: share(c, "writer", "zarr threads") for c in (rev, "work")}
    beyond = {c: 100 - share(c, "forward") for c in (rev, "work")}
    cpu_ms = {k: 1000 * float(np.median(v["cpu"])) for k, v in cost.items()}
    threads_note = swing = ""
    if "timings" in m:
        after_before = Timings(m["timings"]["wall"], m["timings"]["cpu"]).ratios("before", "after")
        swing = f"{min(after_before):.2f} to {max(after_before):.2f}"
    if "threads" in m and len(m["threads"]) == 2:
        (w1, c1), (w2, c2) = ([np.median([t[i] for t in v]) for i in (0, 1)] for v in m["threads"].values())
        threads_note = (
            f"Two threads ran {w1 / w2:.2f}× as fast as one, for {c2 / c1:.2f}× the CPU time. On this box that holds "
            "while it is quiet; with other jobs on both cores, two threads that spin waiting for each other can fall "
            "below one. The thread count is torch's default in every stage (and in the bare forward), so it moves "
            "harvest's tokens/s, not the ratio to the bare forward."
        )
    section = f"""## Profile

Command: `{m["command"]}` (benchmarks/profile_harvest.py). Profiled {args.rounds} times each, in rotated order, each
in a child process under `py-spy record --pid PID --native --threads --rate {args.rate} --format raw` from the
end of its imports to its exit: `{cli}` with the harvest code (harvest/loop.py, pipeline/store.py,
pipeline/sites.py) of `{rev}` (before) and of the working tree (after), and the Harvest section's bare forward
over the same contexts (model and contexts ready before the profile starts). Each sample of each Python thread
goes to one component by its stack; samples of waiting threads (locks, queues, epoll, the GIL) are left out, and
the shares are of the rest. py-spy samples wall-clock time: a thread that could run but waits for a core (this box
is shared) counts where it stands. The forward's rows are the main thread inside `sae.sites.capture`. Machine:
{m["machine"]}; 1-min load average {min(load):.1f}–{max(load):.1f}; measured {m["date"]}.

{shares}

py-spy sees only threads that run Python; CPU seconds of every thread while the call ran, read from /proc:

{cpus}

What the profile shows. The forward is nearly all of a harvest: everything else is {beyond[rev]:.1f} % of the
samples before and {beyond["work"]:.1f} % after, the model load the largest part. Inside the forward,
{share("bare", spin):.0f} % of the bare forward's samples ({share(rev, spin):.0f} % and
{share("work", spin):.0f} % in the harvests) are its main thread waiting at OpenMP/MKL barriers for torch's
second thread, behind on its share of the
work or preempted by the other jobs on this 2-core box. That waste belongs to the forward, (a) and (b) alike; it
moves with the load and is what makes single repetitions swing (last table). Of what harvest adds, the shard writer
was the part to fix: its statistics ran torch ops on a float64 copy of the whole shard, twice (all rows, then the
rows without BOS), which from the writer thread start a second OpenMP team beside the forward's (CPU that py-spy
does not see: it is in the native threads' row) and fault in fresh pages every shard; the permutation was a torch
index op (that team again); the checksum copied the shard into a bytes object; and zarr scanned every chunk for
being all fill value before compressing it.

The fix, in `StoreWriter.write_shard` (pipeline/store.py): the statistics in numpy on one thread, in 1024-row
float64 blocks, one pass over the non-BOS rows and one over the BOS rows, added up for all rows; the within-shard
permutation as a numpy copy of the stored bits; the checksum reads the array's buffer in place; the arrays written
with zarr's `write_empty_chunks` (no fill-value scan). The format and the stored bytes are unchanged (same
checksums); the statistics differ from before only in float64 rounding (~1e-16). In the profiles the writer and
zarr's threads are {writer[rev]:.1f} % of the samples before and {writer["work"]:.1f} % after (the OpenMP team the
old statistics started is not in py-spy's view). Measured directly instead, every full shard of the last profiled
store rewritten into fresh stores by both versions of `write_shard`, interleaved, {args.rounds} rounds:
{cpu_ms["before"]:.0f} → {cpu_ms["after"]:.0f} ms of CPU per shard. (The bare forward's CPU in the last row includes
its spin-waiting; on a quiet machine it is smaller and the writer's share larger, up to about twice.)

{writes}

Throughput before and after, side by side in one process: the bare forward, the working tree's harvest and
`{rev}`'s harvest (its three modules loaded from git beside the working tree's), each once per repetition in
rotated order, {args.tokens:,} tokens × {args.reps} repetitions, as in the Harvest section. × bare is the
harvest's throughput over the bare forward's (the Harvest section's ratio):

{ratios}

The writer and zarr's threads were {writer[rev]:.1f} % of a harvest's samples before, so no change to them
can gain much more than that; one repetition swings by more (other jobs come and go on this box), so this
measurement cannot tell before from after: the after × before ratios range from {swing}. What the fix buys for
sure is CPU and memory traffic (the shard-write table): less for the other processes on a shared machine, and
less for a harvest with many sites, where the writer's work grows with the sites while the forward's does not.

The forward's spin-waiting, measured: the bare forward over its first {THREAD_CHECK_BATCHES} batches (at most)
with one torch thread and with the default, interleaved, {args.reps} times each, in the same run:

{threads}

{threads_note}
"""
    _write_after(DOC, "Profile", _reflow(section) + "\n", after="Harvest")
    print(f"wrote the Profile section of {DOC}", file=sys.stderr)


def _reflow(text: str) -> str:
    """Wrap the prose paragraphs at 120 columns (tables and headings stay as they are)."""
    wrap = textwrap.TextWrapper(120, break_long_words=False, break_on_hyphens=False)
    return "\n\n".join(p if p.startswith(("|", "#")) else wrap.fill(" ".join(p.split())) for p in text.split("\n\n"))


def _write_after(doc: Path, heading: str, section: str, after: str) -> None:
    """Write `## heading` into `doc`, placed right after the `## after` section when it is new."""
    text = doc.read_text()
    if re.search(rf"^## {re.escape(heading)}\n", text, re.M) is None:
        m = re.search(rf"^## {re.escape(after)}\n.*?(?=^## |\Z)", text, re.S | re.M)
        if m:
            doc.write_text(text[: m.end()].rstrip() + f"\n\n## {heading}\n\n" + text[m.end() :])
    write_section(doc, heading, section)


if __name__ == "__main__":
    main()
