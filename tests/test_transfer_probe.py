"""scripts/transfer_probe.py's report: which columns it compares, and that the differences are paired."""
from __future__ import annotations

from scripts.transfer_probe import markdown


def test_report_pairs_each_backbone_with_the_references_and_the_first_backbone_with_the_others():
    accs = {"new": [0.6, 0.7, 0.8], "old": [0.5, 0.7, 0.6], "random init": [0.3] * 3, "pixels": [0.5, 0.6, 0.7],
            "intensity stats": [0.9] * 3}
    rows = [{"dataset": "d", "labels": 20, "method": m, "mean": sum(a) / 3, "std": 0.0, "accs": a}
            for m, a in accs.items()]
    header, _, line = markdown(rows).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
    assert [c for c in columns if "−" in c] == ["new − pixels", "new − random init", "old − pixels",
                                                 "old − random init", "new − old"]  # no reference against another
    assert cells["new − pixels"].startswith("+0.100 ± 0.000")  # the same +0.1 on every draw
    assert cells["new − old"].startswith("+0.100 ± ")  # per draw +0.1, 0, +0.2: mean +0.1, a wide interval
    assert cells["new − old"] != "+0.100 ± 0.000"
    assert cells["intensity stats"] == "**0.900 ± 0.000**"  # the best mean is bold, references included
