"""`sae eval`: splice SAEs into the language model on held-out text and measure what they keep.

One pass over the eval tokens serves every SAE. Per batch of contexts:
1. one clean forward, shared by every SAE and site: its next-token distribution is kept for this batch only,
   and the output of the blocks before each site is recorded (`PrefixReplay`);
2. per (site, first spliced position): one zero-ablation and one mean-ablation forward;
3. per SAE: one forward with its reconstruction spliced in; the splice hook also feeds the reconstruction
   and sparsity accumulators, so nothing per token outlives the batch.
The forwards of 2 and 3 run only the blocks from the site on. When no store gives the mean activation for
mean ablation, a forward that stops at the site computes it from the eval tokens first.

Positions (the same for every CE variant and KL): with t0 = 1 when the SAE was trained without BOS rows and
0 otherwise, activations at positions t ≥ t0 are replaced (the reconstruction metrics cover those rows), and
CE/KL average over the predictions made from positions t0 ≤ t ≤ T − 2 (the prediction at t of token t + 1).
Rows the SAE was trained without (its metadata key `exclude`, see `sae.rowtypes.Exclusion`: massive rows, given
positions or token ids) keep their clean activation, as BOS does, and are left out of the reconstruction metrics.

Row types: a spliced row is *massive* when its norm exceeds M × the site's median non-BOS norm (M:
--massive-factor, else the store's setting; the median from the store's statistics, else from the eval rows);
every reconstruction metric is reported over all spliced rows and over typical and massive rows apart.

Transcoders (a directory in SAELens' transcoder layout, `sae.saedir`): the spliced forward reads the input site
(`hook_name`) and replaces the output site (`hook_name_out`) with the transcoder's prediction
(`sae.sites.splice_from`); everything upstream of the output site runs as usual. An SAE is the case where both
are one site. Zero and mean ablation, the reconstruction metrics (FVU, NMSE of the prediction against the true
output), the row types and the rows left out are all those of the output site: it is what the transcoder
predicts, and a massive output row dominates Σ‖y − ȳ‖² just as a massive input row does an SAE's.

Batch mode selects as training did: the spliced rows of all eval contexts are shuffled with --seed and encoded
in batches of --batch-rows, else the SAE's training batch size (metadata `batch_size`), so one context's
reconstruction depends on rows of other contexts, as in a training batch.
"""

from __future__ import annotations

import glob
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae import outputs, progress, rowtypes
from sae.config import DEFAULT_MODEL, EvalConfig, check_values
from sae.corpus import available_splits, check_corpus, corpus_info, iter_contexts
from sae.errors import SaeError
from sae.interrupt import RERUN, interruptible
from sae.metrics import MeanAccumulator
from sae.models import ModelInfo, check_model_name, load_model
from sae.saedir import SparseAutoencoder, load_sae, recorded_store
from sae.sites import SITE_TABLE, Site, capture, computed_before, parse_site, site_width, splice, splice_from
from sae.store import Store

from .metrics import (
    CeAccumulator,
    SpliceStats,
    bootstrap_weights,
    ce_recovered,
    fvu_resampled,
    interval,
    token_losses,
)
from .report import summary_table, write_report

HELDOUT_SPLITS = ("heldout", "validation", "valid", "test")
"""Split names taken, in this order, as a corpus' held-out data."""

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32"
"""What the embedded default model is, for reports."""

DEFAULT_BATCH_ROWS = 4096
"""Batch mode's batch size for an SAE that records no training batch size (sae train's default)."""


class SaeSpec(NamedTuple):
    """One SAE to evaluate and what its cfg records about its training."""

    path: Path
    """The SAE directory."""
    name: str
    """Short label in tables and plots (the directory name, with its parent when names repeat)."""
    sae: SparseAutoencoder
    """The loaded SAE (or transcoder)."""
    hook_name: str
    """Site the SAE reads (a transcoder: its input site)."""
    skip_bos: bool
    """Trained without BOS rows: position 0 is left unspliced."""
    model: dict[str, Any] | None
    """Recorded model identity ({"id", "sha256", "revision"}), None when the cfg records none."""
    corpus: dict[str, Any] | None
    """Recorded training corpus (`sae.corpus.corpus_info` form), None when unknown."""
    store: Path | None
    """The store the SAE was trained from, when recorded and found (`saedir.recorded_store`)."""
    store_note: str = ""
    """How `store` was found, or why there is none: said in the report, since the statistics come from it."""
    exclude: rowtypes.Exclusion = rowtypes.Exclusion()
    """Rows the SAE was trained without besides BOS (metadata `exclude`); eval leaves them unspliced."""
    train_batch_size: int | None = None
    """Rows per training batch (metadata `batch_size`): batch mode's batch size."""
    hook_name_out: str | None = None
    """Site the SAE writes (cfg `hook_name_out`: a transcoder's output site, an SAE's own); None: `hook_name`."""

    @property
    def spliced(self) -> str:
        """The site whose activation is replaced (and ablated, and typed)."""
        return self.hook_name_out or self.hook_name


# --------------------------------------------------------------------------------------------------
# Finding and describing the SAEs


def find_sae_dirs(paths: tuple[Path, ...] | list[Path]) -> list[Path]:
    """SAE directories named by `paths`: SAE directories themselves, glob patterns, or folders whose
    subfolders are SAE directories (a `sae train` output). A directory is an SAE's when it holds cfg.json."""
    if not paths:
        raise SaeError("no SAE directory given; pass one or more SAE directories, globs or folders of them")
    found: list[Path] = []
    for p in map(Path, paths):
        matches = [p]
        if not p.exists() and glob.has_magic(str(p)):
            matches = [Path(m) for m in sorted(glob.glob(str(p)))]
            if not matches:
                raise SaeError(f"no path matches {str(p)!r}")
        for m in matches:
            if not m.exists():
                raise SaeError(f"SAE directory {str(m)!r} does not exist")
            if not m.is_dir():
                raise SaeError(f"{str(m)!r} is a file; pass an SAE directory (cfg.json + sae_weights.safetensors)")
            if (m / "cfg.json").exists() or (m / "sae_weights.safetensors").exists():
                found.append(m)
                continue
            subs = sorted(
                d for d in m.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "cfg.json").is_file()
            )
            if not subs:
                raise SaeError(
                    f"{str(m)!r} is neither an SAE directory (cfg.json + sae_weights.safetensors) nor a folder "
                    "holding SAE directories"
                )
            found += subs
    # One entry per directory, named as the user gave it (reports show paths as typed, not resolved).
    unique: dict[Path, Path] = {}
    for d in found:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def _names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return names


def load_dictionary(path: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE or transcoder (ours or SAELens-made) in directory `path`; SaeError when its cfg.json records no
    site to read (`hook_name`) or, a transcoder's, to write (`hook_name_out`). Eval and inspect load through this."""
    sae = load_sae(path, device=device)
    if not sae.cfg.hook_name:
        raise SaeError(f"SAE {path}: cfg.json records no hook_name (the site the SAE was trained on)")
    if not sae.cfg.hook_name_out:  # (an SAE's is its hook_name)
        raise SaeError(f"transcoder {path}: cfg.json records no hook_name_out (the site it predicts)")
    return sae


def describe(path: Path, name: str, sae: SparseAutoencoder) -> SaeSpec:
    """What the SAE's cfg records: sites (a transcoder's input and output sites), BOS handling, model, corpus and
    store (metadata keys `keep_bos`, `model`, `corpus`, `store`, written by `sae train`; SAELens-made SAEs have
    none of them)."""
    cfg, meta = sae.cfg, sae.cfg.metadata
    model = meta.get("model")
    if not isinstance(model, dict) or not model.get("id"):
        model = {"id": cfg.model_name} if cfg.model_name else None
    corpus = meta.get("corpus")
    store, store_note = recorded_store(path, meta)
    return SaeSpec(
        path=path,
        name=name,
        sae=sae,
        hook_name=str(cfg.hook_name),
        # Only SAEs that say they were trained without BOS rows keep position 0 clean; SAELens-made ones
        # record nothing of the kind and are spliced everywhere.
        skip_bos=meta.get("keep_bos") is False,
        model=model,
        corpus=corpus if isinstance(corpus, dict) else None,
        store=store,
        store_note=store_note,
        exclude=rowtypes.exclusion_from_metadata(meta),
        train_batch_size=int(meta["batch_size"]) if isinstance(meta.get("batch_size"), int) else None,
        hook_name_out=str(cfg.hook_name_out),
    )


def _snapshot(spec: SaeSpec) -> bool:
    """An SAE of ours saved by a checkpoint or an interrupted run, before its training finished."""
    return bool(spec.sae.cfg.metadata.get("sae_pipeline_version")) and not spec.sae.cfg.complete


def _store_attrs(spec: SaeSpec) -> dict[str, Any] | None:
    if spec.store is None or not spec.store.exists():
        return None
    try:
        return Store.open(spec.store).attrs
    except SaeError:
        return None


# --------------------------------------------------------------------------------------------------
# Checks: model identity, site width, training data


def _norm_id(model_id: str) -> str:
    p = Path(model_id).expanduser()
    return str(p.resolve()) if p.exists() else model_id.rstrip("/")


def same_model(recorded: dict[str, Any], info: ModelInfo) -> bool:
    """Whether the recorded model is the loaded one: same weights hash when both are known, else same id
    (and same hub revision when both are known)."""
    if recorded.get("sha256") and info.sha256:
        return recorded["sha256"] == info.sha256
    if recorded.get("revision") and info.revision and recorded["revision"] != info.revision:
        return False
    return _norm_id(str(recorded.get("id", ""))) == _norm_id(info.id)


def check_model(specs: list[SaeSpec], info: ModelInfo, force: bool) -> None:
    """Stop (or, with `force`, warn loudly) when an SAE was trained on another model than `info`."""
    for s in specs:
        if s.model is None or same_model(s.model, info):
            continue
        msg = (
            f"SAE {s.name} was trained on model {s.model.get('id')!r}"
            + (f" (weights sha256 {s.model['sha256'][:12]}…)" if s.model.get("sha256") else "")
            + f", but the model loaded for eval is {info.id!r}"
            + (f" (weights sha256 {info.sha256[:12]}…)" if info.sha256 else "")
        )
        if not force:
            raise SaeError(msg + "; its metrics would be meaningless. Pass --force to evaluate anyway.")
        print(f"\n!!! WARNING: {msg}. Evaluating anyway (--force).\n", file=sys.stderr, flush=True)


def check_sites(specs: list[SaeSpec], model: Any) -> dict[str, Site]:
    """The site of each SAE's hook name and output hook name on `model` (SaeError for an unknown site, an SAE
    whose width does not fit, or a transcoder whose output is computed before its input)."""
    sites = {}
    for s in specs:
        for what, hook, width in (("d_in", s.hook_name, s.sae.d_in), ("d_out", s.spliced, s.sae.d_out)):
            site = parse_site(hook, model)
            have = site_width(model, site)
            if width != have:
                raise SaeError(
                    f"SAE {s.name} has {what} {width}, but site {site.name} of this model has width {have}: "
                    "the SAE belongs to another model or site"
                )
            sites[hook] = site
        if not computed_before(sites[s.hook_name], sites[s.spliced]):
            raise SaeError(
                f"transcoder {s.name} reads {s.hook_name}, which this model computes after its output site "
                f"{s.spliced}: it cannot be spliced"
            )
    return sites


def _same_corpus(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("split") != b.get("split"):
        return False
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return (a.get("id"), a.get("paths")) == (b.get("id"), b.get("paths"))


def _training_corpora(spec: SaeSpec) -> list[dict[str, Any]]:
    """The corpora the SAE was trained on (several for a concatenated store), from its cfg or its store."""
    corpus = spec.corpus
    if corpus is None:
        attrs = _store_attrs(spec)
        corpus = attrs.get("corpus") if attrs else None

    def flat(c: Any) -> list[dict[str, Any]]:
        if isinstance(c, dict) and isinstance(c.get("concat"), list):
            return [x for part in c["concat"] for x in flat(part)]
        return [c] if isinstance(c, dict) and (c.get("id") or c.get("paths")) else []

    return flat(corpus)


def _heldout_sibling(paths: list[str]) -> Path | None:
    """For a single training file or folder named like `train…`, a sibling named `heldout…`/`validation…`/…"""
    if len(paths) != 1:
        return None
    p = Path(paths[0])
    if "train" not in p.name:
        return None
    for split in HELDOUT_SPLITS:
        q = p.with_name(p.name.replace("train", split, 1))
        if q.exists():
            return q
    return None


def _default_split(dataset: str, exclude: str | None = None) -> str:
    """The first held-out split `dataset` has (not `exclude`); `train` for local files, where splits do not apply."""
    splits = available_splits(dataset)
    if splits is None:
        return "train"
    split = next((s for s in HELDOUT_SPLITS if s in splits and s != exclude), None)
    if split is None:
        raise SaeError(
            f"dataset {dataset!r} has no held-out split (splits: {', '.join(splits)}); pass --split or --dataset"
        )
    return split


def resolve_dataset(cfg: EvalConfig, specs: list[SaeSpec]) -> tuple[str, str]:
    """(dataset, split) to evaluate on: --dataset/--split, else the held-out part of the SAE's training corpus."""
    if cfg.dataset is not None:
        return cfg.dataset, cfg.split or _default_split(cfg.dataset)
    corpora = _training_corpora(specs[0])
    if len(corpora) != 1:
        raise SaeError(
            f"SAE {specs[0].name} records "
            + ("no training corpus" if not corpora else f"{len(corpora)} training corpora (a concatenated store)")
            + "; pass --dataset (and --split) with held-out text"
        )
    corpus = corpora[0]
    if corpus.get("paths"):
        sibling = _heldout_sibling(corpus["paths"])
        if sibling is None:
            raise SaeError(
                f"SAE {specs[0].name} was trained on local files {corpus['paths']}, which have no held-out "
                "split; pass --dataset with held-out text"
            )
        print(f"eval data: {sibling} (the held-out sibling of the training corpus)", file=sys.stderr)
        return str(sibling), cfg.split or "train"
    dataset = corpus["id"]
    return dataset, cfg.split or _default_split(dataset, exclude=corpus.get("split"))


def check_not_training_data(specs: list[SaeSpec], dataset: str, split: str, cfg: EvalConfig) -> None:
    """Refuse to evaluate on the corpus split an SAE was trained on, unless `allow_train_data`."""
    if cfg.allow_train_data:
        return
    info = None
    for s in specs:
        for trained in _training_corpora(s):
            info = info or corpus_info(dataset, split=split, text_column=cfg.text_column)
            if _same_corpus(trained, info):
                raise SaeError(
                    f"eval data {dataset!r} (split {split!r}) is the corpus SAE {s.name} was trained on; "
                    "evaluate on held-out data (--dataset/--split), or pass --allow-train-data to do it anyway"
                )


# --------------------------------------------------------------------------------------------------
# Eval data and ablation means


def load_contexts(dataset: str, tokenizer: Any, split: str, cfg: EvalConfig) -> np.ndarray:
    """The eval contexts [N, seq_len] int32, read exactly as harvest reads a corpus."""
    it = iter_contexts(
        dataset, tokenizer, seq_len=cfg.seq_len, split=split, text_column=cfg.text_column, max_tokens=cfg.max_tokens
    )
    contexts = list(it)
    if not contexts:
        raise SaeError(f"dataset {dataset!r} (split {split!r}) gave no eval contexts")
    return np.stack(contexts)


def _store_mean(path: Path, hook: str, t0: int, info: ModelInfo) -> Tensor:
    """The store's mean activation at `hook` over the positions ≥ t0; SaeError when the store cannot give it."""
    store = Store.open(path)
    recorded = store.attrs.get("model")
    if isinstance(recorded, dict) and recorded.get("id") and not same_model(recorded, info):
        raise SaeError(f"store {path} holds activations of model {recorded['id']!r}, not of {info.id!r}")
    return store.stats(hook, skip_bos=t0 > 0).mean


def ablation_means(
    keys: list[tuple[str, int]],
    sites: dict[str, Site],
    specs: list[SaeSpec],
    cfg: EvalConfig,
    model: Any,
    info: ModelInfo,
    contexts: np.ndarray,
    rows: dict[str, Tensor] | None = None,
) -> dict[tuple[str, int], tuple[Tensor, str]]:
    """Mean activation per (site, t0) for mean ablation, and where it came from: --store, else the SAE's
    recorded store, else the eval tokens at the spliced positions (from `rows`, the captured activations, or one
    pass that stops at the site)."""
    device = next(model.parameters()).device
    out: dict[tuple[str, int], tuple[Tensor, str]] = {}
    todo = []
    for key in keys:
        hook, t0 = key
        if cfg.store is not None:  # the store the user named must work
            out[key] = (_store_mean(cfg.store, hook, t0, info).to(device), f"store {cfg.store}")
            continue
        for path in dict.fromkeys(s.store for s in specs if s.spliced == hook and s.store and s.store.exists()):
            try:
                out[key] = (_store_mean(path, hook, t0, info).to(device), f"store {_shown(path)}")
                break
            except SaeError:
                continue  # a recorded store that moved on or changed: try the next, else the eval tokens
        else:
            site = sites[hook].name
            if rows is not None and site in rows:
                x = rows[site][:, t0:].reshape(-1, rows[site].shape[-1])
                acc = MeanAccumulator(x.shape[-1], "cpu")
                acc.add(x)
                out[key] = (acc.mean.float().to(device), "eval tokens")
            else:
                todo.append(key)
    if todo:
        acc = {key: MeanAccumulator(model.config.hidden_size, device) for key in todo}
        todo_sites = list(dict.fromkeys(sites[hook] for hook, _ in todo))
        for i in range(0, len(contexts), cfg.batch_size):
            ids = torch.from_numpy(contexts[i : i + cfg.batch_size]).to(device, torch.long)
            with torch.inference_mode():
                acts = capture(model, todo_sites, ids)
            for hook, t0 in todo:
                a = acts[sites[hook].name][:, t0:]
                acc[hook, t0].add(a.reshape(-1, a.shape[-1]).float())
        for key in todo:
            out[key] = (acc[key].mean.float(), "eval tokens")
    return out


def capture_rows(model: Any, contexts: np.ndarray, sites: list[Site], batch_size: int) -> dict[str, Tensor]:
    """The clean activations of `sites` on every eval context, [N, T, d] float32 on the CPU (one forward that
    stops at the deepest site)."""
    if not sites:
        return {}
    device = next(model.parameters()).device
    out: dict[str, list[Tensor]] = {s.name: [] for s in sites}
    for i in range(0, len(contexts), batch_size):
        ids = torch.from_numpy(contexts[i : i + batch_size]).to(device, torch.long)
        with torch.inference_mode():
            acts = capture(model, sites, ids)
        for s in sites:
            out[s.name].append(acts[s.name].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _store_norms(path: Path, hook: str) -> dict[str, Any] | None:
    try:
        return Store.open(path).norm_stats(hook)
    except SaeError:
        return None


def _shown(path: Path | str) -> str:
    """A store path for the report: an SAE records its store's absolute path, so one under the working directory
    is shown relative to it, as the user would have typed it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def row_types(
    specs: list[SaeSpec], sites: dict[str, Site], cfg: EvalConfig, rows: dict[str, Tensor]
) -> dict[str, RowTypes]:
    """Per spliced hook: the median non-BOS norm (--store's statistics, else the SAE's store's, else the eval
    rows at positions ≥ 1 in `rows`) and M (--massive-factor, else the store's setting, else the default)."""
    out = {}
    for hook, site in sites.items():
        paths = [cfg.store] if cfg.store is not None else []
        paths += [s.store for s in specs if s.spliced == hook and s.store and s.store.exists()]
        found = next(((p, n) for p in dict.fromkeys(paths) if (n := _store_norms(p, hook)) is not None), None)
        if found is not None:
            path, norms = found
            factor = cfg.massive_factor or float(norms["massive"]["factor"])
            out[hook] = RowTypes(float(norms["median"]), factor, f"store {_shown(path)}")
            continue
        x = rows[site.name][:, 1:].reshape(-1, rows[site.name].shape[-1])
        median = float(rowtypes.row_norms(x).median()) if len(x) else None
        out[hook] = RowTypes(median, cfg.massive_factor or rowtypes.DEFAULT_MASSIVE_FACTOR, "eval tokens")
    return out


def _needs_rows(specs: list[SaeSpec], cfg: EvalConfig) -> set[str]:
    """Spliced hooks whose median row norm no store gives: those need a capture pass over the eval tokens."""
    out = set()
    for s in specs:
        paths = [cfg.store] if cfg.store is not None else ([s.store] if s.store and s.store.exists() else [])
        if not any(_store_norms(p, s.spliced) is not None for p in paths):
            out.add(s.spliced)
    return out


# --------------------------------------------------------------------------------------------------
# The pass


def _replace_from(act: Tensor, t0: int, new: Tensor) -> Tensor:
    """`act` with positions ≥ t0 replaced by `new` [B, T − t0, d]."""
    new = new.to(act.dtype)
    return new if t0 == 0 else torch.cat([act[:, :t0], new], dim=1)


class RowTypes(NamedTuple):
    """How the rows of one site are told apart."""

    median: float | None
    """Median non-BOS row norm of the site (None: unknown, every row counts as typical)."""
    factor: float
    """M: a row is massive when its norm exceeds M × median."""
    source: str
    """Where the median came from: `store PATH` or `eval tokens`."""

    @property
    def threshold(self) -> float | None:
        return None if self.median is None else rowtypes.massive_threshold(self.median, self.factor)


def _excluded(spec: SaeSpec, norms: Tensor, position: Tensor, tokens: Tensor, types: RowTypes) -> Tensor:
    """Rows of `spec`'s spliced positions it was trained without (its own threshold, else M_sae × median)."""
    ex = spec.exclude
    thr = None
    if ex.massive_factor is not None and types.median is not None:
        thr = rowtypes.massive_threshold(types.median, ex.massive_factor)
    return rowtypes.excluded_mask(norms, position, tokens, ex, thr)


def _sae_splice(st: _SaeState, ids: Tensor, ctx0: int) -> Callable[..., Tensor]:
    """The splice of one SAE for the forward batch of contexts ctx0.. with token ids `ids` [B, T]: spliced
    positions ≥ t0 get x̂, except rows the SAE never trained on; the reconstruction statistics see the rest.
    `fn(act)` for an SAE; `fn(x, y)` for a transcoder (`sae.sites.splice_from`: its input x and the output y
    that its prediction replaces; an SAE's is `fn(y, y)`)."""
    sae, t0 = st.spec.sae, st.t0
    dtype = sae.W_dec.dtype

    def fn(src: Tensor, act: Tensor | None = None) -> Tensor:
        act = src if act is None else act
        y, x = act[:, t0:], src[:, t0:]
        b, t, d = y.shape
        flat = y.reshape(-1, d)
        if st.batch_xhat is not None:  # batch mode: reconstructions precomputed over shuffled batches
            new = st.batch_xhat[ctx0 : ctx0 + b].to(act.device, act.dtype).reshape(-1, d)
            keep = ~st.batch_excluded[ctx0 : ctx0 + b].to(act.device).reshape(-1)
            out = torch.where(keep[:, None], new, flat)
            return _replace_from(act, t0, out.view(y.shape))
        norms = rowtypes.row_norms(flat)
        position = torch.arange(t0, t0 + t, device=act.device).repeat(b)
        context = torch.arange(ctx0, ctx0 + b, device=act.device).repeat_interleave(t)
        tokens = ids[:, t0:].reshape(-1).to(act.device)
        keep = ~_excluded(st.spec, norms, position, tokens, st.types)
        xs = x.reshape(-1, x.shape[-1])[keep].to(dtype)
        a = sae.encode(xs)
        x_hat = sae.decode(a, xs)  # (a skip transcoder's skip connection reads the input)
        st.stats.add(flat[keep], x_hat, a, context[keep], rowtypes.massive_mask(norms[keep], st.types.threshold))
        st.stats.n_excluded += int((~keep).sum())
        out = flat.clone()
        out[keep] = x_hat.to(act.dtype)
        return _replace_from(act, t0, out.view(y.shape))

    return fn


def batch_reconstructions(
    st: _SaeState, rows: Tensor, contexts: np.ndarray, batch_rows: int, seed: int, targets: Tensor | None = None
) -> None:
    """Batch mode as training selects: every spliced, non-excluded row of the eval contexts (`rows` [N, T, d],
    the site's clean activations on the CPU; a transcoder's input site's, with `targets` [N, T, d_out] those of
    its output site) shuffled with `seed` and encoded with batch top-k in batches of `batch_rows`. Feeds the
    statistics and keeps x̂ for the splice."""
    sae, t0 = st.spec.sae, st.t0
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    x = rows[:, t0:]
    y = x if targets is None else targets[:, t0:]
    n, t, _ = y.shape
    flat = x.reshape(n * t, -1)
    flat_y = y.reshape(n * t, -1)
    norms = rowtypes.row_norms(flat_y)
    position = torch.arange(t0, t0 + t).repeat(n)
    context = torch.arange(n).repeat_interleave(t)
    tokens = torch.from_numpy(np.ascontiguousarray(contexts[:, t0:])).reshape(-1).long()
    excluded = _excluded(st.spec, norms, position, tokens, st.types)
    massive = rowtypes.massive_mask(norms, st.types.threshold)
    idx = torch.nonzero(~excluded).squeeze(1)
    order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    out = flat_y.clone()
    with torch.inference_mode():
        for i in range(0, len(order), batch_rows):
            j = order[i : i + batch_rows]
            xb = flat[j].to(device, dtype)
            a = sae.encode_batch(xb)
            x_hat = sae.decode(a, xb)
            st.stats.add(flat_y[j].to(device), x_hat, a, context[j].to(device), massive[j].to(device))
            out[j] = x_hat.float().cpu()
    st.stats.n_excluded += int(excluded.sum())
    st.batch_xhat = out.view(n, t, -1)
    st.batch_excluded = excluded.view(n, t)


def _ablate_splice(t0: int, value: Tensor | None) -> Callable[[Tensor], Tensor]:
    def fn(act: Tensor) -> Tensor:
        shape = (act.shape[0], act.shape[1] - t0, act.shape[2])
        # contiguous: a broadcast view could break a model that adds to its residual stream in place
        new = act.new_zeros(shape) if value is None else value.to(act.dtype).expand(shape).contiguous()
        return _replace_from(act, t0, new)

    return fn


class PrefixReplay:
    """Skip the blocks before a site in the spliced forwards.

    Blocks before the site compute exactly what they computed in the clean forward of the same batch, so the
    clean forward records the output of the last of them, and in the spliced forwards every one of those
    blocks returns that output instead of running: only the embedding, the blocks from the site on and the
    unembedding run. The splice hooks (on the block itself for `resid_post`) still run as usual.
    """

    def __init__(self, model: Any, sites: list[Site]) -> None:
        path = SITE_TABLE[model.config.model_type]["resid_post"][0]
        self.blocks = [
            model.base_model.get_submodule(path.format(L=i)) for i in range(int(model.config.num_hidden_layers))
        ]
        # resid_post of block L is its output: blocks 0..L can be skipped; other kinds live inside block L.
        self.skip = {s.name: s.layer + 1 if s.kind == "resid_post" else s.layer for s in sites}
        self.outputs: dict[int, Any] = {}

    @contextmanager
    def record(self) -> Iterator[None]:
        """Within the block, the forward records the outputs the replays need."""
        self.outputs.clear()

        def hook(i: int) -> Callable:
            def store(module: Any, args: Any, output: Any) -> None:
                self.outputs[i] = output

            return store

        needed = sorted({n - 1 for n in self.skip.values() if n > 0})
        handles = [self.blocks[i].register_forward_hook(hook(i)) for i in needed]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replay(self, site: Site) -> Iterator[None]:
        """Within the block, the blocks before `site` return their recorded clean output without running."""
        n = self.skip[site.name]
        output = self.outputs.get(n - 1)
        for block in self.blocks[:n]:
            block.forward = lambda *args, **kwargs: output
        try:
            yield
        finally:
            for block in self.blocks[:n]:
                del block.forward  # the instance attribute; the class's forward shows through again


def encoder_modes(sae: Any, mode: str) -> list[str]:
    """The encoder modes one SAE is evaluated in: `both` means threshold and batch for a BatchTopK SAE, and
    threshold alone for any other (their batch mode is the same encoder)."""
    if mode == "both":
        return ["threshold", "batch"] if sae.batch_topk else ["threshold"]
    return [mode]


class _SaeState:
    def __init__(
        self,
        spec: SaeSpec,
        site: Site,
        t0: int,
        device: torch.device,
        mode: str,
        types: RowTypes,
        n_contexts: int,
        source: Site | None = None,
    ) -> None:
        # site: where the SAE is spliced; source: what it reads (a transcoder's input site; else the same)
        self.spec, self.site, self.t0, self.mode, self.types = spec, site, t0, mode, types
        self.source = source if source is not None else site
        self.stats = SpliceStats(spec.sae.d_out, spec.sae.d_sae, n_contexts, device)
        self.ce = CeAccumulator()
        self.batch_xhat: Tensor | None = None
        self.batch_excluded: Tensor | None = None

    @property
    def recon(self) -> Any:
        """The reconstruction accumulator over all spliced rows."""
        return self.stats.groups["all"]


def run_pass(
    model: Any,
    contexts: np.ndarray,
    specs: list[SaeSpec],
    sites: dict[str, Site],
    means: dict[tuple[str, int], tuple[Tensor, str]],
    cfg: EvalConfig,
    *,
    types: dict[str, RowTypes] | None = None,
    rows: dict[str, Tensor] | None = None,
    reuse_prefix: bool = True,
) -> tuple[list[_SaeState], dict[int, CeAccumulator], dict[tuple[str, int], dict[str, CeAccumulator]]]:
    """One pass over `contexts`: per-SAE accumulators, clean CE per t0, zero/mean CE (and zero-ablation KL) per
    (site, t0). `types`: row types per hook (default: every row typical); `rows`: each site's clean activations
    [N, T, d] on the CPU, needed for batch mode (captured here when missing).

    `reuse_prefix=False` runs every forward in full (for checking that `PrefixReplay` changes nothing).
    """
    device = next(model.parameters()).device
    types = types or {}
    n_ctx = len(contexts)
    states = [
        _SaeState(
            s, sites[s.spliced], int(s.skip_bos), device, mode,
            types.get(s.spliced, RowTypes(None, rowtypes.DEFAULT_MASSIVE_FACTOR, "none")), n_ctx, sites[s.hook_name],
        )
        for s in specs
        for mode in encoder_modes(s.sae, cfg.mode)
    ]  # fmt: skip
    batch_states = [st for st in states if st.mode == "batch" and st.spec.sae.batch_topk]
    if batch_states:
        hooks = dict.fromkeys(h for st in batch_states for h in (st.spec.hook_name, st.spec.spliced))
        need = [sites[h] for h in hooks if sites[h].name not in (rows or {})]
        rows = {**(rows or {}), **capture_rows(model, contexts, need, cfg.batch_size)}
        for st in batch_states:
            size = cfg.batch_rows or st.spec.train_batch_size or DEFAULT_BATCH_ROWS
            targets = rows[st.site.name] if st.source != st.site else None
            batch_reconstructions(st, rows[st.source.name], contexts, size, cfg.seed, targets)
    groups = list(dict.fromkeys((st.spec.spliced, st.t0) for st in states))
    clean = {t0: CeAccumulator() for _, t0 in groups}
    ablated = {key: {"zero": CeAccumulator(), "mean": CeAccumulator()} for key in groups}
    prefix = PrefixReplay(model, list(sites.values()))

    def forward(
        ids: Tensor, site: Site | None = None, fn: Callable[..., Tensor] | None = None, source: Site | None = None
    ) -> Tensor:
        # source: a transcoder's input site (spliced from it into `site`); the blocks before it are replayed
        with ExitStack() as stack:
            if site is None:
                stack.enter_context(prefix.record())
            else:
                if source is None or source == site:
                    stack.enter_context(splice(model, site, fn))
                else:
                    stack.enter_context(splice_from(model, source, site, fn))
                if reuse_prefix:
                    stack.enter_context(prefix.replay(source or site))
            return model(input_ids=ids, use_cache=False).logits

    bar = progress.Progress("eval", contexts.size, "tok")
    bar.figures(forwards=f"{1 + 2 * len(groups) + len(states)} per batch ({len(states)} spliced)")
    for i in range(0, len(contexts), cfg.batch_size):
        ids = torch.from_numpy(contexts[i : i + cfg.batch_size]).to(device, torch.long)
        targets = ids[:, 1:]  # the prediction made at position t is of token t + 1
        with torch.inference_mode():
            ref = token_losses(forward(ids)[:, :-1], targets, keep_dist=True)  # the logits are dropped here
            for t0, acc in clean.items():
                acc.add(ref.nll[:, t0:])
            for (hook, t0), accs in ablated.items():
                for kind, value in (("zero", None), ("mean", means[hook, t0][0])):
                    logits = forward(ids, sites[hook], _ablate_splice(t0, value))[:, :-1]
                    out = token_losses(logits, targets, ref.clean if kind == "zero" else None)
                    accs[kind].add(out.nll[:, t0:], None if out.kl is None else out.kl[:, t0:])
            for st in states:
                logits = forward(ids, st.site, _sae_splice(st, ids, i), st.source)
                out = token_losses(logits[:, :-1], targets, ref.clean)
                st.ce.add(out.nll[:, st.t0 :], out.kl[:, st.t0 :])
                del logits
            del ref
        bar.update(ids.numel())
    bar.close()
    return states, clean, ablated


# --------------------------------------------------------------------------------------------------
# Entry point


def _kept(cfg: EvalConfig) -> tuple[str, str]:
    # settings.json is written after the report, so a report a stopped run may have half-replaced never counts
    return f"no new report in {cfg.out}: eval writes it only at the end", RERUN


@interruptible("eval", _kept)
def evaluate(cfg: EvalConfig) -> Path:
    """Evaluate every SAE named in `cfg.sae_dirs` on one set of eval tokens; write the report; return its dir."""
    progress.begin("eval")
    check_values(cfg)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise SaeError(f"report directory {str(cfg.out)!r} exists and is not a directory")
    dirs = find_sae_dirs(cfg.sae_dirs)
    names = _names(dirs)
    specs = [describe(d, n, load_dictionary(d)) for d, n in zip(dirs, names, strict=True)]
    record = outputs.eval_record(cfg)  # what this report is made from, before anything can change it
    for s in specs:
        if _snapshot(s):
            print(f"note: SAE {s.name} is a snapshot taken before its training finished", file=sys.stderr)
        if s.store is None and s.sae.cfg.metadata.get("store"):
            note = f"note: SAE {s.name}: {s.store_note}; its statistics come from --store or the eval tokens"
            print(note, file=sys.stderr)

    model_name, revision = cfg.model, None
    if model_name is None:
        recorded = [s.model for s in specs if s.model]
        if not recorded:
            raise SaeError(f"SAE {specs[0].name} records no model; pass --model")
        model_name, revision = recorded[0]["id"], recorded[0].get("revision")
    # The model's path and the eval data are checked before the model loads (a download, or a minute on a CPU).
    check_model_name(model_name, revision=revision)
    dataset, split = resolve_dataset(cfg, specs)
    check_not_training_data(specs, dataset, split, cfg)
    check_corpus(dataset, split=split, text_column=cfg.text_column)

    model, tokenizer, info = load_model(
        model_name, revision=revision, device=cfg.device, trust_remote_code=cfg.trust_remote_code
    )
    check_model(specs, info, cfg.force)
    sites = check_sites(specs, model)
    device = next(model.parameters()).device
    specs = [s._replace(sae=s.sae.to(device)) for s in specs]
    contexts = load_contexts(dataset, tokenizer, split, cfg)

    keys = list(dict.fromkeys((s.spliced, int(s.skip_bos)) for s in specs))
    batch = cfg.mode != "threshold" and any(s.sae.batch_topk for s in specs)
    batch_hooks = {h for s in specs if s.sae.batch_topk for h in (s.hook_name, s.spliced)} if batch else set()
    need = _needs_rows(specs, cfg) | batch_hooks
    rows = capture_rows(model, contexts, [sites[h] for h in sorted(need)], cfg.batch_size)
    types = row_types(specs, {h: sites[h] for h in dict.fromkeys(s.spliced for s in specs)}, cfg, rows)
    means = ablation_means(keys, sites, specs, cfg, model, info, contexts, rows)
    states, clean, ablated = run_pass(model, contexts, specs, sites, means, cfg, types=types, rows=rows)
    del rows

    results = [_result(st, clean, ablated, means, info, dataset, split, cfg) for st in states]
    setup = {
        "model": info.id + (f" ({EMBEDDED_MODEL_NAME})" if info.id == DEFAULT_MODEL else ""),
        "model dtype": info.dtype,
        "dataset": dataset,
        "split": split,
        "contexts": len(contexts),
        "seq_len": contexts.shape[1],
        "encoder mode": cfg.mode,
        "batch size": cfg.batch_size,
        "bootstrap": f"{cfg.bootstrap} resamples of the contexts, seed {cfg.seed}" if cfg.bootstrap else "none",
    }
    write_report(Path(cfg.out), results, setup)
    outputs.write_record(Path(cfg.out), record)  # last: the report is complete and current
    progress.summary("eval", [*summary_table(results).splitlines(), f"report: {cfg.out}"])
    return Path(cfg.out)


def _result(
    st: _SaeState,
    clean: dict[int, CeAccumulator],
    ablated: dict[tuple[str, int], dict[str, CeAccumulator]],
    means: dict[tuple[str, int], tuple[Tensor, str]],
    info: ModelInfo,
    dataset: str,
    split: str,
    cfg: EvalConfig,
) -> dict[str, Any]:
    spec, t0 = st.spec, st.t0
    key = (spec.spliced, t0)
    ce_clean, ce_sae = clean[t0].ce, st.ce.ce
    ce_zero, ce_mean = ablated[key]["zero"].ce, ablated[key]["mean"].ce
    recon = st.stats.result()
    kl_zero = ablated[key]["zero"].mean_kl
    scfg = spec.sae.cfg
    norms, l0 = st.stats.rows()
    return {
        # `both`: a BatchTopK SAE's batch-mode entry is told apart by its name
        "name": spec.name + (" (batch)" if cfg.mode == "both" and st.mode == "batch" else ""),
        "sae_dir": str(spec.path),
        "architecture": scfg.training_architecture or scfg.architecture,
        "saelens_architecture": scfg.architecture,
        "hook_name": spec.hook_name,
        "target_site": spec.spliced if scfg.layout.transcoder else None,
        "skip": scfg.layout.skip,
        "d_in": int(scfg.d_in),
        "d_out": int(scfg.d_out),  # type: ignore[arg-type]
        "d_sae": int(scfg.d_sae),
        "k": scfg.k,
        "mode": st.mode,
        # None for SAEs made elsewhere (nothing records whether their training finished)
        "training_complete": None if not scfg.metadata.get("sae_pipeline_version") else not _snapshot(spec),
        "tokens_seen": scfg.metadata.get("tokens_seen"),
        "store": str(spec.store) if spec.store is not None else None,
        "store_note": spec.store_note,
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "ce_recovered": ce_recovered(ce_zero, ce_sae, ce_clean),
        "ce_recovered_mean": ce_recovered(ce_mean, ce_sae, ce_clean),
        "delta_ce": ce_sae - ce_clean,
        "kl": st.ce.mean_kl,
        "kl_zero": kl_zero,
        "kl_score": 1 - st.ce.mean_kl / kl_zero if kl_zero > 0 else math.nan,
        "fvu": recon["fvu"],
        "nmse": recon["nmse"],
        "nmse_per_row": recon["nmse_per_row"],
        "cosine": recon["cosine"],
        "l0": recon["l0"],
        "dead_fraction": recon["dead_fraction"],
        "dense_fraction": recon["dense_fraction"],
        "n_tokens": recon["n_tokens"],
        "n_ce_tokens": st.ce.n,
        "first_spliced_position": t0,
        "mean_source": means[key][1],
        "model": info.id,
        "dataset": dataset,
        "split": split,
        "seq_len": cfg.seq_len,
        "ci95": _intervals(st, clean[t0], ablated[key], cfg),
        "row_types": {
            "massive_factor": st.types.factor,
            "median_norm": st.types.median,
            "massive_threshold": st.types.threshold,
            "median_source": st.types.source,
            **recon["groups"],
        },
        "excluded": {"rows": spec.exclude.describe(), "n_rows": st.stats.n_excluded, **spec.exclude._asdict()},
        "batch_rows": (cfg.batch_rows or spec.train_batch_size or DEFAULT_BATCH_ROWS) if st.mode == "batch" else None,
        "l0_histogram": recon["l0_histogram"],
        "fire_counts": recon["fire_counts"],
        "row_norm_l0": (norms, l0),
    }


def _intervals(
    st: _SaeState, clean: CeAccumulator, ablated: dict[str, CeAccumulator], cfg: EvalConfig
) -> dict[str, list[float]]:
    """95 % bootstrap intervals over contexts (the same resamples for every SAE: `cfg.seed`)."""
    if cfg.bootstrap < 1:
        return {}
    nll_c, _, n = clean.per_context()
    nll_s, kl_s, _ = st.ce.per_context()
    nll_z, kl_z, _ = ablated["zero"].per_context()
    nll_m, _, _ = ablated["mean"].per_context()
    w = bootstrap_weights(len(n), cfg.bootstrap, cfg.seed)
    wn = w @ n
    ce_c, ce_s, ce_z, ce_m = (w @ v / wn for v in (nll_c, nll_s, nll_z, nll_m))
    kl, klz = w @ kl_s / wn, w @ kl_z / wn
    s = st.stats
    fvu = fvu_resampled(w, *(t.cpu().numpy() for t in (s.ctx_sq_err, s.ctx_sum, s.ctx_sq, s.ctx_n)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "delta_ce": interval(ce_s - ce_c),
            "ce_recovered": interval((ce_z - ce_s) / (ce_z - ce_c)),
            "ce_recovered_mean": interval((ce_m - ce_s) / (ce_m - ce_c)),
            "kl": interval(kl),
            "kl_score": interval(1 - kl / klz),
            "fvu": interval(fvu),
        }
