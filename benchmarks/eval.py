"""Eval throughput: the spliced forward and the pass of `sae eval`, measured side by side with the bare forward.

All on the same held-out contexts, in the same batches, in one process:

(a) bare: `model(input_ids).logits` of SmolLM2, logits dropped: what any forward over the eval tokens costs.
(b) spliced: the forward with one SAE spliced at the site and the blocks before it replayed from the clean
    forward of the same batch (`PrefixReplay`), as `run_pass` runs it per SAE; the splice hook feeds the
    reconstruction accumulators (`_sae_splice`). The clean forward that recorded the prefix is not timed.
(c) spliced + metrics: (b) plus the per-position NLL and KL from the clean distribution (`token_losses`) and the
    CE accumulator: everything `run_pass` does per SAE and batch.
(d) spliced, no replay: (b) with every block run (`run_pass(reuse_prefix=False)`'s forward), for comparison.
(e) pass ×1 / ×3: `run_pass` end to end for 1 and 3 SAEs of the same site: the clean forward (with its
    distribution kept), zero and mean ablation, then one spliced forward per SAE. (×3 − ×1)/2 is the marginal
    cost of one more SAE of an already evaluated site; ×1 minus that is what a site costs once.

The SAEs are random (d_sae 4608, exported BatchTopK = JumpReLU with one θ, calibrated to L0 ≈ k on these
tokens): throughput does not depend on the weights, so no trained SAE is needed. Each repetition runs every
variant once, in an order reversed from one repetition to the next, so drift in machine load hits every variant
alike; ratios of wall time and of CPU time are taken per repetition (median) and over the totals. One torch
thread by default (see --threads). Prints a Markdown table and rewrites the "Eval" section of
docs/benchmarks.md.

    python benchmarks/eval.py                       # the documented run (~5 min on the shared 2-core box)
    python benchmarks/eval.py --reps 1 --no-doc     # a quick look
    python benchmarks/eval.py --profile --no-doc    # also: where one `run_pass` (1 SAE) spends its time
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # run_pass's progress bar, before tqdm is imported

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import ROOT, machine, write_section

from sae.config import EvalConfig
from sae.evaluate.evaluate import (
    PrefixReplay,
    _sae_splice,
    ablation_means,
    check_model,
    check_sites,
    describe,
    load_contexts,
    run_pass,
)
from sae.evaluate.metrics import CeAccumulator, token_losses
from sae.metrics import ReconstructionAccumulator
from sae.models import load_model
from sae.saedir import SaeConfig, SparseAutoencoder, load_sae, save_sae
from sae.sites import capture, parse_site, splice

DOC = ROOT / "docs" / "benchmarks.md"
HELDOUT = str(Path(__file__).resolve().parents[2] / "shared" / "corpus" / "heldout.jsonl.gz")
GOAL = 0.8
"""The spliced pass should run at ≥ this fraction of the bare forward's tokens/s."""


def random_sae(site, x: torch.Tensor, d_sae: int, k: int, seed: int, keep_bos: bool) -> SparseAutoencoder:
    """A random SAE as `sae train` exports a BatchTopK one (jumprelu, one θ): unit-norm decoder rows, encoder
    their transpose, b_dec the mean of the activations `x` [N, d], θ such that L0 = k on average over `x`."""
    d = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=g), dim=1)
    cfg = SaeConfig(
        architecture="jumprelu",
        d_in=d,
        d_sae=d_sae,
        k=k,
        model_name="smollm2-135m",
        hook_name=site.name,
        training_architecture="batchtopk",
        complete=True,
        metadata={"keep_bos": keep_bos, "benchmark": "random weights"},
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(x.mean(0))
        cfg.theta = float(torch.topk(sae.pre_acts(x).flatten(), k * x.shape[0]).values.min())
        sae.threshold.fill_(cfg.theta)
    return sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=16, help="eval contexts (seq_len tokens each)")
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward (EvalConfig's default)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of every variant, interleaved (0: only --profile)")
    ap.add_argument("--site", default="blocks.15.hook_resid_post")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-saes", type=int, default=3, help="SAEs of the site in the larger pass")
    ap.add_argument("--dataset", default=HELDOUT)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). 1 by default: on a loaded shared box torch's threads spin "
        "waiting for each other, which makes times and CPU times erratic",
    )
    ap.add_argument("--profile", action="store_true", help="profile one run_pass (1 SAE) with torch.profiler")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.n_saes < 2 or args.reps < 0:
        ap.error("--n-saes must be ≥ 2 (the marginal cost is a difference) and --reps ≥ 0")
    command = " ".join(["python benchmarks/eval.py", *map(shlex.quote, sys.argv[1:])])
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    t = time.perf_counter()
    model, tokenizer, info = load_model("smollm2-135m", device="cpu")
    load_s = time.perf_counter() - t
    cfg = EvalConfig(
        dataset=args.dataset,
        split="train",  # a local file has no splits; the held-out text is the file itself
        max_tokens=args.contexts * args.seq_len,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        mode="threshold",
        device="cpu",
    )
    contexts = load_contexts(args.dataset, tokenizer, cfg.split, cfg)
    n_tokens = int(contexts.size)
    batches = [
        torch.from_numpy(contexts[i : i + cfg.batch_size]).long() for i in range(0, len(contexts), cfg.batch_size)
    ]
    site = parse_site(args.site, model)
    t0 = 1  # `sae train` skips BOS rows by default, so eval leaves position 0 unspliced

    # Calibration activations (first batch, spliced positions) for the random SAEs.
    with torch.inference_mode():
        x = capture(model, [site], batches[0])[site.name][:, t0:]
    x = x.reshape(-1, x.shape[-1]).clone()
    tmp = Path(tempfile.mkdtemp(prefix="sae-bench-eval-"))
    try:
        specs = []
        for i in range(args.n_saes):
            sae = random_sae(site, x, args.d_sae, args.k, seed=i, keep_bos=t0 == 0)
            sae.cfg.metadata["model"] = {"id": info.id, "sha256": info.sha256}
            path = save_sae(sae, None, tmp / f"random-{i}")
            specs.append(describe(path, path.name, load_sae(path)))  # as `sae eval` loads them
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_model(specs, info, force=False)
    sites = check_sites(specs, model)
    assert specs[0].skip_bos == (t0 == 1)
    t = time.perf_counter()
    means = ablation_means([(site.name, t0)], sites, specs, cfg, model, info, contexts)
    means_s = time.perf_counter() - t

    # (b)–(d) need the clean forward of their batch: its recorded prefix and its distribution, made once here
    # (this also warms the model up: first-call allocations, kernel selection).
    sae = specs[0].sae
    prefix = PrefixReplay(model, [site])
    clean = []
    with torch.inference_mode():
        for ids in batches:
            with prefix.record():
                logits = model(input_ids=ids, use_cache=False).logits
            clean.append((dict(prefix.outputs), token_losses(logits[:, :-1], ids[:, 1:], keep_dist=True).clean))
            del logits
    recon = ReconstructionAccumulator(sae.d_in, sae.d_sae)

    def spliced_forward(b: int, replay: bool) -> torch.Tensor:
        prefix.outputs = dict(clean[b][0])
        with splice(model, site, _sae_splice(sae, t0, False, recon)):
            if not replay:
                return model(input_ids=batches[b], use_cache=False).logits
            with prefix.replay(site):
                return model(input_ids=batches[b], use_cache=False).logits

    def bare() -> None:
        for ids in batches:
            model(input_ids=ids, use_cache=False).logits  # noqa: B018 (the forward is the point)

    def spliced() -> None:
        for b in range(len(batches)):
            spliced_forward(b, replay=True)

    def spliced_metrics() -> None:
        ce = CeAccumulator()
        for b, ids in enumerate(batches):
            out = token_losses(spliced_forward(b, replay=True)[:, :-1], ids[:, 1:], clean[b][1])
            ce.add(out.nll[:, t0:], out.kl[:, t0:])

    def no_replay() -> None:
        for b in range(len(batches)):
            spliced_forward(b, replay=False)

    last: list = []

    def pass1() -> None:
        last[:] = run_pass(model, contexts, specs[:1], sites, means, cfg)[0]

    def passn() -> None:
        run_pass(model, contexts, specs[: args.n_saes], sites, means, cfg)

    variants: list[tuple[str, Callable[[], None]]] = [
        ("bare", bare),
        ("spliced", spliced),
        ("spliced+metrics", spliced_metrics),
        ("no replay", no_replay),
        ("pass1", pass1),
        ("passN", passn),
    ]
    wall: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for rep in range(args.reps):
            order = variants if rep % 2 == 0 else variants[::-1]
            for name, fn in order:
                t, c = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
                load.append(os.getloadavg()[0])
                print(f"rep {rep} {name}: {wall[name][-1]:.2f} s", file=sys.stderr, flush=True)
    if args.profile:
        profile(lambda: run_pass(model, contexts, specs[:1], sites, means, cfg))
    if not args.reps:
        return
    l0 = last[0].recon.result()["l0"]

    table = report(args, wall, cpu, n_tokens, load, l0, load_s, means_s, time.perf_counter() - start)
    print(table)
    if not args.no_doc:
        write_doc(table, command, args, site.name, len(contexts))


def report(
    args: argparse.Namespace,
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    n_tokens: int,
    load: list[float],
    l0: float,
    load_s: float,
    means_s: float,
    total_s: float,
) -> str:
    """The Markdown table and the notes under it."""
    n = args.n_saes
    for times in (wall, cpu):
        # per repetition: the marginal cost of one more SAE of the site, and what the site costs once
        times["marginal"] = [(a - b) / (n - 1) for a, b in zip(times["passN"], times["pass1"], strict=True)]
        times["shared"] = [b - m for b, m in zip(times["pass1"], times["marginal"], strict=True)]

    def ratio(times: dict[str, list[float]], name: str, per: float) -> str:
        """bare time / variant time per SAE: median of the per-repetition ratios (ratio of the totals)."""
        each = [per * a / b for a, b in zip(times["bare"], times[name], strict=True)]
        return f"{statistics.median(each):.2f} ({per * sum(times['bare']) / sum(times[name]):.2f})"

    rows = [
        ("bare", 1, "(a) bare forward → logits", ""),
        ("spliced", 1, "(b) spliced forward, prefix replayed", f"≥ {GOAL}"),
        ("spliced+metrics", 1, "(c) (b) + NLL/KL metrics: `run_pass`'s per-SAE work", f"≥ {GOAL}"),
        ("no replay", 1, "(d) spliced forward, every block run", ""),
        ("pass1", 1, "(e1) `run_pass`, 1 SAE: clean + zero + mean + SAE", ""),
        ("passN", n, f"(e{n}) `run_pass`, {n} SAEs of the site, per SAE", ""),
        ("marginal", 1, f"(e{n} − e1)/{n - 1}: one more SAE of the site", f"≥ {GOAL}"),
        ("shared", 1, "e1 − that: the site's shared forwards", ""),
    ]
    lines = [
        "| variant | tokens/s (wall) | × bare, wall time | × bare, CPU time | goal |",
        "|---|---|---|---|---|",
    ]
    for name, per, label, goal in rows:
        tps = n_tokens * per * len(wall[name]) / sum(wall[name])
        lines.append(f"| {label} | {tps:,.0f} | {ratio(wall, name, per)} | {ratio(cpu, name, per)} | {goal} |")

    def each(name: str) -> str:
        return ", ".join(f"{a / b:.2f}" for a, b in zip(cpu["bare"], cpu[name], strict=True))

    notes = [
        "× bare: bare time over variant time (per SAE); the median of the per-repetition ratios, in brackets the "
        "ratio of the totals. Above 1 is faster than the bare forward.",
        "",
        f"- tokens per repetition × repetitions: {n_tokens:,} × {args.reps}; torch threads: {torch.get_num_threads()}",
        f"- per-repetition CPU-time ratios: (b) {each('spliced')}; (c) {each('spliced+metrics')}; "
        f"one more SAE {each('marginal')}",
        f"- 1-min load average during the run: {min(load):.1f}–{max(load):.1f} (≤ 2 would be a quiet 2-core box)",
        f"- L0 of the random SAE in the pass: {l0:.1f} (θ calibrated for k = {args.k})",
        f"- one-off, outside every timed variant: model load {load_s:.1f} s; ablation mean from the eval tokens "
        f"(a forward stopped at the site, when no store gives it) {means_s:.1f} s; whole run {total_s / 60:.1f} min",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def profile(fn: Callable[[], object]) -> None:
    """Where one call of `fn` spends its time: torch operators by self CPU time, and the model's modules."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("run_pass"):
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


def write_doc(table: str, command: str, args: argparse.Namespace, site: str, n_contexts: int) -> None:
    threads = "torch's default threads" if not args.threads else f"torch threads: {args.threads}"
    section = f"""## Eval

`{command}` — SmolLM2-135M-Instruct (`smollm2-135m`: Q4_1 GGUF dequantised to float32, on CPU,
{threads}), {n_contexts} held-out contexts of
`{args.dataset}`, seq_len {args.seq_len}, batch {args.batch_size} contexts, SAEs at `{site}` with d_sae
{args.d_sae} and **random weights** (exported BatchTopK: JumpReLU with one θ, calibrated to L0 ≈ {args.k}; eval
throughput does not depend on the weights), threshold mode, position 0 (BOS) unspliced as for SAEs trained
without BOS rows. (a) is the bare forward (`model(input_ids).logits`) over the same contexts and batches. (b) is
the forward with the SAE spliced in and the blocks before the site replayed from the batch's clean forward
(`PrefixReplay`), as `run_pass` runs it per SAE; (c) adds the NLL and KL from the clean distribution
(`token_losses`): all the work `run_pass` does per SAE; (d) is (b) with every block run. (e1) and (e{args.n_saes})
are `sae.evaluate.evaluate.run_pass` end to end for 1 and {args.n_saes} SAEs of the site (clean forward keeping
its distribution, zero and mean ablation, one spliced forward per SAE); their difference gives the cost of one
more SAE of a site already evaluated. Each repetition runs every variant once, the order reversed between
repetitions. The goal is the spliced pass at ≥ {GOAL}× the bare forward's tokens/s.

One torch thread by default: on this shared box, loaded well past its 2 cores, torch's two threads spin
waiting for each other (measured: twice the wall time and twice the CPU time of one thread for the same
forward), so times with them are erratic. With one thread the CPU time of the process is close to the work
done and moves much less with the load than wall time (cache and memory-bandwidth contention still move it by
~10 %), so the CPU-time ratios are the figures to read; absolute tokens/s move with whatever else runs. The
one-more-SAE row is the difference of two long passes, the noisiest figure here; (c) measures the same per-SAE
work directly.

Machine: {machine()}; measured {time.strftime("%Y-%m-%d")}.

{table}
"""
    write_section(DOC, "Eval", section)
    print(f"wrote the Eval section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
