"""Comparisons over seeds (``fedalora.comparison``) on hand-written run directories:
which runs are one method, paired gains with their interval, and what may be said."""

import json
import math

import pytest

from fedalora.comparison import group_runs, method_label, over_seeds, paired_gain, reading
from fedalora.stats import Interval


def _run(root, name, **config):
    run_dir = root / name
    run_dir.mkdir()
    settings = {"strategy": "fedalora-hetero", "ranks": "8,4", "lr": 0.001, **config}
    (run_dir / "config.json").write_text(json.dumps(settings))
    return run_dir


def test_runs_that_differ_only_in_seed_and_place_are_one_method_in_seed_order(tmp_path):
    b = _run(tmp_path, "b", seed=43, **{"run-name": "b", "output-dir": "x"})
    a = _run(tmp_path, "a", seed=42, **{"run-name": "a", "output-dir": "y"})
    other = _run(tmp_path, "c", seed=42, lr=0.01)
    groups = list(group_runs([b, other, a]).values())
    assert groups == [[a, b], [other]]


def test_a_paired_gain_is_the_mean_difference_per_seed_with_a_student_t_interval():
    method = [{"mean": v} for v in (0.80, 0.82, 0.85)]
    baseline = [{"mean": v} for v in (0.70, 0.74, 0.73)]
    gain = paired_gain(method, baseline)
    differences = [0.10, 0.08, 0.12]
    sd = math.sqrt(sum((d - 0.10) ** 2 for d in differences) / 2)
    assert gain.mean == pytest.approx(0.10)
    assert gain.half_width == pytest.approx(4.302652729749464 * sd / math.sqrt(3))  # t(0.975, 2)
    assert gain.n == 3 and gain.excludes_zero


def test_over_seeds_leaves_out_figures_no_seed_has_and_nan_seeds():
    figures = over_seeds([{"mean": 0.5, "worst": math.nan}, {"mean": 0.7, "worst": 0.2}])
    assert set(figures) == {"mean", "worst"}
    assert figures["mean"].mean == pytest.approx(0.6) and figures["mean"].n == 2
    assert figures["worst"].n == 1 and math.isnan(figures["worst"].half_width)


def test_reading_says_no_difference_unless_the_interval_excludes_zero():
    assert "higher by 0.100 ± 0.050 (95% interval over 3 seeds)" in reading(
        Interval(0.1, 0.05, 0.15, 3), "mean"
    )
    assert "lower by 0.100" in reading(Interval(-0.1, -0.15, -0.05, 3), "mean")
    assert "no difference resolved (+0.010 ± 0.050)" in reading(
        Interval(0.01, -0.04, 0.06, 3), "mean"
    )
    assert "from one seed; no interval" in reading(Interval(0.1, math.nan, math.nan, 1), "m")


def test_a_method_label_names_its_privacy_settings(tmp_path):
    assert method_label(_run(tmp_path, "plain")) == "fedalora-hetero (ranks 8,4)"
    private = _run(tmp_path, "dp", **{"dp-noise-multiplier": 1.0, "dp-clip": 0.1})
    assert method_label(private) == "fedalora-hetero (ranks 8,4), DP z=1 C=0.1"
