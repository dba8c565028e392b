"""The static site of `sae inspect`: index.html (the whole app, inline), data as JSON, a PNG of the histogram.

```
out/
  index.html                   the app (inspect_app.html beside this module, with inline CSS and JavaScript):
                               #/ is the index table, #/latent/N a latent's page (client-side routing);
                               #/typical and #/latent/N/typical show top examples over typical rows only
                               (no massive or BOS rows); ← and → step through latents
  density_histogram.png        firing density over the inspected latents, for reports
  data/index.json              run facts and one column per field over all latents (index, density, max, ...)
  data/latents-NNNNN.json      CHUNK latents each: stats, histogram, examples with windows, logit effects
  data/*.js                    the same JSON wrapped in a function call: pages opened from file:// may not
                               fetch() files, but may load scripts, so the app reads these
```
No server, no network, no CDN, no web fonts: everything the page needs is in `out`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae import atomic  # noqa: E402
from sae.errors import SaeError  # noqa: E402

APP = "inspect_app.html"
"""The page itself, shipped beside this module."""

CHUNK = 128
"""Latents per data file: a page loads only the file of the latent it shows."""

SNIPPET = (4, 2)
"""Tokens left and right of the top example's token in the index table's snippet."""


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _write_data(folder: Path, name: str, obj: Any, call: str) -> None:
    text = _json(obj)
    atomic.write_bytes(folder / f"{name}.json", text.encode())
    # `</` cannot end the script early: the loader is a script element of its own, never inline.
    atomic.write_bytes(folder / f"{name}.js", f"{call}({text});\n".encode())


def _snippet(latent: dict[str, Any], text: Callable[[int], str], key: str = "top") -> list[str] | None:
    if not latent[key]:
        return None
    ex = latent[key][0]
    f = ex["position"] - ex["start"]
    ids = ex["tokens"]
    left, right = SNIPPET
    return [
        "".join(map(text, ids[max(0, f - left) : f])),
        text(ids[f]),
        "".join(map(text, ids[f + 1 : f + 1 + right])),
    ]


def density_histogram(info: dict[str, Any], density: list[float | None]) -> dict[str, Any]:
    """log10 firing density of the live latents in 0.25-wide bins, with the dead and dense counts."""
    live = np.log10([d for d in density if d])
    lo = float(np.floor(live.min() * 4) / 4) if len(live) else -6.0
    edges = np.arange(lo, 0.25 + 1e-9, 0.25)
    counts, _ = np.histogram(live, bins=edges)
    return {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist(), "dead": info["dead"]}


def plot_density(hist: dict[str, Any], info: dict[str, Any], path: Path) -> None:
    """The index histogram as a PNG (log10 density on x, latents on y)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=150)
    e = np.asarray(hist["edges"])
    ax.bar(e[:-1], hist["counts"], width=np.diff(e), align="edge", color="#3b6ea8", edgecolor="white", linewidth=0.5)
    ax.axvline(np.log10(info["dense_frequency"]), color="#b4492d", linestyle="--", linewidth=1, label="dense (10 %)")
    ax.set_xlabel("log10 firing density (fraction of used rows)")
    ax.set_ylabel("latents")
    ax.set_title(
        f"{info['sae']['name']}: {sum(hist['counts'])} live, {info['dead']} dead, {info['dense']} dense latents",
        fontsize=9,
    )
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def check_out(out: Path) -> None:
    """SaeError unless `out` is free, an empty folder, or a site this module wrote (which is replaced whole)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise SaeError(f"--out {out} is a file; pass a folder for the site")
    if any(out.iterdir()) and not ((out / "index.html").is_file() and (out / "data" / "index.json").is_file()):
        raise SaeError(f"--out {out} is a folder that holds something other than an inspect site; choose another")


def write_site(out: Path, info: dict[str, Any], latents: list[dict[str, Any]], text: Callable[[int], str]) -> Path:
    """Write the site for `latents` (as `sae.evaluate.inspect` builds them) into `out`, replacing what was there
    only once the new site is complete."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.mkdtemp(out.parent, f".{out.name}.tmp-")
    try:
        data = tmp / "data"
        data.mkdir()
        atomic.apply_umask(data, directory=True)
        numbers = ("i", "count", "density", "mean", "max", "max_typical", "massive_share", "massive_mass")
        columns: dict[str, list[Any]] = {k: [] for k in numbers}
        columns["snippet"], columns["snippet_typical"], columns["top_logit"] = [], [], []
        for lat in latents:
            for k in numbers:
                columns[k].append(lat[k])
            columns["snippet"].append(_snippet(lat, text))
            columns["snippet_typical"].append(_snippet(lat, text, "top_typical"))
            columns["top_logit"].append(text(lat["logits"]["top"][0][0]) if lat["logits"] else None)
        hist = density_histogram(info, columns["density"])
        index = {**info, "chunk_size": CHUNK, "n_latents": len(latents), "columns": columns, "density_hist": hist}
        _write_data(data, "index", index, "SAE_INSPECT.index")
        for c in range(0, len(latents), CHUNK):
            part = latents[c : c + CHUNK]
            ids = {t for lat in part for ex in _all_examples(lat) for t in ex["tokens"]}
            if part and part[0]["logits"] is not None:
                ids |= {t for lat in part for side in ("top", "bottom") for t, _ in lat["logits"][side]}
            vocab = {str(t): text(t) for t in sorted(ids)}
            _write_data(
                data,
                f"latents-{c // CHUNK:05d}",
                {"chunk": c // CHUNK, "latents": part, "vocab": vocab},
                "SAE_INSPECT.chunk",
            )
        atomic.write_bytes(tmp / "index.html", files(__package__).joinpath(APP).read_bytes())
        plot_density(hist, info, tmp / "density_histogram.png")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _all_examples(lat: dict[str, Any]) -> list[dict[str, Any]]:
    return lat["top"] + lat["top_typical"] + [ex for iv in lat["quantiles"] for ex in iv["examples"]]
