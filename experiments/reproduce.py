"""Reproduce the BatchTopK paper's comparison at CPU scale, with seeds, CIs and massive rows in and out.

On SmolLM2-135M-Instruct (`smollm2-135m`: Q4_1 GGUF dequantised to float32) activations of one middle residual
site, F = 8·d, through the real CLI:
  harvest  `sae harvest` of the train split of ../shared/corpus into <out>/train.zarr
  pilot    one `sae train` sweep of JumpReLU SAEs over a grid of L0 coefficients λ, as many optimizer steps as
           the main runs but --pilot-batch-size rows per step; each λ's L0 on the store's validation rows,
           then λ per target k by linear interpolation of log L0 against log λ around it
  train    per seed s and row set (`keep`: every non-BOS row; `excl`: `--exclude-massive M`), one `sae train`
           sweep of BatchTopK, TopK, Matryoshka BatchTopK and JumpReLU at k = 32 into <out>/s{s}-{set}; one
           more sweep (seed 0, every row) of BatchTopK, TopK and JumpReLU at k = 16 and 64. Every SAE runs
           --steps optimizer steps (several epochs over the store); the sweeps of one seed see the same batches
  typical  for seed 0, the k = 32 `keep` SAEs again with the `excl` SAEs' exclusion in their metadata
           (weights linked, not copied), so that eval splices them only on typical rows: CE metrics over
           typical rows on equal terms with the `excl` SAEs
  eval     one `sae eval --mode both --bootstrap` on the held-out split over every SAE: CE metrics, KL and
           KL score with 95 % bootstrap CIs over contexts, FVU/NMSE/L0 over all, typical and massive rows,
           BatchTopK-family SAEs in θ mode and in batch mode (shuffled batches of the training batch size)
Then writes the "Reproduction" section of docs/results.md from the numbers (tables over seeds with their
spread beside the CIs, verdicts, frontier plots with error bars, per-token L0 by row type, latent budget).

    python experiments/reproduce.py --write            # the full run (docs/results.md has its timings)
    python experiments/reproduce.py --smoke --out /tmp/smoke   # the same pipeline, tiny: checks the script

Rerunning reuses every finished stage under --out (store, pilot, sweeps, eval report); each stage's wall and
CPU time are kept in <out>/timings.json, as measured by the invocation that ran it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared benchmark harness
from common import ROOT, machine, write_section  # noqa: E402

from sae.errors import SaeError  # noqa: E402
from sae.evaluate.report import plot_l0_histogram  # noqa: E402
from sae.saedir import checkpoint_path, is_complete  # noqa: E402
from sae.store import Store  # noqa: E402

DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
IMG = ROOT / "docs" / "img"
HEADING = "Reproduction: BatchTopK vs TopK vs JumpReLU vs Matryoshka on SmolLM2-135M-Instruct"
OLD_HEADING = "Reproduction: BatchTopK vs TopK vs JumpReLU on SmolLM2-135M-Instruct"  # the one-seed, layer-15 run
# ../shared/corpus beside the checkout (a worktree under <work>/wt/ sits one level deeper)
CORPUS = next(
    (c for c in (ROOT.parent / "shared" / "corpus", ROOT.parents[1] / "shared" / "corpus") if c.exists()),
    ROOT.parent / "shared" / "corpus",
)
K_MAIN = 32
SIDE_KS = (16, 64)
MAIN_ARCHS = ("batchtopk", "topk", "matryoshka", "jumprelu")
SIDE_ARCHS = ("batchtopk", "topk", "jumprelu")
ARCH_NAMES = {"batchtopk": "BatchTopK", "topk": "TopK", "jumprelu": "JumpReLU", "matryoshka": "Matryoshka"}
ROW_SETS = ("keep", "excl")
SET_NAMES = {"keep": "trained on all rows", "excl": "massive rows excluded", "typ": "all rows, spliced on typical"}
PILOT_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
SMOKE = {
    "train_tokens": 24576, "steps": 40, "batch_size": 128, "pilot_batch_size": 64, "heldout_tokens": 1024,
    "seeds": 2, "bootstrap": 100, "pilot_grid": "0.3,3",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Stages


def run(cmd: list[str]) -> dict[str, float]:
    """Run a CLI command, streaming its output; its wall time, the CPU time (user + system) it used, and the
    5-minute load average at its end (the machine is shared: how busy it was)."""
    print("$", shlex.join(cmd), flush=True)
    if cmd[0] == "sae" and Path(sys.executable).with_name("sae").exists():
        cmd = [str(Path(sys.executable).with_name("sae")), *cmd[1:]]  # this interpreter's CLI, not PATH's
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "load_5min": os.getloadavg()[1], "nice": os.nice(0)}


def finished_store(path: Path, tokens: int) -> bool:
    """Whether `path` is a finalized store of `tokens` rows (so the harvest need not run again)."""
    try:
        return Store.open(path).n_rows == tokens
    except SaeError:
        return False


def fmt_coeff(c: float) -> str:
    """λ as `sae train` names its directory (`jumprelu-l0c{λ:g}-F…`)."""
    return f"{float(c):g}"


def sae_name(arch: str, k: int, coeff: float | None, d_sae: int) -> str:
    return f"jumprelu-l0c{fmt_coeff(coeff)}-F{d_sae}" if arch == "jumprelu" else f"{arch}-k{k}-F{d_sae}"


class Sweep(NamedTuple):
    """One `sae train` invocation: its directory name, seed, row set and SAEs."""

    dir: str
    """Directory under --out (and the prefix of its SAEs' names in the eval report)."""
    seed: int
    """`sae train --seed`: initialisation and the reader's batches."""
    rows: str
    """`keep` (every non-BOS row) or `excl` (massive rows left out)."""
    archs: tuple[str, ...]
    """Architectures of the sweep."""
    ks: tuple[int, ...]
    """Target L0 k of every SAE (JumpReLU: through its λ)."""


def sweeps(seeds: int) -> list[Sweep]:
    out = [Sweep(f"s{s}-{rows}", s, rows, MAIN_ARCHS, (K_MAIN,)) for s in range(seeds) for rows in ROW_SETS]
    out.append(Sweep("s0-keep-k16-64", 0, "keep", SIDE_ARCHS, SIDE_KS))
    return out


def train_stage(cmd: list[str], out: Path, names: list[str], stage: Any, name: str) -> None:
    """Run a `sae train` sweep unless every SAE of it is finished; an interrupted one continues (--resume)."""
    if all(is_complete(out / n) for n in names):
        print(f"reusing {out}", flush=True)
        return
    stage(name, [*cmd, "--resume"] if checkpoint_path(out).exists() else cmd)


def typical_copy(src: Path, dst: Path, exclude: dict[str, Any]) -> None:
    """`src` as an SAE directory whose metadata says it left out what `exclude` names: the same weights
    (a symlink), so `sae eval` splices it only where an SAE trained without those rows is spliced."""
    if (dst / "cfg.json").exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"]["exclude"] = {**exclude, "n_excluded": 0, "share_excluded": 0.0}
    for f in src.iterdir():
        if f.name != "cfg.json":
            (tmp / f.name).symlink_to(f.resolve())
    (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(dst)


# --------------------------------------------------------------------------------------------------
# Choosing JumpReLU's coefficient (kept from the previous comparison: the pilot keeps the main run's number
# of steps, not its tokens, because θ moves by about its lr per step while the L0 term dominates its gradient,
# so the schedule decides how far L0 can fall; fewer rows per step leave the expected gradient unchanged).


def pilot_l0(pilot_dir: Path) -> float:
    """L0 of a pilot SAE on the store's validation rows at the end of its run (from its training log)."""
    rows = [json.loads(line) for line in (pilot_dir / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    if not val:
        raise SaeError(f"{pilot_dir} logged no validation rows; the pilot needs --val-chunks ≥ 1")
    return float(val[-1]["l0_theta"])


def interpolate_coeff(points: dict[float, float], target: float) -> tuple[float, bool]:
    """λ at which L0 = target, from pilot points {λ: L0}: linear in (log λ, log L0) between the two points
    around the target (L0 falls as λ grows); outside their range, the nearest end segment's line, flagged."""
    pts = sorted((math.log(c), math.log(l0)) for c, l0 in points.items() if l0 > 0)
    if len(pts) < 2:
        raise SaeError(f"need two pilot points with L0 > 0, got {points}")
    t = math.log(target)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if min(y0, y1) <= t <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (t - y0) * (x1 - x0) / (y1 - y0)), False
    (x0, y0), (x1, y1) = pts[:2] if t > pts[0][1] else pts[-2:]
    if y0 == y1:
        raise SaeError(f"pilot L0 does not change with λ ({points}); cannot aim at L0 {target}")
    return math.exp(x0 + (t - y0) * (x1 - x0) / (y1 - y0)), True


def eval_done(report: Path, names: list[str], n_tokens: int) -> bool:
    """Whether report.json holds every expected entry over `n_tokens` spliced positions, newer than every SAE."""
    path = report / "report.json"
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    got = {e["name"] for e in entries}
    if not set(names) <= got or any(e["n_tokens"] + e["excluded"]["n_rows"] != n_tokens for e in entries):
        return False
    newest_sae = max(Path(e["sae_dir"], "cfg.json").stat().st_mtime for e in entries)
    return path.stat().st_mtime > newest_sae


# --------------------------------------------------------------------------------------------------
# Results: groups over seeds


class Key(NamedTuple):
    """One cell of the comparison: the seeds of one architecture, k, row set and encoder mode."""

    arch: str
    k: int
    rows: str  # keep | excl | typ
    mode: str  # threshold | batch


# (label, how to read it from an entry, view, lower is better)
METRICS = (
    ("FVU", "fvu", "recon", True),
    ("NMSE", "nmse", "recon", True),
    ("ΔCE (nats)", "delta_ce", "ce", True),
    ("CE rec. (zero)", "ce_recovered", "ce", False),
    ("CE rec. (mean)", "ce_recovered_mean", "ce", False),
    ("KL (nats)", "kl", "ce", True),
    ("KL score", "kl_score", "ce", False),
    ("L0", "l0", "recon", None),
    ("dead", "dead_fraction", "all", True),
)


def value(e: dict[str, Any], key: str, view: str) -> float | None:
    """An entry's metric over all its spliced rows (`all`) or over its typical rows (`typical`)."""
    if view == "typical" and key in ("fvu", "nmse", "l0"):
        g = (e.get("row_types") or {}).get("typical") or {}
        v = g.get(key)
        return None if v is None else float(v)
    v = e.get(key)
    return None if v is None else float(v)


def ci_half(e: dict[str, Any], key: str) -> float | None:
    ci = (e.get("ci95") or {}).get(key)
    return None if not ci else (ci[1] - ci[0]) / 2


class Cell(NamedTuple):
    """A metric over the seeds of one Key."""

    mean: float
    lo: float
    """Smallest value over the seeds."""
    hi: float
    """Largest value over the seeds."""
    sd: float | None
    """Sample standard deviation over the seeds (None for one seed)."""
    ci: float | None
    """Mean half-width of the seeds' 95 % bootstrap intervals over contexts (None when eval gave none)."""
    n: int
    """Seeds."""


def cell(es: list[dict[str, Any]], key: str, view: str) -> Cell | None:
    vals = [v for v in (value(e, key, view) for e in es) if v is not None and math.isfinite(v)]
    if not vals:
        return None
    cis = [c for c in (ci_half(e, key) for e in es) if c is not None] if view == "all" else []
    return Cell(
        statistics.fmean(vals), min(vals), max(vals), statistics.stdev(vals) if len(vals) > 1 else None,
        statistics.fmean(cis) if cis else None, len(vals),
    )  # fmt: skip


def fmt_cell(c: Cell | None, spec: str, pct: bool = False) -> str:
    if c is None:
        return "–"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: format(v, spec))
    s = f(c.mean)
    if c.n > 1:
        s += f" ({f(c.lo)}–{f(c.hi)})"
    if c.ci is not None:
        s += f" ±{format(c.ci, spec)}"
    return s


def group_entries(entries: dict[str, dict], info: dict[str, Any]) -> dict[Key, list[dict[str, Any]]]:
    """The eval's entries by Key (every seed's entry in its list)."""
    groups: dict[Key, list[dict[str, Any]]] = {}
    for name, e in entries.items():
        where = info["where"].get(name.removesuffix(" (batch)"))
        if where is None:
            continue
        key = Key(where["arch"], where["k"], where["rows"], e.get("mode") or "threshold")
        groups.setdefault(key, []).append(e)
    return groups


def verdict(a: Cell | None, b: Cell | None, lower_better: bool, seeds: int) -> str:
    """A against B: `better`, `worse` or `not distinguishable` (the rule is stated in the doc)."""
    if a is None or b is None:
        return "–"
    gap = a.mean - b.mean
    noise = max(a.ci or 0.0, b.ci or 0.0)
    separated = (a.hi < b.lo or b.hi < a.lo) if seeds > 1 else True
    if not separated or abs(gap) <= noise:
        return "not distinguishable"
    return "better" if (gap < 0) == lower_better else "worse"


# --------------------------------------------------------------------------------------------------
# Doc


def spec_of(key: str) -> tuple[str, bool]:
    return {"dead_fraction": (".1%", True), "l0": (".1f", False)}.get(key, (".4f", False))


def main_table(groups: dict[Key, list[dict]], rows: str, view: str) -> list[str]:
    """k = 32, one row per architecture and encoder: every metric, mean (min–max over seeds) ±CI half-width."""
    metrics = [m for m in METRICS if view == "all" or m[2] != "ce" or rows != "keep"]
    head = "| SAE | encoder | seeds | " + " | ".join(m[0] for m in metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for arch in MAIN_ARCHS:
        for mode in ("threshold", "batch"):
            es = groups.get(Key(arch, K_MAIN, rows, mode))
            if not es:
                continue
            enc = {"topk": "per-row top-k", "jumprelu": "per-latent θ"}.get(
                arch, "θ (calibrated)" if mode == "threshold" else "batch top-k"
            )
            cells = []
            for _, key, _, _ in metrics:
                spec, pct = spec_of(key)
                cells.append(fmt_cell(cell(es, key, view), spec, pct))
            lines.append(f"| {ARCH_NAMES[arch]} | {enc} | {len(es)} | " + " | ".join(cells) + " |")
    return lines


def side_table(groups: dict[Key, list[dict]]) -> list[str]:
    """k = 16 and 64 (one seed, every row): all-row and typical-row FVU, ΔCE, KL score, L0."""
    lines = [
        "| k | SAE | encoder | L0 | FVU | FVU (typical) | L0 (typical) | ΔCE | KL score | dead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in (SIDE_KS[0], K_MAIN, SIDE_KS[1]):
        for arch in SIDE_ARCHS:
            for mode in ("threshold", "batch"):
                es = groups.get(Key(arch, k, "keep", mode))
                if not es:
                    continue
                es = es[:1] if k != K_MAIN else [e for e in es if "s0-" in e["name"]] or es[:1]
                e = es[0]
                enc = {"topk": "per-row top-k", "jumprelu": "per-latent θ"}.get(
                    arch, "θ" if mode == "threshold" else "batch top-k"
                )
                t = (e.get("row_types") or {}).get("typical") or {}
                lines.append(
                    f"| {k} | {ARCH_NAMES[arch]} | {enc} | {e['l0']:.1f} | {e['fvu']:.4f} ±{ci_half(e, 'fvu') or 0:.4f}"
                    f" | {t.get('fvu', float('nan')):.4f} | {t.get('l0', float('nan')):.1f} | "
                    f"{e['delta_ce']:.4f} ±{ci_half(e, 'delta_ce') or 0:.4f} | {e['kl_score']:.4f} | "
                    f"{e['dead_fraction']:.1%} |"
                )
    return lines


def side_verdicts(groups: dict[Key, list[dict]]) -> list[str]:
    """k = 16 and 64, one seed: BatchTopK (θ and batch) against TopK by the CI part of the rule only."""
    out = []
    for k in SIDE_KS:
        t = groups.get(Key("topk", k, "keep", "threshold"))
        if not t:
            continue
        parts = []
        for label, key, _, lower in METRICS:
            if key not in ("fvu", "delta_ce", "kl_score"):
                continue
            for mode, enc in (("threshold", "θ"), ("batch", "batch")):
                b = groups.get(Key("batchtopk", k, "keep", mode))
                if b:
                    parts.append(f"{label} ({enc}) {verdict(cell(b, key, 'all'), cell(t, key, 'all'), lower, 1)}")
        out.append(f"- k = {k}, BatchTopK against TopK (one seed, CI rule only): " + "; ".join(parts) + ".")
    return out


def verdict_table(groups: dict[Key, list[dict]], seeds: int) -> tuple[list[str], dict[tuple[str, str, str, str], str]]:
    """BatchTopK (θ and batch mode) against TopK at k = 32, per metric, per row set and view; and the same
    verdicts of Matryoshka and JumpReLU against BatchTopK (θ)."""
    # (no typical-rows column for `excl`: those SAEs are spliced on typical rows only, so 'all rows' are those)
    cols = [("keep", "all", "all rows"), ("keep", "typical", "typical rows"), ("excl", "all", "massive excluded")]
    lines = [
        "| metric | BatchTopK encoder | " + " | ".join(c[2] for c in cols) + " |",
        "|" + "---|" * (2 + len(cols)),
    ]
    plain: dict[tuple[str, str, str, str], str] = {}  # (metric, BatchTopK mode, row set, view) → verdict
    for label, key, kind, lower in METRICS:
        if lower is None or key == "dead_fraction":
            continue
        for mode in ("threshold", "batch"):
            cells = []
            for rows, view, _ in cols:
                if kind == "ce" and view == "typical":
                    # CE over typical rows: the seed-0 copies spliced on typical rows only (`typ`) against TopK's
                    a, b = (
                        groups.get(Key("batchtopk", K_MAIN, "typ", mode)),
                        groups.get(Key("topk", K_MAIN, "typ", "threshold")),
                    )
                    v = verdict(cell(a or [], key, "all"), cell(b or [], key, "all"), lower, 1) if a and b else "–"
                    cells.append(v + (" (1 seed)" if a and b else ""))
                    continue
                a = groups.get(Key("batchtopk", K_MAIN, rows, mode))
                b = groups.get(Key("topk", K_MAIN, rows, "threshold"))
                v = verdict(cell(a or [], key, view), cell(b or [], key, view), lower, seeds) if a and b else "–"
                cells.append(v)
                plain[label, mode, rows, view] = v
            enc = "θ" if mode == "threshold" else "batch top-k"
            lines.append(f"| {label} | {enc} | " + " | ".join(cells) + " |")
    return lines, plain


def others_lines(groups: dict[Key, list[dict]], seeds: int) -> list[str]:
    """Matryoshka and JumpReLU against BatchTopK (θ) and TopK at k = 32, per row set, on FVU, ΔCE, KL score."""
    out = []
    for rows in ROW_SETS:
        btk = groups.get(Key("batchtopk", K_MAIN, rows, "threshold"))
        tk = groups.get(Key("topk", K_MAIN, rows, "threshold"))
        for arch in ("matryoshka", "jumprelu"):
            es = groups.get(Key(arch, K_MAIN, rows, "threshold"))
            if not es or not btk or not tk:
                continue
            parts = []
            for label, key, _, lower in METRICS[:7]:
                if key not in ("fvu", "delta_ce", "kl_score"):
                    continue
                c = cell(es, key, "all")
                vb = verdict(c, cell(btk, key, "all"), lower, seeds)
                vt = verdict(c, cell(tk, key, "all"), lower, seeds)
                parts.append(
                    f"{label} {c.mean:.4f}: {vb} than BatchTopK, {vt} than TopK".replace(
                        "not distinguishable than", "not distinguishable from"
                    )
                )
            l0 = cell(es, "l0", "all")
            out.append(f"- {ARCH_NAMES[arch]}, {SET_NAMES[rows]} (L0 {l0.mean:.1f}): " + "; ".join(parts) + ".")
    return out


def budget_lines(groups: dict[Key, list[dict]]) -> list[str]:
    """Where the latents go: each k = 32 SAE's massive rows' share of the rows and of Σ active latents, and
    the L0 of typical and massive rows (seed means)."""
    lines = [
        "| SAE | encoder | row set | massive share of rows | massive share of latents | L0 typical | L0 massive |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows in ROW_SETS:
        for arch in MAIN_ARCHS:
            for mode in ("threshold", "batch"):
                es = groups.get(Key(arch, K_MAIN, rows, mode))
                if not es:
                    continue
                ms = [(e.get("row_types") or {}).get("massive") or {} for e in es]
                ts = [(e.get("row_types") or {}).get("typical") or {} for e in es]

                if rows == "excl" and not any(m.get("n_rows") for m in ms):
                    enc = "θ" if mode == "threshold" else "batch"
                    lines.append(
                        f"| {ARCH_NAMES[arch]} | {enc} | {SET_NAMES[rows]} | unspliced | – | "
                        f"{statistics.fmean(float(t.get('l0') or 0) for t in ts):.1f} | – |"
                    )
                    continue

                def mean(xs: list[dict], k: str) -> str:
                    v = [float(x[k]) for x in xs if x.get(k) is not None]
                    return (
                        f"{statistics.fmean(v):.1%}"
                        if v and "share" in k
                        else (f"{statistics.fmean(v):.1f}" if v else "–")
                    )

                lines.append(
                    f"| {ARCH_NAMES[arch]} | {'θ' if mode == 'threshold' else 'batch'} | {SET_NAMES[rows]} | "
                    f"{mean(ms, 'share_rows')} | {mean(ms, 'share_budget')} | {mean(ts, 'l0')} | {mean(ms, 'l0')} |"
                )
    return lines


def frontier_plot(groups: dict[Key, list[dict]], path: Path) -> None:
    """FVU and ΔCE against L0 with error bars, all rows (left) and typical rows (FVU) / massive excluded (ΔCE):
    at k = 32 the seed mean with the seed range (thick) and the mean 95 % CI over contexts (thin caps)."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = (
        (axes[0], "fvu", "all", "FVU, all rows"),
        (axes[1], "fvu", "typical", "FVU, typical rows"),
        (axes[2], "delta_ce", "all", "ΔCE (nats)"),
    )
    series = [
        (a, m)
        for a in MAIN_ARCHS
        for m in ("threshold", "batch")
        if a in ("batchtopk", "matryoshka") or m == "threshold"
    ]
    for ax, key, view, title in panels:
        for i, (arch, mode) in enumerate(series):
            for rows, ls, marker in (("keep", "-", "o"), ("excl", "--", "s")):
                pts = []
                for k in (SIDE_KS[0], K_MAIN, SIDE_KS[1]):
                    es = groups.get(Key(arch, k, rows, mode))
                    if not es:
                        continue
                    c, l0 = cell(es, key, view), cell(es, "l0", view)
                    if c is None or l0 is None:
                        continue
                    pts.append((l0.mean, c))
                if not pts:
                    continue
                pts.sort(key=lambda p: p[0])
                xs = [p[0] for p in pts]
                ys = [p[1].mean for p in pts]
                label = f"{ARCH_NAMES[arch]}{' (batch)' if mode == 'batch' else ''}, {SET_NAMES[rows]}"
                color = f"C{i}"
                ax.plot(xs, ys, ls, marker=marker, color=color, ms=5, lw=1.4, label=label)
                spread = [[max(p[1].mean - p[1].lo, 0.0) for p in pts], [max(p[1].hi - p[1].mean, 0.0) for p in pts]]
                ax.errorbar(xs, ys, yerr=spread, fmt="none", ecolor=color, elinewidth=3, alpha=0.5)
                cis = [p[1].ci or 0.0 for p in pts]
                ax.errorbar(xs, ys, yerr=cis, fmt="none", ecolor=color, elinewidth=0.8, capsize=3)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("L0 (mean active latents per token" + (", typical rows)" if view == "typical" else ")"))
        ax.set_title(title)
        ax.grid(True, alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels: inside, it hides the k = 32 points
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize="small", bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(
        "Sparsity–fidelity frontier (solid: trained on all rows; dashed: massive rows excluded, left unspliced). "
        "Thick bars: seed range; caps: 95 % CI over contexts"
    )
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def figures(groups: dict[Key, list[dict]]) -> list[str]:
    """docs/img: the frontier with error bars, the per-token L0 by row type (seed 0, k = 32, BatchTopK in both
    modes, TopK, Matryoshka, JumpReLU; all rows and massive excluded), and the latent budget against row norm."""
    IMG.mkdir(parents=True, exist_ok=True)
    frontier_plot(groups, IMG / "reproduce-frontier.png")

    def seed0(key: Key) -> list[dict]:
        es = groups.get(key) or []
        return [e for e in es if e["name"].startswith("s0-")][:1] or es[:1]

    files = ["reproduce-frontier.png"]
    for rows in ROW_SETS:
        rs = [e for arch in MAIN_ARCHS for mode in ("threshold", "batch") for e in seed0(Key(arch, K_MAIN, rows, mode))]
        if rs:
            fig = plot_l0_histogram(rs)
            fig.savefig(IMG / f"reproduce-l0-{rows}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            files.append(f"reproduce-l0-{rows}.png")
    if budget_plot(groups, seed0, IMG / "reproduce-latent-budget.png"):
        files.append("reproduce-latent-budget.png")
    return files


def budget_plot(groups: dict[Key, list[dict]], seed0: Any, path: Path) -> bool:
    """Mean L0 per band of row norm / median norm (eval's `latent_budget_by_norm`), seed 0, k = 32, one line
    per SAE; left: trained on all rows, right: massive rows excluded (those rows unspliced, so absent)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    drawn = False
    for ax, rows in zip(axes, ROW_SETS, strict=True):
        i = 0
        for arch in MAIN_ARCHS:
            for mode in ("threshold", "batch"):
                for e in seed0(Key(arch, K_MAIN, rows, mode)):
                    bins = e.get("latent_budget_by_norm") or []
                    if not bins:
                        continue
                    xs = [math.sqrt(max(b["norm_ratio_from"], 0.25) * min(b["norm_ratio_to"], 100)) for b in bins]
                    ys = [b["mean_l0"] for b in bins]
                    label = f"{ARCH_NAMES[arch]}{' (batch)' if mode == 'batch' else ''}"
                    ax.plot(xs, ys, "-o", ms=4, color=f"C{i}", label=label)
                    i += 1
                    drawn = True
        ax.axhline(K_MAIN, color="black", ls=":", lw=1, label=f"k = {K_MAIN}")
        ax.axvline(3, color="gray", ls="--", lw=1, label="massive: 3 × median")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("row norm / median non-BOS norm (band centre)")
        ax.set_title(SET_NAMES[rows])
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("mean active latents per row")
    fig.suptitle("Latent budget against row norm (k = 32, seed 0, held-out tokens)")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return drawn


def timing_lines(t: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| stage | wall (s) | CPU (s) | cores used | 5-min load at end |", "|---|---|---|---|---|"]
    for n, v in t.items():
        lines.append(
            f"| {n} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} | {v['cpu_s'] / max(v['wall_s'], 1e-9):.2f} | "
            f"{v.get('load_5min', float('nan')):.1f} |"
        )
    total_w = sum(v["wall_s"] for v in t.values())
    total_c = sum(v["cpu_s"] for v in t.values())
    lines.append(f"| **all** | {total_w:.0f} | {total_c:.0f} | {total_c / max(total_w, 1e-9):.2f} | |")
    return lines


def section(args: argparse.Namespace, info: dict[str, Any], entries: dict[str, dict]) -> str:
    groups = group_entries(entries, info)
    seeds = args.seeds
    files = figures(groups)
    chosen, pilot = info["chosen"], info["pilot"]
    vt, plain = verdict_table(groups, seeds)
    pilot_rows = ["| λ | pilot L0 (validation rows) |", "|---|---|"] + [
        f"| {c} | {pilot[c]:.1f} |" for c in sorted(pilot, key=float)
    ]
    extrapolated = [k for k, v in chosen.items() if v["extrapolated"]]
    n_tok = info["n_tokens"]
    lines = [
        f"## {HEADING}",
        "",
        f"Command: `{info['command']}` (written by `experiments/reproduce.py`; it reuses finished stages).",
        "",
        "**Setup.** SmolLM2-135M-Instruct (`smollm2-135m`: Q4_1 GGUF dequantised to float32, on CPU), site "
        f"`{args.site}` (d = {info['d']}), contexts of {args.seq_len} tokens. The layer: 6 of 30 is a middle "
        "layer, the README demo's, and harvests about twice as fast as layer 15 (the forward stops after the "
        "site); it also carries the known massive rows (` the`, ` `), which the comparison must face: "
        f"{info['massive']}. Training data: {info['train_tokens']:,} tokens of `{CORPUS / 'train.jsonl.gz'}` "
        f"(`{shlex.join(info['harvest_cmd'])}`). Every SAE: F = {info['d_sae']} = 8·d, {info['steps']} optimizer "
        f"steps of {args.batch_size} rows ({info['tokens_seen']:,} rows drawn, {info['epochs']:.2f} epochs over "
        f"the store's {info['rows_per_epoch']:,} training rows: BOS rows and {info['val_chunks']} validation "
        "chunks are left out), every other setting the trainer's default (lr 2e-4/√(F/2¹⁴), warm-up, decay, AuxK, "
        "dead window and θ EMA scaled to the run, θ calibrated on held-out rows). "
        f"Seeds {', '.join(map(str, range(seeds)))} at k = {K_MAIN}: per seed, one sweep of BatchTopK, TopK, "
        f"Matryoshka BatchTopK (default widths F·(1/16, 1/8, 1/4, 1/2, 1)) and JumpReLU on every row, and one "
        f"on the rows left after `--exclude-massive {args.exclude_massive:g}` (norm > {args.exclude_massive:g} × "
        "the store's median non-BOS norm); the SAEs of one seed saw the same batches (less the excluded rows). "
        f"k = {SIDE_KS[0]} and {SIDE_KS[1]}: seed 0, every row, BatchTopK, TopK and JumpReLU. Commands: "
        f"`{shlex.join(info['train_cmd'])}` (one per sweep; `{info['out']}/commands.json` lists them all).",
        "",
        f"**Evaluation.** `{shlex.join(info['eval_cmd'])}`: {info['eval_contexts']} contexts "
        f"({info['eval_contexts'] * args.seq_len:,} tokens) of `{CORPUS / 'heldout.jsonl.gz'}`, the held-out "
        f"split; {n_tok:,} positions after BOS (BOS is never spliced). SAEs trained without massive rows leave "
        "them unspliced, as they never saw them: their CE metrics are those of splicing on typical rows only. "
        "To compare on equal terms, the seed-0 k = 32 SAEs trained on every row are also evaluated spliced on "
        "typical rows only (row set `all rows, spliced on typical`: the same weights, the `excl` SAEs' "
        "exclusion in their metadata). Batch mode: BatchTopK's selection over shuffled batches of its training "
        f"batch size ({args.batch_size} rows). CIs: 95 % percentile bootstrap over contexts, {args.bootstrap} "
        "resamples, the same resamples for every SAE. Massive rows are those with norm > "
        f"{info['massive_factor']:g} × the store's median non-BOS norm; FVU, NMSE and L0 are given over all "
        "spliced rows and over typical rows (eval's row types).",
        "",
        f"**Machine and time.** {info['machine']}; measured {info['date']}; no GPU was lent to this session, so "
        "there is no ≥ 100× GPU run. The cores were shared with other work (5-minute load averages of "
        f"{info['loads']} at the stages' ends){info['nice']}, so wall times are inflated; CPU time is what a "
        "quiet box needs. "
        f"Sizing: {info['sizing']}",
        "",
        *timing_lines(info["timings"]),
        "",
        "**JumpReLU's coefficient.** A pilot sweep (`" + shlex.join(info["pilot_cmd"]) + f"`) trained one "
        f"JumpReLU SAE per λ for {info['steps']} steps (as many as the main runs) of {args.pilot_batch_size} "
        "rows; each λ's L0 on the store's validation rows at the end gives the points below, and each k gets λ "
        "by linear interpolation of log L0 against log λ between the two points around it"
        + (f" (extrapolated for k = {', '.join(extrapolated)})" if extrapolated else "")
        + ", rounded to 3 significant digits: "
        + ", ".join(f"k = {k}: λ = {fmt_coeff(v['coeff'])}" for k, v in chosen.items())
        + ". The `excl` sweeps use the same λ.",
        "",
        *pilot_rows,
        "",
        f"**Results at k = {K_MAIN}.** Each cell: mean over the {seeds} seeds (min–max over seeds) ±the mean "
        "half-width of the seeds' 95 % bootstrap CIs over contexts (FVU and CE metrics; the bootstrap is over "
        "the same contexts for every SAE, so differences between SAEs are less noisy than the CIs suggest). "
        "L0 is measured on the eval tokens (BatchTopK in θ mode: the calibrated θ; batch mode: k by "
        "construction). `dead`: never fired on the eval tokens.",
        "",
        "*Trained and spliced on all rows, metrics over all rows:*",
        "",
        *main_table(groups, "keep", "all"),
        "",
        "*The same SAEs, FVU, NMSE and L0 over typical rows only:*",
        "",
        *main_table(groups, "keep", "typical"),
        "",
        "*Seed 0 of those SAEs spliced only on typical rows (massive rows left clean), all metrics:*",
        "",
        *main_table(groups, "typ", "all"),
        "",
        f"*Trained without massive rows (`--exclude-massive {args.exclude_massive:g}`), spliced on typical "
        "rows only, so 'all rows' here are the spliced, typical rows:*",
        "",
        *main_table(groups, "excl", "all"),
        "",
        f"**k = {SIDE_KS[0]}, {K_MAIN}, {SIDE_KS[1]}** (seed 0, every row; ± the 95 % CI half-width over contexts):",
        "",
        *side_table(groups),
        "",
        *side_verdicts(groups),
        "",
        "![FVU and ΔCE against L0 with error bars](img/reproduce-frontier.png)",
        "",
        f"**Verdicts, BatchTopK against TopK at k = {K_MAIN}.** Rule: BatchTopK is *better* (or *worse*) on a "
        f"metric when every one of its {seeds} seeds beats (or loses to) every TopK seed, so the seed ranges do "
        "not overlap, and the gap between the seed means exceeds the larger of the two mean CI half-widths over "
        "contexts; otherwise *not distinguishable at this scale*. (The CI condition is conservative: both SAEs "
        "see the same contexts.) On typical rows the CE metrics come from splicing on typical rows only: for "
        "SAEs trained on every row that is the seed-0 comparison (one seed: the CI rule alone). The report has no "
        "CI over contexts for NMSE, nor for FVU and NMSE over typical rows: there the seed rule alone decides, "
        "so a small but consistent gap can count. The `excl` SAEs are spliced on typical rows only, so their "
        "column is over typical rows already.",
        "",
        *vt,
        "",
        "**Matryoshka and JumpReLU** (same rule, k = 32, all rows of each row set):",
        "",
        *others_lines(groups, seeds),
        "",
        "**Where the latent budget goes** (k = 32, seed means over the eval tokens): the massive rows' share of "
        "the spliced rows and of Σ active latents, and the L0 of typical and massive rows.",
        "",
        *budget_lines(groups),
        "",
        "![Per-token L0 by row type, trained on all rows](img/reproduce-l0-keep.png)",
        "",
        "![Per-token L0 by row type, massive rows excluded](img/reproduce-l0-excl.png)",
        "",
        "![Latent budget against row norm](img/reproduce-latent-budget.png)",
        "",
        *info.get("reading", []),
        "",
        f"**Caveats.** {info['tokens_seen']:,} rows drawn per SAE (about 1/{1e9 / info['tokens_seen']:,.0f} of the "
        f"paper's 1e9 tokens), {info['epochs']:.1f} epochs over one store of {info['train_tokens']:,} tokens from "
        "one corpus; one site of a much smaller model; batches of "
        f"{args.batch_size} rows, not the paper's 4096 (BatchTopK's selection over a batch is the mechanism "
        "under test, and fewer rows per batch give it less room). The seeds vary the initialisation and the "
        "batches, not the data; the CIs vary the eval contexts, not the training. JumpReLU's λ came from a "
        "pilot, so its L0 lands near, not on, k: compare it along the frontier. Files: "
        + ", ".join(f"`docs/img/{f}`" for f in files)
        + ".",
        "",
    ]
    return "\n".join(lines)


def reading(groups: dict[Key, list[dict]], plain: dict[tuple[str, str, str, str], str]) -> list[str]:
    """Plain sentences from the numbers: the verdicts counted per row set, and the mechanism (where BatchTopK's
    latent budget goes)."""
    out = ["**Reading.**", ""]
    for rows, view, what in (
        ("keep", "all", "Trained and measured on all rows"),
        ("keep", "typical", "The same SAEs measured on typical rows (FVU, NMSE)"),
        ("excl", "all", "Trained without the massive rows"),
    ):
        for mode, enc in (("threshold", "θ mode"), ("batch", "batch mode")):
            vs = {m: v for (m, md, r, vw), v in plain.items() if md == mode and r == rows and vw == view}
            if not vs:
                continue
            by: dict[str, list[str]] = {}
            for m, v in vs.items():
                by.setdefault(v, []).append(m)
            parts = [f"{v} on {', '.join(ms)}" for v, ms in sorted(by.items())]
            out.append(f"- {what}, BatchTopK in {enc} against TopK: " + "; ".join(parts) + ".")
    b = groups.get(Key("batchtopk", K_MAIN, "keep", "threshold")) or []
    t = groups.get(Key("topk", K_MAIN, "keep", "threshold")) or []

    def massive(es: list[dict], key: str) -> float:
        return statistics.fmean(float(((e.get("row_types") or {}).get("massive") or {}).get(key) or 0) for e in es)

    if b and t:
        tb = cell(b, "l0", "typical")
        mr, mb, mt = massive(b, "share_rows"), massive(b, "share_budget"), massive(t, "share_budget")
        text = (
            f"- Where the budget goes: trained on every row, BatchTopK (θ) gives the massive rows ({mr:.1%} of the "
            f"spliced rows) {mb:.1%} of its active latents (TopK: {mt:.1%}), and the typical rows an L0 of "
            f"{tb.mean if tb else float('nan'):.1f} against k = {K_MAIN}."
        )
        if mb > 2 * mr:
            text += (
                " The adaptive allocation that is BatchTopK's advantage in the paper goes to the few rows that "
                "dominate Σ‖x − x̄‖² (latent-budget table and plot); trained without them, its allocation serves "
                "typical rows only."
            )
        out.append(text)
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    global DOC, README, IMG  # --smoke points them under --out
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-tokens", type=int, default=327680, help="tokens harvested for training")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps of every SAE (and of the pilot)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per optimizer step")
    p.add_argument("--pilot-batch-size", type=int, default=128, help="rows per step of the JumpReLU pilot")
    p.add_argument("--pilot-grid", default=",".join(map(fmt_coeff, PILOT_GRID)), help="λ values of the pilot")
    p.add_argument("--seeds", type=int, default=3, help="seeds at k = 32")
    p.add_argument("--exclude-massive", type=float, default=3.0, help="M of the `excl` sweeps")
    p.add_argument("--heldout-tokens", type=int, default=32768, help="held-out tokens evaluated")
    p.add_argument("--eval-batch", type=int, default=16, help="contexts per eval forward")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the eval contexts")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce", help="store, SAEs, report, timings")
    p.add_argument("--site", default="blocks.6.hook_resid_post")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="a tiny configuration of the same pipeline")
    p.add_argument("--write", action="store_true", help=f"replace the section in {DOC.relative_to(ROOT)}")
    args = p.parse_args()
    if args.smoke:  # tiny, and its doc, README section and figures go under --out, not into the checkout
        for k, v in SMOKE.items():
            setattr(args, k, v)
        DOC, README, IMG = args.out / "results.md", args.out / "README-results.md", args.out / "img"
    args.train_tokens -= args.train_tokens % args.seq_len  # whole contexts, as harvest rounds down
    args.heldout_tokens -= args.heldout_tokens % args.seq_len

    load_start = os.getloadavg()[0]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timing_file = out / "timings.json"
    timings: dict[str, dict[str, float]] = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    commands: dict[str, list[str]] = {}

    def stage(name: str, cmd: list[str]) -> None:
        timings[name] = run(cmd)
        timing_file.write_text(json.dumps(timings, indent=1))

    # harvest
    store_path = out / "train.zarr"
    hcmd = [
        "sae", "harvest", "--out", str(store_path), "--site", args.site, "--model", args.model,
        "--dataset", str(CORPUS / "train.jsonl.gz"), "--split", "train", "--max-tokens", str(args.train_tokens),
        "--seq-len", str(args.seq_len), "--shard-chunks", "8",
    ]  # fmt: skip
    commands["harvest"] = hcmd
    if finished_store(store_path, args.train_tokens):
        print(f"reusing {store_path}", flush=True)
    else:
        stage("harvest", hcmd)
    store = Store.open(store_path)
    d_sae = 8 * store.d_model

    def train_cmd(dir_: Path, seed: int, batch: int, extra: list[str]) -> list[str]:
        return [
            "sae", "train", str(store_path), "--site", args.site, "--dict-size", str(d_sae),
            "--batch-size", str(batch), "--tokens", str(args.steps * batch), "--seed", str(seed),
            "--checkpoint-every", str(args.steps * batch // 4), *extra, "--out", str(dir_),
        ]  # fmt: skip

    # pilot: JumpReLU over the λ grid, then λ per target k
    grid = [float(c) for c in args.pilot_grid.split(",")]
    pilot_dir = out / "pilot"
    pcmd = train_cmd(
        pilot_dir, 0, args.pilot_batch_size, ["--arch", "jumprelu", "--l0-coeff", ",".join(map(fmt_coeff, grid))]
    )
    commands["pilot"] = pcmd
    train_stage(pcmd, pilot_dir, [sae_name("jumprelu", 0, c, d_sae) for c in grid], stage, "pilot")
    pilot = {c: pilot_l0(pilot_dir / sae_name("jumprelu", 0, c, d_sae)) for c in grid}
    print("pilot L0:", pilot, flush=True)
    chosen = {}
    for k in (SIDE_KS[0], K_MAIN, SIDE_KS[1]):
        c, extrapolated = interpolate_coeff(pilot, k)
        chosen[str(k)] = {"coeff": float(f"{c:.3g}"), "extrapolated": extrapolated}
    print("chosen λ:", chosen, flush=True)

    # the sweeps
    where: dict[str, dict[str, Any]] = {}  # eval entry name → arch, k, rows
    all_dirs = []
    for sw in sweeps(args.seeds):
        coeffs = [chosen[str(k)]["coeff"] for k in sw.ks]
        extra = [
            "--arch",
            ",".join(sw.archs),
            "--k",
            ",".join(map(str, sw.ks)),
            "--l0-coeff",
            ",".join(map(fmt_coeff, coeffs)),
        ]
        if sw.rows == "excl":
            extra += ["--exclude-massive", f"{args.exclude_massive:g}"]
        cmd = train_cmd(out / sw.dir, sw.seed, args.batch_size, extra)
        commands[sw.dir] = cmd
        names = []
        for arch in sw.archs:
            for k, c in zip(sw.ks, coeffs, strict=True):
                n = sae_name(arch, k, c, d_sae)
                names.append(n)
                where[f"{sw.dir}/{n}"] = {"arch": arch, "k": k, "rows": sw.rows, "seed": sw.seed}
        train_stage(cmd, out / sw.dir, names, stage, f"train {sw.dir}")
        all_dirs.append(out / sw.dir)

    # seed 0's k = 32 SAEs trained on every row, spliced on typical rows only
    exclude = json.loads((out / "s0-excl" / sae_name("batchtopk", K_MAIN, None, d_sae) / "cfg.json").read_text())
    exclude = {k: v for k, v in exclude["metadata"]["exclude"].items() if k not in ("n_excluded", "share_excluded")}
    typ = out / "s0-typ"
    for arch in MAIN_ARCHS:
        n = sae_name(arch, K_MAIN, chosen[str(K_MAIN)]["coeff"], d_sae)
        typical_copy(out / "s0-keep" / n, typ / n, exclude)
        where[f"s0-typ/{n}"] = {"arch": arch, "k": K_MAIN, "rows": "typ", "seed": 0}
    all_dirs.append(typ)

    # eval on the held-out split, BatchTopK-family SAEs in both modes
    report = out / "report"
    ecmd = [
        "sae", "eval", *map(str, all_dirs), "--out", str(report), "--dataset", str(CORPUS / "heldout.jsonl.gz"),
        "--split", "train", "--max-tokens", str(args.heldout_tokens), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.eval_batch), "--mode", "both", "--bootstrap", str(args.bootstrap), "--seed", "0",
    ]  # fmt: skip
    commands["eval"] = ecmd
    (out / "commands.json").write_text(json.dumps(commands, indent=1))
    n_contexts = args.heldout_tokens // args.seq_len
    if eval_done(report, list(where), n_contexts * (args.seq_len - 1)):
        print(f"reusing {report}", flush=True)
    else:
        stage("eval", ecmd)
    entries = {e["name"]: e for e in json.loads((report / "report.json").read_text())}

    meta = json.loads((out / "s0-keep" / sae_name("batchtopk", K_MAIN, None, d_sae) / "cfg.json").read_text())[
        "metadata"
    ]
    rows_per_epoch = int(
        (store.n_chunks - len(meta.get("val_chunks") or [])) * store.chunk_rows * (1 - 1 / store.seq_len)
    )

    def rel(a: str) -> str:
        return os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a

    nice = max((v.get("nice", 0) for v in timings.values()), default=0)  # as the stages recorded it
    info = {
        "command": "python experiments/reproduce.py " + shlex.join(sys.argv[1:]),
        "d": store.d_model,
        "d_sae": d_sae,
        "train_tokens": store.n_rows,
        "tokens_seen": meta["tokens_seen"],
        "steps": meta["steps"],
        "rows_per_epoch": rows_per_epoch,
        "epochs": meta["tokens_seen"] / max(rows_per_epoch, 1),
        "val_chunks": len(meta.get("val_chunks") or []),
        "harvest_cmd": [rel(a) for a in hcmd],
        "pilot_cmd": [rel(a) for a in pcmd],
        "train_cmd": [rel(a) for a in commands["s0-excl"]],
        "eval_cmd": [rel(a) for a in ecmd],
        "pilot": {fmt_coeff(c): v for c, v in pilot.items()},
        "chosen": chosen,
        "where": where,
        "eval_contexts": n_contexts,
        "n_tokens": n_contexts * (args.seq_len - 1),
        "massive_factor": float((entries[next(iter(where))].get("row_types") or {}).get("massive_factor") or 3),
        "massive": massive_text(entries, where),
        "sizing": SIZING,
        "out": os.path.relpath(out, ROOT) if str(out).startswith(str(ROOT)) else str(out),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "load": f"{load_start:.1f}",
        "timings": timings,
        "nice": f", the run went at `nice {nice}`" if nice else "",
        "loads": "{:.1f}–{:.1f}".format(*(f(v.get("load_5min", 0) for v in timings.values()) for f in (min, max))),
    }
    groups = group_entries(entries, info)
    _, plain = verdict_table(groups, args.seeds)
    info["reading"] = reading(groups, plain)
    (out / "results.json").write_text(json.dumps({"info": info}, indent=1, default=str))
    text = section(args, info, entries)
    print(text)
    readme = readme_results(args, info, groups)
    print(readme)
    if args.write:
        if DOC.exists():  # the previous comparison's section is replaced where it stands
            DOC.write_text(DOC.read_text().replace(f"## {OLD_HEADING}\n", f"## {HEADING}\n"))
        write_section(DOC, HEADING, text, title="Results")
        print(f"wrote {DOC}")
        write_section(README, "Results", readme)
        print(f"wrote {README}")


def headline(groups: dict[Key, list[dict]], key: str, rows: str, view: str, seeds: int) -> str:
    """`BatchTopK (θ) 0.123 vs TopK 0.120: worse` at k = 32 for one metric, row set and view."""
    b = cell(groups.get(Key("batchtopk", K_MAIN, rows, "threshold")) or [], key, view)
    bb = cell(groups.get(Key("batchtopk", K_MAIN, rows, "batch")) or [], key, view)
    t = cell(groups.get(Key("topk", K_MAIN, rows, "threshold")) or [], key, view)
    if b is None or t is None:
        return "–"
    lower = next(m[3] for m in METRICS if m[1] == key)
    s = (
        f"{b.mean:.3f} (θ) / {bb.mean:.3f} (batch) against TopK's {t.mean:.3f}"
        if bb
        else f"{b.mean:.3f} vs {t.mean:.3f}"
    )
    return f"{s}: {verdict(b, t, lower, seeds)} (θ), {verdict(bb, t, lower, seeds) if bb else '–'} (batch)"


def wrap(lines: list[str], width: int = 115) -> list[str]:
    """The README's line width: paragraphs and list items wrapped, images and blank lines kept."""
    out = []
    for line in lines:
        if not line or line.startswith(("!", "#")):
            out.append(line)
        else:
            indent = "  " if line.startswith("- ") else ""
            out.extend(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))
    return out


def readme_results(args: argparse.Namespace, info: dict[str, Any], groups: dict[Key, list[dict]]) -> str:
    """The README's Results section: the setup in one sentence, the headline verdicts, the frontier plot."""
    seeds = args.seeds
    btk = groups.get(Key("batchtopk", K_MAIN, "keep", "threshold")) or []
    share = [float(((e.get("row_types") or {}).get("massive") or {}).get("share_budget") or 0) for e in btk]
    rows = [float(((e.get("row_types") or {}).get("massive") or {}).get("share_rows") or 0) for e in btk]
    lines = [
        "## Results",
        "",
        "[docs/results.md](docs/results.md), written by `experiments/reproduce.py --write` (one command; it reuses "
        "finished stages when rerun, and writes this section too), repeats the BatchTopK paper's comparison at CPU "
        f"scale on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), `{args.site}`: BatchTopK, TopK, "
        f"Matryoshka BatchTopK and JumpReLU (λ from a pilot so L0 lands near k) with F = 8·d, {info['steps']} "
        f"steps of {args.batch_size} rows each ({info['epochs']:.1f} epochs over {info['train_tokens']:,} "
        f"tokens), {seeds} seeds at k = {K_MAIN}, each trained on every row and without the massive rows "
        f"(`--exclude-massive {args.exclude_massive:g}`), one seed at k = {SIDE_KS[0]} and {SIDE_KS[1]}; "
        f"evaluated by `sae eval` on {info['eval_contexts'] * args.seq_len:,} held-out tokens with bootstrap CIs "
        "over contexts, every metric over all rows and over typical rows. No GPU run. At k = 32 "
        "(mean over seeds; verdict: seed ranges apart and, where the report has a CI, the gap beyond it):",
        "",
        f"- FVU, trained on all rows: BatchTopK {headline(groups, 'fvu', 'keep', 'all', seeds)}.",
        f"- FVU of typical rows, same SAEs: {headline(groups, 'fvu', 'keep', 'typical', seeds)}.",
        f"- ΔCE (nats), trained on all rows: {headline(groups, 'delta_ce', 'keep', 'all', seeds)}.",
        f"- FVU, massive rows excluded: {headline(groups, 'fvu', 'excl', 'all', seeds)}.",
        f"- ΔCE, massive rows excluded (spliced on typical rows): "
        f"{headline(groups, 'delta_ce', 'excl', 'all', seeds)}.",
    ]
    if share:
        lines.append(
            "- The mechanism: trained on every row, BatchTopK (θ) gives the massive rows "
            f"({statistics.fmean(rows):.1%} of the eval rows) {statistics.fmean(share):.1%} of its active latents."
        )
    lines += [
        "",
        "Matryoshka, JumpReLU, KL, CE recovered, dead fractions, the per-token L0 by row type and the time spent "
        "are in the doc. The GPT-2 small paper setting ships as `manifests/gpt2-small-L8-paper.yaml`. Throughput "
        "figures are in [docs/benchmarks.md](docs/benchmarks.md) (the table above).",
        "",
        "![FVU and ΔCE against L0, seeds' range and CIs as error bars](docs/img/reproduce-frontier.png)",
        "",
    ]
    return "\n".join(wrap(lines))


# How the run was sized (measured on this machine before it, under a load average of 10-14 on its 2 cores).
SIZING = (
    "before the run, a timed `sae train` sweep of 4 SAEs (BatchTopK, TopK, Matryoshka, JumpReLU; F = 4608, "
    "k = 32) for 40 steps on a 153,600-token layer-6 store took 134 CPU-s at 256 rows per step and 164 CPU-s at "
    "1024 (startup, 9 checkpoints and validation included), so about 0.06 CPU-s per SAE-step of 256 rows "
    "beyond a fixed cost; a `sae eval --mode both` of those 4 SAEs on 2,048 held-out tokens (6 spliced entries "
    "and the clean, zero and mean forwards) took 91 CPU-s, about 125 CPU-s per spliced forward of 32k tokens "
    "from layer 6. At 1024 rows per step, 30 SAEs × 2,000 steps alone would cost ≈ 4 CPU-hours; at 256 rows "
    "≈ 1.1 CPU-hours, the eval's ≈ 54 forwards of 32,768 tokens ≈ 1.9 CPU-hours, the pilot (128 rows) and the "
    "harvest (327,680 tokens at layer 6) ≈ 0.2 CPU-hours: ≈ 3.2 CPU-hours, 1.6 hours on 2 quiet cores. So: 256 "
    "rows per step, the smallest store giving well over one epoch, and 32,768 eval tokens, the minimum asked. "
    "The eval (one forward per spliced SAE and mode) costs more than the training. The table gives what each "
    "stage used; on the loaded machine CPU time itself ran above these quiet-box rates."
)


def massive_text(entries: dict[str, dict], where: dict[str, dict]) -> str:
    """The massive rows of the eval tokens as the first `keep` entry's row types count them."""
    for name, w in where.items():
        e = entries.get(name)
        if e is None or w["rows"] != "keep":
            continue
        t = e.get("row_types") or {}
        m = t.get("massive") or {}
        if m:
            return (
                f"on the eval tokens {m.get('n_rows', 0):,} rows ({float(m.get('share_rows') or 0):.1%}) have a norm "
                f"above {float(t.get('massive_factor') or 0):g} × the median {float(t.get('median_norm') or 0):.1f}"
            )
    return "massive rows as the store's statistics define them"


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:  # the stage printed its own one-line error above
        print(f"reproduce: `{shlex.join(map(str, exc.cmd))}` failed with exit status {exc.returncode}", file=sys.stderr)
        sys.exit(exc.returncode)
    except SaeError as exc:
        print(f"reproduce: {exc}", file=sys.stderr)
        sys.exit(2)
