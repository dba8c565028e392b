"""sae.progress: plain lines for batch logs, a tqdm bar on a terminal, the interval's settings, the summary."""

from __future__ import annotations

import io
import re
import time

import pytest
from click.testing import CliRunner

from sae import progress
from sae.cli import main
from sae.errors import SaeError
from sae.progress import Progress, summary


@pytest.fixture(autouse=True)
def _fresh_stages():
    """Each test starts with no stage begun (summary() reports from a stage's first Progress in the process)."""
    progress._stage_start.clear()
    progress._stage_done.clear()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_start_periodic_close():
    out = io.StringIO()
    with Progress("harvest", 1000, interval=0.01, file=out) as p:
        for _ in range(4):
            time.sleep(0.02)
            p.update(100)
        p.figures(**{"bt-k32": "loss 0.12 L0 31.8 dead 0.3%"})
        time.sleep(0.02)
        p.update(100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "harvest: started, 1,000 tok"
    periodic = lines[1:-1]
    assert len(periodic) == 5
    assert re.fullmatch(r"harvest: 100/1,000 tok \(10\.0%\) [\d.]+k? tok/s ETA \d+:\d\d:\d\d", periodic[0])
    assert periodic[-1].startswith("harvest: 500/1,000 tok (50.0%) ")
    assert periodic[-1].endswith(" | bt-k32: loss 0.12 L0 31.8 dead 0.3%")
    assert re.fullmatch(r"harvest: 500/1,000 tok \(50\.0%\) [\d.]+k? tok/s in 0:00:00 \| bt-k32: .*", lines[-1])
    assert "\r" not in out.getvalue()


def test_plain_lines_wait_for_the_interval():
    out = io.StringIO()
    with Progress("stats", 10, unit="chunk", interval=3600, file=out) as p:
        for _ in range(10):
            p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # start and close only, even for a short job
    assert lines[0] == "stats: started, 10 chunk"
    assert lines[1].startswith("stats: 10/10 chunk (100.0%) ")


def test_unknown_total_and_resumed_initial():
    out = io.StringIO()
    with Progress("eval", None, unit="batch", interval=0, file=out) as p:
        p.update(3)
    assert out.getvalue().splitlines()[0] == "eval: started, an unknown number of batch"
    assert out.getvalue().splitlines()[1].startswith("eval: 3 batch ")
    out = io.StringIO()
    Progress("train", 100, initial=40, interval=3600, file=out).close()
    assert out.getvalue().splitlines()[0] == "train: started, 100 tok, 40 already done"


def test_tty_uses_tqdm_with_named_figures():
    out = _Tty()
    with Progress("train", 1000, file=out) as p:
        assert p._bar is not None
        p.figures(**{"bt-k32": "loss 0.12", "topk-k32": "loss 0.20"})
        p.update(500)
        p._bar.refresh()
    text = out.getvalue()
    assert "\r" in text and "train:" in text and "500/1.00k" in text
    assert "bt-k32: loss 0.12 | topk-k32: loss 0.20" in text
    assert "started" not in text  # no plain lines on a terminal


def test_interval_default_env_and_errors(monkeypatch):
    monkeypatch.delenv(progress.ENV_INTERVAL, raising=False)
    assert progress.interval() == 30.0
    monkeypatch.setenv(progress.ENV_INTERVAL, "0.5")
    assert progress.interval() == 0.5
    assert Progress("x", 1, file=io.StringIO()).interval == 0.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(progress.ENV_INTERVAL, bad)
        with pytest.raises(SaeError, match=progress.ENV_INTERVAL):
            progress.interval()


def test_cli_option_sets_interval(monkeypatch):
    monkeypatch.setenv(progress.ENV_INTERVAL, "30")  # so that the option's change is undone after the test
    res = CliRunner().invoke(main, ["--progress-interval", "2.5", "validate", "--help"])
    assert res.exit_code == 0, res.output
    assert progress.interval() == 2.5
    res = CliRunner().invoke(main, ["--progress-interval", "abc", "validate", "--help"])
    assert res.exit_code == 2 and "abc" in res.output
    res = CliRunner().invoke(main, ["--progress-interval", "0", "validate", "--help"])
    assert res.exit_code == 2
    monkeypatch.setenv(progress.ENV_INTERVAL, "later")
    res = CliRunner().invoke(main, ["validate", "nowhere"])
    assert res.exit_code == 2 and "SAE_PROGRESS_INTERVAL" in res.output and "Traceback" not in res.output


def test_summary_paragraph():
    out = io.StringIO()
    with Progress("train", 2000, interval=3600, file=io.StringIO()) as p:
        time.sleep(0.01)
        p.update(2000)
    summary("train", ["bt-k32: L0 31.8, FVU 0.12, dead 0.3%", "topk-k32: L0 32.0"], file=out)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"train: done in 0:00:00 \(2,000 tok, [\d.]+k? tok/s\)", lines[0])
    assert lines[1:] == ["  bt-k32: L0 31.8, FVU 0.12, dead 0.3%", "  topk-k32: L0 32.0"]
    out = io.StringIO()
    summary("concat", ["out.zarr: 10 rows"], file=out)  # no Progress for this stage: no time to report
    assert out.getvalue() == "concat: done\n  out.zarr: 10 rows\n"


def test_begin_starts_the_clock_and_forgets_an_unfinished_run(capsys):
    with Progress("eval", 10, interval=3600, file=io.StringIO()) as p:
        p.update(10)  # a run that failed before its summary
    progress._stage_start["eval"] -= 3600
    progress.begin("eval")
    progress._stage_start["eval"] -= 65  # the model took a minute to load
    with Progress("eval", 4, unit="batch", interval=3600, file=io.StringIO()) as p:
        p.update(4)
    summary("eval", [])
    assert capsys.readouterr().out.startswith("eval: done in 0:01:05 (4 batch, ")


def test_duration_and_rate():
    assert progress.duration(97330) == "27:02:10"
    assert progress.duration(5) == "0:00:05"
    assert progress.rate(18234) == "18.2k" and progress.rate(3.1e6) == "3.1M" and progress.rate(12.34) == "12.3"


def test_sae_run_prints_a_header_per_stage(tmp_path, monkeypatch):
    import sae.evaluate
    import sae.harvest
    import sae.train

    ran = []
    for module, name in ((sae.harvest, "harvest"), (sae.train, "train"), (sae.evaluate, "evaluate")):
        monkeypatch.setattr(module, name, lambda cfg, name=name: ran.append(name))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "run_dir: run\nharvest: {sites: [blocks.1.hook_resid_post], max_tokens: 4096}\n"
        "train: {arch: [batchtopk, topk], k: [8]}\n"
    )
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["run", str(manifest)])
    assert res.exit_code == 0, res.output
    assert ran == ["harvest", "train", "evaluate"]
    headers = [line for line in res.stdout.splitlines() if line.startswith("== ")]
    assert headers == [
        "== harvest: blocks.1.hook_resid_post of smollm2-135m on 4,096 tokens of shakespeare (train) → run/store.zarr",
        "== train: 2 SAEs (batchtopk-k8-x8, topk-k8-x8) on blocks.1.hook_resid_post of run/store.zarr → run/saes",
        "== eval: 2 SAEs on 65,536 eval tokens → run/report",
    ]
