"""experiments/reproduce.py's arithmetic: the seeds' cells, the verdict rule and JumpReLU's λ interpolation."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"  # reproduce.py reads the shared harness (machine line, doc writer) from there


@pytest.fixture(scope="module")
def rp():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("reproduce_under_test", ROOT / "experiments" / "reproduce.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def entry(fvu: float, ci: float, typical: float | None = None) -> dict:
    return {
        "fvu": fvu,
        "ci95": {"fvu": [fvu - ci, fvu + ci]},
        "row_types": {"typical": {"fvu": typical if typical is not None else fvu}},
    }


def test_cell_mean_range_and_ci(rp):
    c = rp.cell([entry(0.10, 0.01), entry(0.12, 0.03), entry(0.11, 0.02)], "fvu", "all")
    assert c.n == 3
    assert math.isclose(c.mean, 0.11) and (c.lo, c.hi) == (0.10, 0.12)
    assert math.isclose(c.sd, 0.01)
    assert math.isclose(c.ci, 0.02)
    t = rp.cell([entry(0.1, 0.01, typical=0.5)], "fvu", "typical")
    assert t.mean == 0.5 and t.ci is None  # eval gives no CI for a row group


def test_verdict_rule(rp):
    def cells(vals: list[float], ci: float):
        return rp.cell([entry(v, ci) for v in vals], "fvu", "all")

    a, b = cells([0.10, 0.11, 0.105], 0.001), cells([0.13, 0.14, 0.135], 0.001)
    assert rp.verdict(a, b, True, 3) == "better"
    assert rp.verdict(b, a, True, 3) == "worse"
    assert rp.verdict(a, b, False, 3) == "worse"  # higher is better: the lower one loses
    # seed ranges overlap: not distinguishable, however small the CIs
    assert rp.verdict(cells([0.10, 0.14], 0.001), cells([0.12, 0.13], 0.001), True, 2) == "not distinguishable"
    # separated seeds but the gap is inside the CIs
    assert rp.verdict(cells([0.100, 0.101], 0.05), cells([0.110, 0.111], 0.05), True, 2) == "not distinguishable"
    assert rp.verdict(None, b, True, 3) == "–"


def test_interpolate_coeff(rp):
    pts = {0.1: 120.0, 0.3: 39.0, 1.0: 13.7, 3.0: 7.3}
    c, extra = rp.interpolate_coeff(pts, 32)
    assert not extra and 0.3 < c < 1.0
    # on the line through the two points around the target, in log-log
    f = (math.log(32) - math.log(39.0)) / (math.log(13.7) - math.log(39.0))
    assert math.isclose(math.log(c), math.log(0.3) + f * (math.log(1.0) - math.log(0.3)))
    c, extra = rp.interpolate_coeff(pts, 4)
    assert extra and c > 3.0
