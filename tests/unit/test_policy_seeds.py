"""`bench/policy_seeds.py`: the seed list it parses and the report it prints."""

from __future__ import annotations

import re

import pytest

from bench.policy_seeds import main, parse_seeds


def test_seeds_parse_as_ranges_and_lists() -> None:
    assert parse_seeds("1-3") == [1, 2, 3]
    assert parse_seeds("4,7, 9") == [4, 7, 9]
    assert parse_seeds("5-6,2,6") == [2, 5, 6]


@pytest.mark.parametrize("text", ["x", "3-1", "", "1-y"])
def test_bad_seeds_say_what_is_wrong(text: str) -> None:
    with pytest.raises(SystemExit, match="--seeds"):
        parse_seeds(text)


def test_the_report_counts_each_target_over_the_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "2-3", "--hours", "0.25", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "seed   2: cold_loads" in out and "seed   3: gpu_misses" in out
    assert "## targets over 2 seeds" in out
    # Every target of both scenarios is counted, over both seeds.
    counted = [line for line in out.splitlines() if line.startswith("- ") and "/2" in line]
    assert len(counted) == 8
    assert all("0 over-commits: 2/2" in line for line in counted if ": 0 over-commits" in line)
    # The sums over the seeds: gpu-serve's per-seed figures added up, against Belady-Size's.
    assert "## over all 2 seeds" in out and "@knows=" not in out  # the references only with --hindsight
    one_gpu = re.findall(r"seed +\d+: cold_loads (\d+) / Belady-Size (\d+)", out)
    ours, belady = sum(int(a) for a, _ in one_gpu), sum(int(b) for _, b in one_gpu)
    assert f"| gpu-serve | {ours} | {ours / belady:.3f}x | 2/2 |" in out
    assert f"| belady-size | {belady} | 1.000x |" in out
