"""The training loop (nanoGPT-style, linear): one read of the data trains every SAE of a sweep.

    store ──ChunkReader──> x (raw, fp32 on device) ──·c──> each SAE: forward, backward, clip, Adam, renorm, θ

c = √d / E‖x‖ is one dataset-level scalar from the store's manifest; `TrainingSae.export` folds it back.
Checkpoints (sae.train.checkpoint) hold everything the loop's future depends on, so a run killed at any moment
and resumed ends with the very weights of an uninterrupted run (bit for bit on CPU).

The parts live beside this file, one concern each: `plan` (run length, schedules), `rundir` (what `--out` holds,
start/resume/skip), `saerun` (one SAE with its Adam, directory and log), `checkpoint`, `ddp` (torchrun),
`signals` (SIGTERM/SIGINT), `log` (train rows, progress figures, the summary), `validate` (held-out rows,
sae.metrics). Progress goes to stderr (sae.progress): a bar on a terminal, plain lines in batch logs.

On a GPU the host queues the steps without waiting for the device, except where it must: the data-dependent
sizes inside each SAE's forward (`train_step` lists them), the figures of a log step (every --log-every steps),
checkpoints, and under DDP the stop-flag agreement every STOP_CHECK_STEPS steps (on gloo, a host value).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sae import __version__, atomic
from sae.config import TrainConfig, check_values, to_dict
from sae.device import resolve_device
from sae.errors import SaeError
from sae.interrupt import RERUN, interruptible
from sae.progress import Progress, summary
from sae.saedir import sweep
from sae.store import Store

from . import checkpoint
from .archs import check_config
from .calibrate import check_theta, choose_theta, split_held_out
from .ddp import (
    SINGLE,
    Dist,
    GradSync,
    any_rank,
    broadcast_float,
    broadcast_state,
    destroy_process_group,
    init_distributed,
    reader_state,
    reduce_output,
)
from .exclude import RowFilter
from .log import progress_figures, summary_line, train_row
from .plan import Plan, default_lr, make_plan, short_run_warning
from .reader import ChunkReader, Rows, read_rows
from .rundir import LOG_DIR, LOG_FILE, RUN_FILE, check_out, compare_store, open_store, store_identity, target_site
from .saerun import SaeRun, make_run, save_sae, write_log
from .signals import StopFlag as _StopFlag  # (tests replace trainer._StopFlag to simulate a signal)
from .signals import TrainingInterrupted
from .validate import VAL_MAX_ROWS, val_row, validate

GEOMEDIAN_ROWS = 8192
"""Rows sampled to initialise b_dec (geometric median) before the first step (the kept ones, under --exclude-*)."""

KEPT_STATS_ROWS = 131072
"""Rows sampled for the input scale and σ² of the kept rows when some are excluded (--exclude-*)."""

STOP_CHECK_STEPS = 8
"""Under DDP the ranks agree on a SIGTERM/SIGINT every this many steps (and at each scheduled checkpoint): a
collective every step would hold every rank's host at every step. One process checks after each step."""


RESUME = "continue with the same command plus --resume"
"""How to continue a run stopped after a checkpoint (`sae run` resumes by itself: rerunning it is enough)."""


def _kept(cfg: TrainConfig) -> tuple[str, str]:
    """What a run stopped outside the loop's own checkpoint-and-stop (a second Ctrl-C, or a signal before the
    first step) left in `out`, and how to continue it."""
    out = Path(cfg.out)
    latest = checkpoint.latest_name(out)
    if latest is None:
        return "no checkpoint was written yet", RERUN
    return f"the last checkpoint, {out / checkpoint.DIR / latest}, is kept", RESUME


@interruptible("train", _kept)
def train(cfg: TrainConfig) -> list[Path]:
    """Train every SAE of the sweep in `cfg` from one read of the store; return their directories.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its slice of each global batch of `cfg.batch_size` rows,
    read from its own reader lanes (disjoint chunks); the gradients, the BatchTopK selection, the dead-latent
    counters and θ are global, so the weights match one process reading the same lanes. Rank 0 alone writes; the
    checkpoint holds global state only (every lane's position), so it resumes with any number of ranks."""
    d, device, created = init_distributed(cfg)
    try:
        return _train(cfg, d, device)
    finally:
        if created:
            destroy_process_group()


def _train(cfg: TrainConfig, dd: Dist, device: torch.device) -> list[Path]:
    check_values(cfg)
    # What to do with --out: start, resume from its checkpoint, or nothing (already trained).
    store, site = open_store(cfg)
    target = target_site(cfg, store, site)  # a transcoder run's output site, None for SAEs
    # a batch row holds the input site's columns, then a transcoder's target's: the output is compared with the last
    sites = [site] if target is None else [site, target]
    d = store.d_model
    d_out = d if target is not None else None
    points = sweep(cfg)
    if not points:
        raise SaeError("the sweep is empty: give at least one --arch and one --k / --dict-size / --expansion")
    check_config(cfg, points, d, d_out=d_out)  # each architecture validates its settings before anything is written
    check_theta(cfg, points)
    # rows left out of training (--exclude-*); a transcoder's are judged by its target (the batch's last columns)
    rowfilter = RowFilter(cfg, store, sites[-1], columns=slice(d, None) if target is not None else None)
    names = [p.name for p in points]
    out = Path(cfg.out)
    identity = store_identity(store, site, target)
    config = to_dict(cfg)
    config["site"] = site
    run_info = {"config": config, "store": identity, "tool_version": __version__}
    mode = check_out(cfg, names, run_info)
    dd.barrier()  # every rank has looked at `out` before rank 0 writes into it
    if mode == "done":
        print(f"every SAE in {out} is already trained; nothing to do", file=sys.stderr)
        return [out / n for n in names]
    ck = checkpoint.load(out) if mode == "resume" else None
    if ck is not None:
        compare_store(ck.state["store"], identity, out)

    # The reader (this rank's lanes; a checkpoint's position) and the store statistics of its site(s).
    stats = {s: _site_stats(cfg, store, s) for s in sites}
    lanes = cfg.reader_lanes if cfg.reader_lanes is not None else dd.world  # (a checkpoint's state overrides)
    reader = ChunkReader(
        store,
        sites if target is not None else site,
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
        # (E‖x‖, σ²) per site: the store's, or with rows excluded the kept rows' from a seeded sample (the same on
        # every rank and resume); a transcoder's batch rows hold its input's columns, then its target's.
        moments = {s: (st.mean_norm, st.variance) for s, st in stats.items()}
        if rowfilter.active:
            sample = reader.sample(KEPT_STATS_ROWS)
            moments = {s: rowfilter.kept_stats(sample, slice(i * d, (i + 1) * d)) for i, s in enumerate(moments)}
        scale = math.sqrt(d) / moments[site][0]  # the input scale c
        target_scale = math.sqrt(d) / moments[sites[-1]][0]  # the scale of what the output is compared with (c)
        raw_variance = moments[sites[-1]][1]
        if not (math.isfinite(raw_variance) and raw_variance > 0):
            raise SaeError(f"store {cfg.store}: site {sites[-1]} has variance {raw_variance}; nothing to reconstruct")
        # σ² of the scaled rows (a transcoder's: of its scaled targets): the fixed normaliser of the reconstruction
        variance = raw_variance * target_scale**2
        plan = make_plan(cfg, reader.train_rows, scale)
        short = short_run_warning(plan, reader.train_rows, cfg.tokens is not None)
        if short and dd.main and ck is None:
            print(short, file=sys.stderr)
        if ck is not None:
            was = {k: v for k, v in ck.state["plan"].items() if k != "checkpoint_steps"}
            now = {k: v for k, v in plan._asdict().items() if k != "checkpoint_steps"}
            if was != now:
                raise SaeError(f"checkpoint {ck.path} was made for another run length or schedule ({was}, now {now})")

        # The SAEs: fresh (b_dec from a sample's geometric median) or restored from the checkpoint.
        if dd.main:
            out.mkdir(parents=True, exist_ok=True)
        if ck is None and dd.main:
            atomic.write_json(out / RUN_FILE, {**run_info, "plan": plan._asdict(), "started": time.time()})
        runs = [make_run(cfg, p, d, device, scale, variance, d_out=d_out, target_scale=target_scale) for p in points]
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
            sample = rowfilter.rows(reader.sample(GEOMEDIAN_ROWS)).x.to(device)
            x0, y0 = sample[:, :d] * scale, (sample[:, d:] * target_scale if target is not None else None)
            for r in runs:
                r.sae.init_from_sample(x0, y0)
            del sample, x0, y0
            start = 0
        else:
            checkpoint.restore_run(ck, runs, truncate_logs=dd.main)
            rowfilter.restore(ck.state.get("exclude_rows"), dd.main)
            start = int(ck.state["step"])
        if dd.group is not None:
            broadcast_state([r.sae for r in runs], dd)
        for r in runs:
            if dd.main:
                r.log = stack.enter_context(open(r.log_path, "a"))
        held = reader.validation_rows(2 * VAL_MAX_ROWS) if cfg.val_chunks > 0 and dd.main else None
        # alternate rows for the validation metrics and for calibrating θ (sae.train.calibrate)
        val, cal = split_held_out(rowfilter.rows(held), VAL_MAX_ROWS, VAL_MAX_ROWS)
        if cal is not None:  # θ is calibrated on the encoder's input columns
            cal = Rows(cal.x[:, :d], cal.rows)
        meta = {"config": config, "store": identity, "plan": plan._asdict()}
        stop = stack.enter_context(_StopFlag())
        # progress lines (or a bar on a terminal) from rank 0 only
        quiet = None if dd.main else stack.enter_context(open(os.devnull, "w"))
        prog = stack.enter_context(Progress("train", plan.tokens, "tok", initial=start * plan.batch_size, file=quiet))
        last: dict[str, dict[str, Any]] = {r.name: {} for r in runs}  # each SAE's last log rows, by split
        # A signal ends the loop with TrainingInterrupted, after a checkpoint: no summary then, the progress bar's
        # last line (closed by `stack`) says how far it got.
        _loop(
            cfg, plan, runs, reader, val, device, start, stop, meta, store, site, prog, last, dd, cal, rowfilter,
            target, target_scale,
        )  # fmt: skip
        prog.close()
        counts = rowfilter.state(dd)  # (a collective under DDP)
        if dd.main:
            for r in runs:
                th, ex = choose_theta(r.sae, cfg.theta, cal, device), rowfilter.metadata(**counts)
                save_sae(
                    r, cfg, plan, store, site, plan.steps, reader, complete=True, theta=th, exclude=ex, target=target
                )
    dd.barrier()
    # The SAEs are final, with their logs: the optimizer state and the growing logs are not needed any more.
    if dd.main:
        shutil.rmtree(out / checkpoint.DIR, ignore_errors=True)
        shutil.rmtree(out / LOG_DIR, ignore_errors=True)
        summary("train", [summary_line(r, last[r.name], plan) for r in runs])
    return [r.dir for r in runs]


def _site_stats(cfg: TrainConfig, store: Store, site: str) -> Any:
    """The store's statistics of `site` over the training rows' BOS handling; SaeError when its rows cannot be
    scaled (naming the non-finite rows when there are some)."""
    stats = store.stats(site, skip_bos=not cfg.keep_bos)
    if not (math.isfinite(stats.mean_norm) and stats.mean_norm > 0):
        _find_bad_rows(store, site, cfg.keep_bos)  # raises naming the rows, when some are NaN/Inf
        raise SaeError(f"store {cfg.store}: site {site} has mean norm {stats.mean_norm}; cannot scale the inputs")
    return stats


def _find_bad_rows(store: Store, site: str, keep_bos: bool) -> None:
    """Scan the store for non-finite rows (only when its statistics say there are some)."""
    for c in store.complete_chunks():
        read_rows(store, site, c, keep_bos=keep_bos)


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
    prog: Progress,
    last: dict[str, dict[str, Any]],
    dd: Dist = SINGLE,
    cal: Rows | None = None,
    rowfilter: RowFilter | None = None,
    target: str | None = None,
    target_scale: float | None = None,
) -> None:
    """Steps `start`..plan.steps; keeps each SAE's last log rows by split ("train", "val") in `last`.
    Transcoders: a batch holds the input's columns, then the target's (`target_scale` scales the latter)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out = Path(cfg.out)
    t_last, step_last = time.perf_counter(), start
    for step in range(start, plan.steps):
        batch = reader.next_batch()  # this rank's rows of the global batch, less the excluded ones
        x = rowfilter.apply(batch) if rowfilter is not None else batch.x
        y = None
        if target is not None:
            x, y = x[:, : runs[0].sae.d_in], x[:, runs[0].sae.d_in :] * target_scale
        x = x * plan.input_scale
        n_rows = global_rows(len(x), dd, varies=rowfilter is not None and rowfilter.active)
        if step == start and step == 0:
            for r in runs:
                if r.sae.decoder == "auto":
                    r.sae.choose_decoder(x, autocast=autocast, target=y)  # timed as the steps run
                    # the ranks' timings differ: rank 0's choice for all
                    r.sae.sparse_max_density = broadcast_float(r.sae.sparse_max_density, dd)

        # One optimizer step of every SAE on the same batch.
        lr_f = plan.lr_factor(step)
        outs = []
        for r in runs:
            outs.append(train_step(r, x, lr_f * r.lr, step, plan, cfg, autocast, dd, y, n_rows=n_rows))
        done = step + 1

        # Log (the only host reads of the step's figures).
        if done % cfg.log_every == 0 or done == plan.steps:
            now = time.perf_counter()
            tok_s = (done - step_last) * plan.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            for r, (o, gn) in zip(runs, outs, strict=True):
                o = reduce_output(o, dd)
                row = train_row(r, o, gn, x, done, plan, lr_f * r.lr, tok_s)
                write_log(r, row)
                last[r.name]["train"] = row
            prog.figures(**{r.name: progress_figures(last[r.name]["train"]) for r in runs})
        prog.update(plan.batch_size)

        # Checkpoint when scheduled or stopped by a signal; the ranks must agree on stopping (a signal may reach
        # them a step apart), so under DDP they ask each other at the same steps.
        scheduled = done % plan.checkpoint_steps == 0
        ask = dd.group is None or scheduled or done % STOP_CHECK_STEPS == 0
        stopped = ask and any_rank(stop.signum is not None, dd)
        if stopped and stop.signum is None:
            stop.signum = signal.SIGTERM
        if done < plan.steps and (scheduled or stopped):
            path = out / checkpoint.DIR
            state = reader_state(reader, dd)
            counts = rowfilter.state(dd) if rowfilter is not None else {"seen": 0, "excluded": 0}
            if dd.main:
                thetas = {r.name: choose_theta(r.sae, cfg.theta, cal, device) for r in runs}
                if val is not None and scheduled:  # (not on a signal: the log stays that of an uninterrupted run)
                    for r in runs:
                        write_log(r, val_row(r.sae, val, plan, done, device, theta=thetas[r.name]))
                for r in runs:
                    ex = rowfilter.metadata(**counts) if rowfilter is not None else None
                    th = thetas[r.name]
                    save_sae(
                        r, cfg, plan, store, site, done, reader, complete=False, theta=th, exclude=ex, target=target
                    )
                path = checkpoint.save_run(out, done, runs, state, {**meta, "exclude_rows": counts})
            dd.barrier()  # the other ranks wait until rank 0's checkpoint is complete
            if stopped:
                name = signal.Signals(stop.signum).name
                raise TrainingInterrupted(
                    f"train stopped by {name} after step {done} of {plan.steps}",
                    f"checkpoint written to {path}",
                    RESUME,
                )
    if val is not None and dd.main:
        for r in runs:
            th = choose_theta(r.sae, cfg.theta, cal, device)
            last[r.name]["val"] = row = val_row(r.sae, val, plan, plan.steps, device, theta=th)
            write_log(r, row)


def global_rows(n: int, dd: Dist, varies: bool) -> int:
    """Rows of the global batch from this rank's `n`: known on the host unless the ranks' counts `vary` (rows
    left out by --exclude-*), then summed over the gloo group (host values: no wait for the device)."""
    if dd.group is None:
        return n
    if not varies:
        return n * dd.world  # every rank reads batch_size / world rows
    t = torch.tensor([n])
    dist.all_reduce(t, group=dd.cpu_group)
    return int(t)


def train_step(
    r: SaeRun,
    x: torch.Tensor,
    lr: float,
    step: int,
    plan: Plan,
    cfg: TrainConfig,
    autocast: Any,
    dd: Dist = SINGLE,
    y: torch.Tensor | None = None,
    n_rows: int | None = None,
) -> tuple[Any, torch.Tensor]:
    """One optimizer step of one SAE on the scaled batch `x` (in DDP: this rank's slice of the global batch of
    `n_rows` rows; `y`: a transcoder's scaled targets); returns its SaeOutput and the gradient norm (before
    clipping), both left on the device.

    Host reads. The step itself reads nothing back: the clip, Adam (its step counters live on the CPU), the
    decoder renormalisation, the dead counters and θ's EMA stay on the device, and the log reads the figures
    only every --log-every steps. What remains is in the SAE's forward, where a size depends on the data: the
    selected entries' count (BatchTopK: one `nonzero` over the candidates above a sampled bound; TopK: the
    entries > 0 of the per-row top k; relu/jumprelu: the active entries) and AuxK's dead latents. Under DDP the
    global selection also gathers the ranks' candidate counts; with --exclude-* the batch's kept rows are one
    more (sae.train.exclude)."""
    sae = r.sae
    if dd.group is not None and r.grad_sync is None:
        r.grad_sync = GradSync(sae, dd)
    n = n_rows if n_rows is not None else len(x) * dd.world
    sae.before_step(step, plan)
    with autocast:
        o = sae(x, dead_mask=sae.dead_mask(plan.dead_tokens), target=y, n_rows=n)
    if r.grad_sync is not None:
        r.grad_sync.arm()  # each gradient's all-reduce starts as soon as backward has produced it
    o.loss.backward()
    if r.grad_sync is not None:
        r.grad_sync.wait()  # the ranks then take identical steps: same clip, Adam, renormalisation
    sae.remove_parallel_grad()
    gn = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    for g in r.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    sae.after_step(o, n, step, plan)  # renormalise, dead counters (`fired` is global), θ, ...
    return o, gn


__all__ = [
    "LOG_DIR",
    "LOG_FILE",
    "Plan",
    "RUN_FILE",
    "SaeRun",
    "TrainingInterrupted",
    "default_lr",
    "global_rows",
    "make_plan",
    "make_run",
    "resolve_device",
    "train",
    "train_step",
    "validate",
]
