"""`sae inspect`: the streaming state, and the pages' numbers against a brute-force encode of every row."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, make_model, make_tokenizer

from sae.config import HarvestConfig, InspectConfig
from sae.errors import SaeError
from sae.evaluate.dashboard import MARKER, read_site
from sae.evaluate.inspect import inspect, parse_latents
from sae.evaluate.latent_state import N_BINS, Entries, LatentState
from sae.harvest import harvest
from sae.saedir import SaeConfig, load_sae, save_sae
from sae.sites import capture
from sae.store import Store

D, F, SEQ = 64, 96, 16
SITE = "blocks.1.hook_resid_post"
STORE_OF: list[Path] = []  # the module's store, for SAEs made without one recorded


def _text(seed: int, n_words: int = 3000) -> str:
    words = TINY_TEXT.split()
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(n_words // 40)) + "\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Llama, a store of 48 contexts of its layer-1 residual stream, and an SAE of ours on it."""
    root = tmp_path_factory.mktemp("inspect")
    model_dir = root / "model"
    make_model("llama", n_layers=2, d_model=D).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "train.txt").write_text(_text(1))
    (root / "heldout.txt").write_text(_text(2))
    store = root / "store.zarr"
    harvest(
        HarvestConfig(
            out=store, model=str(model_dir), dataset=str(root / "train.txt"), sites=(SITE,), seq_len=SEQ,
            max_tokens=SEQ * 48, chunk_rows=64, shard_chunks=3, batch_size=8, device="cpu",
        )
    )  # fmt: skip
    STORE_OF[:] = [store]
    sae_dir = make_sae(root / "sae", store=store, model=model_dir)
    return {"root": root, "model": model_dir, "store": store, "sae": sae_dir, "heldout": root / "heldout.txt"}


def make_sae(
    path: Path, *, store: Path | None, model: Path | None, keep_bos: bool = False, seed: int = 0, theta: float = 0.0
) -> Path:
    """A BatchTopK-exported SAE (jumprelu with one θ) of random unit directions; θ defaults to 1.5 standard
    deviations of a random projection of the store's rows, so latents fire on a few percent of them."""
    if not theta:
        stats = Store.open(store if store is not None else STORE_OF[0]).stats(SITE, skip_bos=True)
        theta = 1.5 * stats.mean_norm / D**0.5
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=1)
    weights = {
        "W_enc": w_dec.T.contiguous(),
        "b_enc": torch.zeros(F),
        "W_dec": w_dec,
        "b_dec": torch.zeros(D),
        "threshold": torch.full((F,), theta),
    }
    meta: dict = {"keep_bos": keep_bos}
    if store is not None:
        meta["store"] = str(store)
    if model is not None:
        meta["model"] = {"id": str(model), "revision": None, "sha256": None}
    cfg = SaeConfig(
        architecture="jumprelu", d_in=D, d_sae=F, k=4, hook_name=SITE, training_architecture="batchtopk",
        theta=theta, complete=True, metadata=meta,
    )  # fmt: skip
    return save_sae(weights, cfg, path)


def run(env, tmp_path, **kw) -> tuple[dict, list[dict]]:
    kw = {"sae_dir": env["sae"], "out": tmp_path / "site", "device": "cpu", "batch_size": 100, **kw}
    res = inspect(InspectConfig(**kw))
    return read_site(res.out)


def brute_force(store_path: Path, sae_dir: Path, keep_bos: bool = False):
    """Every row of the store in storage order, encoded at once: (acts [n, F], rows, context, position)."""
    store = Store.open(store_path)
    sae = load_sae(sae_dir)
    xs, rows, ctx, pos = [], [], [], []
    for i in store.complete_chunks():
        a, b = store.chunk_range(i)
        m = store.chunk_meta(i)
        keep = np.ones(b - a, bool) if keep_bos else np.asarray(m.position) != 0
        xs.append(store.chunk(SITE, i).float()[torch.from_numpy(keep)])
        rows.append(np.arange(a, b)[keep])
        ctx.append(np.asarray(m.context)[keep])
        pos.append(np.asarray(m.position)[keep])
    with torch.no_grad():
        acts = sae.encode(torch.cat(xs))
    return acts.numpy(), np.concatenate(rows), np.concatenate(ctx), np.concatenate(pos)


# --------------------------------------------------------------------------------------------------
# The streaming state


def _batches(seed: int, n_batches: int = 12, n_lat: int = 5):
    """Entries whose scale grows over the batches (so histogram ranges double and bins merge), with ties."""
    rng = np.random.default_rng(seed)
    out, row = [], 0
    for b in range(n_batches):
        n = int(rng.integers(20, 60))
        lat = rng.integers(0, n_lat, n)
        val = np.round(rng.random(n) * 2.0 ** (b - 4) * 8) / 8 + 2.0**-10  # coarse: equal values happen
        rows = row + np.arange(n)
        row += n
        out.append((lat, val.astype(np.float32), rows))
    return out


def test_state_top_histogram_and_reservoirs_equal_brute_force():
    n_lat, top, m, seed = 5, 7, 3, 11
    state = LatentState(n_lat, top=top, per_bin=m, seed=seed, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    every = []
    for lat, val, rows in _batches(0, n_lat=n_lat):
        massive = rows % 3 == 0
        pay = torch.from_numpy(np.stack([rows, rows // 10, rows % 10, massive.astype(np.int64)], 1))
        mk = torch.from_numpy(massive)
        e = Entries(torch.from_numpy(lat), torch.from_numpy(val), pay, mk, ~mk)
        state.update(e)
        keys = torch.rand(len(val), generator=gen).numpy()  # the keys the state drew, in the same order
        every += list(zip(lat.tolist(), val.tolist(), rows.tolist(), keys.tolist(), strict=True))
    exponent = state.exponent.numpy()
    for j in range(n_lat):
        mine = [(v, r, k) for lat, v, r, k in every if lat == j]
        assert state.count[j] == len(mine)
        assert state.massive_count[j] == sum(r % 3 == 0 for _, r, _ in mine)
        assert state.total[j].item() == pytest.approx(sum(v for v, _, _ in mine))
        assert state.massive_total[j].item() == pytest.approx(sum(v for v, r, _ in mine if r % 3 == 0))
        # Top: largest values, ties to the earlier row; once over all rows, once over typical (non-massive) rows.
        want = sorted(mine, key=lambda t: (-t[0], t[1]))[:top]
        assert state.top.payload[j, :, 0].tolist() == [r for _, r, _ in want]
        assert state.top.value[j].tolist() == [v for v, _, _ in want]
        want = sorted([t for t in mine if t[1] % 3], key=lambda t: (-t[0], t[1]))[:top]
        assert state.top_typical.payload[j, :, 0].tolist() == [r for _, r, _ in want]
        assert state.top_typical.payload[j, :, 3].tolist() == [0] * top
        # The range is the power of two above the maximum; the histogram is exact after every merge.
        vmax = max(v for v, _, _ in mine)
        assert 2.0 ** (exponent[j] - 1) <= vmax < 2.0 ** exponent[j]
        width = 2.0 ** exponent[j] / N_BINS
        want_hist = np.bincount([int(v / width) for v, _, _ in mine], minlength=N_BINS)
        assert state.hist[j].tolist() == want_hist.tolist()
        # Reservoir of each bin: the m smallest keys among that bin's activations.
        for b in range(N_BINS):
            in_bin = sorted((k, r) for v, r, k in mine if int(v / width) == b)[:m]
            got = state.reservoir.payload[j * N_BINS + b, :, 0].tolist()
            assert got == [r for _, r in in_bin] + [-1] * (m - len(in_bin))


def test_state_size_does_not_grow_with_rows():
    state = LatentState(8, top=5, per_bin=2, seed=0, device=torch.device("cpu"))
    sizes = None
    for lat, val, rows in _batches(1, n_batches=30, n_lat=8):
        pay = torch.from_numpy(np.stack([rows, rows, rows, rows % 2], 1))
        m = torch.from_numpy(rows % 2 == 1)
        state.update(Entries(torch.from_numpy(lat), torch.from_numpy(val), pay, m, ~m))
        now = [t.numel() for t in (*state.top, *state.top_typical, *state.reservoir, state.hist, state.count)]
        assert sizes is None or now == sizes
        sizes = now


def test_parse_latents():
    assert parse_latents("all", 5).tolist() == [0, 1, 2, 3, 4]
    assert parse_latents("3, 0-2,2", 10).tolist() == [0, 1, 2, 3]
    r = parse_latents("random:4", 100, seed=3)
    assert len(r) == 4 and r.tolist() == sorted(r.tolist()) and r.tolist() == parse_latents("random:4", 100, 3).tolist()
    for bad in ("", "5-2", "0-10", "x", "random:0", "random:x", "-1"):
        with pytest.raises(SaeError):
            parse_latents(bad, 10)


# --------------------------------------------------------------------------------------------------
# The whole command against a brute-force encode


def test_pages_equal_brute_force_encode(env, tmp_path):
    index, latents = run(env, tmp_path, top=6, window=3)
    acts, rows, ctx, pos = brute_force(env["store"], env["sae"])
    store = Store.open(env["store"])
    n_bos = int((np.asarray(store.array("position")[:]) == 0).sum())
    assert index["rows_read"] == store.n_rows and index["rows_used"] == store.n_rows - n_bos
    assert index["left_out"] == {"bos": n_bos, "excluded": 0, "non_finite": 0}
    assert [lat["i"] for lat in latents] == list(range(F))
    count = (acts > 0).sum(0)
    assert [lat["count"] for lat in latents] == count.tolist()
    assert index["dead"] == int((count == 0).sum())
    fired = [f for f in range(F) if count[f] >= 6]
    assert len(fired) > 10
    input_ids = np.asarray(store.input_ids[:])
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(env["model"])
    for f in fired[:: max(1, len(fired) // 8)]:
        lat = latents[f]
        assert lat["density"] == pytest.approx(count[f] / len(rows), rel=1e-5)
        assert lat["max"] == pytest.approx(float(acts[:, f].max()), rel=1e-5)
        assert lat["mean"] == pytest.approx(float(acts[acts[:, f] > 0, f].mean()), rel=1e-4)
        order = sorted(range(len(rows)), key=lambda r: (-acts[r, f], r))[:6]
        assert [ex["row"] for ex in lat["top"]] == rows[order].tolist()
        assert [ex["act"] for ex in lat["top"]] == pytest.approx(acts[order, f].tolist(), rel=1e-5)
        assert sum(lat["hist"]["counts"]) == count[f] == sum(q["count"] for q in lat["quantiles"])
        for ex in lat["top"] + [e for q in lat["quantiles"] for e in q["examples"]]:
            c, p = ex["context"], ex["position"]
            lo, hi = max(0, p - 3), min(SEQ - 1, p + 3)
            assert ex["start"] == lo and ex["tokens"] == input_ids[c, lo : hi + 1].tolist()
            want = [
                float(acts[(ctx == c) & (pos == q), f][0]) if q > 0 else None for q in range(lo, hi + 1)
            ]  # BOS was left out: no value there, and a value everywhere else
            assert [a is None for a in ex["acts"]] == [w is None for w in want]
            got = [a for a in ex["acts"] if a is not None]
            assert got == pytest.approx([w for w in want if w is not None], rel=2e-3, abs=1e-4)
        for q in lat["quantiles"]:
            slack = lat["hist"]["width"]
            assert all(q["lo"] - slack <= e["act"] <= q["hi"] + slack for e in q["examples"])
            assert len(q["examples"]) == min(4, q["count"])
        # Logit effects: the decoder row through the final norm's gain and the unembedding.
        w = load_sae(env["sae"]).W_dec[f] * model.model.norm.weight
        logits = (w @ model.lm_head.weight.T).detach()
        assert [t for t, _ in lat["logits"]["top"]] == logits.topk(10).indices.tolist()
        assert [t for t, _ in lat["logits"]["bottom"]] == logits.topk(10, largest=False).indices.tolist()
        unit = torch.nn.functional.normalize(load_sae(env["sae"]).W_dec, dim=1)
        cos = (unit @ unit[f]).detach()
        cos[f] = -2
        assert [j for j, _ in lat["similar"]] == cos.topk(5).indices.tolist()


def _data(path: Path) -> dict:
    """A data file as the page's script element evaluates it: one call whose argument is a JSON object."""
    text = path.read_text(encoding="utf-8")
    head = re.match(r"SAE_INSPECT\.(index|chunk)\(", text)
    assert head and text.endswith(");\n"), text[:80]
    return json.loads(text[head.end() : -3])


def test_site_data_are_written_once_and_read_back_unchanged(env, tmp_path, monkeypatch):
    """`read_site` gives back exactly what `inspect` handed `write_site`; each data file is written once (a script,
    for file://), each example of a latent once, and its typical-rows top examples only where they differ."""
    from sae import outputs
    from sae.evaluate import inspect as inspect_module

    given = {}
    write_site = inspect_module.write_site

    def spy(out, info, latents, text):
        given["latents"] = latents
        return write_site(out, info, latents, text)

    monkeypatch.setattr(inspect_module, "write_site", spy)
    (tmp_path / "site" / "data").mkdir(parents=True)  # a site of the earlier layout is replaced whole
    (tmp_path / "site" / "index.html").write_text("<html></html>")
    (tmp_path / "site" / "data" / "index.json").write_text("{}")
    index, latents = run(env, tmp_path, top=6, window=3)
    assert latents == given["latents"]
    out = tmp_path / "site"
    chunks = [f"latents-{c:05d}.js" for c in range(-(-F // index["chunk_size"]))]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["index.js", *chunks]
    assert sorted(p.name for p in out.iterdir()) == ["data", "density_histogram.png", "index.html", "settings.json"]
    cfg = InspectConfig(sae_dir=env["sae"], out=out, device="cpu", batch_size=100, top=6, window=3)
    assert outputs.changes(out, outputs.inspect_record(cfg)) == []  # what `sae run` reads as current
    assert _data(out / MARKER) == index
    same = 0
    for name in chunks:
        chunk = _data(out / "data" / name)
        assert len(set(chunk["token_ids"])) == len(chunk["token_ids"]) == len(chunk["tokens"])
        for lat in chunk["latents"]:
            full = latents[lat["i"]]
            rows = [x[0] for x in lat["examples"]]
            assert len(rows) == len(set(rows))  # each example once, however many lists show it
            assert all(len(x) == len(index["example_fields"]) for x in lat["examples"])
            assert all(v is None or v != 0 for x in lat["examples"] for v in x[-1][1::2])  # zeros are implied
            assert ("top_typical" in lat) == (full["top_typical"] != full["top"])
            same += full["top"] != [] and "top_typical" not in lat
            c = index["columns"]
            j = c["i"].index(lat["i"])
            assert c["typical_same"][j] == int(full["top_typical"] == full["top"])
            assert c["snippet_typical"][j] is None or not c["typical_same"][j]
    assert same > F // 2  # the tiny model has few massive rows: most latents have one list


def test_selected_latents_and_max_rows(env, tmp_path):
    index, latents = run(env, tmp_path, latents="5,7-9", max_rows=200, top=3)
    assert [lat["i"] for lat in latents] == [5, 7, 8, 9] and index["n_latents"] == 4
    assert index["rows_read"] == 200
    acts, rows, _, _ = brute_force(env["store"], env["sae"])
    first = rows < 200
    for lat in latents:
        col = acts[first, lat["i"]]
        assert lat["count"] == int((col > 0).sum())
        if lat["count"]:
            assert lat["max"] == pytest.approx(float(col.max()), rel=1e-5)


def test_keep_bos_sae_reads_every_row(env, tmp_path):
    sae = make_sae(tmp_path / "sae-bos", store=env["store"], model=env["model"], keep_bos=True)
    index, latents = run(env, tmp_path, sae_dir=sae, latents="0-9")
    assert index["left_out"]["bos"] == 0 and index["rows_used"] == index["rows_read"]
    acts, *_ = brute_force(env["store"], sae, keep_bos=True)
    assert [lat["count"] for lat in latents] == (acts[:, :10] > 0).sum(0).tolist()


def test_dataset_runs_the_lm_up_to_the_site(env, tmp_path):
    index, latents = run(env, tmp_path, dataset=str(env["heldout"]), max_rows=SEQ * 6, seq_len=SEQ, latents="0-31")
    assert index["rows_read"] == SEQ * 6 and index["left_out"]["bos"] == 6
    from sae.corpus import iter_contexts

    tok = make_tokenizer()
    ctx = np.stack(list(iter_contexts(str(env["heldout"]), tok, seq_len=SEQ, max_tokens=SEQ * 6)))
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(env["model"]).eval()
    x = capture(model, [SITE], torch.from_numpy(ctx).long())[SITE]
    with torch.no_grad():
        acts = load_sae(env["sae"]).encode(x)  # [contexts, SEQ, F]
    acts[:, 0] = 0
    for lat in latents:
        assert lat["count"] == int((acts[..., lat["i"]] > 0).sum())
        for ex in lat["top"]:
            assert ex["act"] == pytest.approx(float(acts[ex["context"], ex["position"], lat["i"]]), rel=1e-4)
            assert ex["tokens"] == ctx[ex["context"], ex["start"] : ex["start"] + len(ex["tokens"])].tolist()


def test_saelens_sae_without_store_needs_one(env, tmp_path):
    sae = make_sae(tmp_path / "foreign", store=None, model=None)
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg["metadata"] = {"sae_lens_version": "6.5.0", "hook_name": SITE, "model_name": "tiny"}
    (sae / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeError, match="records no store"):
        inspect(InspectConfig(sae_dir=sae, out=tmp_path / "x", device="cpu"))
    index, latents = run(env, tmp_path, sae_dir=sae, store=env["store"], model=str(env["model"]), latents="0-3")
    assert index["left_out"]["bos"] == 0  # SAELens-made: nothing says BOS was left out of its training
    assert latents[0]["logits"] is not None


def test_a_moved_run_finds_its_store(env, tmp_path):
    """The store is found by its path relative to the SAE directory when the run moved as a whole; when it is
    gone, one line names the recorded store."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(env["store"], run_dir / "store.zarr")
    sae = make_sae(run_dir / "saes" / "sae", store=(run_dir / "store.zarr").resolve(), model=env["model"])
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg["metadata"]["store_relative"] = "../../store.zarr"
    (sae / "cfg.json").write_text(json.dumps(cfg))
    shutil.move(run_dir, tmp_path / "moved")
    index, _ = run(env, tmp_path, sae_dir=tmp_path / "moved" / "saes" / "sae", latents="0-3")
    assert str(tmp_path / "moved" / "store.zarr") in json.dumps(index)
    shutil.rmtree(tmp_path / "moved" / "store.zarr")
    with pytest.raises(SaeError, match=r"recorded store .*store.zarr not found \(moved or deleted\); pass --store"):
        run(env, tmp_path, sae_dir=tmp_path / "moved" / "saes" / "sae", latents="0-3")


def test_cli_bad_input_is_one_line_and_exit_2(env, tmp_path):
    from click.testing import CliRunner

    from sae.cli import main

    out = tmp_path / "site"
    res = CliRunner().invoke(
        main, ["inspect", str(env["sae"]), "--out", str(out), "--latents", "0-2", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert (out / "index.html").is_file() and (out / "density_histogram.png").is_file()
    before = (out / MARKER).read_bytes()
    for args, msg in [
        (["--latents", "0-999"], "outside the SAE's latents"),
        (["--top", "0"], "--top must be at least 1"),
        (["--store", str(tmp_path / "nope")], "does not exist"),
    ]:
        res = CliRunner().invoke(main, ["inspect", str(env["sae"]), "--out", str(out), "--device", "cpu", *args])
        assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["inspect", str(env["sae"]), "--out", str(tmp_path / "mine"), "--device", "cpu"])
    assert res.exit_code == 2 and "something other than an inspect site" in res.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert (out / MARKER).read_bytes() == before  # nothing already written was touched


def test_manifest_inspect_stage_is_optional_and_pages_every_sae(tmp_path):
    import yaml

    from sae import manifest as mf
    from sae import outputs

    calls = []

    def harvest(cfg):
        calls.append("harvest")

    def train(cfg):
        calls.append("train")

    def evaluate(cfg):
        calls.append("eval")

    def inspect_stage(cfg):  # writes what marks a finished site, as `inspect` does
        calls.append(("inspect", cfg.sae_dir, cfg.out))
        (Path(cfg.out) / "data").mkdir(parents=True)
        (Path(cfg.out) / MARKER).write_text("SAE_INSPECT.index({});\n")
        outputs.write_record(Path(cfg.out), outputs.inspect_record(cfg))

    stages = mf.Stages(harvest, train, evaluate, inspect_stage)
    base = {"run_dir": str(tmp_path / "run"), "harvest": {"sites": [SITE]}, "train": {"arch": "batchtopk,topk"}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(base))
    m = mf.load_manifest(path)
    assert m.inspect is None and mf.inspect_configs(m) == [] and mf.status(m)["inspect"]
    mf.run(m, stages, stage="eval")
    with pytest.raises(SaeError, match="no inspect section"):
        mf.run(m, stages, stage="inspect")
    path.write_text(yaml.safe_dump({**base, "inspect": {"top": 7}}))
    m = mf.load_manifest(path)
    assert not mf.status(m)["inspect"]
    mf.run(m, stages, stage="inspect")
    run = tmp_path / "run"
    want = [("inspect", run / "saes" / n, run / "inspect" / n) for n in ("batchtopk-k32-x8", "topk-k32-x8")]
    assert [c for c in calls if c[0] == "inspect"] == want
    assert all(c.top == 7 for c in mf.inspect_configs(m)) and mf.status(m)["inspect"]
    mf.run(m, stages, stage="inspect")  # complete: skipped
    assert len([c for c in calls if c[0] == "inspect"]) == 2


@pytest.mark.cuda
def test_cuda_pass_equals_cpu(env, tmp_path):
    _, cpu = run(env, tmp_path / "cpu", latents="0-31")
    _, gpu = run(env, tmp_path / "gpu", latents="0-31", device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert a["count"] == b["count"]
        assert [e["row"] for e in a["top"]] == [e["row"] for e in b["top"]]
        assert [e["act"] for e in a["top"]] == pytest.approx([e["act"] for e in b["top"]], rel=1e-3)


def test_another_model_than_the_stores_is_refused(env, tmp_path):
    other = tmp_path / "other"
    make_model("llama", n_layers=2, d_model=D, seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    with pytest.raises(SaeError, match="holds activations of model"):
        inspect(InspectConfig(sae_dir=env["sae"], out=tmp_path / "x", device="cpu", model=str(other)))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# Massive rows: a synthetic store where every row at one position is planted 20× longer

MASSIVE_POSITION = 7
D_SYN, F_SYN = 16, 24


@pytest.fixture(scope="module")
def massive(tmp_path_factory):
    """A store whose rows at MASSIVE_POSITION are 20× the others plus a large fixed direction u (as real massive
    activations are), and an SAE on it: latents 0..F-2 are dictionary directions (they fire everywhere, many far
    harder on the massive rows); the last latent reads u with a threshold only massive rows pass."""
    from _synthetic import SITE as SYN_SITE
    from _synthetic import make_store, sparse_data

    base = sparse_data(D_SYN)
    u = torch.nn.functional.normalize(base.dictionary[: F_SYN - 1].sum(0), dim=0)

    def data(n, position, shard):
        x = base(n, position, shard)
        m = torch.from_numpy(position == MASSIVE_POSITION)
        x[m] = 20 * x[m] + 200 * u
        return x

    root = tmp_path_factory.mktemp("massive")
    store = make_store(root / "m.zarr", d=D_SYN, n_contexts=96, seq_len=16, data=data, tokens=lambda r: r % 50 + 1)
    st = Store.open(store)
    x = torch.cat([st.chunk(SYN_SITE, i).float() for i in st.complete_chunks()])
    pos = np.concatenate([np.asarray(st.chunk_meta(i).position) for i in st.complete_chunks()])
    proj = x @ u
    lo = float(proj[torch.from_numpy(pos == MASSIVE_POSITION)].min())
    hi = float(proj[torch.from_numpy((pos > 0) & (pos != MASSIVE_POSITION))].max())
    assert hi < lo  # u tells the planted rows apart
    w_dec = torch.cat([base.dictionary[: F_SYN - 1], u[None]])
    theta = torch.full((F_SYN,), 1.0)
    theta[-1] = (lo + hi) / 2
    weights = {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(F_SYN), "W_dec": w_dec, "b_dec": torch.zeros(D_SYN)}
    weights["threshold"] = theta

    def sae(name: str, **meta) -> Path:
        cfg = SaeConfig(
            architecture="jumprelu", d_in=D_SYN, d_sae=F_SYN, k=4, hook_name=SYN_SITE,
            training_architecture="batchtopk", theta=1.0, complete=True,
            metadata={"keep_bos": False, "store": str(store), **meta},
        )  # fmt: skip
        return save_sae(weights, cfg, root / name)

    return {"store": store, "site": SYN_SITE, "sae": sae("sae"), "make_sae": sae}


def _store_rows(store_path: Path, site: str, sae_dir: Path):
    """Every non-BOS row: (acts [n, F], store rows, positions, norms)."""
    store = Store.open(store_path)
    xs, rows, pos = [], [], []
    for i in store.complete_chunks():
        a, b = store.chunk_range(i)
        keep = np.asarray(store.chunk_meta(i).position) != 0
        xs.append(store.chunk(site, i).float()[torch.from_numpy(keep)])
        rows.append(np.arange(a, b)[keep])
        pos.append(np.asarray(store.chunk_meta(i).position)[keep])
    x = torch.cat(xs)
    with torch.no_grad():
        acts = load_sae(sae_dir).encode(x).numpy()
    return acts, np.concatenate(rows), np.concatenate(pos), x.norm(dim=1).numpy()


def test_massive_rows_are_marked_and_do_not_own_the_top_examples(massive, tmp_path):
    index, latents = run(massive, tmp_path, model="none", top=8, window=2)
    store = Store.open(massive["store"])
    norms = store.norm_stats(massive["site"])
    kinds = index["row_kinds"]
    assert kinds["source"] == f"store {store.path}" and kinds["median_norm"] == pytest.approx(norms["median"])
    assert kinds["massive_factor"] == norms["massive"]["factor"]
    acts, rows, pos, row_norm = _store_rows(massive["store"], massive["site"], massive["sae"])
    is_massive = row_norm > kinds["massive_factor"] * norms["median"]
    assert (is_massive == (pos == MASSIVE_POSITION)).all()  # the planted rows, and only they
    kind_of = dict(zip(rows.tolist(), np.where(is_massive, "massive", "typical").tolist(), strict=True))
    for lat in latents:
        f = lat["i"]
        col = acts[:, f]
        for ex in lat["top"] + lat["top_typical"] + [e for q in lat["quantiles"] for e in q["examples"]]:
            assert ex["kind"] == kind_of[ex["row"]]
        # The activation mass on massive rows, and the top examples over typical rows, against brute force.
        assert lat["massive_mass"] == pytest.approx(col[is_massive].sum() / col.sum(), rel=1e-3)
        typical = np.flatnonzero(~is_massive & (col > 0))
        want = typical[np.lexsort((rows[typical], -col[typical]))][:8]
        assert [ex["row"] for ex in lat["top_typical"]] == rows[want].tolist()
        assert all(ex["kind"] == "typical" for ex in lat["top_typical"])
        assert lat["max_typical"] == (pytest.approx(float(col[typical].max()), rel=1e-5) if len(typical) else None)
    # Most dictionary latents' top examples over all rows are all on the planted rows; the typical view is not.
    owned = [lat for lat in latents[:-1] if lat["top"] and all(ex["kind"] == "massive" for ex in lat["top"])]
    assert len(owned) > (F_SYN - 1) / 2 and all(len(lat["top_typical"]) == 8 for lat in owned)
    chunk = _data(tmp_path / "site" / "data" / "latents-00000.js")
    assert all("top_typical" in chunk["latents"][lat["i"]] for lat in owned)  # two lists where they differ
    # The offset reader fires on massive rows only: all its mass there, no typical example, flagged on the index.
    only = latents[-1]
    assert only["count"] == int(is_massive.sum()) and only["massive_mass"] == 1 and only["top_typical"] == []
    assert index["on_massive"] >= 1
    assert index["columns"]["massive_mass"][-1] == 1 and index["columns"]["snippet_typical"][-1] is None


def test_rows_the_sae_was_trained_without_are_left_out(massive, tmp_path):
    norms = Store.open(massive["store"]).norm_stats(massive["site"])
    sae = massive["make_sae"](
        "excl", exclude={"massive_factor": 3.0, "massive_threshold": None, "median_norm": norms["median"],
                         "positions": [3], "token_ids": [], "n_excluded": 0, "share_excluded": 0.0},
    )  # fmt: skip
    index, latents = run(massive, tmp_path, sae_dir=sae, model="none", top=5, window=2)
    _, _, pos, _ = _store_rows(massive["store"], massive["site"], sae)
    n_excluded = int(((pos == MASSIVE_POSITION) | (pos == 3)).sum())
    assert index["left_out"]["excluded"] == n_excluded and index["rows_used"] == len(pos) - n_excluded
    for lat in latents:
        for ex in lat["top"] + [e for q in lat["quantiles"] for e in q["examples"]]:
            assert ex["kind"] == "typical" and ex["position"] not in (3, MASSIVE_POSITION)
            # the window shows left-out rows as such (no value), as it does BOS
            for p, a in zip(range(ex["start"], ex["start"] + len(ex["acts"])), ex["acts"], strict=True):
                assert (a is None) == (p in (0, 3, MASSIVE_POSITION))
    assert latents[-1]["count"] == 0  # the massive-only latent never sees a row


# --------------------------------------------------------------------------------------------------
# Transcoders: the encoder reads the input site, the decoder writes to the output site

TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def _transcoder(path: Path, store: Path, model: Path, hook_out: str = TC_OUT) -> Path:
    g = torch.Generator().manual_seed(4)
    w_enc = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=1).T.contiguous()
    weights = {
        "W_enc": w_enc, "b_enc": torch.zeros(F), "W_dec": torch.randn(F, D, generator=g), "b_dec": torch.zeros(D),
        "threshold": torch.full((F,), 1.5), "W_skip": torch.zeros(D, D),
    }  # fmt: skip
    cfg = SaeConfig(
        architecture="jumprelu_skip_transcoder", d_in=D, d_sae=F, d_out=D, k=4.0, hook_name=TC_IN,
        hook_name_out=hook_out, training_architecture="batchtopk", theta=1.5, complete=True,
        metadata={"keep_bos": False, "store": str(store), "model": {"id": str(model), "revision": None}},
    )  # fmt: skip
    return save_sae(weights, cfg, path)


def test_transcoder_reads_its_input_site_and_writes_logits_from_its_output_site(env, tmp_path):
    store = tmp_path / "tc.zarr"
    harvest(
        HarvestConfig(
            out=store, model=str(env["model"]), dataset=str(env["root"] / "train.txt"), sites=(TC_IN,), seq_len=SEQ,
            max_tokens=SEQ * 24, chunk_rows=64, shard_chunks=3, batch_size=8, device="cpu",
        )
    )  # fmt: skip
    tc = _transcoder(tmp_path / "tc", store, env["model"])
    index, latents = run(env, tmp_path, sae_dir=tc, top=4, window=2)
    assert index["sae"]["transcoder"] and index["sae"]["site"] == TC_IN and index["sae"]["site_out"] == TC_OUT
    st = Store.open(store)
    xs, rows = [], []
    for i in st.complete_chunks():
        a, b = st.chunk_range(i)
        keep = np.asarray(st.chunk_meta(i).position) != 0
        xs.append(st.chunk(TC_IN, i).float()[torch.from_numpy(keep)])
        rows.append(np.arange(a, b)[keep])
    t = load_sae(tc)
    with torch.no_grad():
        acts = t.encode(torch.cat(xs)).numpy()
    rows = np.concatenate(rows)
    assert [lat["count"] for lat in latents] == (acts > 0).sum(0).tolist() and index["rows_used"] == len(rows)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(env["model"])
    for lat in [lat for lat in latents if lat["count"] >= 4][:5]:
        f = lat["i"]
        order = sorted(range(len(rows)), key=lambda r: (-acts[r, f], r))[:4]
        assert [ex["row"] for ex in lat["top"]] == rows[order].tolist()
        logits = ((t.W_dec[f] * model.model.norm.weight) @ model.lm_head.weight.T).detach()  # W_dec: output space
        assert [i for i, _ in lat["logits"]["top"]] == logits.topk(10).indices.tolist()
    # A decoder that writes somewhere other than into the residual stream has no logit effects, and says why.
    odd = _transcoder(tmp_path / "tc-odd", store, env["model"], hook_out=TC_IN)
    index, latents = run(env, tmp_path / "odd", sae_dir=odd, latents="0-3")
    assert all(lat["logits"] is None for lat in latents) and "residual stream" in index["logit_note"]
    # Its input site missing from the store given: one line, nothing written.
    from click.testing import CliRunner

    from sae.cli import main

    res = CliRunner().invoke(main, ["inspect", str(tc), "--store", str(env["store"]), "--out", str(tmp_path / "no")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and TC_IN in res.output, res.output
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "standard"])
def test_nonzero_acts_equal_the_encode(arch):
    from sae.evaluate.inspect import nonzero_acts
    from sae.saedir import SparseAutoencoder

    g = torch.Generator().manual_seed(2)
    sae = SparseAutoencoder(SaeConfig(architecture=arch, d_in=D, d_sae=F, k=5, hook_name=SITE))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if arch == "jumprelu":
            sae.threshold[: F // 3] = -0.2  # a negative θ: pre in (θ, 0] is still zero after the relu
    x = torch.randn(50, D, generator=g)
    a = sae.encode(x).detach()
    for sel in (None, torch.tensor([3, 0, 17, 95])):
        want = a if sel is None else a[:, sel]
        r, f, v = nonzero_acts(sae, x, sel)
        wr, wf = want.nonzero(as_tuple=True)
        assert r.tolist() == wr.tolist() and f.tolist() == wf.tolist()
        torch.testing.assert_close(v, want[wr, wf])


def test_ordered_bits_keep_the_float_order():
    from sae.evaluate.latent_state import _ordered_bits

    v = torch.tensor([-float("inf"), -3e38, -2.5, -1.0, -1e-40, 1e-40, 0.5, 1.0, 7.0, 3e38, float("inf")])
    bits = _ordered_bits(v)
    assert (bits[1:] > bits[:-1]).all() and bits.min() >= -(2**31) and bits.max() < 2**31
    perm = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))
    assert torch.equal(v[perm][torch.sort(_ordered_bits(v[perm])).indices], v)
