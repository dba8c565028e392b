"""The training loop (nanoGPT-style, linear): one read of the data trains every SAE of a sweep.

    store ──ChunkReader──> x (raw, fp32 on device) ──·c──> each SAE: forward, backward, clip, Adam, renorm, θ

c = √d / E‖x‖ is one dataset-level scalar from the store's manifest; `TrainingSae.export` folds it back.
Checkpoints (sae.train.checkpoint) hold everything the loop's future depends on, so a run killed at any moment
and resumed ends with the very weights of an uninterrupted run (bit for bit on CPU).

Read top to bottom: `train` → `setup` (the checks, --out, the reader, the scales, the plan, the SAEs, the
held-out rows: one `RunState`) → `loop`, whose step reads a batch (`next_batch`), steps each SAE (`train_step`),
logs (`log_step`), asks whether a signal stops the run (`stop_requested`) and saves (`save`: the SAE directories,
their validation rows and θ, and a checkpoint or the final export) → the summary.

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
from dataclasses import dataclass
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
from .calibrate import Theta, check_theta, choose_theta, split_held_out
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
    dd, device, created = init_distributed(cfg)
    try:
        s = setup(cfg, dd, device)
        if s is None:  # every SAE is already trained
            return [Path(cfg.out) / p.name for p in sweep(cfg)]
        # A signal ends the loop with TrainingInterrupted, after a checkpoint: no summary then, the progress bar's
        # last line (closed with the rest of `s.closing`) says how far it got.
        with s.closing:
            loop(s)
        # The SAEs are final, with their logs: the optimizer state and the growing logs are not needed any more.
        if dd.main:
            shutil.rmtree(s.out / checkpoint.DIR, ignore_errors=True)
            shutil.rmtree(s.out / LOG_DIR, ignore_errors=True)
            summary("train", [summary_line(r, s.last[r.name], s.plan) for r in s.runs])
        return [r.dir for r in s.runs]
    finally:
        if created:
            destroy_process_group()


@dataclass
class RunState:
    """Everything the loop reads and updates, made by `setup`."""

    cfg: TrainConfig
    dd: Dist
    """This process's place in a torchrun run (SINGLE in one process)."""
    device: torch.device
    store: Store
    site: str
    """The input site."""
    target: str | None
    """A transcoder's output site (its targets are a batch row's last columns); None for SAEs."""
    target_scale: float
    """The dataset-level scale of what the output is compared with (a transcoder's targets; an SAE's input)."""
    plan: Plan
    runs: list[SaeRun]
    """The sweep's SAEs, in sweep order."""
    reader: ChunkReader
    rowfilter: RowFilter
    """The rows left out of training (--exclude-*), and their counts."""
    val: Rows | None
    """Held-out rows of the validation metrics (rank 0, with --val-chunks; None otherwise)."""
    cal: Rows | None
    """Held-out rows θ is calibrated on (the encoder's input columns): the other half of the same rows."""
    meta: dict[str, Any]
    """Config, store identity and plan: what each checkpoint records beside the trainer's state."""
    start: int
    """The first step to take (a resumed run's checkpoint step)."""
    stop: _StopFlag
    prog: Progress
    autocast: Any
    """bf16 autocast on a GPU, a null context on the CPU."""
    closing: contextlib.ExitStack
    """What `setup` opened, closed in reverse at the end: the reader, the logs, the signal handlers, the progress."""
    last: dict[str, dict[str, Any]]
    """Each SAE's last log rows, by split ("train", "val"): the summary's figures."""
    logged: tuple[float, int]
    """(perf_counter time, step) of the last log step: the next log's tokens/s."""

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def setup(cfg: TrainConfig, dd: Dist, device: torch.device) -> RunState | None:
    """The run's state, from the checks (before anything is written) to the progress bar: what to do with --out,
    the reader and the input scale, the plan, the SAEs (fresh, or as the checkpoint left them) and the held-out
    rows. None when every SAE in --out is already trained."""
    check_values(cfg)
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

    # What to do with --out: start, resume from its checkpoint, or nothing (already trained).
    out = Path(cfg.out)
    identity = store_identity(store, site, target)
    config = to_dict(cfg)
    config["site"] = site
    run_info = {"config": config, "store": identity, "tool_version": __version__}
    mode = check_out(cfg, [p.name for p in points], run_info)
    dd.barrier()  # every rank has looked at `out` before rank 0 writes into it
    if mode == "done":
        print(f"every SAE in {out} is already trained; nothing to do", file=sys.stderr)
        return None
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
    with contextlib.ExitStack() as closing:  # closed here on an error; handed to the state otherwise
        closing.callback(reader.close)
        scale, target_scale, variance = _scales(cfg, stats, reader, rowfilter)
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
        for r in runs:
            r.sae.process_group = dd.group  # (None in one process)
            if dd.main:
                r.log_path.parent.mkdir(parents=True, exist_ok=True)
                if ck is None:
                    r.log_path.unlink(missing_ok=True)  # left by a run that died before its first checkpoint
        if ck is None:
            sample = rowfilter.rows(reader.sample(GEOMEDIAN_ROWS)).x.to(device)
            x0, y0 = sample[:, :d] * scale, (sample[:, d:] * target_scale if target is not None else None)
            for r in runs:
                r.sae.init_from_sample(x0, y0)
            del sample, x0, y0
        else:
            checkpoint.restore_run(ck, runs, truncate_logs=dd.main)
            rowfilter.restore(ck.state.get("exclude_rows"), dd.main)
        if dd.group is not None:
            broadcast_state([r.sae for r in runs], dd)
        if dd.main:
            for r in runs:
                r.log = closing.enter_context(open(r.log_path, "a"))

        held = reader.validation_rows(2 * VAL_MAX_ROWS) if cfg.val_chunks > 0 and dd.main else None
        # alternate rows for the validation metrics and for calibrating θ (sae.train.calibrate)
        val, cal = split_held_out(rowfilter.rows(held), VAL_MAX_ROWS, VAL_MAX_ROWS)
        if cal is not None:  # θ is calibrated on the encoder's input columns
            cal = Rows(cal.x[:, :d], cal.rows)
        start = int(ck.state["step"]) if ck is not None else 0
        stop = closing.enter_context(_StopFlag())
        # progress lines (or a bar on a terminal) from rank 0 only
        quiet = None if dd.main else closing.enter_context(open(os.devnull, "w"))
        prog = closing.enter_context(Progress("train", plan.tokens, "tok", initial=start * plan.batch_size, file=quiet))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        return RunState(
            cfg=cfg,
            dd=dd,
            device=device,
            store=store,
            site=site,
            target=target,
            target_scale=target_scale,
            plan=plan,
            runs=runs,
            reader=reader,
            rowfilter=rowfilter,
            val=val,
            cal=cal,
            meta={"config": config, "store": identity, "plan": plan._asdict()},
            start=start,
            stop=stop,
            prog=prog,
            autocast=autocast,
            closing=closing.pop_all(),
            last={r.name: {} for r in runs},
            logged=(time.perf_counter(), start),
        )


def _scales(cfg: TrainConfig, stats: dict[str, Any], reader: ChunkReader, rowfilter: RowFilter) -> tuple[float, ...]:
    """(c, c_target, σ²): the input scale c = √d / E‖x‖, the scale of what the output is compared with (an SAE's
    input; a transcoder's target, the last site of `stats`) and σ² of those scaled rows, the fixed normaliser of
    the reconstruction term."""
    d = reader.store.d_model
    # (E‖x‖, σ²) per site: the store's, or with rows excluded the kept rows' from a seeded sample (the same on
    # every rank and resume); a transcoder's batch rows hold its input's columns, then its target's.
    moments = {s: (st.mean_norm, st.variance) for s, st in stats.items()}
    if rowfilter.active:
        sample = reader.sample(KEPT_STATS_ROWS)
        moments = {s: rowfilter.kept_stats(sample, slice(i * d, (i + 1) * d)) for i, s in enumerate(moments)}
    site, target = list(moments)[0], list(moments)[-1]
    raw_variance = moments[target][1]
    if not (math.isfinite(raw_variance) and raw_variance > 0):
        raise SaeError(f"store {cfg.store}: site {target} has variance {raw_variance}; nothing to reconstruct")
    target_scale = math.sqrt(d) / moments[target][0]
    return math.sqrt(d) / moments[site][0], target_scale, raw_variance * target_scale**2


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


def loop(s: RunState) -> None:
    """Steps s.start..plan.steps, every SAE on the same batches. The SAEs are saved at each scheduled checkpoint,
    when a signal stops the run (which then raises TrainingInterrupted) and, complete, after the last step."""
    for step in range(s.start, s.plan.steps):
        x, y, n_rows = next_batch(s)
        if step == 0:
            choose_decoders(s, x, y)
        lr_f = s.plan.lr_factor(step)
        outs = [train_step(r, x, lr_f * r.lr, step, s.plan, s.cfg, s.autocast, s.dd, y, n_rows=n_rows) for r in s.runs]
        done = step + 1
        if done % s.cfg.log_every == 0 or done == s.plan.steps:
            log_step(s, done, outs, x, lr_f)
        s.prog.update(s.plan.batch_size)
        final = done == s.plan.steps
        scheduled = done % s.plan.checkpoint_steps == 0
        stopped = stop_requested(s, done, scheduled) and not final  # (after the last step the SAEs are complete)
        if final or scheduled or stopped:
            # validation rows at the scheduled checkpoints and the end, not on a signal alone: the log stays that
            # of an uninterrupted run
            path = save(s, done, log_val=final or scheduled)
            if stopped:
                raise interrupted(s, done, path)


def next_batch(s: RunState) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """This rank's rows of the next global batch, less the excluded ones, scaled: (x, a transcoder's targets y or
    None, the global batch's row count)."""
    x = s.rowfilter.apply(s.reader.next_batch())
    y = None
    if s.target is not None:  # a transcoder's rows hold the input's columns, then the target's
        d = s.store.d_model
        x, y = x[:, :d], x[:, d:] * s.target_scale
    x = x * s.plan.input_scale
    return x, y, global_rows(len(x), s.dd, varies=s.rowfilter.active)


def choose_decoders(s: RunState, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """--decoder auto: each SAE times its dense and sparse decoders on the first batch (a resumed run restores the
    choice from its checkpoint)."""
    for r in s.runs:
        if r.sae.decoder == "auto":
            r.sae.choose_decoder(x, autocast=s.autocast, target=y)  # timed as the steps run
            # the ranks' timings differ: rank 0's choice for all
            r.sae.sparse_max_density = broadcast_float(r.sae.sparse_max_density, s.dd)


def log_step(s: RunState, done: int, outs: list[tuple[Any, torch.Tensor]], x: torch.Tensor, lr_f: float) -> None:
    """Each SAE's log row after step `done` (the only host reads of the step's figures) and the progress line's
    figures; `outs`: each SAE's SaeOutput and gradient norm."""
    now = time.perf_counter()
    tok_s = (done - s.logged[1]) * s.plan.batch_size / max(now - s.logged[0], 1e-9)
    s.logged = (now, done)
    for r, (o, gn) in zip(s.runs, outs, strict=True):
        o = reduce_output(o, s.dd)
        row = train_row(r, o, gn, x, done, s.plan, lr_f * r.lr, tok_s)
        write_log(r, row)
        s.last[r.name]["train"] = row
    s.prog.figures(**{r.name: progress_figures(s.last[r.name]["train"]) for r in s.runs})


def stop_requested(s: RunState, done: int, scheduled: bool) -> bool:
    """Whether a SIGTERM/SIGINT stops the run after step `done`. The ranks must agree on stopping (a signal may
    reach them a step apart), so under DDP they ask each other at the same steps: every STOP_CHECK_STEPS and at
    each scheduled checkpoint."""
    ask = s.dd.group is None or scheduled or done % STOP_CHECK_STEPS == 0
    stopped = ask and any_rank(s.stop.signum is not None, s.dd)
    if stopped and s.stop.signum is None:
        s.stop.signum = signal.SIGTERM  # another rank's signal
    return stopped


def interrupted(s: RunState, done: int, path: Path) -> TrainingInterrupted:
    """What a signal's stop raises once the checkpoint after step `done` is in `path` (the CLI prints it and exits
    with sae.interrupt.EXIT_CODE)."""
    name = signal.Signals(s.stop.signum).name
    return TrainingInterrupted(
        f"train stopped by {name} after step {done} of {s.plan.steps}", f"checkpoint written to {path}", RESUME
    )


def save(s: RunState, step: int, log_val: bool) -> Path:
    """Every SAE's directory as of `step` (after the last step: the complete one), with θ chosen once for its
    validation row (`log_val`) and its export; before the last step also a checkpoint of the run, whose folder is
    returned. Every rank calls it (the reader's position and the row counts are gathered); rank 0 writes, the
    others wait until it is done."""
    final = step == s.plan.steps
    reader = None if final else reader_state(s.reader, s.dd)
    counts = s.rowfilter.state(s.dd)
    path = s.out / checkpoint.DIR
    if s.dd.main:
        thetas = {r.name: choose_theta(r.sae, s.cfg.theta, s.cal, s.device) for r in s.runs}
        if log_val and s.val is not None:
            log_validation(s, s.val, step, thetas)
        if final:
            s.prog.close()  # the run's time and tokens/s cover its training and validation, not the export
        for r in s.runs:
            save_sae(r, s, step, theta=thetas[r.name], exclude=s.rowfilter.metadata(**counts))
        if not final:
            path = checkpoint.save_run(s.out, step, s.runs, reader, {**s.meta, "exclude_rows": counts})
    s.dd.barrier()
    return path


def log_validation(s: RunState, val: Rows, step: int, thetas: dict[str, Theta | None]) -> None:
    """Each SAE's validation row after `step`: the metrics of the SAE as exported (at its θ) on the held-out rows
    `val`."""
    for r in s.runs:
        s.last[r.name]["val"] = row = val_row(r.sae, val, s.plan, step, s.device, theta=thetas[r.name])
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
    "RunState",
    "SaeRun",
    "TrainingInterrupted",
    "default_lr",
    "global_rows",
    "make_plan",
    "make_run",
    "resolve_device",
    "setup",
    "train",
    "train_step",
    "validate",
]
