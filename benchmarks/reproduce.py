"""Reproduce the BatchTopK paper's comparison at CPU scale: BatchTopK, TopK and JumpReLU at k ∈ {16, 32, 64}.

On SmolLM2-135M-Instruct (`smollm2-135m`) activations of one mid-depth residual site, through the real CLI:
  harvest  `sae harvest` of the train split of ../shared/corpus into <out>/train.zarr
  pilot    one `sae train` sweep of JumpReLU SAEs over a grid of L0 coefficients λ, with as many optimizer
           steps as the main run but --pilot-batch-size rows per step; each λ's L0 on the store's validation
           rows, then λ for each target k by linear interpolation of log L0 against log λ between the two
           pilot points around it
  train    ONE `sae train` sweep: BatchTopK and TopK at each k, JumpReLU at each chosen λ, F = 8·d, so all
           nine SAEs see the same batches
  eval     `sae eval --mode both` on the held-out split: CE_clean/sae/zero/mean, CE recovered, ΔCE, KL, FVU,
           NMSE, L0, dead latents; BatchTopK in θ mode (its exported JumpReLU threshold) and in batch mode
           (batch top-k over each forward batch), the other SAEs with their one encoder
Then writes the "Reproduction" section of docs/results.md from the numbers, with the frontier plot (FVU and
ΔCE against L0) and the per-token L0 histogram of the k=32 BatchTopK SAE under docs/img/.

    python benchmarks/reproduce.py --write

Rerunning reuses every finished stage under --out (the store, the pilot and main SAEs, the eval report);
each stage's wall and CPU time are kept in <out>/timings.json, as measured by the invocation that ran it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine, write_section

from sae.errors import SaeError
from sae.evaluate.report import plot_frontier, plot_l0_histogram
from sae.saedir import checkpoint_path, is_complete
from sae.store import Store

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img"
HEADING = "Reproduction: BatchTopK vs TopK vs JumpReLU on SmolLM2-135M-Instruct"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
KS = (16, 32, 64)
PILOT_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
ARCH_NAMES = {"batchtopk": "BatchTopK", "topk": "TopK", "jumprelu": "JumpReLU"}


# --------------------------------------------------------------------------------------------------
# Stages


def run(cmd: list[str]) -> dict[str, float]:
    """Run a CLI command, streaming its output; its wall time, the CPU time (user + system) it used, and the
    5-minute load average at its end (the machine is shared: how busy it was)."""
    print("$", shlex.join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "load_5min": os.getloadavg()[1]}


def finished_store(path: Path, tokens: int) -> bool:
    """Whether `path` is a finalized store of `tokens` rows (so the harvest need not run again)."""
    try:
        return Store.open(path).n_rows == tokens
    except SaeError:
        return False


def sweep_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/cfg.json"))


def train_stage(cmd: list[str], out: Path, names: list[str], stage: Any, name: str) -> None:
    """Run a `sae train` sweep unless every SAE of it is finished; an interrupted one continues (--resume)."""
    if all(is_complete(out / n) for n in names):
        print(f"reusing {out}")
        return
    stage(name, [*cmd, "--resume"] if checkpoint_path(out).exists() else cmd)


def train_cmd(args: argparse.Namespace, store: Path, out: Path, d_sae: int, extra: list[str]) -> list[str]:
    return [
        "sae", "train", str(store), "--site", args.site, "--dict-size", str(d_sae),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed), *extra, "--out", str(out),
    ]  # fmt: skip


def fmt_coeff(c: float) -> str:
    """λ as `sae train` names its directory (`jumprelu-l0c{λ:g}-F…`)."""
    return f"{float(c):g}"


# --------------------------------------------------------------------------------------------------
# Choosing JumpReLU's coefficient
#
# The pilot keeps the main run's number of steps, not its tokens: with Adam, θ moves by about its lr per step
# whenever the L0 term dominates its gradient, so in a run of a few hundred steps how far θ can travel (the
# schedule) decides L0 as much as λ does. A pilot on the first third of the tokens (its own, 3× shorter
# schedule) was tried first: its L0s mispredicted the main run's by a factor of about 2, too sparse at large λ
# and too dense at small λ. Fewer rows per step cost less and leave the expected gradient, hence the
# equilibrium, unchanged.


def main_steps(store: Store, batch_size: int, val_chunks: int = 2) -> int:
    """Optimizer steps of a one-pass `sae train` over `store` (non-BOS rows of the non-validation chunks; rows
    are shuffled within shards, so any chunk holds its share of BOS rows, give or take a few)."""
    rows = (store.n_chunks - val_chunks) * store.chunk_rows
    return int(rows * (1 - 1 / store.seq_len)) // batch_size


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


# --------------------------------------------------------------------------------------------------
# Report


def eval_done(report: Path, names: list[str], n_tokens: int) -> bool:
    """Whether report.json holds every expected entry over `n_tokens` spliced rows, newer than every SAE."""
    path = report / "report.json"
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    got = {e["name"]: e for e in entries}
    if set(got) != set(names) or any(e["n_tokens"] != n_tokens for e in entries):
        return False
    newest_sae = max(Path(e["sae_dir"], "cfg.json").stat().st_mtime for e in entries)
    return path.stat().st_mtime > newest_sae


def _f(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def results_table(entries: dict[str, dict], names: dict[tuple[str, int], str]) -> list[str]:
    rows = [
        "| k | SAE | encoder | L0 | FVU | NMSE | ΔCE (nats) | CE rec. (zero) | CE rec. (mean) | KL (nats) | dead |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in KS:
        for arch in ("batchtopk", "topk", "jumprelu"):
            base = names[arch, k]
            for name, enc in ((base, "θ" if arch == "batchtopk" else "own"), (f"{base} (batch)", "batch top-k")):
                e = entries.get(name)
                if e is None:
                    continue
                if arch == "topk":
                    enc = "per-row top-k"
                elif arch == "jumprelu":
                    enc = "per-latent θ"
                label = ARCH_NAMES[arch] + (f" λ={fmt_coeff(e['l0_coeff'])}" if arch == "jumprelu" else "")
                rows.append(
                    f"| {k} | {label} | {enc} | {e['l0']:.1f} | {e['fvu']:.4f} | {e['nmse']:.4f} | "
                    f"{e['delta_ce']:.4f} | {e['ce_recovered']:.4f} | {e['ce_recovered_mean']:.4f} | "
                    f"{e['kl']:.4f} | {e['dead_fraction']:.1%} |"
                )
    return rows


def ordering(entries: dict[str, dict], names: dict[tuple[str, int], str]) -> list[str]:
    """Whether BatchTopK beats TopK at every k, on FVU and on ΔCE, in each of BatchTopK's encoder modes."""
    lines = []
    for mode, suffix in (("batch mode (the paper's)", " (batch)"), ("θ mode", "")):
        for key, what in (("fvu", "FVU"), ("delta_ce", "ΔCE")):
            wins = [k for k in KS if entries[names["batchtopk", k] + suffix][key] < entries[names["topk", k]][key]]
            lose = [k for k in KS if k not in wins]
            if not lose:
                verdict = "**holds** (lower at every k)"
            elif not wins:
                verdict = "**does not hold** (higher at every k)"
            else:
                verdict = (
                    f"**does not hold** (lower at k = {', '.join(map(str, wins))}, "
                    f"not at k = {', '.join(map(str, lose))})"
                )
            lines.append(f"- {what}, BatchTopK in {mode}: {verdict}")
    return lines


def store_validation(saes: Path, names: dict[tuple[str, int], str]) -> dict[tuple[str, int], dict]:
    """Each SAE's last validation row from its training log: FVU and L0 on the store's held-out chunks (rows of
    the training corpus, BOS excluded, batches of the training batch size), in θ and batch mode."""
    out = {}
    for key, name in names.items():
        rows = [json.loads(line) for line in (saes / name / "train_log.jsonl").read_text().splitlines()]
        out[key] = [r for r in rows if r.get("split") == "val"][-1]
    return out


def validation_lines(
    val: dict[tuple[str, int], dict], rows_per_batch: int, entries: dict[str, dict], names: dict[tuple[str, int], str]
) -> list[str]:
    lines = [
        "| k | BatchTopK FVU (θ) | BatchTopK FVU (batch) | TopK FVU | BatchTopK L0 (θ) | JumpReLU L0 | JumpReLU FVU |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in KS:
        b, t, j = val["batchtopk", k], val["topk", k], val["jumprelu", k]
        lines.append(
            f"| {k} | {b['fvu_theta']:.5f} | {b['fvu_batch']:.5f} | {t['fvu_theta']:.5f} | {b['l0_theta']:.1f} | "
            f"{j['l0_theta']:.1f} | {j['fvu_theta']:.5f} |"
        )
    wins = {
        m: [k for k in KS if val["batchtopk", k][f"fvu_{m}"] < val["topk", k]["fvu_theta"]] for m in ("batch", "theta")
    }
    heldout_wins = [
        k for k in KS if entries[names["batchtopk", k] + " (batch)"]["fvu"] < entries[names["topk", k]]["fvu"]
    ]
    harder = all(entries[n]["fvu"] > val[key]["fvu_theta"] for key, n in names.items())
    contrast = []
    if harder:
        contrast.append("Every SAE's FVU is higher on the held-out split than on these rows.")
    if heldout_wins != wins["batch"]:
        contrast.append(
            "Which of BatchTopK (batch mode) and TopK reconstructs better thus differs between the training "
            "corpus's rows and the held-out text: at this scale the comparison depends on the data it is made on."
        )
    return [
        *lines,
        "",
        f"Here BatchTopK has the lower FVU at k = {', '.join(map(str, wins['batch'])) or 'none'} in batch mode "
        f"(batches of {rows_per_batch} rows) and at k = {', '.join(map(str, wins['theta'])) or 'none'} in θ mode. "
        + " ".join(contrast),
    ]


def section(args: argparse.Namespace, info: dict[str, Any], entries: dict[str, dict]) -> str:
    names = info["names"]
    t = info["timings"]
    stages = ", ".join(
        f"{n} {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU ({v['cpu_s'] / v['wall_s']:.2f} cores"
        + (f", 5-min load {v['load_5min']:.1f}" if "load_5min" in v else "")
        + ")"
        for n, v in t.items()
    )
    total_wall = sum(v["wall_s"] for v in t.values())
    total_cpu = sum(v["cpu_s"] for v in t.values())
    pilot = info["pilot"]
    chosen = info["chosen"]
    theta_l0 = ", ".join(
        f"k = {k}: {entries[names['batchtopk', k]]['l0']:.1f} ({entries[names['batchtopk', k]]['l0'] / k - 1:+.1%})"
        for k in KS
    )
    jr_l0 = ", ".join(
        f"k = {k}: λ = {fmt_coeff(chosen[str(k)]['coeff'])} → {entries[names['jumprelu', k]]['l0']:.1f}" for k in KS
    )
    pilot_rows = ["| λ | pilot L0 (validation rows) |", "|---|---|"] + [
        f"| {fmt_coeff(c)} | {pilot[c]:.1f} |" for c in sorted(pilot, key=float)
    ]
    extrapolated = [k for k in KS if chosen[str(k)]["extrapolated"]]
    h = info["harvest_cmd"]
    lines = [
        f"## {HEADING}",
        "",
        f"Command: `{info['command']}` (written by `benchmarks/reproduce.py`).",
        "",
        f"**Setup.** SmolLM2-135M-Instruct (`{args.model}`: Q4_1 GGUF dequantised to float32, on CPU), "
        f"site `{args.site}` (d = {info['d']}), contexts "
        f"of {args.seq_len} tokens. Training data: {info['train_tokens']:,} tokens of "
        f"`{CORPUS / 'train.jsonl.gz'}` harvested into a bfloat16 store (`{shlex.join(h)}`); "
        f"{info['tokens_seen']:,} of them trained on, once ({info['steps']} steps of {args.batch_size} rows; BOS "
        f"rows and {info['val_chunks']} validation chunks are left out). Dictionary F = {info['d_sae']} = 8·d. "
        f"All nine SAEs come from one `sae train` sweep (`{shlex.join(info['train_cmd'])}`), so they saw the same "
        "batches; every other setting is the trainer's default (lr 2e-4/√(F/2¹⁴), warm-up, decay, AuxK, dead "
        "window and θ EMA scaled to the run). Evaluation: `"
        + shlex.join(info["eval_cmd"])
        + f"` on {info['eval_contexts']} contexts ({info['eval_contexts'] * args.seq_len:,} tokens) of "
        f"`{CORPUS / 'heldout.jsonl.gz'}`, the corpus's held-out split; {info['n_tokens']:,} spliced positions "
        "(BOS left unspliced, as the SAEs never saw it), batches of "
        f"{args.eval_batch} contexts, so batch mode selects k·{args.eval_batch * (args.seq_len - 1):,} activations "
        "per forward. Definitions are in the eval report (`report.md`); `dead` = never fired on the eval tokens.",
        "",
        f"**Machine.** {info['machine']}; measured {info['date']}. The CPU was shared with other jobs, so each "
        "stage got fewer than the 2 cores (the CPU time over wall time in brackets) and wall times are inflated; "
        "CPU time is the better guide to what a quiet box needs. Stages: "
        f"{stages}; in all {total_wall:.0f} s wall, {total_cpu:.0f} s CPU. Each stage's time is that of the "
        f"invocation that ran it (`{info['out']}/timings.json`; a rerun reuses finished stages). The invocation "
        f"that wrote this section saw a 1-min load average of {info['load']}.",
        "",
        "**JumpReLU's coefficient.** The L0 penalty λ sets JumpReLU's sparsity only indirectly, so it was chosen "
        f"per target k: a pilot sweep (`{shlex.join(info['pilot_cmd'])}`) trained one JumpReLU SAE per λ for "
        f"{info['pilot_steps']} steps, as many as the main run, of {args.pilot_batch_size} rows "
        f"({info['pilot_tokens']:,} tokens). Steps, not tokens, are kept because θ moves by about its lr per step "
        "while the L0 term dominates its gradient, so in a short run the schedule limits how far L0 can fall; a "
        "first pilot on a third of the tokens, with its own shorter schedule, mispredicted the main run's L0 "
        "(too dense at small λ, too sparse at large λ). Each pilot SAE's L0 on the store's validation rows at its "
        "end gives the points below, and each target k gets λ by linear interpolation of log L0 against log λ "
        "between the two points around it"
        + (f" (extrapolated from the nearest two for k = {', '.join(map(str, extrapolated))})" if extrapolated else "")
        + ", rounded to 3 significant digits.",
        "",
        *pilot_rows,
        "",
        f"Chosen λ and the L0 the main run's SAE reached on the eval tokens: {jr_l0}.",
        "",
        "**Results** (held-out tokens; BatchTopK twice: θ mode is its exported JumpReLU with one global threshold, "
        "batch mode keeps the k·B largest activations of each forward batch):",
        "",
        *results_table(entries, names),
        "",
        "![FVU and ΔCE against L0](img/reproduce-frontier.png)",
        "",
        "![Per-token L0 of the k=32 BatchTopK SAE](img/reproduce-l0-batchtopk-k32.png)",
        "",
        "**The paper's ordering** (BatchTopK better than TopK at every k, same k and F):",
        "",
        *ordering(entries, names),
        "",
        f"**θ-mode L0 against k** (BatchTopK, eval tokens): {theta_l0}. In batch mode L0 is k by construction.",
        "",
        "**The same SAEs on the training corpus.** The trainer's last validation pass, on the store's "
        f"{info['val_chunks']} validation chunks (rows of the training corpus, never trained on, but from the "
        "same contexts as training rows, since rows are shuffled within shards; reconstruction only):",
        "",
        *validation_lines(info["validation"], args.batch_size, entries, names),
        "",
        f"**Caveats.** {info['tokens_seen']:,} training tokens are about 1/{1e9 / info['tokens_seen']:,.0f} of "
        "the paper's 1e9, in a few hundred optimizer steps, on one seed and one site of a much smaller model; "
        "latents have not settled and the dead fractions are those of a short run. Differences of a few "
        "thousandths in FVU or ΔCE are within what another seed or another slice of the corpus could move. The "
        f"held-out evaluation is one sample of {info['n_tokens']:,} positions (the same for every SAE, so "
        "differences between SAEs are measured on equal terms). JumpReLU's λ came from a pilot on smaller "
        "batches, so its L0 lands near, not on, each k; compare it with the others along the frontier (FVU or "
        "ΔCE at equal L0), not row by row.",
        "",
    ]
    return "\n".join(lines)


def figures(entries: dict[str, dict], names: dict[tuple[str, int], str]) -> None:
    """docs/img: the eval's frontier plot (FVU and ΔCE against L0) and the per-token L0 histogram of the k=32
    BatchTopK SAE in both modes, drawn by the eval's own plotting functions from this run's report."""
    IMG.mkdir(parents=True, exist_ok=True)
    plot_frontier(list(entries.values())).savefig(IMG / "reproduce-frontier.png", dpi=110, bbox_inches="tight")
    btk = names["batchtopk", 32]
    fig = plot_l0_histogram([entries[btk], entries[f"{btk} (batch)"]])
    fig.savefig(IMG / "reproduce-l0-batchtopk-k32.png", dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-tokens", type=int, default=327680, help="tokens harvested for training")
    p.add_argument("--pilot-batch-size", type=int, default=256, help="rows per step of the JumpReLU pilot")
    p.add_argument("--pilot-grid", default=",".join(map(fmt_coeff, PILOT_GRID)), help="λ values of the pilot")
    p.add_argument("--heldout-tokens", type=int, default=16384, help="held-out tokens evaluated")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce", help="store, SAEs, report, timings")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per optimizer step")
    p.add_argument("--eval-batch", type=int, default=16, help="contexts per eval forward (and batch top-k)")
    p.add_argument("--site", default="blocks.15.hook_resid_post")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"replace the section in {DOC.relative_to(ROOT)}")
    args = p.parse_args()
    args.train_tokens -= args.train_tokens % args.seq_len  # whole contexts, as harvest rounds down
    args.heldout_tokens -= args.heldout_tokens % args.seq_len

    load_start = os.getloadavg()[0]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timing_file = out / "timings.json"
    timings: dict[str, dict[str, float]] = json.loads(timing_file.read_text()) if timing_file.exists() else {}

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
    if finished_store(store_path, args.train_tokens):
        print(f"reusing {store_path}")
    else:
        stage("harvest", hcmd)
    store = Store.open(store_path)
    d_sae = 8 * store.d_model

    # pilot: JumpReLU over the λ grid, then λ per target k
    grid = [float(c) for c in args.pilot_grid.split(",")]
    pilot_dir = out / "pilot"
    pilot_tokens = main_steps(store, args.batch_size) * args.pilot_batch_size
    pcmd = train_cmd(
        args, store_path, pilot_dir, d_sae,
        ["--arch", "jumprelu", "--l0-coeff", ",".join(map(fmt_coeff, grid)), "--tokens", str(pilot_tokens)],
    )  # fmt: skip
    pcmd[pcmd.index("--batch-size") + 1] = str(args.pilot_batch_size)
    train_stage(pcmd, pilot_dir, [f"jumprelu-l0c{fmt_coeff(c)}-F{d_sae}" for c in grid], stage, "pilot")
    pilot = {c: pilot_l0(pilot_dir / f"jumprelu-l0c{fmt_coeff(c)}-F{d_sae}") for c in grid}
    print("pilot L0:", pilot, flush=True)
    chosen = {}
    for k in KS:
        c, extrapolated = interpolate_coeff(pilot, k)
        chosen[str(k)] = {"coeff": float(f"{c:.3g}"), "extrapolated": extrapolated}
    print("chosen λ:", chosen, flush=True)

    # the main sweep
    saes = out / "saes"
    coeffs = [chosen[str(k)]["coeff"] for k in KS]
    tcmd = train_cmd(
        args, store_path, saes, d_sae,
        ["--arch", "batchtopk,topk,jumprelu", "--k", ",".join(map(str, KS)),
         "--l0-coeff", ",".join(map(fmt_coeff, coeffs))],
    )  # fmt: skip
    names = {(a, k): f"{a}-k{k}-F{d_sae}" for a in ("batchtopk", "topk") for k in KS}
    names.update({("jumprelu", k): f"jumprelu-l0c{fmt_coeff(c)}-F{d_sae}" for k, c in zip(KS, coeffs, strict=True)})
    train_stage(tcmd, saes, list(names.values()), stage, "train")

    # eval on the held-out split, BatchTopK in both modes
    report = out / "report"
    ecmd = [
        "sae", "eval", str(saes), "--out", str(report), "--dataset", str(CORPUS / "heldout.jsonl.gz"),
        "--split", "train", "--max-tokens", str(args.heldout_tokens), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.eval_batch), "--mode", "both",
    ]  # fmt: skip
    expected = [*names.values(), *(f"{names['batchtopk', k]} (batch)" for k in KS)]
    n_contexts = args.heldout_tokens // args.seq_len
    if eval_done(report, expected, n_contexts * (args.seq_len - 1)):
        print(f"reusing {report}")
    else:
        stage("eval", ecmd)
    entries = {e["name"]: e for e in json.loads((report / "report.json").read_text())}
    for (arch, _), n in names.items():  # λ from each JumpReLU's own cfg (the table shows it)
        if arch == "jumprelu":
            entries[n]["l0_coeff"] = json.loads((saes / n / "cfg.json").read_text())["metadata"]["l0_coeff"]
    figures(entries, names)

    meta = json.loads((saes / names["batchtopk", 32] / "cfg.json").read_text())["metadata"]
    info = {
        "command": "python benchmarks/reproduce.py " + shlex.join(sys.argv[1:]),
        "d": store.d_model,
        "d_sae": d_sae,
        "train_tokens": store.n_rows,
        "tokens_seen": meta["tokens_seen"],
        "steps": meta["steps"],
        "val_chunks": len(meta.get("val_chunks") or []),
        "harvest_cmd": [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in hcmd],
        "pilot_cmd": [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in pcmd],
        "train_cmd": [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in tcmd],
        "eval_cmd": [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in ecmd],
        "pilot_tokens": pilot_tokens,
        "pilot_steps": pilot_tokens // args.pilot_batch_size,
        "pilot": {fmt_coeff(c): v for c, v in pilot.items()},
        "chosen": chosen,
        "names": {f"{a}/{k}": n for (a, k), n in names.items()},
        "eval_contexts": n_contexts,
        "n_tokens": entries[names["batchtopk", 32]]["n_tokens"],
        "out": os.path.relpath(out, ROOT),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "load": f"{load_start:.1f} at its start and "
        + " / ".join(f"{v:.1f}" for v in os.getloadavg())
        + " (1/5/15 min) at its end",
        "timings": timings,
    }
    (out / "results.json").write_text(json.dumps({"info": info, "entries": entries}, indent=1, default=str))
    validation = store_validation(saes, names)
    text = section(args, {**info, "names": names, "validation": validation}, entries)
    print(text)
    if args.write:
        write_section(DOC, HEADING, text, title="Results")
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
