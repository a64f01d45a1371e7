"""Peak memory of decoding small image files that declare many pixels (what one /predict task can send).

Writes a few adversarial files (10000 x 10000 pixels: 100 M, the default PEAL_MAX_IMAGE_PIXELS), then
decodes each in a fresh child process with `peal_backend.images.decode_image`, the way ImageFetcher
does, and reports the child's peak RSS (VmHWM, reset after the imports) above its RSS before decoding, the size of the decoded
image and the time taken. "4 held" decodes the same file four times and keeps the results, as a
/predict batch keeps its images until the model runs.

    PYTHONPATH=. python -m benchmarks.request_memory [--label after] [--out table.md]

benchmarks/results/request_memory.md puts a "before" and an "after" run side by side. To measure code from another commit, put that commit's package first on PYTHONPATH, e.g.
    git archive d4340cd peal_backend | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before:. python -m benchmarks.request_memory --label before
(an older decode_image without `max_side` is called without it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE = 10_000

CHILD = r"""
import inspect, json, sys, time
from peal_backend.config import Settings
from peal_backend.images import decode_image

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

path, held = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
settings = Settings()
kwargs = {"max_pixels": settings.max_image_pixels, "source": path}
if "max_side" in inspect.signature(decode_image).parameters:
    kwargs["max_side"] = settings.decode_max_side
base = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the imports' own peak does not hide ours
start = time.perf_counter()
images = [decode_image(data, **kwargs) for _ in range(held)]
seconds = time.perf_counter() - start
peak = status_kib("VmHWM")
print(json.dumps({"peak_mib": (peak - base) / 1024, "size": list(images[0].size), "seconds": seconds,
                  "max_side": kwargs.get("max_side")}))
"""


def write_cases(folder: Path) -> dict[str, Path]:
    """The adversarial files: name -> path."""
    import numpy as np
    from PIL import Image

    cases = {}

    def save(name, image, fmt, **options):
        path = folder / name
        image.save(path, format=fmt, **options)
        cases[name] = path

    save("1-bit PNG", Image.new("1", (SIDE, SIDE)), "PNG")
    save("16-bit grey PNG", Image.new("I;16", (SIDE, SIDE)), "PNG")
    save("8-bit palette PNG", Image.new("P", (SIDE, SIDE)), "PNG")
    rgb = Image.fromarray(np.zeros((SIDE, SIDE, 3), dtype=np.uint8))
    save("RGB JPEG", rgb, "JPEG", quality=75)
    return cases


def measure(path: Path, held: int) -> dict:
    # run from the file's folder: with `-c` the working directory comes first on sys.path, before PYTHONPATH
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(held)], capture_output=True, text=True,
                         cwd=path.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="this code", help="what is measured (a column of the table)")
    parser.add_argument("--out", help="write the table as markdown here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = write_cases(Path(tmp))
        for name, path in cases.items():
            for held in (1, 4):
                result = measure(path, held)
                rows.append((name, path.stat().st_size, held, result))
                print(f"{args.label}: {name} ({path.stat().st_size / 1024:.0f} KiB), {held} held: "
                      f"+{result['peak_mib']:.0f} MiB peak RSS, decoded {result['size'][0]}x{result['size'][1]}, "
                      f"{result['seconds']:.2f} s (max_side={result['max_side']})", flush=True)
    if args.out:
        lines = [f"| file ({SIDE}x{SIDE}) | bytes | images held | peak RSS above baseline | decoded size | seconds |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {size:,} | {held} | +{r['peak_mib']:.0f} MiB | {r['size'][0]}x{r['size'][1]} | "
                  f"{r['seconds']:.2f} |" for name, size, held, r in rows]
        Path(args.out).write_text(f"{args.label} (decode max side: {rows[0][3]['max_side']})\n\n"
                                  + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
