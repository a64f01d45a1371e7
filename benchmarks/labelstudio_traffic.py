"""One training cycle's Label Studio traffic on a large project: requests, bytes and seconds.

    python -m benchmarks.labelstudio_traffic --tasks 20000 [--code DIR] [--out benchmarks/results/labelstudio_traffic.md]

A real Label Studio 1.23.2 (the tests' venv, `scripts/install_label_studio.sh`) with a project of
`--tasks` Fashion-MNIST images served by a local HTTP server; 20 tasks annotated (2 per class). Then
two training cycles (`train_project`, the job the queue runs), the second after one more annotation.
Every call the job's Label Studio client makes is recorded (method, path, status, bytes each way,
seconds); image fetches from the image host are not Label Studio traffic and are not counted.

`--code DIR` runs the job from another checkout of peal-backend (e.g. a `git worktree` of an older
commit) against the same Label Studio, for a before/after in one run: the project is rebuilt for it.
"""
from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The part that runs inside the code under test (this checkout, or --code DIR): a JSON summary on stdout.
JOB = r'''
import json, sys, time, dataclasses
import requests
from peal_backend.config import Settings
from peal_backend.labelstudio import LabelStudio
try:
    from peal_backend.labelstudio_job import train_project
except ImportError:  # before the rename
    from peal_backend.cycle import train_project
cfg = json.loads(sys.argv[1])
calls = []
original = requests.Session.request
def recorded(self, method, url, *a, **kw):
    started = time.perf_counter()
    r = original(self, method, url, *a, **kw)
    if url.startswith(cfg["ls_url"]):
        body = kw.get("json")
        up = len(json.dumps(body)) if body is not None else len(kw.get("data") or b"")
        calls.append({"method": method, "path": url[len(cfg["ls_url"]):].split("?")[0], "status": r.status_code,
                      "down": len(r.content), "up": up, "s": time.perf_counter() - started})
    return r
requests.Session.request = recorded
fields = {f.name for f in dataclasses.fields(Settings)}
s = Settings(**{k: v for k, v in cfg["settings"].items() if k in fields})
out = []
for cycle in range(cfg.get("cycles", 2)):
    if cycle:
        ls = LabelStudio(cfg["ls_url"], cfg["token"])
        requests.post(f"{cfg['ls_url']}/api/tasks/{cfg['extra_task']}/annotations/", headers=ls.auth_headers(),
                      json={"result": cfg["extra_result"]}, timeout=60).raise_for_status()
    calls.clear()
    t0 = time.perf_counter()
    result = train_project(cfg["project"], s, "benchmark")
    out.append({"seconds": time.perf_counter() - t0, "calls": list(calls), "result": result})
print("RESULT " + json.dumps(out))
'''


def png(array) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_project(sdk, ls_url: str, token: str, images_url: str, labels, n: int, title: str) -> tuple[int, list[int]]:
    import requests
    config = ("<View><Image name=\"image\" value=\"$image\"/><Choices name=\"choice\" toName=\"image\">"
              + "".join(f"<Choice value=\"c{c}\"/>" for c in range(10)) + "</Choices></View>")
    pid = sdk.projects.create(title=title, label_config=config).id
    tasks = [{"image": f"{images_url}/{i}.png"} for i in range(n)]
    ids = []
    for start in range(0, n, 5000):
        r = requests.post(f"{ls_url}/api/projects/{pid}/import?return_task_ids=true", json=tasks[start:start + 5000],
                          headers={"Authorization": f"Token {token}"}, timeout=600)
        r.raise_for_status()
        ids += r.json()["task_ids"]
    for c in range(10):  # two labels per class
        for i in [j for j in range(n) if labels[j] == c][:2]:
            sdk.annotations.create(id=ids[i], result=result_for(c))
    return pid, ids


def result_for(c: int) -> list:
    return [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [f"c{c}"]}}]


def summarise(cycle: dict) -> dict:
    calls = cycle["calls"]
    return {"requests": len(calls), "mb_down": sum(c["down"] for c in calls) / 1e6, "mb_up": sum(c["up"] for c in calls) / 1e6,
            "ls_seconds": sum(c["s"] for c in calls), "cycle_seconds": cycle["seconds"],
            "by_path": _by_path(calls)}


def _by_path(calls: list) -> dict:
    out: dict = {}
    for c in calls:
        parts = [p if not p.isdigit() else "<id>" for p in c["path"].split("/")]
        key = f"{c['method']} {'/'.join(parts)}"
        agg = out.setdefault(key, [0, 0.0])
        agg[0] += 1
        agg[1] += c["down"] / 1e6
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from peal_backend.simulate import load_dataset
    from tests.labelstudio_fixture import ensure_template, require_label_studio, start_server, stop_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--code", action="append", default=[], help="another checkout to measure too (repeatable)")
    p.add_argument("--cycles", type=int, default=2, help="training cycles per checkout (the second after one more label)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    data = load_dataset("fashion-mnist", args.tasks, 10)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = tmp / "images"
        images.mkdir()
        for i, a in enumerate(data.train_images):
            (images / f"{i}.png").write_bytes(png(a))
        image_server, images_url = serve(images)
        exe = require_label_studio()
        template = ensure_template(exe, tmp)
        import shutil
        shutil.copytree(template, tmp / "ls-data")
        (tmp / "docroot").mkdir()
        ls = start_server(exe, tmp / "ls-data", tmp / "docroot", tmp / "ls.log")
        rows = []
        try:
            for code in [str(ROOT)] + args.code:
                label = "this checkout" if code == str(ROOT) else _describe(code)
                t0 = time.perf_counter()
                pid, ids = make_project(ls.client, ls.url, ls.token, images_url, data.train_labels, args.tasks, f"traffic {len(rows)}")
                print(f"{label}: project {pid} with {len(ids)} tasks made in {time.perf_counter() - t0:.0f} s", flush=True)
                extra = [j for j in range(args.tasks) if data.train_labels[j] == 0][2]  # a third label of class 0
                cfg = {"ls_url": ls.url, "token": ls.token, "project": pid, "cycles": args.cycles, "extra_task": ids[extra],
                       "extra_result": result_for(0),
                       "settings": {"label_studio_url": ls.url, "label_studio_api_key": ls.token,
                                    "model_dir": str(tmp / f"models-{len(rows)}"), "backbone": "peal-mini",
                                    "adapter": "linear", "allowed_hosts": images_url.split("//")[1],
                                    "cache_dir": str(tmp / f"cache-{len(rows)}"), "torch_threads": 2}}
                env = {**os.environ, "PYTHONPATH": code}
                done = subprocess.run([sys.executable, "-c", JOB, json.dumps(cfg)], cwd=code, env=env,
                                      capture_output=True, text=True, timeout=7200)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{label}: the job failed:\n{done.stderr[-3000:]}")
                for n, cycle in enumerate(json.loads(line[7:]), 1):
                    rows.append({"code": label, "cycle": n, **summarise(cycle)})
                    r = rows[-1]
                    print(f"{label} cycle {n}: {r['requests']} requests, {r['mb_down']:.1f} MB down, {r['mb_up']:.1f} MB up, "
                          f"{r['ls_seconds']:.1f} s in Label Studio calls, cycle {r['cycle_seconds']:.1f} s", flush=True)
        finally:
            stop_server(ls)
            image_server.shutdown()
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text)


def _describe(code: str) -> str:
    try:
        sha = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        return f"commit {sha}"
    except OSError:
        return code


def report(rows: list[dict], args) -> str:
    lines = [f"# Label Studio traffic of one training cycle: a {args.tasks:,}-task project", "",
             f"Command: `python -m benchmarks.labelstudio_traffic --tasks {args.tasks} --cycles {args.cycles}"
             + "".join(f" --code {c}" for c in args.code) + "` (Fashion-MNIST images on a local HTTP host, linear "
             "probe on peal-mini, 20 labels then one more; Label Studio 1.23.2 on the same 2-core machine). Image "
             "fetches are not counted: only calls to Label Studio.", "",
             "| code | cycle | requests | MB down | MB up | s in Label Studio calls | cycle s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['code']} | {r['cycle']} | {r['requests']} | {r['mb_down']:.1f} | {r['mb_up']:.1f} | "
                     f"{r['ls_seconds']:.1f} | {r['cycle_seconds']:.1f} |")
    last = max(r["cycle"] for r in rows)
    lines += ["", f"Calls by route (cycle {last}): requests, MB down", ""]
    for r in rows:
        if r["cycle"] == last:
            lines.append(f"- {r['code']}: " + "; ".join(f"`{k}` {v[0]} ({v[1]:.1f} MB)" for k, v in sorted(r["by_path"].items())))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
