"""benchmarks/speed_physicsnemo.py: rounds of ours / theirs pairs, alternating which runs first."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import speed_physicsnemo  # noqa: E402


def test_rounds_alternate_and_ratios_are_taken_per_pair():
    # A machine slowing steadily: each run takes 10% longer than the one before. Ours needs 2 s
    # and theirs 4 s at the same speed, so every ratio taken between neighbours stays near 0.5.
    order, clock = [], [1.0]

    def runner(side, seconds):
        def run():
            order.append(side)
            clock[0] *= 1.1
            return {"median_s": seconds * clock[0], "peak_rss_bytes": 100 if side == "ours" else 50}

        return run

    row = speed_physicsnemo.measure_row(runner("ours", 2.0), runner("theirs", 4.0), rounds=4)
    assert order == ["ours", "theirs", "theirs", "ours", "ours", "theirs", "theirs", "ours"]
    per_round = row["ours_over_theirs_per_round"]["median_s"]
    assert per_round == pytest.approx([0.5 / 1.1, 0.5 * 1.1, 0.5 / 1.1, 0.5 * 1.1])
    assert row["ours_over_theirs"]["median_s"] == pytest.approx(0.5 * (1.1 + 1 / 1.1) / 2)
    assert row["ours_over_theirs"]["peak_rss_bytes"] == 2.0
    assert [run["median_s"] for run in row["ours"]] == pytest.approx([2.2, 2 * 1.1**4, 2 * 1.1**5, 2 * 1.1**8])


def test_a_row_with_a_failed_run_keeps_its_runs_but_no_ratio():
    row = speed_physicsnemo.measure_row(lambda: {"median_s": 1.0}, lambda: {"error": "exit 1"}, rounds=2)
    assert row["ours_over_theirs"] == {} and row["physicsnemo"] == [{"error": "exit 1"}] * 2


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        speed_physicsnemo.parse_args(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
