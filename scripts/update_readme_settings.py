"""Regenerate the README's settings table from peal_backend.config (run after adding a setting)."""
import re
from pathlib import Path

from peal_backend.config import markdown_table

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
new = re.sub(r"(<!-- settings:start -->\n).*?(<!-- settings:end -->)",
             lambda m: m.group(1) + markdown_table() + "\n" + m.group(2), text, flags=re.S)
readme.write_text(new)
