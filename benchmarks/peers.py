"""Peers, side by side in one run: sae-lens' activation cache against `sae harvest`, and the SAE trainers of the
peer libraries that install here against ours, on the same activations and config.

Cache: the same model (the embedded SmolLM2-135M-Instruct, float32 on CPU), the same site (the residual stream
after block L: `blocks.L.hook_resid_post` for us, the output of `model.layers.L` hooked through sae-lens'
HookedProxyLM), the same packed contexts of the same corpus, the same batches of contexts, shards of the same size.
Each side runs end
to end from the text file to a finished cache in a fresh folder: model load, tokenization and packing, forward
(both stop after the site's block), conversion, writing. sae-lens gets the contexts as a pre-tokenized
`datasets.Dataset`, built inside its timing from our packer (what its PretokenizeRunner step would do), so both
caches hold the very same tokens. Sides, interleaved a b c d, d c b a, ...:

  ours        `sae.harvest.harvest`, bfloat16 in Blosc-zstd chunks (the default)
  ours-f32    the same with --dtype float32
  lens        sae-lens `CacheActivationsRunner` with its defaults: float32 in Arrow files, shuffle=True
  lens-f16    the same with dtype float16 (Arrow has no bfloat16)

Trainers: one optimizer step at a time on the same scaled batches from our shuffled reader, d_in = d_model,
F = 8·d, k = 32, B = 4096, fp32: ours (BatchTopK and TopK), sae-lens `SAETrainer` (BatchTopK, as in
benchmarks/train.py), dictionary_learning `BatchTopKTrainer.update`, and sparsify's `SparseCoder` driven through
the per-step work of its `Trainer.fit` (sparsify trains TopK only, on live model activations, so it is compared
with our TopK). A peer that does not import is reported with the reason.

    python benchmarks/peers.py                # the documented run (several minutes on 2 cores)
    python benchmarks/peers.py --reps 1 --rounds 1 --steps 1 --no-doc   # a quick look

Prints Markdown and rewrites the "Peers" section of docs/benchmarks.md (unless --no-doc).
"""

from __future__ import annotations

import os

# Everything here is local; never let a library try the hub. No progress bars from either side.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import importlib.metadata
import logging
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, machine, write_section

from sae import store
from sae.config import DEFAULT_MODEL, HarvestConfig, TrainConfig
from sae.corpus import iter_contexts
from sae.harvest import harvest
from sae.models import embedded_model_dir, load_model, load_tokenizer
from sae.saedir import sweep
from sae.sites import SITE_TABLE, capture, parse_site
from sae.train.reader import ChunkReader
from sae.train.trainer import make_plan, make_run, train_step
from train import SaeLens, sync

DOC = ROOT / "docs" / "benchmarks.md"
TRAIN = str(Path(__file__).resolve().parents[2] / "shared" / "corpus" / "train.jsonl.gz")
PEER_INSTALL = (
    "pip install --no-deps eai-sparsify==1.3.3 dictionary-learning==0.1.0 nnsight==0.3.7 natsort schedulefree "
    "python-socketio python-engineio bidict simple-websocket wsproto"
)
"""How the trainer peers were installed next to sae-lens (see the section text for why --no-deps)."""


def dir_bytes(path: Path) -> int:
    """Bytes of all files under `path`: what the cache takes on disk, metadata included."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------------
# Part 1: the activation caches.


@dataclass
class Setup:
    """What both caches are made of: model, site, corpus, context packing, batching and shard size."""

    model: str
    model_dir: Path
    site: str
    layer: int
    lens_hook: str
    d: int
    dataset: str
    seq_len: int
    tokens: int
    batch_size: int
    shard_rows: int
    shard_chunks: int


@dataclass
class CacheSide:
    name: str
    label: str
    stored: str
    run: Callable[[Path], None]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    disk: int = 0


def run_ours(s: Setup, out: Path, dtype: str) -> None:
    cfg = HarvestConfig(
        out=out,
        sites=(s.site,),
        model=s.model,
        dataset=s.dataset,
        seq_len=s.seq_len,
        max_tokens=s.tokens,
        batch_size=s.batch_size,
        dtype=dtype,  # type: ignore[arg-type]
        shard_chunks=s.shard_chunks,
        device="cpu",
    )
    with contextlib.redirect_stdout(sys.stderr):  # harvest prints its summary
        harvest(cfg)


def run_lens(s: Setup, out: Path, dtype: str) -> None:
    from datasets import Dataset
    from sae_lens.cache_activations_runner import CacheActivationsRunner
    from sae_lens.config import CacheActivationsRunnerConfig

    # The pre-tokenization step a sae-lens user runs first, with our packer so the contexts are ours exactly.
    tokenizer = load_tokenizer(s.model)
    ids = np.stack(list(iter_contexts(s.dataset, tokenizer, seq_len=s.seq_len, max_tokens=s.tokens)))
    bytes_per_token = s.d * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    cfg = CacheActivationsRunnerConfig(
        dataset_path=s.dataset,
        model_name=str(s.model_dir),
        model_class_name="AutoModelForCausalLM",  # sae-lens' HookedProxyLM around the Hugging Face model
        model_from_pretrained_kwargs={"dtype": torch.float32},
        hook_name=s.lens_hook,
        d_in=s.d,
        context_size=s.seq_len,
        training_tokens=ids.size,
        model_batch_size=s.batch_size,
        new_cached_activations_path=str(out),
        dtype=dtype,
        device="cpu",
        # One buffer (= one shard file) per our shard; rounding down must not lose a batch.
        buffer_size_gb=(s.shard_rows * bytes_per_token + bytes_per_token // 2) / 1e9,
    )
    assert cfg.n_tokens_in_buffer == s.shard_rows, (cfg.n_tokens_in_buffer, s.shard_rows)
    CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": ids})).run()


def ours_context(path: Path, site: str, context: int, seq_len: int) -> np.ndarray:
    """The rows of packed context `context` in our store, in position order, as float32 [seq_len, d]."""
    st = store.Store.open(path)
    out = np.full((seq_len, st.d_model), np.nan, np.float32)
    found = 0
    for i in st.complete_chunks():
        meta = st.chunk_meta(i)
        mask = np.asarray(meta.context) == context
        if mask.any():
            out[np.asarray(meta.position)[mask]] = st.chunk(site, i).float().numpy()[mask]
            found += int(mask.sum())
        if found == seq_len:
            break
    return out


def lens_context(path: Path, hook: str, context: int) -> np.ndarray:
    """Row `context` of the sae-lens cache as float32 [seq_len, d] (its files keep the order it computed them in;
    shuffle=True only adds an indices mapping)."""
    import datasets

    ds = datasets.load_from_disk(str(path)).with_format("numpy")
    return np.asarray(ds[context][hook], dtype=np.float32)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ over positions 1.. (BOS rows are ~100× larger and would hide everything else)."""
    return float(np.linalg.norm(a[1:] - b[1:]) / np.linalg.norm(b[1:]))


def cache_part(s: Setup, reps: int, tmp: Path) -> tuple[list[CacheSide], dict[str, float], list[float]]:
    blosc, arrow = "Blosc zstd-1 + byte shuffle", "Arrow, uncompressed"
    lens = f"sae-lens {version('sae-lens')} `CacheActivationsRunner`"
    sides = [
        CacheSide("ours", "ours: `sae harvest`", f"bfloat16, {blosc}", lambda p: run_ours(s, p, "bfloat16")),
        CacheSide("ours-f32", "ours, `--dtype float32`", f"float32, {blosc}", lambda p: run_ours(s, p, "float32")),
        CacheSide("lens", lens, f"float32, {arrow}", lambda p: run_lens(s, p, "float32")),
        CacheSide("lens-f16", 'sae-lens, `dtype="float16"`', f"float16, {arrow}", lambda p: run_lens(s, p, "float16")),
    ]
    load = [os.getloadavg()[0]]
    for rep in range(reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            out = tmp / side.name
            shutil.rmtree(out, ignore_errors=True)
            t, c = time.perf_counter(), time.process_time()
            side.run(out)
            side.wall.append(time.perf_counter() - t)
            side.cpu.append(time.process_time() - c)
            side.disk = dir_bytes(out)
            load.append(os.getloadavg()[0])
            print(f"rep {rep} {side.name}: {side.wall[-1]:.1f} s wall, {side.cpu[-1]:.1f} s CPU", file=sys.stderr)
    # The caches hold the same numbers: context 0 read back from each (outside all timing).
    lens32 = lens_context(tmp / "lens", s.lens_hook, 0)
    check = {
        "ours-f32": rel_diff(ours_context(tmp / "ours-f32", s.site, 0, s.seq_len), lens32),
        "ours": rel_diff(ours_context(tmp / "ours", s.site, 0, s.seq_len), lens32),
        "lens-f16": rel_diff(lens_context(tmp / "lens-f16", s.lens_hook, 0), lens32),
    }
    return sides, check, load


# --------------------------------------------------------------------------------------------------
# Part 2: the trainers, on batches of one store.


class Ours:
    """Our training step (`sae.train.trainer.train_step`), as `sae train` runs it, for one architecture."""

    def __init__(self, cfg: TrainConfig, arch: str, d: int, scale: float, x0: torch.Tensor):
        self.cfg = TrainConfig(**{**cfg.__dict__, "arch": (arch,)})
        (point,) = sweep(self.cfg)
        self.plan = make_plan(self.cfg, 10**9, scale)
        torch.manual_seed(0)
        variance = store.Store.open(cfg.store).stats(cfg.site, skip_bos=True).variance * scale**2
        self.run = make_run(self.cfg, point, d, x0.device, scale, variance)
        self.run.sae.init_from_sample(x0)
        self.run.sae.choose_decoder(x0)  # as `sae train` does on its first batch with --decoder auto
        self.decoder = "sparse" if self.run.sae.sparse_max_density > 0 else "dense"
        self.n = 0

    def step(self, x: torch.Tensor) -> None:
        train_step(self.run, x, self.run.lr, self.n, self.plan, self.cfg, contextlib.nullcontext())
        self.n += 1


class DictionaryLearning:
    """dictionary_learning's `BatchTopKTrainer`, one `update(step, x)` per step as its `trainSAE` loop calls it
    (the first call, in the untimed warm-up, sets b_dec to the batch's geometric median)."""

    def __init__(self, d: int, f: int, k: int, device: torch.device):
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

        # A long run, as our plan's: its lr warm-up and threshold start are then 1000 steps in, like ours.
        self.trainer = BatchTopKTrainer(
            steps=10**6, activation_dim=d, dict_size=f, k=k, layer=0, lm_name="peers", device=str(device), seed=0
        )
        self.n = 0

    def step(self, x: torch.Tensor) -> None:
        self.trainer.update(self.n, x)
        self.n += 1


class Sparsify:
    """EleutherAI sparsify's `SparseCoder` (TopK) with the per-step work of its `Trainer.fit` for loss_fn="fvu" and
    its default optimizer (signum with schedule-free momentum): sparsify only trains on live model activations,
    so its hook body and step body are replayed here, in its order, on our batches."""

    def __init__(self, d: int, f: int, k: int, device: torch.device):
        with contextlib.redirect_stdout(sys.stderr):  # it prints which decoder kernel it uses
            from schedulefree import ScheduleFreeWrapper
            from sparsify import SparseCoder, SparseCoderConfig
            from sparsify.sign_sgd import SignSGD

        torch.manual_seed(0)
        self.sae = SparseCoder(d, SparseCoderConfig(activation="topk", num_latents=f, k=k), device, torch.float32)
        lr = 5e-3 / (self.sae.num_latents / 2**14) ** 0.5  # Trainer's default for signum
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(), "lr": lr}]), momentum=0.95)
        self.opt.train()
        self.fired_since = torch.zeros(f, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(f, dtype=torch.bool, device=device)
        self.n = 0

    def step(self, x: torch.Tensor) -> None:
        sae = self.sae
        if self.n == 0:
            sae.b_dec.data = x.mean(0)  # Trainer: b_dec starts at the first batch's mean
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)  # auxk_alpha defaults to 0
        self.did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # its running FVU average for the log (a host sync)
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.fired_since += len(x)
        self.fired_since[self.did_fire] = 0
        self.did_fire.zero_()
        self.n += 1


@dataclass
class Trainer:
    name: str
    label: str
    versus: str | None  # the name of our trainer it is compared with
    step: Callable[[torch.Tensor], Any]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def make_peer(name: str, make: Callable[[], Any]) -> tuple[Any, str | None]:
    """The peer, or None and why it could not be set up."""
    try:
        return make(), None
    except ImportError as e:
        return None, f"`{e.name or e}` does not import ({type(e).__name__}: {e})"


def trainer_part(
    path: Path, what: str, site: str, k: int, expansion: int, b: int, rounds: int, steps: int
) -> tuple[list[Trainer], dict[str, str], str, list[float]]:
    device = torch.device("cpu")
    st = store.Store.open(path)
    d = st.d_model
    f = expansion * d
    scale = math.sqrt(d) / st.stats(site, skip_bos=True).mean_norm
    cfg = TrainConfig(store=path, site=site, k=(k,), expansion=(expansion,), batch_size=b)
    feed = ChunkReader(st, site, batch_size=b, device=device, seed=1, val_chunks=0)  # nothing is validated
    x0 = feed.next_batch().x * scale
    total = (rounds + 1) * steps + 2
    trainers: list[Trainer] = []
    missing: dict[str, str] = {}
    ours = {arch: Ours(cfg, arch, d, scale, x0) for arch in ("batchtopk", "topk")}
    for arch, o in ours.items():
        trainers.append(Trainer(arch, f"ours, {arch} ({o.decoder} decoder)", None, o.step))
    peers: list[tuple[str, str, str, Callable[[], Any]]] = [
        ("sae-lens", f"sae-lens {version('sae-lens')} `SAETrainer`, batchtopk", "batchtopk",
         lambda: SaeLens(d, f, k, b, ours["batchtopk"].run.lr, device, total)),
        ("dictionary_learning", f"dictionary_learning {version('dictionary-learning')} `BatchTopKTrainer`",
         "batchtopk", lambda: DictionaryLearning(d, f, k, device)),
        ("sparsify", f"sparsify (eai-sparsify {version('eai-sparsify')}) `SparseCoder`, topk", "topk",
         lambda: Sparsify(d, f, k, device)),
    ]  # fmt: skip
    for name, label, versus, make in peers:
        peer, why = make_peer(name, make)
        if peer is None:
            missing[name] = why or "?"
        else:
            trainers.append(Trainer(name, label, versus, peer.step))

    def run(t: Trainer, timed: bool) -> None:
        for _ in range(steps):
            x = feed.next_batch().x * scale
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            t.step(x)
            sync(device)
            if timed:
                t.wall.append(time.perf_counter() - w)
                t.cpu.append(time.process_time() - c)

    load = [os.getloadavg()[0]]
    for t in trainers:  # warm-up, not counted
        run(t, timed=False)
    for rnd in range(rounds):
        print(f"trainers: round {rnd + 1}/{rounds}", file=sys.stderr)
        for t in trainers if rnd % 2 == 0 else trainers[::-1]:
            run(t, timed=True)
            load.append(os.getloadavg()[0])
    feed.close()
    data = (
        f"d={d}, F={f}, k={k}, B={b}, fp32 on CPU, input scaled so E‖x‖ = √d, batches from our shuffled reader "
        f"over {what} ({st.n_rows:,} rows of {st.attrs['model']['id']} `{site}`)"
    )
    return trainers, missing, data, load


# --------------------------------------------------------------------------------------------------
# Report.


def tps(tokens: int, times: list[float]) -> float:
    return tokens * len(times) / sum(times)


def cache_table(s: Setup, sides: list[CacheSide], check: dict[str, float]) -> str:
    base = next(x for x in sides if x.name == "lens")
    raw32 = 4 * s.d
    rows = [
        "| cache | stored as | tokens/s (wall) | tokens/s (CPU) | × sae-lens default, wall (CPU) "
        "| bytes/token on disk | × 4·d | same context vs sae-lens float32 |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for x in sides:
        wall = statistics.median(b / a for a, b in zip(x.wall, base.wall, strict=True))
        cpu = statistics.median(b / a for a, b in zip(x.cpu, base.cpu, strict=True))
        diff = "reference" if x is base else f"{check[x.name]:.1e} relative"
        rows.append(
            f"| {x.label} | {x.stored} | {tps(s.tokens, x.wall):,.0f} | {tps(s.tokens, x.cpu):,.0f} "
            f"| {wall:.2f} ({cpu:.2f}) | {x.disk / s.tokens:,.0f} | {x.disk / s.tokens / raw32:.3f} | {diff} |"
        )
    return "\n".join(rows)


def trainer_table(trainers: list[Trainer], b: int) -> str:
    by_name = {t.name: t for t in trainers}
    rows = [
        "| trainer | tokens/s (wall) | tokens/s (CPU) | ours × it, wall (CPU) |",
        "|---|---:|---:|---|",
    ]
    for t in trainers:
        wall, cpu = b / statistics.median(t.wall), b / statistics.median(t.cpu)
        ratio = "reference"
        if t.versus is not None:
            o = by_name[t.versus]
            ratio = (
                f"{statistics.median(t.wall) / statistics.median(o.wall):.2f} "
                f"({statistics.median(t.cpu) / statistics.median(o.cpu):.2f}) vs ours {t.versus}"
            )
        rows.append(f"| {t.label} | {wall:,.0f} | {cpu:,.0f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per cache (a multiple of the shard size)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each cache side, interleaved")
    ap.add_argument("--site", default="blocks.15.hook_resid_post", help="a resid_post site (what sae-lens hooks)")
    ap.add_argument("--dataset", default=TRAIN)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="contexts per forward, both sides")
    ap.add_argument("--shard-chunks", type=int, default=1, help="our shard in chunks; sae-lens' buffer matches it")
    ap.add_argument("--store", type=Path, help="train on this store (default: the bfloat16 cache written above)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved trainer rounds; medians are reported")
    ap.add_argument("--steps", type=int, default=2, help="steps of each trainer per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    command = " ".join(["python benchmarks/peers.py", *map(shlex.quote, sys.argv[1:])])
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(sae_lens|datasets|transformers)(\.|$)")
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()

    # Imports and first calls outside every timing: sae-lens' modules take seconds to import.
    import sae_lens.cache_activations_runner  # noqa: F401

    model, _, info = load_model(DEFAULT_MODEL, device="cpu")
    site = parse_site(args.site, model)
    if site.kind != "resid_post":
        raise SystemExit("sae-lens hooks module outputs: pick a blocks.L.hook_resid_post site")
    module = SITE_TABLE[info.architecture]["resid_post"][0].format(L=site.layer)
    with torch.inference_mode():  # warm-up of this process: first-call allocations and kernel selection
        ids = np.stack(list(iter_contexts(args.dataset, load_tokenizer(), seq_len=args.seq_len, max_tokens=4096)))
        capture(model, [site], torch.from_numpy(ids[: args.batch_size]).long())
    chunk_rows = store.default_chunk_rows(info.d_model)
    s = Setup(
        model=DEFAULT_MODEL,
        model_dir=embedded_model_dir()[0],  # the converted safetensors copy `sae harvest` loads too
        site=site.name,
        layer=site.layer,
        lens_hook=f"{model.base_model_prefix}.{module}",
        d=info.d_model,
        dataset=args.dataset,
        seq_len=args.seq_len,
        tokens=args.tokens // args.seq_len * args.seq_len,
        batch_size=args.batch_size,
        shard_rows=chunk_rows * args.shard_chunks,
        shard_chunks=args.shard_chunks,
    )
    del model
    if s.tokens % s.shard_rows:
        raise SystemExit(f"--tokens must be a multiple of the shard size ({s.shard_rows} rows)")

    with tempfile.TemporaryDirectory(prefix="sae-peers-") as tmp:
        sides, check, load_c = cache_part(s, args.reps, Path(tmp))
        cache = cache_table(s, sides, check)
        print(cache)
        trainers, missing, data, load_t = trainer_part(
            args.store or Path(tmp) / "ours",
            f"`{args.store}`" if args.store else "the bfloat16 cache `sae harvest` wrote above",
            s.site,
            args.k,
            args.expansion,
            args.train_batch,
            args.rounds,
            args.steps,
        )
    train = trainer_table(trainers, args.train_batch)
    print(train)
    for name, why in missing.items():
        print(f"{name}: {why}")
    if not args.no_doc:
        write_doc(s, args, command, cache, train, missing, data, load_c + load_t)


def write_doc(
    s: Setup,
    args: argparse.Namespace,
    command: str,
    cache: str,
    train: str,
    missing: dict[str, str],
    data: str,
    load: list[float],
) -> None:
    cores = os.cpu_count() or 1
    not_run = "".join(f"\n- {name} could not be run here: {why}." for name, why in missing.items())
    section = f"""## Peers

Command: `{command}`, in this project's environment with sae-lens installed (the `test` extra) and the trainer
peers added by `{PEER_INSTALL}`.

Machine: {machine()}; measured {time.strftime("%Y-%m-%d")}; 1-min load average during the run
{min(load):.1f}–{max(load):.1f} on {cores} cores (other jobs shared the machine, so absolute tokens/s are low and
move with them; every side saw the same load, interleaved, and the CPU-time figures move less with it).

### Activation cache: `sae harvest` vs sae-lens `CacheActivationsRunner`

SmolLM2-135M-Instruct (`{s.model}`: Q4_1 GGUF dequantised to float32, on CPU, both sides load the same
converted safetensors), site `{s.site}` (for
sae-lens `{s.lens_hook}` through its `HookedProxyLM`), {s.tokens:,} tokens per cache: the first
{s.tokens // s.seq_len} packed contexts of `{s.dataset}`, seq_len {s.seq_len}, BOS first, in forward batches of
{s.batch_size} contexts, written in shards of {s.shard_rows:,} tokens (our shard; sae-lens' `buffer_size_gb` set
to the same tokens). Each side runs end to end into a fresh folder: model load, tokenization and packing (sae-lens
gets a pre-tokenized `datasets.Dataset` made by our packer inside its timing, so both caches hold exactly the same
tokens), the forward (both stop after block {s.layer}: ours by `sae.sites.capture`, sae-lens by its
`stop_at_layer` hook), conversion and writing, then our manifest and sae-lens' shard consolidation and shuffle.
{args.reps} repetitions of each side, the order reversed every repetition; tokens/s from the total time, the
ratios are medians of the per-repetition ratios (sae-lens' time over the side's time: above 1 is faster than
sae-lens' default). Bytes are everything in the folder: our store also keeps the token id, context and position of
every row and the packed contexts; sae-lens keeps the activations and the token ids. The last column reads context
0 back from each cache: ‖difference‖/‖sae-lens float32‖ over positions 1..{s.seq_len - 1}.

{cache}

What differs besides the code:

- Storage dtype: our default keeps bfloat16 (the model's float32 rounded; the last column shows what that
  costs), sae-lens' default float32. `--dtype float32` (ours) and `dtype="float16"` (sae-lens; Arrow has no
  bfloat16) give the same-width pairs.
- Compression: our chunks are Blosc zstd-1 with byte shuffle; sae-lens writes uncompressed Arrow.
- Shuffling: we permute the rows (tokens) within each shard on disk; sae-lens' `shuffle=True` permutes whole
  contexts through an indices file beside the unshuffled data, and its trainer later mixes tokens in memory.
- Work beyond the activations: ours also checksums every shard, writes the context and position of every row and
  the packed contexts, and computes the per-site statistics (mean, norm, variance) the trainer scales its input
  by; sae-lens writes the token ids only.
- Concurrency: ours writes shard s on a background thread while the forward computes shard s+1; sae-lens
  computes, then writes, one buffer at a time.

### Trainers on the same activations

{data}. One warm-up round, then {args.rounds} interleaved rounds of {args.steps} steps of each trainer; medians per
step. Each peer runs its own defaults for what the config leaves open (optimizer, learning rate, auxiliary loss);
these cost little next to the encoder and decoder products. sparsify trains TopK only and so is compared with our
TopK; sae-lens and dictionary_learning with our BatchTopK.

{train}

- sae-lens' trainer is measured as in the Train section (`benchmarks/train.py`'s driver).
- dictionary_learning (Marks et al., PyPI `dictionary-learning`): its trainer runs as it is. Its package
  imports nnsight (for its activation buffer), and nnsight's 0.3 series requires torchvision, whose current
  release pulls in a newer torch with CUDA libraries in place of this project's tested CPU torch; so the peers
  were installed without their declared dependencies (nnsight, wandb, umap-learn, circuitsvis, ...), plus the
  few small modules their imports need.
- sparsify (EleutherAI, PyPI `eai-sparsify`; PyPI `sparsify` is an unrelated, deprecated Neural Magic tool):
  its `Trainer` only trains on activations hooked from a live model, with no way to feed cached ones, so its
  `SparseCoder`, fused TopK encoder, sparse decoder (the eager `embedding_bag` path, as Triton is not
  installed here) and optimizer run here in the order its `fit` loop runs them.{not_run}
- Other SAE trainers on PyPI (e.g. `sparse-autoencoder`, OpenMOSS' lm-saes as `llamascopium`) were not run: this
  section covers sae-lens, sparsify and dictionary_learning.
"""
    write_section(DOC, "Peers", section)
    print(f"wrote the Peers section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
