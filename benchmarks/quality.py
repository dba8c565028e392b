"""Quality check: BatchTopK against TopK at the same k, dictionary size and tokens, on held-out rows.

On SmolLM2-135M (`smollm2-135m`) activations of one mid layer, trains BatchTopK and TopK SAEs at k ∈ {16, 32, 64}
with F = 8·d in ONE `sae train` sweep (the data is read once, every SAE sees the same batches), then reports on
the rows of a separately harvested held-out store (BOS rows excluded, as in training), in both inference modes:
  θ mode       `SparseAutoencoder.encode`: BatchTopK exported as JumpReLU, a = pre·1[pre > θ]; TopK per row
  batch mode   `SparseAutoencoder.encode_batch` over batches of 4096 rows: BatchTopK keeps the k·B largest
               activations of the batch; TopK is per row in both modes
FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean of the evaluated rows), NMSE = Σ‖x − x̂‖² / Σ‖x‖² (DESIGN.md), mean L0.

    python benchmarks/quality.py --train-tokens 196608 --heldout-tokens 36864 --batch-size 1024 --write

Rerunning reuses finished stores and SAEs under --out (stage times are kept in <out>/timings.json).
`--write` replaces the "BatchTopK vs TopK (quality check)" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine

from sae.errors import SaeError
from sae.saedir import checkpoint_path, is_complete, load_sae
from sae.store import Store

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
SECTION = "## BatchTopK vs TopK (quality check)"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
ARCHS = ("batchtopk", "topk")
KS = (16, 32, 64)
EVAL_BATCH = 4096
MODE_NAMES = {"theta": "θ mode", "batch": "batch mode"}


def run(cmd: list[str]) -> float:
    """Run a CLI command, streaming its output; seconds it took."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def finished_store(path: Path, tokens: int) -> bool:
    """Whether `path` is a finalized store holding `tokens` rows (so the harvest need not run again)."""
    try:
        return Store.open(path).n_rows == tokens
    except SaeError:
        return False


def harvest_cmd(args: argparse.Namespace, out: Path, corpus: Path, tokens: int) -> list[str]:
    return [
        "sae", "harvest", "--out", str(out), "--site", args.site, "--model", args.model, "--dataset", str(corpus),
        "--split", "train", "--max-tokens", str(tokens), "--seq-len", str(args.seq_len),
    ]  # fmt: skip


def train_cmd(args: argparse.Namespace, store: Path, out: Path, d_sae: int) -> list[str]:
    return [
        "sae", "train", str(store), "--site", args.site, "--arch", ",".join(ARCHS), "--k", ",".join(map(str, KS)),
        "--dict-size", str(d_sae), "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--out", str(out),
    ]  # fmt: skip


def heldout_rows(store: Store, site: str) -> torch.Tensor:
    """All non-BOS rows of the held-out store (float32), cut to whole evaluation batches so both modes see the
    same rows. Rows are already shuffled within shards at harvest time."""
    parts = []
    for i in range(store.n_chunks):
        keep = torch.from_numpy(store.chunk_meta(i).position != 0)
        parts.append(store.chunk(site, i).float()[keep])
    x = torch.cat(parts)
    n = x.shape[0] // EVAL_BATCH * EVAL_BATCH
    if n == 0:
        raise SaeError(f"held-out store has {x.shape[0]} non-BOS rows, fewer than one batch of {EVAL_BATCH}")
    return x[:n]


@torch.no_grad()
def evaluate(sae_dir: Path, x: torch.Tensor) -> dict:
    """FVU, NMSE and mean L0 of one SAE on rows x, in θ mode and batch mode."""
    sae = load_sae(sae_dir)
    total = ((x - x.mean(0)) ** 2).sum().item()
    energy = (x**2).sum().item()
    meta = sae.cfg.metadata
    out = {
        "k": sae.cfg.k,
        "threshold": sae.cfg.theta,
        "steps": meta.get("steps"),
        "tokens_seen": meta.get("tokens_seen"),
        "val_chunks": meta.get("val_chunks"),
        "dead_fraction": meta.get("dead_fraction"),
    }
    for mode, enc in (("theta", sae.encode), ("batch", sae.encode_batch)):
        err = l0 = 0.0
        for xb in x.split(EVAL_BATCH):
            a = enc(xb)
            err += ((xb - sae.decode(a)) ** 2).sum().item()
            l0 += (a != 0).sum().item()
        out[mode] = {"fvu": err / total, "nmse": err / energy, "l0": l0 / x.shape[0]}
    return out


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{v:.1%}"


def table(results: dict, mode: str) -> list[str]:
    rows = [
        "| k | BatchTopK FVU | TopK FVU | BatchTopK NMSE | TopK NMSE | BatchTopK L0 | TopK L0 | BatchTopK < TopK FVU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in KS:
        b, t = results[f"batchtopk-k{k}"][mode], results[f"topk-k{k}"][mode]
        rows.append(
            f"| {k} | {b['fvu']:.4f} | {t['fvu']:.4f} | {b['nmse']:.4f} | {t['nmse']:.4f} | {b['l0']:.1f} | "
            f"{t['l0']:.1f} | {'yes' if b['fvu'] < t['fvu'] else 'no'} |"
        )
    return rows


def section(args, results, info) -> str:
    wins = {m: [k for k in KS if results[f"batchtopk-k{k}"][m]["fvu"] < results[f"topk-k{k}"][m]["fvu"]] for m in
            ("theta", "batch")}  # fmt: skip
    l0 = {k: results[f"batchtopk-k{k}"]["theta"]["l0"] for k in KS}
    l0_text = ", ".join(f"k={k}: {l0[k]:.1f} ({(l0[k] - k) / k:+.0%})" for k in KS)

    def verdict(mode: str) -> str:
        w, lose = wins[mode], [k for k in KS if k not in wins[mode]]
        if not lose:
            return f"{MODE_NAMES[mode]}: holds (lower FVU at every k)"
        if not w:
            return f"{MODE_NAMES[mode]}: does not hold (higher FVU at every k)"
        return (
            f"{MODE_NAMES[mode]}: does not hold (lower FVU at k = {', '.join(map(str, w))}, "
            f"not at k = {', '.join(map(str, lose))})"
        )

    t = info["timings"]
    stage = ", ".join(f"{name} {sec:.0f} s" for name, sec in t.items())
    lines = [
        SECTION,
        "",
        f"Command: `{info['command']}`",
        "",
        f"SmolLM2-135M (`{args.model}`, float32 on CPU), site `{args.site}` (d = {info['d']}), seq_len "
        f"{args.seq_len}, bfloat16 store. Training: `{info['train_store']}` harvested from "
        f"`{CORPUS / 'train.jsonl.gz'}`, {info['train_tokens']:,} tokens ({info['tokens_seen']:,} of them "
        f"trained on, once: BOS rows and {info['val_chunks']} validation chunks are left out), one `sae train` sweep "
        f"(`{shlex.join(info['train_cmd'])}`) so all six SAEs (F = {info['d_sae']} = 8·d) saw the same batches; "
        f"batch size {args.batch_size} rows ({info['steps']} steps; the default 4096 would leave only a few dozen "
        f"steps at this size), other settings at their defaults. Held-out: `{info['heldout_store']}` harvested from "
        f"`{CORPUS / 'heldout.jsonl.gz'}`, {info['heldout_tokens']:,} tokens, of which the first "
        f"{info['eval_rows']:,} non-BOS rows (whole batches of {EVAL_BATCH}) are evaluated in both modes.",
        "",
        f"Machine: {info['machine']}; measured {info['date']}. The CPU was shared with other jobs "
        f"(1-min load average {info['load']}). Wall time: {info['wall']:.0f} s in all ({stage}); each stage's time "
        f"is that of the invocation that ran it (kept in `{info['out']}/timings.json`; a rerun reuses finished "
        "stores and SAEs and re-times only the evaluation).",
        "",
        "Harvest commands: " + "; ".join(f"`{shlex.join(c)}`" for c in info["harvest_cmds"]) + ".",
        "",
        "θ mode (`encode`: BatchTopK as JumpReLU with its global threshold θ; TopK per-row top-k):",
        "",
        *table(results, "theta"),
        "",
        f"Batch mode (`encode_batch` over batches of {EVAL_BATCH} rows: BatchTopK keeps the k·{EVAL_BATCH} "
        "largest activations of the batch; TopK is per row, the same as in θ mode):",
        "",
        *table(results, "batch"),
        "",
        f'The paper\'s claim "BatchTopK < TopK FVU at every k", on this run: {verdict("batch")}; '
        f"{verdict('theta')}. BatchTopK's θ-mode mean L0 against its k: {l0_text}.",
        "",
        "Dead latents at the end of training (the trainer's dead window), "
        + "; ".join(
            f"{a} " + ", ".join(f"k={k} {_pct(results[f'{a}-k{k}']['dead_fraction'])}" for k in KS) for a in ARCHS
        )
        + ". BatchTopK θ: "
        + ", ".join(f"k={k} {results[f'batchtopk-k{k}']['threshold']:.4g}" for k in KS)
        + " (pre-activation units).",
        "",
        f"Caveat: {info['train_tokens']:,} training tokens is about 1/{1e9 / info['train_tokens']:,.0f} of the "
        "paper's 1e9, on one seed; differences of a few thousandths in FVU are within what another seed or "
        "another slice of the corpus could move, and many latents may not have settled yet.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Results\n\nEach section is written by the script it names.\n\n"
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        nxt = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + ("" if nxt < 0 else "\n" + doc[nxt + 1 :])
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-tokens", type=int, default=196608, help="tokens harvested for training")
    p.add_argument("--heldout-tokens", type=int, default=36864, help="tokens harvested for evaluation")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality", help="stores, SAEs and results")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per optimizer step")
    p.add_argument("--site", default="blocks.15.hook_resid_post")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"replace the section in {DOC.relative_to(ROOT)}")
    args = p.parse_args()
    # Whole contexts only, as the harvest rounds down.
    args.train_tokens -= args.train_tokens % args.seq_len
    args.heldout_tokens -= args.heldout_tokens % args.seq_len

    load_start = os.getloadavg()[0]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timing_file = out / "timings.json"
    timings: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.exists() else {}

    def stage(name: str, cmd: list[str]) -> None:
        timings[name] = run(cmd)
        timing_file.write_text(json.dumps(timings, indent=1))

    train_store, heldout_store, saes = out / "train.zarr", out / "heldout.zarr", out / "saes"
    harvest_cmds = []
    for name, path, corpus, tokens in (
        ("harvest (train)", train_store, CORPUS / "train.jsonl.gz", args.train_tokens),
        ("harvest (held-out)", heldout_store, CORPUS / "heldout.jsonl.gz", args.heldout_tokens),
    ):
        harvest_cmds.append(harvest_cmd(args, path, corpus, tokens))
        if finished_store(path, tokens):
            print(f"reusing {path}")
        else:
            stage(name, harvest_cmds[-1])

    store = Store.open(train_store)
    d = store.d_model
    d_sae = 8 * d
    names = [f"{a}-k{k}-F{d_sae}" for a in ARCHS for k in KS]
    tcmd = train_cmd(args, train_store, saes, d_sae)
    if all(is_complete(saes / n) for n in names):
        print(f"reusing {saes}")
    else:
        # An interrupted sweep continues from its checkpoint (same command plus --resume).
        stage("train", [*tcmd, "--resume"] if checkpoint_path(saes).exists() else tcmd)

    t0 = time.perf_counter()
    x = heldout_rows(Store.open(heldout_store), args.site)
    results = {}
    for n in names:
        results[n.rsplit("-F", 1)[0]] = evaluate(saes / n, x)
        print(n, json.dumps(results[n.rsplit("-F", 1)[0]]), flush=True)
    timings["evaluate"] = time.perf_counter() - t0
    timing_file.write_text(json.dumps(timings, indent=1))

    first = results[f"batchtopk-k{KS[0]}"]
    info = {
        "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:]),
        "d": d,
        "d_sae": d_sae,
        "train_store": os.path.relpath(train_store, ROOT),
        "heldout_store": os.path.relpath(heldout_store, ROOT),
        "train_tokens": store.n_rows,
        "tokens_seen": first["tokens_seen"],
        "val_chunks": len(first["val_chunks"] or []),
        "steps": first["steps"],
        "train_cmd": tcmd,
        "harvest_cmds": harvest_cmds,
        "out": os.path.relpath(out, ROOT),
        "heldout_tokens": Store.open(heldout_store).n_rows,
        "eval_rows": x.shape[0],
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "load": f"{load_start:.1f} at the start of this invocation, "
        + " / ".join(f"{v:.1f}" for v in os.getloadavg())
        + " (1/5/15 min) at its end",
        "timings": timings,
        "wall": sum(timings.values()),
    }
    (out / "results.json").write_text(json.dumps({"results": results, "info": info}, indent=1, default=str))
    text = section(args, results, info)
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
