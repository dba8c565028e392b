"""`sae inspect`: feature pages for every latent of an SAE from one streaming pass over its rows, without the LM.

1. Pass over the rows in store order (or over held-out text run through the LM up to the site). Each batch
   is encoded on the SAE's device (BatchTopK in θ mode: relu(pre)·1[pre > θ]); the nonzero activations feed
   bounded per-latent state (`sae.evaluate.latent_state`): counts, sums, a running top-N, a histogram with
   seeded per-bin reservoirs. Rows the SAE never trained on (BOS rows of an SAE trained without them) and rows
   holding NaN/Inf are left out and counted.
2. A second, small pass over the rows of the selected examples' context windows gives each latent's value at
   every token of its windows, for the shading.
3. From the weights alone: logit effects through the final norm's gain and the unembedding, and the latents
   with the most similar decoder rows.
The result is a static site (`sae.evaluate.dashboard`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae.config import InspectConfig
from sae.device import resolve_device
from sae.errors import SaeError
from sae.metrics import DENSE_FREQUENCY
from sae.progress import Progress, summary
from sae.saedir import SparseAutoencoder, load_sae
from sae.store import Store

from .dashboard import check_out, write_site
from .directions import logit_effects, similar_decoders
from .evaluate import same_model
from .examples import TOP, choose, window_values, windows
from .latent_state import Entries, LatentState
from .rows import ModelRows, StoreRows

MASSIVE_FACTOR = 5.0
"""A row is massive when its norm exceeds this many times the median row norm (of the first batch of used rows;
rows are shuffled within shards, so it is a fair sample). Pages say which share of a latent's firing fell on
such rows, so a latent that only fires on them is seen for what it is."""

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
    """Rows left out, by reason (`bos`, `non_finite`)."""
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


def _recorded_store(sae: SparseAutoencoder) -> Path | None:
    store = sae.cfg.metadata.get("store")
    return Path(store) if isinstance(store, str) and store else None


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
    path = cfg.store or _recorded_store(sae)
    if path is None:
        raise SaeError(f"SAE {cfg.sae_dir} records no store; pass --store (a store of its site) or --dataset")
    if not Path(path).exists() and cfg.store is None:
        raise SaeError(f"SAE {cfg.sae_dir} was trained on store {path}, which no longer exists; pass --store")
    store = Store.open(path)
    rows = StoreRows(store, site, device, cfg.max_rows)
    if store.d_model != sae.cfg.d_in:
        raise SaeError(f"store {path} has d_model {store.d_model}, but the SAE has d_in {sae.cfg.d_in}")
    model, tokenizer = _load_model(_model_name(cfg, sae, store), cfg, torch.device("cpu"), False, store)
    return rows, model, tokenizer


# --------------------------------------------------------------------------------------------------
# The passes


def _encode(sae: SparseAutoencoder, x: Tensor, selected: Tensor | None) -> Tensor:
    with torch.no_grad():
        a = sae.encode(x)
    return a if selected is None else a[:, selected]


def first_pass(
    source: StoreRows | ModelRows,
    sae: SparseAutoencoder,
    selected: np.ndarray,
    cfg: InspectConfig,
    skip_bos: bool,
) -> tuple[LatentState, dict[str, int], int, float]:
    """Stream every row once: (state, rows left out by reason, rows used, median row norm)."""
    device = sae.W_enc.device
    state = LatentState(len(selected), top=cfg.top, per_bin=cfg.per_quantile, seed=cfg.seed, device=device)
    sel = None if len(selected) == sae.cfg.d_sae else torch.as_tensor(selected, device=device)
    left_out = {"bos": 0, "non_finite": 0}
    used, median = 0, math.nan
    progress = Progress("inspect", source.n_rows, unit="rows")
    for batch in source.batches():
        keep = np.ones(len(batch.row), dtype=bool)
        if skip_bos:
            keep &= batch.position != 0
            left_out["bos"] += int((~keep).sum())
        x = batch.x[torch.from_numpy(keep).to(batch.x.device)]
        finite = torch.isfinite(x).all(1)
        n_bad = int((~finite).sum())
        meta = np.stack([batch.row, batch.context, batch.position], 1)[keep]
        if n_bad:
            left_out["non_finite"] += n_bad
            x, meta = x[finite], meta[finite.cpu().numpy()]
        pay_all = torch.from_numpy(meta).to(device)
        for i in range(0, x.shape[0], cfg.batch_size):
            xb = x[i : i + cfg.batch_size]
            norm = xb.norm(dim=1)
            if math.isnan(median):
                median = float(norm.median())
            a = _encode(sae, xb, sel)
            r, f = a.nonzero(as_tuple=True)
            state.update(
                Entries(f, a[r, f].float(), pay_all[i : i + cfg.batch_size][r], (norm > MASSIVE_FACTOR * median)[r])
            )
            used += xb.shape[0]
        progress.figures(rows=f"{used:,} used", latents=f"{int((state.count > 0).sum()):,} fired")
        progress.update(len(batch.row))
    progress.close()
    return state, left_out, used, median


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


def inspect(cfg: InspectConfig) -> InspectResult:
    """Write the feature pages of the SAE in `cfg.sae_dir` into `cfg.out` (see the module docstring)."""
    for name in ("top", "quantiles", "per_quantile", "batch_size"):
        if getattr(cfg, name) < 1:
            raise SaeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.window < 0:
        raise SaeError(f"--window must be 0 or more, got {cfg.window}")
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise SaeError(f"--max-rows must be at least 1, got {cfg.max_rows}")
    if cfg.sae_dir is None:
        raise SaeError("no SAE directory given")
    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae_dir, device=device)
    if not sae.cfg.hook_name:
        raise SaeError(f"SAE {cfg.sae_dir}: cfg.json records no hook_name (the site the SAE reads)")
    site = str(sae.cfg.hook_name)
    skip_bos = sae.cfg.metadata.get("keep_bos") is False
    selected = parse_latents(cfg.latents, sae.cfg.d_sae, cfg.seed)
    source, model, tokenizer = _source(cfg, sae, site, device)
    out = Path(cfg.out) if cfg.out is not None else Path("runs/inspect") / Path(cfg.sae_dir).resolve().name
    check_out(out)
    t = source.seq_len

    state, left_out, used, median = first_pass(source, sae, selected, cfg, skip_bos)
    if used == 0:
        raise SaeError(f"no row to inspect: all {sum(left_out.values())} rows read were left out ({left_out})")
    ex, intervals = choose(state, cfg.quantiles)
    win = windows(ex, cfg.window, t)
    values, own_norm = window_values(source, sae, selected, ex, win, skip_bos, cfg.batch_size, t)
    ctx_ids = np.unique(ex.context)
    tokens = source.contexts(ctx_ids)[
        np.searchsorted(ctx_ids, np.repeat(ex.context, np.diff(win.offset))), win.position
    ]
    focus = win.offset[:-1] + ex.position - win.start
    values[focus] = ex.act  # the first pass's value (a re-encode in another batch shape may differ in the last bit)

    w_dec = sae.W_dec.detach()
    effects = logit_effects(w_dec[torch.as_tensor(selected, device=w_dec.device)], model) if model is not None else None
    neighbours = similar_decoders(w_dec, torch.as_tensor(selected))

    acts_l, tokens_l = round_sig(values, 4), tokens.tolist()
    act_l, norm_l = round_sig(ex.act, 6), round_sig(own_norm / median, 3)
    for f, a in zip(focus.tolist(), act_l, strict=True):
        acts_l[f] = a  # the example's own token: the same number as its "act"
    row_l, ctx_l, pos_l, start_l = ex.row.tolist(), ex.context.tolist(), ex.position.tolist(), win.start.tolist()
    off = win.offset.tolist()

    def example(e: int) -> dict[str, Any]:
        a, b = off[e], off[e + 1]
        return {
            "row": row_l[e],
            "context": ctx_l[e],
            "position": pos_l[e],
            "act": act_l[e],
            "norm": norm_l[e],
            "start": start_l[e],
            "tokens": tokens_l[a:b],
            "acts": acts_l[a:b],
        }

    count = state.count.cpu().numpy()
    massive = state.massive_count.cpu().numpy()
    total = state.total.cpu().numpy()
    hist = state.hist.cpu().numpy()
    width = state.bin_width().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        density_l = round_sig(count / used, 6)
        mean_l = round_sig(np.where(count > 0, total / count, np.nan), 6)
        share_l = round_sig(np.where(count > 0, massive / count, np.nan), 4)
    vmax = np.where(count > 0, state.top.value[:, 0].cpu().numpy(), np.nan)
    max_l, width_l = round_sig(vmax, 6), round_sig(width, 8)
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
            "massive_share": share_l[j],
            "hist": {"width": width_l[j], "counts": hist[j, :last].tolist()},
            "top": groups.get(TOP, []),
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
            "encoder": "θ mode (relu(pre)·1[pre > θ])" if sae.batch_topk else sae.cfg.architecture,
        },
        "source": {**source.describe(), **({"dataset": cfg.dataset} if cfg.dataset else {})},
        "seq_len": t,
        "rows_read": source.n_rows,
        "rows_used": used,
        "left_out": left_out,
        "median_norm": _sig(median),
        "massive_factor": MASSIVE_FACTOR,
        "dense_frequency": DENSE_FREQUENCY,
        "dead": dead,
        "dense": dense,
        "top": cfg.top,
        "quantiles": cfg.quantiles,
        "window": cfg.window,
        "logit_effects": effects is not None,
    }
    write_site(out, info, latents, _token_text(tokenizer))
    summary(
        "inspect",
        [
            f"{len(selected):,} latents of {info['sae']['name']} ({site}) from {used:,} rows; left out: "
            + (", ".join(f"{v:,} {k.replace('_', '-')}" for k, v in left_out.items() if v) or "none"),
            f"{dead:,} dead, {dense:,} dense (density > {DENSE_FREQUENCY:.0%}); {len(ex.row):,} examples shown",
            f"pages: {out / 'index.html'}",
        ],
    )
    return InspectResult(out, len(selected), source.n_rows, used, left_out, dead, dense)
