"""BENCHMARKS.md is assembled from benchmarks/results/*.md: an edit made to the page alone would be lost
the next time anyone runs `python -m benchmarks.collect`."""
from pathlib import Path

from benchmarks.collect import assemble

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_md_is_what_collect_assembles_from_the_results():
    assert (ROOT / "BENCHMARKS.md").read_text() == assemble(), \
        "BENCHMARKS.md differs from benchmarks/results/*.md: edit the results file, then python -m benchmarks.collect"
