"""`sae inspect`: feature pages for every latent of an SAE from one streaming pass over its rows, without the LM.

1. Pass over the rows in store order (or over held-out text run through the LM up to the site). Each batch
   is encoded on the SAE's device (BatchTopK in θ mode: relu(pre)·1[pre > θ]); the nonzero activations feed
   bounded per-latent state (`sae.evaluate.latent_state`): counts, sums, a running top-N over all rows and one
   over typical rows, a histogram with seeded per-bin reservoirs. Rows the SAE never trained on (BOS rows of an
   SAE trained without them, the rows its metadata `exclude` names) and rows holding NaN/Inf are left out and
   counted. Every row used is typical, massive (norm > M × the site's median non-BOS norm, `sae.rowtypes`; M and
   the median from the store's statistics) or BOS; pages mark each example's kind and give each latent's share
   of its activation mass on massive rows, so a latent living on a few huge-norm token types is seen as such.
2. A second, small pass over the rows of the selected examples' context windows gives each latent's value at
   every token of its windows, for the shading.
3. From the weights alone: logit effects through the final norm's gain and the unembedding, and the latents
   with the most similar decoder rows. For a transcoder the encoder reads its input site and the decoder
   writes to its output site (an SAE's are one site): logit effects follow the decoder rows when that site adds
   into the residual stream.
The result is a static site (`sae.evaluate.dashboard`), then `settings.json` (`sae.outputs`), written last: what
`sae run` compares to tell a current site from a stale or half-written one.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae import outputs, rowtypes
from sae.config import InspectConfig, check_values
from sae.device import resolve_device
from sae.errors import SaeError
from sae.interrupt import NOTHING_KEPT, RERUN, interruptible
from sae.metrics import DENSE_FREQUENCY
from sae.progress import Progress, summary
from sae.saedir import SparseAutoencoder, flat_nonzero, recorded_store
from sae.store import Store

from .dashboard import check_out, write_site
from .directions import logit_effects, similar_decoders
from .evaluate import load_dictionary, same_model
from .examples import TOP, TOP_TYPICAL, choose, window_values, windows
from .latent_state import KINDS, Entries, LatentState
from .rows import ModelRows, StoreRows

RESIDUAL_WRITES = re.compile(r"\.hook_(mlp_out|attn_out|resid_(pre|mid|post))$")
"""Sites whose activations add into (or are) the residual stream: a decoder writing there has logit effects
through the final norm and the unembedding."""

MOSTLY_MASSIVE = 0.5
"""A latent whose share of activation mass on massive rows exceeds this is flagged on the index."""

DEFAULT_TEXT_TOKENS = 65536
"""Tokens of held-out text read with --dataset when --max-rows is not given."""


class InspectResult(NamedTuple):
    """What `inspect` wrote and saw."""

    out: Path
    """The site directory."""
    latents: int
    """Latents inspected."""
    rows_read: int
    """Rows the pass read."""
    rows_used: int
    """Rows encoded (read minus those left out)."""
    left_out: dict[str, int]
    """Rows left out, by reason (`bos`, `excluded`: named by the SAE's metadata `exclude`, `non_finite`)."""
    dead: int
    """Inspected latents that never fired on the used rows."""
    dense: int
    """Inspected latents firing on more than 10 % of the used rows."""


# --------------------------------------------------------------------------------------------------
# Which latents, which rows


def parse_latents(spec: str, d_sae: int, seed: int = 0) -> np.ndarray:
    """Sorted latent indices from `all`, `random:N` or a comma list of indices and inclusive ranges `a-b`."""
    spec = spec.strip()
    if spec == "all":
        return np.arange(d_sae)
    if spec.startswith("random:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise SaeError(f"--latents {spec!r}: random:N needs a whole number N") from None
        if not 0 < n <= d_sae:
            raise SaeError(f"--latents {spec!r}: N must be between 1 and the SAE's {d_sae} latents")
        return np.sort(np.random.default_rng(seed).choice(d_sae, n, replace=False))
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise SaeError(f"--latents {spec!r}: {part!r} is not an index or a range a-b") from None
        if not 0 <= a <= b < d_sae:
            raise SaeError(f"--latents {spec!r}: {part!r} is outside the SAE's latents 0-{d_sae - 1}")
        out += range(a, b + 1)
    if not out:
        raise SaeError(f"--latents {spec!r} names no latent; use all, random:N or a list such as 0-99,512")
    return np.unique(np.asarray(out))


class RowKinds:
    """How the pass tells typical, massive and BOS rows apart, and which rows it leaves out."""

    def __init__(self, median: float | None, factor: float, source: str, exclusion: rowtypes.Exclusion, skip_bos: bool):
        self.median = median
        """Median non-BOS row norm of the site (None until the first batch gives one, without store statistics)."""
        self.factor = factor
        """M: a row is massive when its norm exceeds M × median."""
        self.source = source
        """Where the median came from."""
        self.exclusion = exclusion
        """Rows the SAE was trained without (its metadata `exclude`)."""
        self.skip_bos = skip_bos
        """The SAE was trained without BOS rows."""

    @property
    def threshold(self) -> float | None:
        return None if self.median is None else rowtypes.massive_threshold(self.median, self.factor)

    @property
    def exclude_threshold(self) -> float | None:
        """The norm above which the SAE's training left rows out (its own record, else M_sae × median)."""
        ex = self.exclusion
        if ex.massive_threshold is not None:
            return ex.massive_threshold
        if ex.massive_factor is not None and self.median is not None:
            return rowtypes.massive_threshold(self.median, ex.massive_factor)
        return None

    def classify(self, x: Tensor, position: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(kind code per row, `KINDS`; rows to leave out as never trained on; rows holding NaN/Inf)."""
        norms = rowtypes.row_norms(x)
        finite = torch.isfinite(norms)
        bos = position == 0
        if self.median is None:
            usable = norms[finite & ~bos]
            if usable.numel():
                # rows are shuffled within shards, so the first batch is a fair sample
                self.median, self.source = float(usable.median()), "the first batch of rows"
        skip = (bos & self.skip_bos) | (finite & rowtypes.excluded_mask(
            norms, position, tokens, self.exclusion, self.exclude_threshold
        ))  # fmt: skip
        massive = rowtypes.massive_mask(norms, self.threshold) & ~bos
        kind = torch.where(bos, 2, torch.where(massive, 1, 0))
        return kind, skip, ~finite & ~skip

    def describe(self) -> dict[str, Any]:
        return {
            "median_norm": _sig(self.median) if self.median is not None else None,
            "massive_factor": self.factor,
            "massive_threshold": _sig(self.threshold) if self.threshold is not None else None,
            "source": self.source,
            "excluded": self.exclusion.describe(),
        }


def row_kinds(cfg: InspectConfig, sae: SparseAutoencoder, site: str, store: Store | None) -> RowKinds:
    """The median from --store's statistics (else the SAE's store's, else the SAE's exclusion record, else the
    first batch of rows); M from --massive-factor, else the store's setting, else the default."""
    exclusion = rowtypes.exclusion_from_metadata(sae.cfg.metadata)
    skip_bos = sae.cfg.metadata.get("keep_bos") is False
    factor = cfg.massive_factor
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise SaeError(f"--massive-factor must be a positive number, got {factor}")
    stores = [store] if store is not None else []
    recorded, _ = recorded_store(cfg.sae_dir, sae.cfg.metadata) if cfg.sae_dir is not None else (None, "")
    if store is None and recorded is not None:
        try:
            stores.append(Store.open(recorded))
        except SaeError:
            pass
    for st in stores:
        norms = st.norm_stats(site)
        if norms is not None and norms.get("median"):
            f = factor or float(norms["massive"]["factor"])
            return RowKinds(float(norms["median"]), f, f"store {st.path}", exclusion, skip_bos)
    recorded_median = (sae.cfg.metadata.get("exclude") or {}).get("median_norm")
    f = factor or rowtypes.DEFAULT_MASSIVE_FACTOR
    if isinstance(recorded_median, (int, float)) and recorded_median > 0:
        return RowKinds(float(recorded_median), f, "the SAE's exclusion record", exclusion, skip_bos)
    return RowKinds(None, f, "the first batch of rows", exclusion, skip_bos)


def _model_name(cfg: InspectConfig, sae: SparseAutoencoder, store: Store | None) -> str | None:
    if cfg.model:
        return cfg.model
    recorded = sae.cfg.metadata.get("model")
    if isinstance(recorded, dict) and recorded.get("id"):
        return str(recorded["id"])
    if store is not None and isinstance(store.attrs.get("model"), dict) and store.attrs["model"].get("id"):
        return str(store.attrs["model"]["id"])
    return sae.cfg.model_name or None


def _load_model(
    name: str | None, cfg: InspectConfig, device: torch.device, required: bool, store: Store | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer), or (None, None) with a warning when the model cannot be had and only gives text and
    logit effects. SaeError when `store` holds another model's activations (its token ids would be misread)."""
    from sae.models import load_model

    if name == "none" and not required:
        return None, None
    if name is None or name == "none":
        if required:
            raise SaeError("the SAE records no model; pass --model")
        print("inspect: the SAE records no model; token ids shown, no logit effects (pass --model)", file=sys.stderr)
        return None, None
    try:
        model, tokenizer, info = load_model(
            name, device=str(device), dtype="float32", trust_remote_code=cfg.trust_remote_code
        )
    except SaeError as e:
        if required:
            raise
        print(f"inspect: {e}; token ids shown, no logit effects (pass --model)", file=sys.stderr)
        return None, None
    recorded = store.attrs.get("model") if store is not None else None
    if isinstance(recorded, dict) and recorded.get("id") and not same_model(recorded, info):
        raise SaeError(
            f"store {store.path} holds activations of model {recorded['id']!r}, not of {info.id!r}; pass its model "
            "as --model (or --model none for token ids only)"
        )
    return model, tokenizer


def _source(
    cfg: InspectConfig, sae: SparseAutoencoder, site: str, device: torch.device
) -> tuple[StoreRows | ModelRows, Any, Any]:
    """The row source, and the model and tokenizer (None when unavailable)."""
    if cfg.dataset is not None:
        if cfg.store is not None:
            raise SaeError("pass either --store or --dataset, not both")
        from sae.corpus import iter_contexts
        from sae.sites import parse_site

        from .evaluate import _default_split  # the held-out split eval would choose

        model, tokenizer = _load_model(_model_name(cfg, sae, None), cfg, device, required=True)
        parse_site(site, model)
        seq_len = cfg.seq_len or int(sae.cfg.metadata.get("context_size") or 128)
        split = cfg.split or _default_split(cfg.dataset)
        max_tokens = cfg.max_rows or DEFAULT_TEXT_TOKENS
        contexts = list(
            iter_contexts(
                cfg.dataset, tokenizer, seq_len=seq_len, split=split, text_column=cfg.text_column, max_tokens=max_tokens
            )
        )
        if not contexts:
            raise SaeError(f"dataset {cfg.dataset!r} (split {split!r}) gave no context")
        rows = ModelRows(model, site, np.stack(contexts), device, max(1, cfg.batch_size // seq_len))
        return rows, model, tokenizer
    path, how = (cfg.store, "--store") if cfg.store is not None else recorded_store(cfg.sae_dir, sae.cfg.metadata)
    if path is None:
        if sae.cfg.metadata.get("store"):
            raise SaeError(f"SAE {cfg.sae_dir}: {how}; pass --store (a store of its site) or --dataset")
        raise SaeError(f"SAE {cfg.sae_dir} records no store; pass --store (a store of its site) or --dataset")
    store = Store.open(path)
    rows = StoreRows(store, site, device, cfg.max_rows)
    if store.d_model != sae.cfg.d_in:
        raise SaeError(f"store {path} has d_model {store.d_model}, but the SAE has d_in {sae.cfg.d_in}")
    model, tokenizer = _load_model(_model_name(cfg, sae, store), cfg, torch.device("cpu"), False, store)
    return rows, model, tokenizer


def _store_of(source: StoreRows | ModelRows) -> Store | None:
    return source.store if isinstance(source, StoreRows) else None


# --------------------------------------------------------------------------------------------------
# The passes


def nonzero_acts(sae: SparseAutoencoder, x: Tensor, selected: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(row, latent, activation) of every nonzero of `sae.encode(x)` restricted to `selected`, row-major.

    With per-latent thresholds (SAELens jumprelu, our BatchTopK export, jumprelu transcoders) encode is
    relu(pre)·1[pre > θ], nonzero exactly where pre > max(θ, 0): one comparison over the pre-activations
    instead of relu, compare, multiply and a scan of the product (on a CPU these cost as much as the GEMM)."""
    with torch.no_grad():
        threshold = getattr(sae, "threshold", None)
        if threshold is None:
            a = sae.encode(x)
            a = a if selected is None else a[:, selected]
            r, f = a.nonzero(as_tuple=True)
            return r, f, a[r, f]
        pre = sae.pre_acts(x)
        theta = threshold.detach().clamp(min=0)
        if selected is not None:
            pre, theta = pre[:, selected], theta[selected]
        # flat indices of the few nonzeros, then one gather (`nonzero` and a masked select scan every entry)
        idx = flat_nonzero(pre > theta)
        n = pre.shape[1]
        return idx // n, idx % n, pre.view(-1)[idx]


def first_pass(
    source: StoreRows | ModelRows,
    sae: SparseAutoencoder,
    selected: np.ndarray,
    cfg: InspectConfig,
    kinds: RowKinds,
) -> tuple[LatentState, dict[str, int], int]:
    """Stream every row once: (state, rows left out by reason, rows used)."""
    device = sae.W_enc.device
    state = LatentState(len(selected), top=cfg.top, per_bin=cfg.per_quantile, seed=cfg.seed, device=device)
    sel = None if len(selected) == sae.cfg.d_sae else torch.as_tensor(selected, device=device)
    left_out = {"bos": 0, "excluded": 0, "non_finite": 0}
    used = 0
    progress = Progress("inspect", source.n_rows, unit="rows")
    for batch in source.batches():
        x = batch.x
        position = torch.from_numpy(batch.position).to(x.device)
        kind, skip, bad = kinds.classify(x, position, torch.from_numpy(batch.token).to(x.device))
        left_out["bos"] += int((skip & (position == 0)).sum())
        left_out["excluded"] += int((skip & (position != 0)).sum())
        left_out["non_finite"] += int(bad.sum())
        keep = ~(skip | bad)
        meta = torch.from_numpy(np.stack([batch.row, batch.context, batch.position], 1)).to(x.device)
        meta = torch.cat([meta, kind[:, None].long()], 1)[keep].to(device)
        x, kind = x[keep], kind[keep].to(device)
        for i in range(0, x.shape[0], cfg.batch_size):
            r, f, v = nonzero_acts(sae, x[i : i + cfg.batch_size], sel)
            k = kind[i : i + cfg.batch_size][r]
            state.update(Entries(f, v.float(), meta[i : i + cfg.batch_size][r], k == 1, k == 0))
        used += x.shape[0]
        progress.figures(rows=f"{used:,} used", latents=f"{int((state.count > 0).sum()):,} fired")
        progress.update(len(batch.row))
    progress.close()
    return state, left_out, used


# --------------------------------------------------------------------------------------------------
# The whole command


def _sig(v: float, digits: int = 6) -> float | None:
    """A float rounded to `digits` significant digits for the JSON (None for NaN)."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _pairs(ids: Tensor, values: Tensor) -> list[list[Any]]:
    return [[int(i), _sig(float(v), 4)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _token_text(tokenizer: Any) -> Any:
    cache: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i]) if tokenizer is not None else f"⟨{i}⟩"
        return cache[i]

    return text


def round_sig(a: np.ndarray, digits: int) -> list[float | None]:
    """`a` rounded to `digits` significant digits, as a list for the JSON (None for NaN). The rounded values
    are the doubles nearest to short decimals, so the JSON stays short."""
    a = np.asarray(a, dtype=np.float64)
    out = a.copy()
    ok = np.isfinite(a) & (a != 0)
    p = digits - 1 - np.floor(np.log10(np.abs(a[ok])))
    up = p >= 0
    v = a[ok]
    v[up] = np.round(v[up] * 10.0 ** p[up]) / 10.0 ** p[up]
    v[~up] = np.round(v[~up] / 10.0 ** -p[~up]) * 10.0 ** -p[~up]
    out[ok] = v
    lst = out.tolist()
    for i in np.flatnonzero(~np.isfinite(a)).tolist():
        lst[i] = None
    return lst


@interruptible("inspect", lambda cfg: (NOTHING_KEPT, RERUN))
def inspect(cfg: InspectConfig) -> InspectResult:
    """Write the feature pages of the SAE in `cfg.sae_dir` into `cfg.out` (see the module docstring)."""
    check_values(cfg)
    if cfg.sae_dir is None:
        raise SaeError("no SAE directory given")
    record = outputs.inspect_record(cfg)  # what this site is made from, before anything can change it
    device = resolve_device(cfg.device)
    sae = load_dictionary(Path(cfg.sae_dir), device)
    site, site_out = str(sae.cfg.hook_name), str(sae.cfg.hook_name_out)  # what the encoder reads, the decoder writes
    selected = parse_latents(cfg.latents, sae.cfg.d_sae, cfg.seed)
    source, model, tokenizer = _source(cfg, sae, site, device)
    kinds = row_kinds(cfg, sae, site, _store_of(source))
    out = Path(cfg.out) if cfg.out is not None else Path("runs/inspect") / Path(cfg.sae_dir).resolve().name
    check_out(out)
    t = source.seq_len

    state, left_out, used = first_pass(source, sae, selected, cfg, kinds)
    if used == 0:
        raise SaeError(f"no row to inspect: all {sum(left_out.values())} rows read were left out ({left_out})")
    median = kinds.median if kinds.median is not None else math.nan
    ex, intervals = choose(state, cfg.quantiles)
    win = windows(ex, cfg.window, t)
    ctx_ids = np.unique(ex.context)
    tokens = source.contexts(ctx_ids)[
        np.searchsorted(ctx_ids, np.repeat(ex.context, np.diff(win.offset))), win.position
    ]
    planned_u, first = np.unique(win.planned, return_index=True)
    token_of = tokens[first].astype(np.int64)

    def left_out_rows(x: Tensor, planned: np.ndarray) -> Tensor:
        position = torch.from_numpy(planned % t).to(x.device)
        tok = torch.from_numpy(token_of[np.searchsorted(planned_u, planned)]).to(x.device)
        _, skip, bad = kinds.classify(x, position, tok)
        return skip | bad

    values, own_norm = window_values(source, sae, selected, ex, win, left_out_rows, cfg.batch_size, t)
    focus = win.offset[:-1] + ex.position - win.start
    values[focus] = ex.act  # the first pass's value (a re-encode in another batch shape may differ in the last bit)

    w_dec = sae.W_dec.detach()
    effects, logit_note = None, None
    if model is None:
        logit_note = "no model with an unembedding was loaded"
    elif not RESIDUAL_WRITES.search(site_out):
        logit_note = f"the decoder writes to {site_out}, which does not add into the residual stream"
    else:
        effects = logit_effects(w_dec[torch.as_tensor(selected, device=w_dec.device)], model)
        if effects is None:
            logit_note = "the model has no unembedding of the decoder's width or no final norm this tool knows"
    neighbours = similar_decoders(w_dec, torch.as_tensor(selected))

    acts_l, tokens_l = round_sig(values, 4), tokens.tolist()
    act_l, norm_l = round_sig(ex.act, 6), round_sig(own_norm / median, 3)
    for f, a in zip(focus.tolist(), act_l, strict=True):
        acts_l[f] = a  # the example's own token: the same number as its "act"
    row_l, ctx_l, pos_l, start_l = ex.row.tolist(), ex.context.tolist(), ex.position.tolist(), win.start.tolist()
    kind_l = [KINDS[k] for k in ex.kind.tolist()]
    off = win.offset.tolist()

    def example(e: int) -> dict[str, Any]:
        a, b = off[e], off[e + 1]
        return {
            "row": row_l[e],
            "context": ctx_l[e],
            "position": pos_l[e],
            "act": act_l[e],
            "norm": norm_l[e],
            "kind": kind_l[e],
            "start": start_l[e],
            "tokens": tokens_l[a:b],
            "acts": acts_l[a:b],
        }

    count = state.count.cpu().numpy()
    massive = state.massive_count.cpu().numpy()
    total = state.total.cpu().numpy()
    massive_total = state.massive_total.cpu().numpy()
    hist = state.hist.cpu().numpy()
    width = state.bin_width().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        density_l = round_sig(count / used, 6)
        mean_l = round_sig(np.where(count > 0, total / count, np.nan), 6)
        share_l = round_sig(np.where(count > 0, massive / count, np.nan), 4)
        mass_l = round_sig(np.where(count > 0, massive_total / total, np.nan), 4)
    vmax = np.where(count > 0, state.top.value[:, 0].cpu().numpy(), np.nan)
    typical_fired = torch.isfinite(state.top_typical.key[:, 0]).cpu().numpy()
    vmax_typ = np.where(typical_fired, state.top_typical.value[:, 0].cpu().numpy(), np.nan)
    max_l, max_typ_l, width_l = round_sig(vmax, 6), round_sig(vmax_typ, 6), round_sig(width, 8)
    ex_start = np.searchsorted(ex.latent, np.arange(len(selected) + 1))
    iv_start = np.searchsorted(intervals.latent, np.arange(len(selected) + 1))
    iv_lo, iv_hi = round_sig(intervals.lo, 6), round_sig(intervals.hi, 6)
    latents = []
    for j, idx in enumerate(selected.tolist()):
        n = int(count[j])
        last = int(np.flatnonzero(hist[j]).max()) + 1 if n else 0
        mine = range(ex_start[j], ex_start[j + 1])
        groups: dict[int, list[dict[str, Any]]] = {}
        for e in mine:
            groups.setdefault(int(ex.group[e]), []).append(example(e))
        entry: dict[str, Any] = {
            "i": idx,
            "count": n,
            "density": density_l[j],
            "mean": mean_l[j],
            "max": max_l[j],
            "max_typical": max_typ_l[j],
            "massive_share": share_l[j],
            "massive_mass": mass_l[j],
            "hist": {"width": width_l[j], "counts": hist[j, :last].tolist()},
            "top": groups.get(TOP, []),
            "top_typical": groups.get(TOP_TYPICAL, []),
            "quantiles": [
                {
                    "lo": iv_lo[k],
                    "hi": iv_hi[k],
                    "count": int(intervals.count[k]),
                    "examples": groups.get(int(intervals.group[k]), []),
                }
                for k in range(iv_start[j], iv_start[j + 1])
            ],  # fmt: skip
            "similar": _pairs(neighbours.ids[j], neighbours.cosine[j]),
            "logits": None,
        }
        if effects is not None:
            entry["logits"] = {
                "top": _pairs(effects.top_ids[j], effects.top_values[j]),
                "bottom": _pairs(effects.bottom_ids[j], effects.bottom_values[j]),
            }
        latents.append(entry)
    dead = int((count == 0).sum())
    dense = int((count > DENSE_FREQUENCY * used).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        on_massive = int((np.where(count > 0, massive_total / total, 0) > MOSTLY_MASSIVE).sum())
    info = {
        "sae": {
            "path": str(Path(cfg.sae_dir).resolve()),
            "name": Path(cfg.sae_dir).resolve().name,
            "architecture": sae.cfg.architecture,
            "trained_as": sae.cfg.training_architecture,
            "k": sae.cfg.k,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "site": site,
            "site_out": site_out,
            "transcoder": sae.cfg.layout.transcoder,
            "encoder": "θ mode (relu(pre)·1[pre > θ])" if sae.batch_topk else sae.cfg.architecture,
        },
        "source": {**source.describe(), **({"dataset": cfg.dataset} if cfg.dataset else {})},
        "seq_len": t,
        "rows_read": source.n_rows,
        "rows_used": used,
        "left_out": left_out,
        "median_norm": _sig(median),
        "massive_factor": kinds.factor,
        "row_kinds": kinds.describe(),
        "mostly_massive": MOSTLY_MASSIVE,
        "dense_frequency": DENSE_FREQUENCY,
        "dead": dead,
        "dense": dense,
        "on_massive": on_massive,
        "top": cfg.top,
        "quantiles": cfg.quantiles,
        "window": cfg.window,
        "logit_effects": effects is not None,
        "logit_note": logit_note,
    }
    write_site(out, info, latents, _token_text(tokenizer))
    outputs.write_record(out, record)  # last: the site is complete and current
    summary(
        "inspect",
        [
            f"{len(selected):,} latents of {info['sae']['name']} ({site}) from {used:,} rows; left out: "
            + (", ".join(f"{v:,} {k.replace('_', '-')}" for k, v in left_out.items() if v) or "none"),
            f"{dead:,} dead, {dense:,} dense (density > {DENSE_FREQUENCY:.0%}); {on_massive:,} with most of their "
            f"activation mass on massive rows (norm > {kinds.factor:g} × median); {len(ex.row):,} examples shown",
            f"pages: {out / 'index.html'}",
        ],
    )
    return InspectResult(out, len(selected), source.n_rows, used, left_out, dead, dense)
