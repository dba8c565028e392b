"""The static site of `sae inspect`: index.html (the whole app, inline), the page data, a PNG of the histogram.

```
out/
  index.html                   the app (inspect_app.html beside this module, with inline CSS and JavaScript):
                               #/ is the index table, #/latent/N a latent's page (client-side routing);
                               #/typical and #/latent/N/typical show top examples over typical rows only
                               (no massive or BOS rows); ← and → step through latents
  density_histogram.png        firing density over the inspected latents, for reports
  data/index.js                run facts and one column per field over all latents (index, density, max, ...)
  data/latents-NNNNN.js        CHUNK latents each: stats, histogram, examples with windows, logit effects
```
No server, no network, no CDN, no web fonts: everything the page needs is in `out`. Each data file is one JSON
object written once, as the argument of a call (`SAE_INSPECT.index({...});`): a page opened from file:// may not
fetch() files, but may load scripts. `read_site` reads a site back in Python. `data/index.js` is written with
the rest into a temporary folder that replaces `out` whole, so its presence means a finished site.

A chunk is {"chunk", "tokens", "token_ids", "latents"}: `tokens` (text) and `token_ids` (model ids) are the
token table of its windows and logit effects, most frequent first so that the references stay short. A latent
holds its numbers (as in the index's columns), `hist` {"width", "counts"}, and each of its examples once:
  examples      [[row, context, position, kind, norm, tokens, acts], ...]: store row, packed context, position,
                row kind (index into the index's `kinds`), ‖x‖ / median norm, the window's tokens (indices into
                the token table) from max(0, position - window), and [offset, value, offset, value, ...] of the
                window tokens whose value is not 0 (null: a row left out); the example's own activation is its
                value at `position`
  top           indices into examples, largest first
  top_typical   the same over typical rows only; absent where it equals top
  quantiles     [{"lo", "hi", "count", "examples": indices into examples}, ...], highest interval first
  similar       [[latent, cosine], ...]
  logits        {"top": [[token index, effect], ...], "bottom": [...]}, or null
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae import atomic  # noqa: E402
from sae.errors import SaeError  # noqa: E402

from .latent_state import KINDS  # noqa: E402

APP = "inspect_app.html"
"""The page itself, shipped beside this module."""

CHUNK = 128
"""Latents per data file: a page loads only the file of the latent it shows."""

SNIPPET = (4, 2)
"""Tokens left and right of the top example's token in the index table's snippet."""

FORMAT = 2
"""Version of the data layout above, recorded in the index (1: JSON and .js copies, one dict per example)."""

MARKER = Path("data") / "index.js"
"""The file whose presence in a folder means a finished site (the folder is swapped in whole)."""

_OLD_MARKER = Path("data") / "index.json"
"""The marker of a site of the first layout, which a new run may replace."""

EXAMPLE_FIELDS = ("row", "context", "position", "kind", "norm", "tokens", "acts")
"""The fields of an example as written, in order."""


def is_site(out: Path) -> bool:
    """Whether `out` holds a finished site of this module (either layout)."""
    out = Path(out)
    return (out / "index.html").is_file() and ((out / MARKER).is_file() or (out / _OLD_MARKER).is_file())


def _json(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # JSON allows raw U+2028/U+2029 inside strings; JavaScript before ES2019 does not.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _write_data(path: Path, obj: Any, call: str) -> None:
    # `</` cannot end the script early: the loader is a script element of its own, never inline.
    atomic.write_bytes(path, f"{call}({_json(obj)});\n".encode())


def _read_data(path: Path, call: str) -> Any:
    text = Path(path).read_text(encoding="utf-8").strip()
    head, tail = f"{call}(", ");"
    if not (text.startswith(head) and text.endswith(tail)):
        raise SaeError(f"{path} is not a data file of an inspect site (expected {head}...{tail})")
    return json.loads(text[len(head) : -len(tail)])


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
    if any(out.iterdir()) and not is_site(out):
        raise SaeError(f"--out {out} is a folder that holds something other than an inspect site; choose another")


# --------------------------------------------------------------------------------------------------
# One latent's examples, each written once


def _example_key(ex: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(tuple(v) if isinstance(v, list) else v for v in (ex[k] for k in (*EXAMPLE_FIELDS, "act", "start")))


class _Latent:
    """A latent's examples, deduplicated (a row can be a top example, a typical-rows top example and a quantile
    sample at once), and the groups as indices into them."""

    def __init__(self, lat: dict[str, Any], window: int):
        self.examples: list[dict[str, Any]] = []
        seen: dict[tuple[Any, ...], int] = {}

        def ref(ex: dict[str, Any]) -> int:
            key = _example_key(ex)
            if key not in seen:
                # the layout leaves out what follows from the rest: the window's start, the example's own act
                start = max(0, ex["position"] - window)
                if ex["start"] != start or ex["acts"][ex["position"] - start] != ex["act"]:
                    raise ValueError(f"latent {lat['i']}, row {ex['row']}: window start or act does not follow")
                seen[key] = len(self.examples)
                self.examples.append(ex)
            return seen[key]

        self.top = [ref(ex) for ex in lat["top"]]
        typical = [ref(ex) for ex in lat["top_typical"]]
        self.typical = None if typical == self.top else typical
        self.quantiles = [[ref(ex) for ex in q["examples"]] for q in lat["quantiles"]]

    def token_ids(self) -> Iterable[int]:
        for ex in self.examples:
            yield from ex["tokens"]


def _encode_latent(lat: dict[str, Any], ex: _Latent, token: dict[int, int]) -> dict[str, Any]:
    def example(e: dict[str, Any]) -> list[Any]:
        acts: list[Any] = []
        for o, a in enumerate(e["acts"]):
            if a is None or a != 0:
                acts += [o, a]
        return [
            e["row"], e["context"], e["position"], KINDS.index(e["kind"]), e["norm"], [token[t] for t in e["tokens"]],
            acts,
        ]  # fmt: skip

    out = {k: v for k, v in lat.items() if k not in ("top", "top_typical", "quantiles", "similar", "logits")}
    out["examples"] = [example(e) for e in ex.examples]
    out["top"] = ex.top
    if ex.typical is not None:
        out["top_typical"] = ex.typical
    out["quantiles"] = [{**{k: q[k] for k in ("lo", "hi", "count")}, "examples": refs}
                        for q, refs in zip(lat["quantiles"], ex.quantiles, strict=True)]  # fmt: skip
    out["similar"] = lat["similar"]
    out["logits"] = None
    if lat["logits"] is not None:
        out["logits"] = {side: [[token[t], v] for t, v in lat["logits"][side]] for side in ("top", "bottom")}
    return out


def _encode_chunk(k: int, part: list[dict[str, Any]], text: Callable[[int], str], window: int) -> dict[str, Any]:
    deduped = [_Latent(lat, window) for lat in part]
    count: Counter[int] = Counter()
    for ex in deduped:
        count.update(ex.token_ids())
    for lat in part:
        if lat["logits"] is not None:
            count.update(t for side in ("top", "bottom") for t, _ in lat["logits"][side])
    ids = sorted(count, key=lambda t: (-count[t], t))  # the most frequent tokens get the shortest indices
    token = {t: n for n, t in enumerate(ids)}
    return {
        "chunk": k,
        "tokens": [text(t) for t in ids],
        "token_ids": ids,
        "latents": [_encode_latent(lat, ex, token) for lat, ex in zip(part, deduped, strict=True)],
    }


def write_site(out: Path, info: dict[str, Any], latents: list[dict[str, Any]], text: Callable[[int], str]) -> Path:
    """Write the site for `latents` (as `sae.evaluate.inspect` builds them: one dict per example, token ids and
    every window value) into `out`, replacing what was there only once the new site is complete."""
    out = Path(out)
    check_out(out)
    with atomic.replace_dir(out) as tmp:
        data = tmp / "data"
        data.mkdir()
        atomic.apply_umask(data, directory=True)
        numbers = ("i", "count", "density", "mean", "max", "max_typical", "massive_share", "massive_mass")
        columns: dict[str, list[Any]] = {k: [] for k in numbers}
        columns["snippet"], columns["typical_same"], columns["snippet_typical"] = [], [], []
        columns["top_logit"] = []
        for lat in latents:
            for k in numbers:
                columns[k].append(lat[k])
            same = lat["top_typical"] == lat["top"]
            columns["snippet"].append(_snippet(lat, text))
            columns["typical_same"].append(int(same))
            columns["snippet_typical"].append(None if same else _snippet(lat, text, "top_typical"))
            columns["top_logit"].append(text(lat["logits"]["top"][0][0]) if lat["logits"] else None)
        hist = density_histogram(info, columns["density"])
        index = {
            **info, "format": FORMAT, "kinds": list(KINDS), "example_fields": list(EXAMPLE_FIELDS),
            "chunk_size": CHUNK, "n_latents": len(latents), "columns": columns, "density_hist": hist,
        }  # fmt: skip
        for c in range(0, len(latents), CHUNK):
            chunk = _encode_chunk(c // CHUNK, latents[c : c + CHUNK], text, int(info["window"]))
            _write_data(data / f"latents-{c // CHUNK:05d}.js", chunk, "SAE_INSPECT.chunk")
        _write_data(tmp / MARKER, index, "SAE_INSPECT.index")
        atomic.write_bytes(tmp / "index.html", files(__package__).joinpath(APP).read_bytes())
        plot_density(hist, info, tmp / "density_histogram.png")
    return out


# --------------------------------------------------------------------------------------------------
# Reading a site back


def read_index(out: Path) -> dict[str, Any]:
    """The index of the site in `out`: run facts, `columns` over all latents (`snippet_typical` is null and
    `typical_same` 1 where the typical-rows top examples are the top examples)."""
    path = Path(out) / MARKER
    if not path.is_file():
        raise SaeError(f"{out} holds no inspect site of this version ({MARKER} is missing; rerun `sae inspect`)")
    index = _read_data(path, "SAE_INSPECT.index")
    if index.get("format") != FORMAT:
        raise SaeError(f"{path}: data layout {index.get('format')!r}, not {FORMAT}; rerun `sae inspect`")
    return dict(index)


def _decode_latent(lat: dict[str, Any], ids: list[int], index: dict[str, Any]) -> dict[str, Any]:
    kinds, window = index["kinds"], int(index["window"])

    def example(x: list[Any]) -> dict[str, Any]:
        row, context, position, kind, norm, tokens, sparse = x
        start = max(0, position - window)
        acts: list[float | None] = [0.0] * len(tokens)
        for o, a in zip(sparse[::2], sparse[1::2], strict=True):
            acts[o] = a
        return {
            "row": row, "context": context, "position": position, "act": acts[position - start], "norm": norm,
            "kind": kinds[kind], "start": start, "tokens": [ids[t] for t in tokens], "acts": acts,
        }  # fmt: skip

    examples = [example(x) for x in lat["examples"]]
    out = {k: v for k, v in lat.items() if k not in ("examples", "top", "top_typical", "quantiles", "logits")}
    out["top"] = [examples[e] for e in lat["top"]]
    out["top_typical"] = [examples[e] for e in lat.get("top_typical", lat["top"])]
    out["quantiles"] = [{**q, "examples": [examples[e] for e in q["examples"]]} for q in lat["quantiles"]]
    out["logits"] = None
    if lat["logits"] is not None:
        out["logits"] = {side: [[ids[t], v] for t, v in lat["logits"][side]] for side in ("top", "bottom")}
    return out


def read_site(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(index, latents) of the site in `out`, each latent as `write_site` was given it: top, top_typical and
    quantile examples as dicts with the window's token ids and every value in it."""
    index = read_index(out)
    latents: list[dict[str, Any]] = []
    for c in range(-(-index["n_latents"] // index["chunk_size"])):
        chunk = _read_data(Path(out) / "data" / f"latents-{c:05d}.js", "SAE_INSPECT.chunk")
        latents += [_decode_latent(lat, chunk["token_ids"], index) for lat in chunk["latents"]]
    return index, latents
