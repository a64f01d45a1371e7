"""Assemble BENCHMARKS.md from benchmarks/results/*.md (each written by the script it names).

    python -m benchmarks.collect
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the backbones newest first, after the headline grids; raw tables in sub-folders (transfer_probe/) are not sections
ORDER = ["queue_order", "queue_order_peal_mini_2", "backbone_peal_mini_4", "queue_order_peal_mini_4",
         "backbone_peal_mini_3", "queue_order_peal_mini_3", "peal_mini", "head_fit", "pool_scoring", "rescore", "sharded_scoring", "predict_latency",
         "selection", "load"]
INTRO = """# Benchmarks

Every figure below was produced by the command printed beside it, on this project's 2-core, 24 GiB
machines (the CPU model differs between sessions: an Intel Xeon with AMX/AVX-512 bf16 in one, an AMD
EPYC without AVX-512 in another), usually while other work shared the two cores: absolute
times are noisy, so comparisons are ratios measured side by side in the same run. Sections are
assembled from `benchmarks/results/*.md` by `python -m benchmarks.collect`.
"""


def assemble() -> str:
    """BENCHMARKS.md's text: the intro, a contents line, then each results file as a section."""
    parts = [INTRO]
    names = [n for n in ORDER if (RESULTS / f"{n}.md").exists()]
    names += sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in ORDER)
    parts.append("Contents: " + ", ".join(f"[{n.replace('_', ' ')}](#{n})" for n in names) + "\n")
    for name in names:
        text = (RESULTS / f"{name}.md").read_text().strip()
        # shift headings so that each section's top heading is a level-2 heading under this page's title
        lines = text.splitlines()
        levels = [len(line) - len(line.lstrip("#")) for line in lines if line.startswith("#")]
        shift = 2 - min(levels, default=2)
        text = "\n".join(("#" * shift + line) if line.startswith("#") and shift > 0 else
                         line[-shift:] if line.startswith("#") and shift < 0 else line for line in lines)
        # links relative to benchmarks/results/ become relative to the repository root
        text = re.sub(r"\]\((?!https?:|#|/|benchmarks/)", "](benchmarks/results/", text)
        parts.append(f'<a id="{name}"></a>\n\n{text}\n')
    return "\n".join(parts)


def main() -> None:
    (ROOT / "BENCHMARKS.md").write_text(assemble())


if __name__ == "__main__":
    main()
