"""The training loop (nanoGPT-style, linear): one read of the data trains every SAE of a sweep.

    store ──ChunkReader──> x (raw, fp32 on device) ──·c──> each SAE: forward, backward, clip, Adam, renorm, θ

c = √d / E‖x‖ is one dataset-level scalar from the store's manifest; `TrainingSae.export` folds it back.
Checkpoints (sae.train.checkpoint) hold everything the loop's future depends on, so a run killed at any moment
and resumed ends with the very weights of an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae import __version__, atomic
from sae.config import TrainConfig, to_dict
from sae.device import resolve_device
from sae.errors import SaeError
from sae.saedir import batch_topk_indices, is_complete, sweep
from sae.store import Store

from . import checkpoint
from .reader import ChunkReader, Rows, merge_states, read_rows
from .sae import TrainingSae

RUN_FILE = "run.json"
"""Written into `out` when a run starts: its config and store, so a rerun can tell whether `out` is its own."""

LOG_FILE = "train_log.jsonl"
"""Training log in each SAE directory: one JSON object per line, `split` "train" or "val"."""

LOG_DIR = "logs"
"""Where the logs grow during training (`out/logs/<sae>.jsonl`); each save of an SAE copies its log into the SAE
directory, so a kill during that save (which swaps the directory) never loses log lines."""

STATE_VERSION = 1
GEOMEDIAN_ROWS = 8192
VAL_MAX_ROWS = 8192
THETA_L0_ROWS = 1024
# Settings a resumed run may change: they do not alter what is computed (the reader's buffer size and the
# decoder choice live in the checkpoint).
RESUMABLE_CHANGES = {"resume", "device", "log_every", "buffer_mb", "checkpoint_every", "store", "out"}


class TrainingInterrupted(SaeError):
    """SIGTERM/SIGINT stopped the run after a checkpoint; rerun with --resume."""


class Dist(NamedTuple):
    """This process's place in a torchrun (DDP) run. Rank r trains on the r-th contiguous 1/N of each global batch,
    which its reader draws from its own lanes (disjoint chunks); the global batches, and so the BatchTopK selection
    and the weights, are those of one process reading the same lanes."""

    rank: int
    """This process's rank."""
    world: int
    """Number of ranks (1: no torch.distributed)."""
    group: Any = None
    """The process group (None in one process)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and SAEs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


SINGLE = Dist(0, 1)


def _init_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on cuda:LOCAL_RANK); return the
    context, the device and whether this call created the group (and must destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world <= 1:
        return SINGLE, device, False
    if cfg.batch_size % world:
        raise SaeError(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dist.group.WORLD), device, created


def _broadcast_state(runs: list[SaeRun], d: Dist) -> None:
    """Make every rank start from rank 0's parameters and buffers (they agree already; this guards it)."""
    for r in runs:
        for t in [*r.sae.parameters(), *r.sae.buffers()]:
            dist.broadcast(t.data, 0, group=d.group)


def _all_reduce_grads(sae: TrainingSae, d: Dist) -> None:
    """Sum the gradients over the ranks (each rank's loss is its share of the global loss), one collective."""
    params = [p for p in sae.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=d.group)
    off = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(g).to(g.dtype)
        off += n


def _reduce_output(o: Any, d: Dist) -> Any:
    """The global-batch losses and L0 of a step: the sums of the ranks' shares (see SaeOutput)."""
    if d.group is None:
        return o
    keys = ("loss", "fvu", "mse", "aux_loss", "sparsity_loss", "l0")
    t = torch.stack([getattr(o, k).detach().float().reshape(()) for k in keys])
    dist.all_reduce(t, group=d.group)
    return o._replace(**dict(zip(keys, t.unbind(), strict=True)))


class Plan(NamedTuple):
    """The run's length and the schedules derived from it (defaults scale with the run)."""

    steps: int
    """Optimizer steps."""
    batch_size: int
    """Rows per step."""
    warmup_steps: int
    """Linear lr warm-up: min(1000, 5% of the steps) by default."""
    decay_steps: int
    """Linear lr decay to 0 over the last steps: `decay_fraction` of the run."""
    dead_tokens: int
    """A latent is dead after this many tokens without firing: min(10M, 10% of the run) by default."""
    theta_start: int
    """First step of the θ EMA: min(1000, 10% of the steps) by default."""
    theta_decay: float
    """Per-step decay of the θ EMA: min(0.99, 1 − 1/(10% of the steps)) by default."""
    checkpoint_steps: int
    """Steps between checkpoints: 10 per run by default."""
    input_scale: float
    """c with E‖c·x‖ = √d over the training rows' BOS handling."""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr at `step` (0-based): warm-up ramp, plateau, linear decay to 0."""
        f = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            f = (step + 1) / self.warmup_steps
        if self.decay_steps and step >= self.steps - self.decay_steps:
            f = min(f, (self.steps - step) / self.decay_steps)
        return f


def make_plan(cfg: TrainConfig, train_rows: int, input_scale: float) -> Plan:
    """Resolve the run length and the scaled defaults of `cfg`."""
    b = cfg.batch_size
    tokens = cfg.tokens if cfg.tokens is not None else train_rows
    steps = tokens // b
    if steps < 1:
        raise SaeError(
            f"--tokens {tokens} is less than one batch of --batch-size {b} (the store's training rows: {train_rows})"
        )
    if cfg.log_every < 1:
        raise SaeError(f"--log-every must be at least 1, got {cfg.log_every}")
    if not 0 <= cfg.decay_fraction <= 1:
        raise SaeError(f"--decay-fraction must lie in [0, 1], got {cfg.decay_fraction}")
    every = cfg.checkpoint_every if cfg.checkpoint_every is not None else steps * b // 10
    return Plan(
        steps=steps,
        batch_size=b,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, steps // 20),
        decay_steps=int(cfg.decay_fraction * steps),
        dead_tokens=max(b, cfg.dead_tokens if cfg.dead_tokens is not None else min(10_000_000, steps * b // 10)),
        theta_start=cfg.theta_warmup_steps if cfg.theta_warmup_steps is not None else min(1000, steps // 10),
        theta_decay=cfg.theta_ema if cfg.theta_ema is not None else min(0.99, 1 - 1 / max(1.0, steps / 10)),
        checkpoint_steps=max(1, every // b),
        input_scale=input_scale,
    )


def default_lr(d_sae: int) -> float:
    """2e-4 / √(F / 2¹⁴) (the BatchTopK paper's scaling rule)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass
class SaeRun:
    """One SAE of the sweep with its optimizer and output directory."""

    name: str
    """Sweep point name, also the directory name."""
    sae: TrainingSae
    """The module being trained."""
    opt: torch.optim.Adam
    """Its Adam."""
    lr: float
    """Base learning rate."""
    dir: Path
    """Its SAELens-format output directory."""
    log: Any = None
    """Its open log file, out/logs/<name>.jsonl (append)."""

    @property
    def log_path(self) -> Path:
        return self.dir.parent / LOG_DIR / f"{self.name}.jsonl"


# --------------------------------------------------------------------------------------------------
# Setup


def _store_identity(store: Store, site: str) -> dict[str, Any]:
    a = store.attrs
    return {
        "path": str(Path(store.path).resolve()),
        "site": site,
        "d_model": store.d_model,
        "n_rows": store.n_rows,
        "chunk_rows": store.chunk_rows,
        "dtype": store.dtype,
        "model": a.get("model"),
        "corpus": a.get("corpus"),
        "seq_len": store.seq_len,
        "seed": a.get("seed"),
    }


def _open_store(cfg: TrainConfig) -> tuple[Store, str]:
    store = Store.open(cfg.store)
    site = cfg.site
    if not site:
        if len(store.sites) != 1:
            raise SaeError(f"--site is required: store {cfg.store} has sites {', '.join(store.sites)}")
        site = store.sites[0]
    if site not in store.sites:
        raise SaeError(f"store {cfg.store} has no site {site!r}; its sites: {', '.join(store.sites)}")
    return store, site


def _compare_config(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    diff = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if diff:
        shown = "; ".join(f"--{k.replace('_', '-')}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise SaeError(
            f"{out} holds a run with other settings ({shown}). Nothing was changed; rerun with the same settings, "
            "or choose another --out"
        )


def _compare_store(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    if old["d_model"] != new["d_model"]:
        raise SaeError(
            f"the run in {out} trained on d_model {old['d_model']}, but store {new['path']} has d_model "
            f"{new['d_model']}; resume with the store it was trained on"
        )
    if old["site"] != new["site"]:
        raise SaeError(f"the run in {out} trained on site {old['site']!r}, this run asks for {new['site']!r}")
    diff = [k for k in old if k != "path" and old[k] != new.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old[k]!r} then, {new.get(k)!r} now" for k in diff)
        raise SaeError(f"store {new['path']} is not the store the run in {out} trained on ({shown})")


def _check_out(cfg: TrainConfig, names: list[str], run_info: dict[str, Any]) -> str:
    """Decide what to do with `out`: "fresh", "resume" or "done"; SaeError when it holds something else."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaeError(f"--out {out} exists and is not a directory")
    old = _read_json(out / RUN_FILE)
    has_ckpt = checkpoint.exists(out)
    present = [n for n in [*names, LOG_DIR] if (out / n).exists()]
    if old is None:
        if has_ckpt or present:
            what = "a checkpoint" if has_ckpt else f"directories {', '.join(present)}"
            raise SaeError(
                f"--out {out} already holds {what} but no {RUN_FILE}; not ours to overwrite. Choose another --out"
            )
        if cfg.resume:
            raise SaeError(f"--resume: {out} holds no training run to resume; run without --resume")
        return "fresh"
    _compare_config(old.get("config", {}), run_info["config"], out)
    _compare_store(old["store"], run_info["store"], out)
    if has_ckpt:
        if not cfg.resume:
            raise SaeError(
                f"--out {out} holds a run with a checkpoint ({checkpoint.latest_name(out)}); pass --resume to "
                "continue it, or choose another --out. Nothing was changed"
            )
        return "resume"
    if names and all(is_complete(out / n) for n in names):
        if not cfg.resume:
            raise SaeError(f"--out {out} holds a finished run of these settings; choose another --out")
        return "done"
    return "fresh"  # a run of the same settings that died before its first checkpoint: nothing to keep


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _make_optimizer(sae: TrainingSae, lr: float) -> torch.optim.Adam:
    # one group per lr multiple (jumprelu's θ has its own); `train_step` sets lr = base·lr_scale per group
    try:
        return torch.optim.Adam(sae.param_groups(lr), lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.Adam(sae.param_groups(lr), lr=lr, betas=(0.9, 0.999))


def make_run(cfg: TrainConfig, point: Any, d_in: int, device: torch.device, input_scale: float) -> SaeRun:
    """The SAE of sweep point `point` (sae.saedir.SweepPoint), freshly initialised, with its Adam."""
    sae = TrainingSae.from_config(cfg, point, d_in, device=device)
    if sae.k is not None and sae.k > sae.d_sae:
        raise SaeError(f"{point.name}: k={sae.k} exceeds the dictionary size {sae.d_sae}")
    sae.set_input_scale(input_scale)
    lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae)
    return SaeRun(point.name, sae, _make_optimizer(sae, lr), lr, Path(cfg.out) / point.name)


# --------------------------------------------------------------------------------------------------
# Checkpoint (de)serialisation


def _rng_tensors() -> dict[str, torch.Tensor]:
    t = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"rng/cuda/{i}"] = s
    return t


def _reader_state(reader: ChunkReader, d: Dist) -> dict[str, Any]:
    """The whole reader's state: each rank knows the positions of the lanes it reads."""
    if d.group is None:
        return reader.state_dict()
    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, reader.state_dict(), group=d.group)
    return merge_states(states)


def _save_checkpoint(
    out: Path, step: int, runs: list[SaeRun], reader_state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    tensors = _rng_tensors()
    saes: dict[str, Any] = {}
    for r in runs:
        for k, v in r.sae.state_dict().items():
            tensors[f"{r.name}/sae/{k}"] = v
        sd = r.opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{r.name}/opt/{i}/{k}"] = v
        if r.log is not None:
            r.log.flush()
        saes[r.name] = {
            "param_groups": sd["param_groups"],
            "sparse_max_density": r.sae.sparse_max_density,
            "density": r.sae._density,
            "log_bytes": r.log_path.stat().st_size if r.log_path.exists() else 0,
        }
    state = {
        "version": STATE_VERSION,
        "tool_version": __version__,
        "step": step,
        "reader": reader_state,
        "saes": saes,
        "python_random": _jsonable(random.getstate()),
        **meta,
    }
    return checkpoint.save(out, step, tensors, state)


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _restore(ck: checkpoint.Checkpoint, runs: list[SaeRun], truncate_logs: bool = True) -> None:
    t = ck.tensors
    for r in runs:
        info = ck.state["saes"].get(r.name)
        if info is None:
            raise SaeError(f"checkpoint {ck.path} has no SAE {r.name!r}; it was made by another sweep")
        prefix = f"{r.name}/sae/"
        sd = {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
        try:
            r.sae.load_state_dict(sd)
        except RuntimeError as e:
            raise SaeError(f"checkpoint {ck.path} does not fit SAE {r.name}: {e}") from None
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"{r.name}/opt/"
        for k, v in t.items():
            if k.startswith(prefix):
                i, name = k[len(prefix) :].split("/")
                opt_state.setdefault(int(i), {})[name] = v
        groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]
        r.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        r.sae.sparse_max_density = info["sparse_max_density"]
        r.sae._density = info["density"]
        # drop the lines logged after the checkpoint: the resumed run logs them again
        if truncate_logs and r.log_path.exists():
            with open(r.log_path, "r+b") as f:
                f.truncate(min(info["log_bytes"], r.log_path.stat().st_size))
    torch.set_rng_state(t["rng/torch"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(k for k in t if k.startswith("rng/cuda/"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuples(ck.state["python_random"]))


# --------------------------------------------------------------------------------------------------
# Signals: finish the step, checkpoint, exit non-zero


class _StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def validate(sae: TrainingSae, val: Rows, batch_size: int, device: torch.device) -> dict[str, float]:
    """FVU, NMSE and mean L0 of the exported (raw-unit) SAE on held-out rows, in threshold mode (θ / JumpReLU,
    per-row for topk) and batch mode (batch top-k over batches of `batch_size` rows; BatchTopK only, the same
    as threshold mode for the others)."""
    inf = sae.export().to(device)
    modes = ("theta", "batch")
    sums = {m: [0.0, 0.0] for m in modes}  # squared error, active latents
    n, sq, total = 0, 0.0, None
    for i in range(0, len(val.x), batch_size):
        x = val.x[i : i + batch_size].to(device).float()
        n += len(x)
        sq += float(x.double().pow(2).sum())
        s = x.double().sum(0)
        total = s if total is None else total + s
        if inf.batch_topk:  # one encoder pass for both modes
            pre = inf.pre_acts(x)
            by_mode = {"theta": pre.relu() * (pre > inf.threshold)}
            idx = batch_topk_indices(pre, round(float(inf.cfg.k) * len(x)))
            a = torch.zeros_like(pre)
            a.view(-1)[idx] = pre.reshape(-1)[idx]
            by_mode["batch"] = a
        else:
            a = inf.encode(x)
            by_mode = {"theta": a, "batch": a}
        for m, a in by_mode.items():
            x_hat = _decode(inf, a)
            sums[m][0] += float((x_hat - x).double().pow(2).sum())
            sums[m][1] += float((a != 0).sum())
    var = sq - float(total.pow(2).sum()) / n  # Σ‖x − x̄‖²
    out = {}
    for m, (se, act) in sums.items():
        out[f"fvu_{m}"] = se / max(var, 1e-30)
        out[f"nmse_{m}"] = se / max(sq, 1e-30)
        out[f"l0_{m}"] = act / n
    return out


def _decode(inf: Any, a: torch.Tensor) -> torch.Tensor:
    """inf.decode(a); with few non-zeros (k per row) a sparse product instead of a dense [B, F]·[F, d] GEMM."""
    if float((a != 0).float().mean()) > 0.05 or a.device.type != "cpu":
        return inf.decode(a)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        csr = a.to_sparse_csr()
    return torch.sparse.mm(csr, inf.W_dec) + inf.b_dec


@torch.no_grad()
def _theta_l0(sae: TrainingSae, x: torch.Tensor) -> float:
    """L0 that the θ threshold would give on (a slice of) the training batch."""
    x = x[:THETA_L0_ROWS].float()
    pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    return float(((pre > sae.theta) & (pre > 0)).sum()) / len(x)


def _write_log(run: SaeRun, row: dict[str, Any]) -> None:
    if run.log is None:  # a DDP rank other than 0
        return
    run.log.write(json.dumps(row) + "\n")
    run.log.flush()


# --------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> list[Path]:
    """Train every SAE of the sweep in `cfg` from one read of the store; return their directories.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its slice of each global batch of `cfg.batch_size` rows,
    read from its own reader lanes (disjoint chunks); the gradients, the BatchTopK selection, the dead-latent
    counters and θ are global, so the weights match one process reading the same lanes. Rank 0 alone writes; the
    checkpoint holds global state only (every lane's position), so it resumes with any number of ranks."""
    d, device, created = _init_distributed(cfg)
    try:
        return _train(cfg, d, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, dd: Dist, device: torch.device) -> list[Path]:
    store, site = _open_store(cfg)
    d = store.d_model
    points = sweep(cfg)
    if not points:
        raise SaeError("the sweep is empty: give at least one --arch and one --k / --dict-size / --expansion")
    names = [p.name for p in points]
    out = Path(cfg.out)
    identity = _store_identity(store, site)
    config = to_dict(cfg)
    config["site"] = site
    run_info = {"config": config, "store": identity, "tool_version": __version__}
    mode = _check_out(cfg, names, run_info)
    dd.barrier()  # every rank has looked at `out` before rank 0 writes into it
    if mode == "done":
        print(f"every SAE in {out} is already trained; nothing to do", file=sys.stderr)
        return [out / n for n in names]
    ck = checkpoint.load(out) if mode == "resume" else None
    if ck is not None:
        _compare_store(ck.state["store"], identity, out)

    stats = store.stats(site, skip_bos=not cfg.keep_bos)
    if not (math.isfinite(stats.mean_norm) and stats.mean_norm > 0):
        _find_bad_rows(store, site, cfg.keep_bos)  # raises naming the rows, when some are NaN/Inf
        raise SaeError(f"store {cfg.store}: site {site} has mean norm {stats.mean_norm}; cannot scale the inputs")
    scale = math.sqrt(d) / stats.mean_norm
    lanes = cfg.reader_lanes if cfg.reader_lanes is not None else dd.world  # (a checkpoint's state overrides)
    reader = ChunkReader(
        store,
        site,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        buffer_mb=cfg.buffer_mb,
        val_chunks=cfg.val_chunks,
        keep_bos=cfg.keep_bos,
        device=device,
        lanes=lanes,
        rank=dd.rank,
        world=dd.world,
        state=ck.state["reader"] if ck is not None else None,
    )
    with contextlib.ExitStack() as stack:
        stack.callback(reader.close)
        plan = make_plan(cfg, reader.train_rows, scale)
        if ck is not None:
            was = {k: v for k, v in ck.state["plan"].items() if k != "checkpoint_steps"}
            now = {k: v for k, v in plan._asdict().items() if k != "checkpoint_steps"}
            if was != now:
                raise SaeError(f"checkpoint {ck.path} was made for another run length or schedule ({was}, now {now})")

        if dd.main:
            out.mkdir(parents=True, exist_ok=True)
        if ck is None and dd.main:
            atomic.write_json(out / RUN_FILE, {**run_info, "plan": plan._asdict(), "started": time.time()})
        runs = [make_run(cfg, p, d, device, scale) for p in points]
        if dd.group is not None:
            for r in runs:
                r.sae.process_group = dd.group
        for r in runs:
            if dd.main:
                r.log_path.parent.mkdir(parents=True, exist_ok=True)
        if ck is None:
            for r in runs:
                if dd.main:
                    r.log_path.unlink(missing_ok=True)  # left by a run that died before its first checkpoint
            sample = reader.sample_rows(GEOMEDIAN_ROWS).to(device) * scale
            for r in runs:
                r.sae.init_from_sample(sample)
            del sample
            start = 0
        else:
            _restore(ck, runs, truncate_logs=dd.main)
            start = int(ck.state["step"])
        if dd.group is not None:
            _broadcast_state(runs, dd)
        for r in runs:
            if dd.main:
                r.log = stack.enter_context(open(r.log_path, "a"))
        val = reader.validation_rows(VAL_MAX_ROWS) if cfg.val_chunks > 0 and dd.main else None
        meta = {"config": config, "store": identity, "plan": plan._asdict()}
        stop = stack.enter_context(_StopFlag())
        _loop(cfg, plan, runs, reader, val, device, start, stop, meta, store, site, dd)
        if dd.main:
            for r in runs:
                _save_sae(r, cfg, plan, store, site, plan.steps, reader, complete=True)
    dd.barrier()
    # The SAEs are final, with their logs: the optimizer state and the growing logs are not needed any more.
    if dd.main:
        shutil.rmtree(out / checkpoint.DIR, ignore_errors=True)
        shutil.rmtree(out / LOG_DIR, ignore_errors=True)
    return [r.dir for r in runs]


def _find_bad_rows(store: Store, site: str, keep_bos: bool) -> None:
    """Scan the store for non-finite rows (only when its statistics say there are some)."""
    for c in store.complete_chunks():
        read_rows(store, site, c, keep_bos=keep_bos)


def _save_sae(
    r: SaeRun, cfg: TrainConfig, plan: Plan, store: Store, site: str, step: int, reader: ChunkReader, complete: bool
) -> None:
    a = store.attrs
    model = a.get("model") or {}
    metadata = {
        "model": model,
        "corpus": a.get("corpus"),
        "store": str(Path(store.path).resolve()),
        "site": site,
        "context_size": store.seq_len,
        "keep_bos": cfg.keep_bos,
        "tokens_seen": step * plan.batch_size,
        "steps": step,
        "batch_size": plan.batch_size,
        "lr": r.lr,
        "seed": cfg.seed,
        "k_aux": r.sae.k_aux,
        "aux_alpha": cfg.aux_alpha,
        "dead_tokens": plan.dead_tokens,
        "dead_fraction": float(r.sae.dead_mask(plan.dead_tokens).float().mean()),
        "decoder": r.sae.decoder,
        "sparse_max_density": r.sae.sparse_max_density,
        "val_chunks": reader.val_chunks,
        "reader_lanes": reader.lanes,
    }
    if r.sae.arch == "relu":
        metadata["l1_coeff"] = r.sae.l1_coeff
    if r.sae.arch == "jumprelu":
        metadata["l0_coeff"] = r.sae.l0_coeff
        metadata["jumprelu_bandwidth"] = r.sae.bandwidth
        metadata["jumprelu_lr_scale"] = r.sae.threshold_lr_scale
        metadata["jumprelu_init_threshold"] = cfg.jumprelu_init_threshold
    r.sae.save(r.dir, model_name=model.get("id"), hook_name=site, complete=complete, metadata=metadata)
    if r.log is not None:
        r.log.flush()
        atomic.write_bytes(r.dir / LOG_FILE, r.log_path.read_bytes())


def _loop(
    cfg: TrainConfig,
    plan: Plan,
    runs: list[SaeRun],
    reader: ChunkReader,
    val: Rows | None,
    device: torch.device,
    start: int,
    stop: _StopFlag,
    meta: dict[str, Any],
    store: Store,
    site: str,
    dd: Dist = SINGLE,
) -> None:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out = Path(cfg.out)
    bar = tqdm(
        total=plan.steps,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        desc="train",
        mininterval=1.0,
        disable=True if not dd.main else None,
    )
    t_last, step_last = time.perf_counter(), start
    for step in range(start, plan.steps):
        x = reader.next_batch().x * plan.input_scale  # this rank's rows of the global batch
        if step == start and step == 0:
            for r in runs:
                if r.sae.decoder == "auto":
                    r.sae.choose_decoder(x)
                    if dd.group is not None:  # the ranks' timings differ: rank 0's choice for all
                        t = torch.tensor([r.sae.sparse_max_density], dtype=torch.float64, device=x.device)
                        dist.broadcast(t, 0, group=dd.group)
                        r.sae.sparse_max_density = float(t)
        lr_f = plan.lr_factor(step)
        outs = []
        for r in runs:
            outs.append(train_step(r, x, lr_f * r.lr, step, plan, cfg, autocast, dd))
        done = step + 1
        if done % cfg.log_every == 0 or done == plan.steps:
            now = time.perf_counter()
            tok_s = (done - step_last) * plan.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            post = []
            for r, (o, gn) in zip(runs, outs, strict=True):
                o = _reduce_output(o, dd)
                row = _train_row(r, o, gn, x, done, plan, lr_f * r.lr, tok_s)
                _write_log(r, row)
                post.append(row)
            bar.set_postfix(
                tok_s=f"{tok_s:,.0f}",
                loss="/".join(f"{p['loss']:.3g}" for p in post),
                L0="/".join(f"{p['l0']:.1f}" for p in post),
                dead="/".join(f"{p['dead_fraction']:.2f}" for p in post),
                refresh=False,
            )
        bar.update(1)
        scheduled = done % plan.checkpoint_steps == 0
        stopped = stop.signum is not None
        if dd.group is not None:  # the ranks must agree on stopping: a signal may reach them a step apart
            t = torch.tensor([int(stopped)], device=x.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dd.group)
            stopped = bool(t)
            if stopped and stop.signum is None:
                stop.signum = signal.SIGTERM
        if done < plan.steps and (scheduled or stopped):
            path = out / checkpoint.DIR
            reader_state = _reader_state(reader, dd)
            if dd.main:
                if val is not None and scheduled:  # (not on a signal: the log stays that of an uninterrupted run)
                    _validate_all(runs, val, plan, done, device)
                for r in runs:
                    _save_sae(r, cfg, plan, store, site, done, reader, complete=False)
                path = _save_checkpoint(out, done, runs, reader_state, meta)
            dd.barrier()  # the other ranks wait until rank 0's checkpoint is complete
            if stopped:
                bar.close()
                name = signal.Signals(stop.signum).name
                raise TrainingInterrupted(
                    f"stopped by {name} after step {done} of {plan.steps}; checkpoint written to {path}. "
                    "Continue with the same command plus --resume"
                )
    bar.close()
    if val is not None and dd.main:
        _validate_all(runs, val, plan, plan.steps, device)


def train_step(
    r: SaeRun,
    x: torch.Tensor,
    lr: float,
    step: int,
    plan: Plan,
    cfg: TrainConfig,
    autocast: Any,
    dd: Dist = SINGLE,
) -> tuple[Any, torch.Tensor]:
    """One optimizer step of one SAE on the scaled batch `x` (in DDP: this rank's slice of the global batch);
    returns its SaeOutput and the gradient norm (before clipping). No host synchronisation in one process."""
    sae = r.sae
    with autocast:
        o = sae(x, dead_mask=sae.dead_mask(plan.dead_tokens))
    o.loss.backward()
    if dd.group is not None:
        _all_reduce_grads(sae, dd)  # the ranks then take identical steps: same clip, Adam, renormalisation
    sae.remove_parallel_grad()
    gn = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    for g in r.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    sae.clamp_threshold()
    sae.update_dead(o.fired, len(x) * dd.world)  # `fired` is global already
    if sae.arch == "batchtopk" and step >= plan.theta_start:
        sae.update_theta(o.min_act, plan.theta_decay)
    return o, gn


def _train_row(
    r: SaeRun, o: Any, gn: torch.Tensor, x: torch.Tensor, step: int, plan: Plan, lr: float, tok_s: float
) -> dict[str, Any]:
    loss = float(o.loss.detach())
    if not math.isfinite(loss):
        raise SaeError(
            f"{r.name}: the loss became {loss} at step {step} (the inputs were checked: the training diverged); "
            "lower --lr or --grad-clip"
        )
    row = {
        "split": "train",
        "step": step,
        "tokens": step * plan.batch_size,
        "loss": loss,
        "fvu": float(o.fvu.detach()),
        "mse": float(o.mse.detach()),
        "aux_loss": float(o.aux_loss.detach()),
        "sparsity_loss": float(o.sparsity_loss.detach()),
        "l0": float(o.l0),
        "dead_fraction": float(r.sae.dead_mask(plan.dead_tokens).float().mean()),
        "n_dead_aux": int(o.n_dead),
        "grad_norm": float(gn),
        "lr": lr,
        "tokens_per_s": tok_s,
        "decoder": "sparse" if o.sparse else "dense",
    }
    if r.sae.arch == "batchtopk":
        row["theta"] = float(r.sae.theta)
        row["l0_theta"] = _theta_l0(r.sae, x) if int(r.sae.theta_updates) > 0 else None
    if r.sae.arch == "jumprelu":  # where the thresholds are, and how many sit at their floor of 0
        th = r.sae.threshold.detach()
        row["threshold_mean"] = float(th.mean())
        row["threshold_zero_fraction"] = float((th == 0).float().mean())
    return row


def _validate_all(runs: list[SaeRun], val: Rows, plan: Plan, step: int, device: torch.device) -> None:
    for r in runs:
        m: dict[str, Any] = validate(r.sae, val, plan.batch_size, device)
        if r.sae.arch == "batchtopk" and int(r.sae.theta_updates) == 0:  # θ's EMA has not started: no θ mode yet
            m.update({k: None for k in m if k.endswith("_theta")})
        _write_log(r, {"split": "val", "step": step, "tokens": step * plan.batch_size, "rows": len(val.x), **m})


__all__ = [
    "LOG_FILE",
    "Plan",
    "RUN_FILE",
    "SaeRun",
    "TrainingInterrupted",
    "default_lr",
    "make_plan",
    "make_run",
    "train_step",
    "train",
    "validate",
]
