"""The `sae inspect` site as a person sees it: rendered by a real headless Chromium from file://, no server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from test_inspect import env, massive, run  # noqa: F401  (the module's stores and SAE fixtures)

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run does it)"
    ),
]

SHOTS = os.environ.get("SAE_INSPECT_SCREENSHOTS")
"""When set, a folder the screenshots are copied into (to look at them)."""


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--allow-file-access-from-files=false",
        "--virtual-time-budget=2000", "--window-size=1280,1800", *args, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def dom(url: str) -> str:
    return chromium(url, "--dump-dom").stdout


def screenshot(url: str, path: Path) -> np.ndarray:
    chromium(url, f"--screenshot={path}")
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS) / path.name)
    import matplotlib.image

    return matplotlib.image.imread(path)


class Elements(HTMLParser):
    """Every element as (tag, attrs, text directly and deeply inside it)."""

    def __init__(self, html: str):
        super().__init__()
        self.open: list[list] = []
        self.all: list[list] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        el = [tag, dict(attrs), ""]
        self.all.append(el)
        if tag not in ("meta", "link", "br", "input", "img", "rect", "line"):
            self.open.append(el)

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for el in self.open:
            el[2] += data

    def find(self, tag=None, **attrs):
        def match(el):
            if tag and el[0] != tag:
                return False
            for k, v in attrs.items():
                got = el[1].get(k.rstrip("_").replace("_", "-"))
                if got is None or (v is not True and (v not in got.split() if k == "class_" else got != v)):
                    return False
            return True

        return [el for el in self.all if match(el)]


def shown_equals(text: str, value: float) -> bool:
    """A number as the page prints it (4 significant digits; `12.5 %` for a share) equals the JSON value."""
    m = re.match(r"\s*([-+0-9.e]+)( %)?", text)
    assert m, text
    return float(m[1]) == pytest.approx(100 * value if m[2] else value, rel=6e-4, abs=1e-12)


@pytest.fixture(scope="module")
def site(env, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("site")
    index, latents = run(env, tmp, top=5, window=4)
    return tmp / "site", index, latents


def test_offline_and_self_contained(site):
    out, _, _ = site
    html = (out / "index.html").read_text()
    assert not re.search(r"https?://|@import|@font-face|url\(", html)
    for f in (out / "data").iterdir():
        assert f.suffix == ".js"  # loaded as scripts (file:// pages may not fetch), each written once
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts == ["data/index.js"] and (out / scripts[0]).is_file()


def test_index_lists_the_latents(site, tmp_path):
    out, index, latents = site
    page = Elements(dom((out / "index.html").as_uri()))
    rows = page.find("tr", data_latent=True)
    assert [int(r[1]["data-latent"]) for r in rows] == [lat["i"] for lat in latents][:100]
    assert page.find("span", id="n-dead")[0][2] == str(index["dead"])
    assert page.find("span", id="n-latents")[0][2] == str(len(latents))
    density = [el for el in page.find("td", class_="num") if el[1].get("data-value") not in (None, "null")]
    assert density, "no numbers in the table"
    for el in density[:30]:
        assert shown_equals(el[2], float(el[1]["data-value"]))
    # Sorted by max activation, descending: the first row is the latent with the largest max.
    page = Elements(dom((out / "index.html").as_uri() + "#/?sort=-max"))
    first = int(page.find("tr", data_latent=True)[0][1]["data-latent"])
    assert first == max(latents, key=lambda lat: lat["max"] or -1)["i"]
    # Every control is a link or a button (reachable with Tab), every sortable header a button.
    assert len(page.find("button", data_sort=True)) == 6
    img = screenshot((out / "index.html").as_uri(), tmp_path / "inspect-index.png")
    assert img.std() > 0.05 and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50


def test_latent_page_shows_examples_and_the_json_numbers(site, tmp_path):
    out, index, latents = site
    lat = max(latents, key=lambda lat: lat["count"])
    page = Elements(dom((out / "index.html").as_uri() + f"#/latent/{lat['i']}"))
    assert page.find("h1")[0][2] == f"Latent {lat['i']}"
    for key in ("density", "mean", "max"):
        el = page.find("span", id=key)[0]
        assert float(el[1]["data-value"]) == lat[key] and shown_equals(el[2], lat[key])
    top = page.find("ol", id="top")[0]
    items = [el for el in page.find("li", class_="ex") if el[2] and el[2] in top[2]][: len(lat["top"])]
    assert [int(el[1]["data-row"]) for el in items] == [ex["row"] for ex in lat["top"]]
    focus = page.find("span", class_="focus")
    assert len(focus) == len(lat["top"]) + sum(len(q["examples"]) for q in lat["quantiles"])
    for el, ex in zip(focus, lat["top"], strict=False):
        assert float(el[1]["data-act"]) == ex["act"]
        assert el[1]["title"].startswith("activation ") and shown_equals(el[1]["title"].split()[-1], ex["act"])
    # The shading covers the whole window: every token of the first example carries its activation.
    first = lat["top"][0]
    toks = page.find("span", class_="tok")[: len(first["tokens"])]
    assert [float(el[1]["data-act"]) if el[1]["data-act"] else None for el in toks] == first["acts"]
    assert "focus" in toks[first["position"] - first["start"]][1]["class"]
    promoted = page.find("table", class_="pos")
    assert promoted and promoted[0][2].strip()
    similar = [el for el in page.find("a") if re.fullmatch(r"#/latent/\d+", el[1].get("href", ""))]
    assert {int(el[1]["href"].rsplit("/", 1)[1]) for el in similar} >= {j for j, _ in lat["similar"]}
    img = screenshot((out / "index.html").as_uri() + f"#/latent/{lat['i']}", tmp_path / "inspect-latent.png")
    assert img.std() > 0.05 and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50


def test_a_latent_with_no_top_example_on_a_massive_row_shows_one_list(site):
    out, _, latents = site
    lat = next(lat for lat in latents if lat["top"] and lat["top_typical"] == lat["top"])
    rows = [ex["row"] for ex in lat["top"]]
    for view, list_id in (("", "top"), ("/typical", "top-typical")):
        page = Elements(dom((out / "index.html").as_uri() + f"#/latent/{lat['i']}{view}"))
        assert "are the same" in page.find("p", id="typical-same")[0][2] and not page.find("p", id="top-note")
        top = page.find("ol", id=list_id)[0]
        assert [int(el[1]["data-row"]) for el in page.find("li", class_="ex") if el[2] in top[2]][: len(rows)] == rows
        assert len(page.find("ol", class_="examples")) == 1 + len(lat["quantiles"])  # one list of top examples
    # The index's typical-rows view shows the same snippet as the all-rows view.
    snippets = [
        Elements(dom((out / "index.html").as_uri() + v)).find("tr", data_latent=str(lat["i"]))[0][2]
        for v in ("#/", "#/typical")
    ]
    assert snippets[0] == snippets[1] and "never fired" not in snippets[1]


def test_a_latent_that_was_not_inspected_says_so(site):
    out, index, _ = site
    page = Elements(dom((out / "index.html").as_uri() + f"#/latent/{index['sae']['d_sae'] + 5}"))
    assert "was not inspected" in "".join(el[2] for el in page.find("p", class_="error"))


def test_massive_rows_are_marked_and_the_typical_view_shows_other_examples(massive, tmp_path):  # noqa: F811
    out = tmp_path / "site"
    _, latents = run(massive, tmp_path, model="none", top=5, window=2)
    lat = next(lat for lat in latents if lat["top"] and all(ex["kind"] == "massive" for ex in lat["top"]))
    page = Elements(dom((out / "index.html").as_uri() + f"#/latent/{lat['i']}"))
    items = [el for el in page.find("li", class_="ex") if el[1]["data-row"] in {str(e["row"]) for e in lat["top"]}]
    assert items and all(el[1]["data-kind"] == "massive" and "massive row" in el[2] for el in items)
    assert float(page.find("span", id="massive-mass")[0][1]["data-value"]) == lat["massive_mass"]
    assert page.find("a", href=f"#/latent/{lat['i']}/typical"), "no link to the typical-rows view"
    page = Elements(dom((out / "index.html").as_uri() + f"#/latent/{lat['i']}/typical"))
    assert not page.find("ol", id="top")
    top = page.find("ol", id="top-typical")[0]
    rows = [int(el[1]["data-row"]) for el in page.find("li", class_="ex") if el[2] in top[2]][: len(lat["top_typical"])]
    assert rows == [ex["row"] for ex in lat["top_typical"]] and rows
    assert all(el[1]["data-kind"] == "typical" for el in page.find("li", class_="ex") if el[2] in top[2])
    assert not page.find("p", id="typical-same")  # two different lists
    index = Elements(dom((out / "index.html").as_uri() + "#/typical"))
    only = index.find("tr", data_latent=str(latents[-1]["i"]))[0]
    assert "never fired on a typical row" in only[2] and "mostly massive" in only[2]
    img = screenshot((out / "index.html").as_uri() + f"#/latent/{lat['i']}", tmp_path / "inspect-massive.png")
    assert img.std() > 0.05
