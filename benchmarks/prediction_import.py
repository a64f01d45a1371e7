"""What one push of predictions costs Label Studio, by request size.

    python -m benchmarks.prediction_import --tasks 5000 --chunks 200,1000,5000 [--out benchmarks/results/prediction_import.md]

A real Label Studio 1.23.2 (the tests' venv) with a project of `--tasks` tasks (no images needed:
predictions only name the task). For each chunk size, one model version's predictions for every task
are pushed through `LabelStudio.create_predictions` (the call the training job makes), and the
seconds are timed side by side in the same run, on the same project.

Why chunk size matters: Label Studio 1.23's bulk import (its default, non-"memory efficient" path)
recomputes the counters of *every task in the project* after each request, so a push of n predictions
in chunks of c costs about n/c full-project counter updates.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import shutil

    import requests

    from peal_backend import labelstudio as ls_module
    from peal_backend.labelstudio import LabelStudio
    from tests.labelstudio_fixture import ensure_template, require_label_studio, start_server, stop_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--chunks", default="200,1000,5000")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        exe = require_label_studio()
        template = ensure_template(exe, tmp)
        shutil.copytree(template, tmp / "ls-data")
        (tmp / "docroot").mkdir()
        ls = start_server(exe, tmp / "ls-data", tmp / "docroot", tmp / "ls.log")
        try:
            config = ('<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
                      '<Choice value="a"/><Choice value="b"/></Choices></View>')
            pid = ls.client.projects.create(title="import", label_config=config).id
            headers = {"Authorization": f"Token {ls.token}"}
            ids = []
            for start in range(0, args.tasks, 5000):
                n = min(5000, args.tasks - start)
                r = requests.post(f"{ls.url}/api/projects/{pid}/import?return_task_ids=true", headers=headers,
                                  json=[{"image": f"http://example.invalid/{start + i}.png"} for i in range(n)],
                                  timeout=600)
                r.raise_for_status()
                ids += r.json()["task_ids"]
            client = LabelStudio(ls.url, ls.token, timeout=600)
            result = [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": ["a"]}}]
            for chunk in chunks:
                ls_module.CHUNK_SIZE = chunk
                preds = [{"task": t, "result": result, "score": i / len(ids)} for i, t in enumerate(ids)]
                t0 = time.perf_counter()
                created = client.create_predictions(pid, preds, f"bench-{chunk}", new_version=True)
                seconds = time.perf_counter() - t0
                assert created == len(ids), (created, len(ids))
                rows.append({"chunk": chunk, "requests": -(-len(ids) // chunk), "seconds": seconds})
                print(f"chunk {chunk}: {rows[-1]['requests']} requests, {seconds:.1f} s "
                      f"({len(ids) / seconds:.0f} predictions/s)", flush=True)
        finally:
            stop_server(ls)
    base = rows[0]["seconds"]
    lines = ["# Pushing predictions to Label Studio: request size", "",
             f"`python -m benchmarks.prediction_import --tasks {args.tasks} --chunks {args.chunks}`: one version's "
             f"predictions for all {args.tasks:,} tasks of a real Label Studio 1.23.2 project, pushed with "
             "`LabelStudio.create_predictions` at each chunk size, side by side in one run.", "",
             "| predictions per request | requests | seconds | predictions/s | time vs first row |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk']} | {r['requests']} | {r['seconds']:.1f} | {args.tasks / r['seconds']:.0f} | "
                     f"{r['seconds'] / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
