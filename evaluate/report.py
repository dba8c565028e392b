"""The report directory: report.json (one object per SAE), report.md (tables a person reads) and PNG plots."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from sae import atomic  # noqa: E402
from sae.metrics import DENSE_FREQUENCY  # noqa: E402

METRIC_KEYS = (
    "ce_clean", "ce_sae", "ce_zero", "ce_mean", "ce_recovered", "ce_recovered_mean", "delta_ce", "kl", "fvu",
    "nmse", "cosine", "l0", "dead_fraction", "dense_fraction", "n_tokens",
)  # fmt: skip
"""The metric names every report.json entry carries, exactly."""

PLOTS = ("frontier.png", "l0_histogram.png", "firing_frequency.png", "latent_budget.png")

_NOT_JSON = ("fire_counts", "row_norm_l0")
"""Per-latent and per-row arrays that feed the plots but stay out of report.json."""

CI_KEYS = ("delta_ce", "ce_recovered", "ce_recovered_mean", "kl", "kl_score", "fvu")
"""Metrics reported with a 95 % bootstrap interval over contexts."""

MODE_LABELS = {"threshold": "θ", "batch": "batch top-k"}
"""How plots name an encoder mode when an architecture appears in both."""

DEFINITIONS = """\
- **Positions.** Contexts of `seq_len` tokens, BOS first. The SAE replaces the site's activation at the
  *spliced positions*: every position, or every position but 0 when the SAE was trained without BOS rows.
  Zero and mean ablation replace the same positions.
- **CE** = mean next-token cross-entropy (nats) over the predictions made *from* spliced positions (the
  prediction at position t of token t+1, for spliced t < seq_len − 1); all CE variants and KL use exactly
  these predictions. CE_clean: no replacement; CE_sae: replaced by x̂; CE_zero: by 0; CE_mean: by the mean
  activation (the store's, else the eval tokens').
- **CE recovered** = (CE_zero − CE_sae) / (CE_zero − CE_clean); **CE recovered (mean)** the same with CE_mean.
  **ΔCE** = CE_sae − CE_clean. **KL** = mean over those predictions of KL(p_clean ‖ p_sae) (nats).
- **FVU** = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: mean of the eval activations); **NMSE** = Σ‖x − x̂‖² / Σ‖x‖²;
  **cosine** = mean cos(x, x̂); sums over all spliced positions (`n_tokens` rows).
- **L0** = mean number of active latents per token; **dead** = fraction of latents that never fired on the
  eval tokens; **dense** = fraction firing on more than 10 % of them.
- **NMSE (row mean)** = mean over rows of ‖x − x̂‖² / ‖x‖², beside the pooled NMSE (which large rows dominate).
- **KL score** = 1 − KL_sae / KL_zero (SAEBench's normalised KL; KL_zero: KL(p_clean ‖ p_zero-ablated)).
- **Row types.** A spliced row is *massive* when its norm exceeds M × the site's median non-BOS norm (M and
  the median's source in the row-type table), else *typical*. Reconstruction metrics are given over all
  spliced rows and per type, with each type's share of the rows and of the latent budget (Σ active latents).
- **Excluded rows.** Rows the SAE was trained without (its metadata `exclude`: massive rows, positions or
  token ids) keep their clean activation, like BOS, and are in no reconstruction metric; CE and KL still
  average over every prediction from spliced positions.
- **95 % intervals** (in brackets): percentile bootstrap over eval contexts (resampled with replacement, fixed
  seed, the same resamples for every SAE).
- **Batch mode** (`batch top-k`): the spliced rows of all eval contexts are shuffled with the seed and encoded
  with batch top-k in batches of the SAE's training batch size, as training selects.
"""


def write_report(out: Path, results: list[dict[str, Any]], setup: dict[str, Any]) -> None:
    """Write report.json, report.md and the plots into `out` (each file replaced atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = [
        {**{k: v for k, v in r.items() if k not in _NOT_JSON}, "latent_budget_by_norm": budget_bins(r)} for r in results
    ]
    atomic.write_json(out / "report.json", _json_safe(entries))
    atomic.write_bytes(out / "report.md", markdown(results, setup).encode())
    _save(plot_frontier(results), out / "frontier.png")
    _save(plot_l0_histogram(results), out / "l0_histogram.png")
    _save(plot_firing_frequency(results), out / "firing_frequency.png")
    _save(plot_latent_budget(results), out / "latent_budget.png")


def budget_bins(r: dict[str, Any]) -> list[dict[str, float]]:
    """Mean L0 of the spliced rows per band of norm / median norm (for report.json; the plot shows every row)."""
    norms, l0 = r.get("row_norm_l0", (np.zeros(0), np.zeros(0)))
    median = (r.get("row_types") or {}).get("median_norm")
    if not len(norms) or not median:
        return []
    ratio = np.asarray(norms) / median
    edges = [0, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, math.inf]
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        sel = (ratio >= a) & (ratio < b)
        if sel.any():
            out.append(
                {"norm_ratio_from": a, "norm_ratio_to": b, "rows": int(sel.sum()), "mean_l0": float(l0[sel].mean())}
            )
    return out


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _save(fig: plt.Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Tables


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _with_ci(r: dict[str, Any], key: str, spec: str = ".4f") -> str:
    ci = (r.get("ci95") or {}).get(key)
    if not ci or not all(_finite(v) for v in ci):
        return _fmt(r.get(key), spec)
    return f"{_fmt(r.get(key), spec)} [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _ci_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["SAE", "FVU", "ΔCE", "CE rec. (zero)", "CE rec. (mean)", "KL", "KL score"]
    rows = [
        [
            r["name"],
            *(_with_ci(r, k) for k in ("fvu", "delta_ce", "ce_recovered", "ce_recovered_mean", "kl", "kl_score")),
        ]
        for r in results
    ]
    return header, rows


def _type_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["SAE", "rows", "share of rows", "share of latents", "L0", "FVU", "NMSE", "NMSE (row mean)", "cos"]
    rows = []
    for r in results:
        types = r.get("row_types") or {}
        for g, v in ((g, types[g]) for g in ("all", "typical", "massive") if g in types):
            rows.append(
                [
                    f"{r['name']}: {g}",
                    str(v["n_rows"]),
                    _fmt(v["share_rows"], ".2%"),
                    _fmt(v["share_budget"], ".2%"),
                    _fmt(v["l0"], ".1f"),
                    _fmt(v["fvu"], ".4f"),
                    _fmt(v["nmse"], ".4f"),
                    _fmt(v["nmse_per_row"], ".4f"),
                    _fmt(v["cosine"], ".4f"),
                ]
            )
    return header, rows


def _metric_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["SAE", "L0", "FVU", "NMSE", "cos", "ΔCE", "CE rec.", "CE rec. (mean)", "KL", "dead", "dense"]
    rows = [
        [
            r["name"],
            _fmt(r["l0"], ".1f"),
            _fmt(r["fvu"], ".4f"),
            _fmt(r["nmse"], ".4f"),
            _fmt(r["cosine"], ".4f"),
            _fmt(r["delta_ce"], ".4f"),
            _fmt(r["ce_recovered"], ".4f"),
            _fmt(r["ce_recovered_mean"], ".4f"),
            _fmt(r["kl"], ".4f"),
            _fmt(r["dead_fraction"], ".3f"),
            _fmt(r["dense_fraction"], ".3f"),
        ]
        for r in results
    ]
    return header, rows


def _provenance(results: list[dict[str, Any]]) -> str:
    """One line per SAE directory: whether its training finished, and the store its statistics come from."""
    lines = []
    for r in {r["sae_dir"]: r for r in results}.values():
        done = r.get("training_complete")
        trained = (
            "trained to the end" if done else
            f"**a snapshot taken before its training finished** ({r.get('tokens_seen') or 0:,} tokens seen); "
            "its metrics are not those of the finished SAE" if done is False else "made elsewhere"
        )  # fmt: skip
        store = f"store {r['store']} ({r['store_note']})" if r.get("store") else (r.get("store_note") or "no store")
        lines.append(f"- {r['name']}: {trained}; {store}")
    return "\n".join(lines)


def _types_intro(results: list[dict[str, Any]]) -> str:
    """One line per SAE: M, the median and where it came from, and the rows left unspliced besides BOS."""
    lines = []
    for r in results:
        t, ex = r.get("row_types") or {}, r.get("excluded") or {}
        median = t.get("median_norm")
        lines.append(
            f"- {r['name']}: massive = norm > {_fmt(t.get('massive_factor'), 'g')} × median "
            f"{_fmt(median, '.4g')} (median from {t.get('median_source', '–')}); "
            f"left unspliced besides BOS: {ex.get('rows', 'nothing')}"
            + (f" ({ex['n_rows']} rows)" if ex.get("n_rows") else "")
            + (f"; batch mode over shuffled batches of {r['batch_rows']} rows" if r.get("batch_rows") else "")
        )
    return "\n".join(lines)


def summary_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table of the main metrics, for the terminal."""
    header, rows = _metric_rows(results)
    cols = list(zip(header, *rows, strict=True))
    widths = [max(len(c) for c in col) for col in cols]

    def line(cells: list[str]) -> str:
        # first column (the name) left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header)] + [line(r) for r in rows])


def markdown(results: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """report.md: the eval setup, what each SAE is, its metrics, the CE values, definitions and the plots."""
    parts = ["# SAE evaluation report", ""]
    parts += [
        _table(
            ["setting", "value"],
            [[k, f"`{v}`" if v not in (None, "") else "–"] for k, v in setup.items()],
        ),
        "",
        "## SAEs",
        "",
        _table(
            ["SAE", "architecture", "site", "d_in", "d_sae", "k", "mode", "spliced positions", "directory"],
            [
                [
                    r["name"],
                    r["architecture"],
                    f"`{r['hook_name']}`" + (f" → `{r['target_site']}`" if r.get("target_site") else ""),
                    str(r["d_in"]),
                    str(r["d_sae"]),
                    _fmt(r.get("k")),
                    r["mode"],
                    "all" if r["first_spliced_position"] == 0 else f"≥ {r['first_spliced_position']}",
                    f"`{r['sae_dir']}`",
                ]
                for r in results
            ],
        ),
        "",
        _provenance(results),
        "",
        "## Metrics",
        "",
        _table(*_metric_rows(results)),
        "",
        "## 95 % bootstrap intervals over contexts",
        "",
        _table(*_ci_rows(results)),
        "",
        "## Typical and massive rows",
        "",
        _types_intro(results),
        "",
        _table(*_type_rows(results)),
        "",
        "## Cross-entropy (nats per token)",
        "",
        _table(
            ["SAE", "CE clean", "CE sae", "CE zero", "CE mean", "mean from", "CE tokens", "spliced tokens"],
            [
                [
                    r["name"],
                    _fmt(r["ce_clean"], ".4f"),
                    _fmt(r["ce_sae"], ".4f"),
                    _fmt(r["ce_zero"], ".4f"),
                    _fmt(r["ce_mean"], ".4f"),
                    r["mean_source"],
                    str(r["n_ce_tokens"]),
                    str(r["n_tokens"]),
                ]
                for r in results
            ],
        ),
        "",
        "## Definitions",
        "",
        DEFINITIONS,
        "## Plots",
        "",
        "![Sparsity–fidelity frontier](frontier.png)",
        "",
        "![Per-token L0](l0_histogram.png)",
        "",
        "![Latent firing frequency](firing_frequency.png)",
        "",
        "![Latent budget against row norm](latent_budget.png)",
        "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Plots


def _groups(results: list[dict[str, Any]]) -> dict[tuple[str, int | None], list[dict[str, Any]]]:
    """SAEs by architecture (and encoder mode, when the report has both), and by dictionary size when several
    sizes are present: a sweep over k is a group."""
    several_sizes = len({r["d_sae"] for r in results}) > 1
    modes: dict[str, set[str | None]] = defaultdict(set)
    for r in results:
        modes[r["architecture"]].add(r.get("mode"))
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        mixed = len(modes[r["architecture"]]) > 1  # `--mode both`: BatchTopK's two encoders are two series
        series = r["architecture"] + (f" ({MODE_LABELS.get(r.get('mode'), r.get('mode'))})" if mixed else "")
        groups[series, r["d_sae"] if several_sizes else None].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))


def _group_label(key: tuple[str, int | None]) -> str:
    return key[0] + (f", F={key[1]}" if key[1] is not None else "")


def _panels(n: int, width: float = 5.0, height: float = 3.6) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    if n == 1:
        width, height = 8.0, 4.6
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.5), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_frontier(results: list[dict[str, Any]]) -> plt.Figure:
    """FVU and ΔCE against L0 (BatchTopK paper, Figure 1): one line per architecture (colour) and dictionary
    size (line style), its SAEs sorted by L0."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    groups = _groups(results)
    archs = sorted({arch for arch, _ in groups})
    sizes = sorted({size for _, size in groups if size is not None})
    colors = {a: f"C{i}" for i, a in enumerate(archs)}
    styles = {f: (ls, m) for f, ls, m in zip(sizes, ["-", "--", ":", "-."] * 4, "osD^v<>" * 3, strict=False)}
    l0s = [r["l0"] for r in results if _finite(r["l0"]) and r["l0"] > 0]
    log_x = bool(l0s) and max(l0s) / min(l0s) > 4
    for ax, key, ylabel in (
        (axes[0], "fvu", "FVU  (Σ‖x − x̂‖² / Σ‖x − x̄‖²)"),
        (axes[1], "delta_ce", "ΔCE  (CE_sae − CE_clean, nats)"),
    ):
        for (arch, size), rs in groups.items():
            pts = sorted(
                (r["l0"], r[key]) for r in rs if _finite(r["l0"]) and _finite(r[key]) and (r["l0"] > 0 or not log_x)
            )
            if not pts:
                continue
            ls, marker = styles.get(size, ("-", "o"))
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, ls, marker=marker, color=colors[arch], lw=1.6, ms=6, label=_group_label((arch, size)))
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(title="architecture", fontsize="small")
    axes[0].set_title("Reconstruction vs sparsity")
    axes[1].set_title("Downstream loss vs sparsity")
    fig.suptitle("Sparsity–fidelity frontier (lower and further left is better)")
    fig.tight_layout()
    return fig


def _quantile(counts: np.ndarray, q: float) -> int:
    """The smallest L0 value with at least a fraction `q` of the tokens at or below it."""
    cdf = np.cumsum(counts) / max(counts.sum(), 1)
    return int(np.searchsorted(cdf, q))


def _l0_series(r: dict[str, Any]) -> list[tuple[str, str, np.ndarray]]:
    """(label, line style, L0 counts) per row type of one SAE: typical and massive when the report splits them,
    else all rows."""
    types = r.get("row_types") or {}
    split = [(g, ls) for g, ls in (("typical", "-"), ("massive", "--")) if (types.get(g) or {}).get("n_rows")]
    if not split:
        return [("all rows", "-", np.asarray(r["l0_histogram"], dtype=float))]
    return [(g, ls, np.asarray(types[g]["l0_histogram"], dtype=float)) for g, ls in split]


def plot_l0_histogram(results: list[dict[str, Any]]) -> plt.Figure:
    """Distribution over tokens of the number of active latents (BatchTopK paper, Figure 3), one panel per
    architecture (and dictionary size), typical rows solid and massive rows dashed, each as a fraction of its
    own rows. The x-axis ends where 99.5 % of every series' tokens lie; the legend says how many lie beyond."""
    series = {id(r): _l0_series(r) for r in results}
    top = max(
        [_quantile(h, 0.995) + 1 for ss in series.values() for _, _, h in ss]
        + [int(r.get("k") or 0) + 1 for r in results]
        + [2]
    )
    top = int(math.ceil(top * 1.1))
    width = max(1, math.ceil(top / 60))  # at most ~60 bins, so wide dictionaries stay readable
    n_bins = math.ceil(top / width)
    groups = _groups(results)
    fig, axes = _panels(len(groups))
    for ax, (key, rs) in zip(axes, groups.items(), strict=True):
        for i, r in enumerate(rs):
            color = f"C{i}"
            for label, ls, counts in series[id(r)]:
                total = max(counts.sum(), 1)
                shown = np.zeros(n_bins * width)
                m = min(len(counts), len(shown))
                shown[:m] = counts[:m]
                frac = shown.reshape(n_bins, width).sum(1) / total
                beyond = counts[len(shown) :].sum() / total
                mean = float((np.arange(len(counts)) * counts).sum() / total)
                text = f"{r['name']}, {label}: {int(counts.sum())} rows, mean {mean:.1f}"
                text += f"; {beyond:.1%} > {len(shown)}" if beyond else ""
                ax.stairs(frac, np.arange(n_bins + 1) * width, linewidth=1.6, linestyle=ls, color=color, label=text)
            if r.get("k"):
                ax.axvline(float(r["k"]), color=color, linestyle=":", linewidth=1.2)
        ax.set_xlim(0, n_bins * width)
        ax.set_xlabel("active latents per token (L0)" + (f", bins of {width}" if width > 1 else ""))
        ax.set_ylabel("fraction of the row type's tokens")
        ax.set_title(_group_label(key))
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the peaks, not on them
        ax.legend(fontsize="x-small", loc="upper right")
    fig.suptitle("Per-token L0 by row type (solid: typical, dashed: massive; dotted lines: k)")
    fig.tight_layout()
    return fig


def plot_latent_budget(results: list[dict[str, Any]]) -> plt.Figure:
    """Active latents per row against the row's norm (over the site's median norm), one panel per SAE: every
    row as a faint dot, the mean L0 per norm band as a line, M as a vertical line. BatchTopK's adaptive
    allocation shows as L0 rising with the norm; TopK's as a flat line at k."""
    fig, axes = _panels(len(results), width=4.6, height=3.6)
    rng = np.random.default_rng(0)
    for ax, r in zip(axes, results, strict=True):
        norms, l0 = (np.asarray(v, dtype=float) for v in r.get("row_norm_l0", (np.zeros(0), np.zeros(0))))
        t = r.get("row_types") or {}
        median = t.get("median_norm") or (float(np.median(norms)) if len(norms) else 1.0)
        ratio = norms / median if median else norms
        keep = ratio > 0
        ratio, l0 = ratio[keep], l0[keep]
        if len(ratio) > 20000:  # a readable cloud; the band means use every row
            pick = rng.choice(len(ratio), 20000, replace=False)
        else:
            pick = np.arange(len(ratio))
        ax.scatter(ratio[pick], l0[pick], s=2, alpha=0.15, color="C0", rasterized=True, label="rows")
        if len(ratio):
            edges = np.geomspace(ratio.min(), ratio.max() * 1.0001, 25)
            idx = np.digitize(ratio, edges) - 1
            xs = [np.sqrt(edges[i] * edges[i + 1]) for i in range(len(edges) - 1) if (idx == i).any()]
            ys = [l0[idx == i].mean() for i in range(len(edges) - 1) if (idx == i).any()]
            ax.plot(xs, ys, "-o", color="C3", ms=3, lw=1.6, label="mean L0 per norm band")
        if t.get("massive_factor"):
            ax.axvline(float(t["massive_factor"]), color="gray", ls="--", lw=1, label=f"M = {t['massive_factor']:g}")
        if r.get("k"):
            ax.axhline(float(r["k"]), color="black", ls=":", lw=1, label=f"k = {r['k']}")
        ax.set_xscale("log")
        ax.set_xlabel("row norm / median non-BOS norm")
        ax.set_ylabel("active latents (L0)")
        ax.set_title(r["name"], fontsize="medium")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    fig.suptitle("Latent budget against row norm")
    fig.tight_layout()
    return fig


def plot_firing_frequency(results: list[dict[str, Any]]) -> plt.Figure:
    """Histograms of log10 latent firing frequency over the eval tokens, one panel per architecture (and
    dictionary size); dead latents cannot be placed on a log axis and are counted in the legend."""
    freqs = {}
    for r in results:
        fire = np.asarray(r["fire_counts"], dtype=float)
        freqs[id(r)] = (np.log10(fire[fire > 0] / max(r["n_tokens"], 1)), int((fire == 0).sum()))
    lo = min((f.min() for f, _ in freqs.values() if f.size), default=-6.0)
    edges = np.linspace(lo - 0.05, 0.0, 41)
    groups = _groups(results)
    fig, axes = _panels(len(groups))
    for ax, (key, rs) in zip(axes, groups.items(), strict=True):
        for r in rs:
            f, dead = freqs[id(r)]
            ax.hist(f, bins=edges, histtype="step", linewidth=1.6, label=f"{r['name']} ({dead}/{r['d_sae']} dead)")
        ax.axvline(math.log10(DENSE_FREQUENCY), color="gray", linestyle="--", linewidth=1, label="dense (> 10 %)")
        ax.set_xlabel("log10 firing frequency (fraction of eval tokens)")
        ax.set_ylabel("latents")
        ax.set_title(_group_label(key))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle("Latent firing frequency")
    fig.tight_layout()
    return fig
