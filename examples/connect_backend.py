#!/usr/bin/env python
"""Connect a running peal-backend to a Label Studio project, as a user would, with the SDK.

    python examples/connect_backend.py --url http://localhost:8080 --backend http://localhost:9090 \
        --project 3                         # an existing project
    python examples/connect_backend.py --url ... --backend ... --title "Chest X-rays"   # a new one,
        # labeled with examples/label_config.xml

LABEL_STUDIO_API_KEY (or --api-key) is your Label Studio token. With --basic-auth-user/--basic-auth-pass
(the backend's BASIC_AUTH_USER/BASIC_AUTH_PASS), Label Studio sends those credentials; the webhook that
Label Studio creates for the backend does not carry them, so this script adds the header to it.
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

from label_studio_sdk import LabelStudio

HERE = Path(__file__).resolve().parent


def connect(client: LabelStudio, project: int, backend_url: str, title: str = "peal-backend",
            basic_auth: tuple[str, str] | None = None, uncertainty_sampling: bool = True) -> int:
    """Add the backend to the project; returns the ML backend id. Label Studio checks /health and
    calls /setup here, and creates a webhook <backend>/webhook for annotation events."""
    kwargs = {}
    if basic_auth:
        kwargs = {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
    ml = client.ml.create(project=project, url=backend_url, title=title, is_interactive=False, **kwargs)
    if basic_auth:
        add_webhook_auth(client, project, backend_url, basic_auth)
    if uncertainty_sampling:
        # The Community UI greys this option out, but the server honours it: the labeling stream then
        # serves the task with the lowest prediction score (the backend's pick) first.
        client.projects.update(id=project, sampling="Uncertainty sampling")
    return ml.id


def add_webhook_auth(client: LabelStudio, project: int, backend_url: str, basic_auth: tuple[str, str]) -> int:
    """Give the webhook Label Studio created for the backend the basic-auth header (Label Studio sends
    the ML backend's credentials on /setup, /predict and training, but not on this webhook).
    Returns how many webhooks were updated."""
    token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
    hook_url = backend_url.rstrip("/") + "/webhook"
    updated = 0
    for hook in client.webhooks.list(project=str(project)):
        if hook.url == hook_url:
            client.webhooks.update(id=hook.id, url=hook.url, headers={"Authorization": f"Basic {token}"})
            updated += 1
    return updated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", "http://localhost:8080"), help="Label Studio URL")
    p.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY", ""), help="Label Studio token")
    p.add_argument("--backend", required=True, help="backend URL as Label Studio reaches it, e.g. http://peal-backend.internal:9090 in docker-compose (a host with a dot: Label Studio creates no webhook for a dotless one)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--project", type=int, help="id of an existing project")
    group.add_argument("--title", help="create a project with this title and examples/label_config.xml")
    p.add_argument("--label-config", type=Path, default=HERE / "label_config.xml")
    p.add_argument("--basic-auth-user", default=os.environ.get("BASIC_AUTH_USER", ""))
    p.add_argument("--basic-auth-pass", default=os.environ.get("BASIC_AUTH_PASS", ""))
    p.add_argument("--keep-sampling", action="store_true", help="do not switch the project to Uncertainty sampling")
    args = p.parse_args(argv)
    if not args.api_key:
        p.error("set LABEL_STUDIO_API_KEY or pass --api-key")
    client = LabelStudio(base_url=args.url, api_key=args.api_key)
    project = args.project
    if project is None:
        project = client.projects.create(title=args.title, label_config=args.label_config.read_text()).id
        print(f"created project {project}")
    auth = (args.basic_auth_user, args.basic_auth_pass) if args.basic_auth_user else None
    ml_id = connect(client, project, args.backend, basic_auth=auth, uncertainty_sampling=not args.keep_sampling)
    ml = client.ml.get(id=ml_id)
    print(f"project {project}: ML backend {ml_id} at {args.backend} is {ml.state}; "
          f"open {args.url}/projects/{project} and start labeling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
