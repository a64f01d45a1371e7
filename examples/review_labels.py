#!/usr/bin/env python
"""List the labeled tasks whose labels peal-backend finds most likely wrong, with the SDK.

    python examples/review_labels.py --url http://localhost:8080 --project 3 [--top 20] [--create-tab]

After each training the backend gives labeled tasks a prediction at a `peal-quality-vN` version with
Label Studio's `mislabeling` (0..1, high = the label is likely wrong) and `neighbors` (near-duplicate task
ids). This prints the top ones: task, score, the label given, the choice of a model that never saw that
label, and near-duplicates. It needs nothing special from Label Studio.

With --create-tab it also adds a Data Manager tab, "Labels to review", ordered by mislabeling (highest
first). Label Studio 1.23 accepts that ordering only if it runs with
DATA_MANAGER_FILTER_ALLOWLIST=predictions__mislabeling (README, "Review labels in the Data Manager").
LABEL_STUDIO_API_KEY (or --api-key) is your Label Studio token.
"""
from __future__ import annotations

import argparse
import os
import sys

from label_studio_sdk import LabelStudio

QUALITY_PREFIX = "peal-quality-"


def chosen(result) -> str:
    return ", ".join(c for r in result or [] for c in (r.get("value") or {}).get("choices", [])) or "-"


def to_review(client: LabelStudio, project: int, top: int) -> list[dict]:
    """The `top` labeled tasks with the highest mislabeling, with what a reviewer needs to judge them."""
    judged = [p for p in client.predictions.list(project=project)
              if (p.model_version or "").startswith(QUALITY_PREFIX)]
    judged.sort(key=lambda p: p.mislabeling or 0.0, reverse=True)
    rows = []
    for p in judged[:top]:
        task = client.tasks.get(id=str(p.task))
        annotations = [a for a in task.annotations or [] if not a.get("was_cancelled")]
        given = chosen(annotations[-1]["result"]) if annotations else "-"
        rows.append({"task": p.task, "mislabeling": p.mislabeling, "given": given, "model": chosen(p.result),
                     "neighbors": p.neighbors or []})
    return rows


def create_tab(client: LabelStudio, project: int) -> int:
    view = client.views.create(project=project, data={"title": "Labels to review",
                                                      "ordering": ["-tasks:predictions__mislabeling"]})
    return view.id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", "http://localhost:8080"), help="Label Studio URL")
    p.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY", ""), help="Label Studio token")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--create-tab", action="store_true", help="add a Data Manager tab ordered by mislabeling")
    args = p.parse_args(argv)
    if not args.api_key:
        p.error("set LABEL_STUDIO_API_KEY or pass --api-key")
    if args.top < 1:
        p.error("--top must be at least 1")
    client = LabelStudio(base_url=args.url, api_key=args.api_key)
    rows = to_review(client, args.project, args.top)
    if not rows:
        print(f"project {args.project}: no label-quality predictions yet (the backend writes them after a "
              "training with two classes labeled at least twice each)")
    for r in rows:
        near = f"  near-duplicates: {', '.join(map(str, r['neighbors']))}" if r["neighbors"] else ""
        print(f"task {r['task']}: mislabeling {r['mislabeling']:.3f}  given: {r['given']}  model: {r['model']}{near}")
    if args.create_tab:
        print(f"Data Manager tab {create_tab(client, args.project)} 'Labels to review' created")
    return 0


if __name__ == "__main__":
    sys.exit(main())
