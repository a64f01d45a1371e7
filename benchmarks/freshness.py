"""Queue freshness: seconds from a submitted label to a queue ordered by a model that has seen it.

    python -m benchmarks.freshness --tasks 1000 --backbone peal-mini [--labels 10] [--prelabel 0]
                                   [--out benchmarks/results/freshness.md]

A real Label Studio 1.23.2 (installed or found as the tests do) with a project of `--tasks` Fashion-MNIST
images served from a loopback HTTP host; the backend under gunicorn with its defaults (in-process
trainings, LoRA, `auto` strategy), connected to the project through Label Studio's API as a user
would (Label Studio calls /setup, creates the webhook). First pass: from connecting until every task
carries a prediction of the cold-start ordering (reported apart). Then, `--labels` times: annotate the
task Label Studio serves next (`/api/projects/<id>/next`) with its true class, and time until the
project's `model_version` is a version whose training saw that label (its meta.json in MODEL_DIR) *and*
every unlabeled task holds a prediction at that version. The job's own phase timings (fetch, train,
score, save, push, switch: the project's model_version moved) come from what it recorded in the
project's history when it published that version; the next label goes in at once, without waiting for
the job to end (with PEAL_ADAPT_GROWTH a job may publish a head refresh, then train the adapter). Deleting pruned versions' predictions (Label Studio does it one prediction at a time)
runs in the background after the switch, beside the next training.

`--prelabel N` annotates the first N tasks before the backend connects, so the timed labels are the
(N+1)-th onwards: a cycle's training grows with the labeled set (its batch, until PEAL_BATCH_SIZE), so
the first few labels alone would flatter a large backbone.

`--backbone dinov2-small` builds a DINOv2-small-shaped model (random weights: no pretrained weights
can be downloaded here; the cost is the same) and serves it at 224 px.

The last line printed is `freshness_p50_s: <seconds>`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("fetch", "train", "score", "save", "push", "switch")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the load benchmark's)."""
    from benchmarks.load import percentile as nearest_rank
    return nearest_rank(sorted(values), q)


def start_backend(ls, backbone: str, image_size: int, images_host: str, tmp: Path, extra: dict) -> tuple[subprocess.Popen, str, Path]:
    from tests.conftest import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEAL_", "LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.pop("REDIS_URL", None)
    env.update({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "MODEL_DIR": str(tmp / "models"),
                "PEAL_BACKBONE": backbone, "PEAL_ALLOWED_HOSTS": images_host, "LOG_LEVEL": "INFO",
                "PYTHONPATH": str(ROOT), **({"PEAL_IMAGE_SIZE": str(image_size)} if image_size else {}), **extra})
    log = tmp / "backend.log"
    proc = subprocess.Popen([sys.executable, "-m", "peal_backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"backend exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return proc, url, log
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit("backend not healthy in 180 s")


def wait_until(check, what: str, timeout: float, log: Path) -> float:
    """Poll `check` every 0.2 s; seconds until it held."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if check():
            return time.perf_counter() - t0
        time.sleep(0.2)
    raise SystemExit(f"{what}: not within {timeout:.0f} s\n{log.read_text()[-3000:]}")


NEXT_ERRORS: list[str] = []  # Label Studio's failed answers to /next, reported


def next_task(ls_url: str, pid: int, headers: dict, attempts: int = 30) -> dict:
    """The task Label Studio serves next (asked before a label's clock starts). Label Studio has answered
    this with an HTML error page (500) once in a while, several times in a row on a 10,000-task project:
    asked again, as an annotator's browser would, for up to a minute; each failure is counted in the
    report."""
    for attempt in range(attempts):
        r = requests.get(f"{ls_url}/api/projects/{pid}/next", headers=headers, timeout=120)
        if r.ok and r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        NEXT_ERRORS.append(str(r.status_code))
        print(f"/next answered {r.status_code} {r.text[:120]!r}; asking again", flush=True)
        time.sleep(2)
    raise SystemExit(f"/next failed {attempts} times")


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.labelstudio_traffic import png, result_for, serve
    from examples.connect_backend import connect
    from peal_backend.labelstudio import LabelStudio
    from peal_backend.simulate import load_dataset
    from tests.labelstudio_fixture import ensure_template, require_label_studio, start_server, stop_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--backbone", default="peal-mini", help="peal-mini, dinov2-small (shape, random weights) or a folder")
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--prelabel", type=int, default=0, help="tasks annotated (the first ones imported) before the backend "
                   "connects, so the timed labels are measured with a training set of that size (not timed)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for one fresh queue")
    p.add_argument("--env", action="append", default=[], help="extra backend setting NAME=VALUE (repeatable)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--logs", type=Path, default=None, help="copy Label Studio's and the backend's logs here at the end")
    args = p.parse_args()
    args.load_at_start = os.getloadavg()[0]
    extra = dict(e.split("=", 1) for e in args.env)
    data = load_dataset("fashion-mnist", args.tasks, 10)
    names = [f"c{c}" for c in range(10)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        backbone, size = args.backbone, 0
        if args.backbone == "dinov2-small":
            from benchmarks.pool_scoring import dinov2_small
            backbone, size = dinov2_small(str(tmp / "dinov2-small"), "sdpa"), 224
        (tmp / "images").mkdir()
        for i, a in enumerate(data.train_images):
            (tmp / "images" / f"{i}.png").write_bytes(png(a))
        image_server, images_url = serve(tmp / "images")
        exe = require_label_studio()
        shutil.copytree(ensure_template(exe, tmp), tmp / "ls-data")
        (tmp / "docroot").mkdir()
        ls = start_server(exe, tmp / "ls-data", tmp / "docroot", tmp / "ls.log")
        backend = None
        try:
            config = ('<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
                      + "".join(f'<Choice value="{n}"/>' for n in names) + "</Choices></View>")
            pid = ls.client.projects.create(title="freshness", label_config=config).id
            headers = {"Authorization": f"Token {ls.token}"}
            truth = {}
            for start in range(0, args.tasks, 5000):
                chunk = list(range(start, min(args.tasks, start + 5000)))
                r = requests.post(f"{ls.url}/api/projects/{pid}/import?return_task_ids=true", headers=headers,
                                  json=[{"image": f"{images_url}/{i}.png"} for i in chunk], timeout=600)
                r.raise_for_status()
                truth.update({tid: int(data.train_labels[i]) for tid, i in zip(r.json()["task_ids"], chunk)})

            def annotate(tid: int) -> None:
                requests.post(f"{ls.url}/api/tasks/{tid}/annotations/", headers=headers, timeout=60,
                              json={"result": result_for(truth[tid])}).raise_for_status()

            for tid in list(truth)[:args.prelabel]:  # a project that already has labels when it connects
                annotate(tid)
            client = LabelStudio(ls.url, ls.token, timeout=120)
            proc, url, log = start_backend(ls, backbone, size, images_url.split("//")[1], tmp, extra)
            backend = proc

            seen: dict = {}

            def job() -> dict:
                return requests.get(f"{url}/jobs/{pid}", timeout=30).json()

            def fresh(k: int) -> bool:
                """Whether the project is now ordered by a version that saw k labels, with every unlabeled task
                predicted at it: Label Studio's model_version, and the labels that version's training saw
                (its meta.json in MODEL_DIR). The job may still be deleting pruned versions' predictions."""
                status = job()
                if status["failures"]:
                    raise SystemExit(f"training failed: {status['last_error']}\n{log.read_text()[-3000:]}")
                version = client.project(pid).get("model_version")
                meta = tmp / "models" / str(pid) / str(version) / "meta.json"
                if not version or not meta.exists():
                    return False
                if json.loads(meta.read_text())["metrics"].get("n_labeled", 0) < k:
                    return False
                if client.model_versions(pid).get(version, 0) < args.tasks - k:
                    return False
                seen["version"] = version  # the version that made the queue fresh (a later one may follow)
                return True

            def published(version: str) -> dict:
                """What the job recorded when it published `version` (phase timings; not timed): its entry in
                the project's history. A job may publish two versions (a head refresh, then the adapter it
                trains), so the job's own end is not waited for: the next label goes in at once, as an
                annotator's would."""
                history = tmp / "models" / str(pid) / "history.json"
                while True:
                    cycles = json.loads(history.read_text())["cycles"] if history.exists() else []
                    entry = next((c for c in reversed(cycles) if c.get("version") == version), None)
                    if entry is not None and "timings" in entry:
                        return {"model_version": version, "status": "trained" if entry.get("trained") else "ordered",
                                "strategy": entry.get("strategy"), "timings": entry["timings"]}
                    if job()["failures"]:
                        return {"model_version": version}
                    time.sleep(0.2)

            for attempt in range(10):  # Label Studio gives /setup 3 s: a backend still warming up may miss it
                try:
                    connect(ls.client, pid, url, title="peal-backend")  # /setup: the cold start is queued
                    break
                except Exception as exc:  # noqa: BLE001 - the SDK's ApiError; retried as a user would
                    print(f"connecting failed ({str(exc)[-200:]}); again in 5 s", flush=True)
                    time.sleep(5)
            else:
                raise SystemExit("Label Studio could not connect the backend")
            first_pass = wait_until(lambda: fresh(args.prelabel), "first pass", args.timeout, log)
            print(f"first pass (ordering of {args.tasks} tasks, {args.prelabel} labeled): {first_pass:.1f} s", flush=True)
            rows = []
            for k in range(args.prelabel + 1, args.prelabel + args.labels + 1):
                task = next_task(ls.url, pid, headers)
                tid = task["id"]
                annotate(tid)
                seconds = wait_until(lambda: fresh(k), f"label {k}", args.timeout, log)
                got = published(seen["version"])
                meta_path = tmp / "models" / str(pid) / str(got.get("model_version")) / "meta.json"
                meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                rows.append({"label": k, "seconds": seconds, "status": got.get("status"), "strategy": got.get("strategy"),
                             "load": os.getloadavg()[0], "steps": (meta.get("metrics") or {}).get("steps"),
                             "cycle": "head only" if meta.get("refresh") else "warm" if meta.get("warm_started_from") else "",
                             "version": got.get("model_version"), **{ph: (got.get("timings") or {}).get(ph) for ph in PHASES}})
                print(f"label {k}: fresh after {seconds:.1f} s ({got.get('model_version')}, {got.get('status')}, "
                      f"{got.get('timings')})", flush=True)
        except BaseException:  # the temporary folder goes: keep both servers' logs for the post-mortem
            args.logs = args.logs or Path(tempfile.mkdtemp(prefix="freshness-logs-"))
            print(f"failed; Label Studio's and the backend's logs go to {args.logs}", flush=True)
            raise
        finally:
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for name in ("ls.log", "backend.log"):
                    if (tmp / name).exists():
                        shutil.copy(tmp / name, args.logs / name)
            if backend is not None:
                os.killpg(backend.pid, signal.SIGTERM)
                backend.wait(timeout=60)
            stop_server(ls)
            image_server.shutdown()
    text = report(rows, first_pass, args)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    print(f"freshness_p50_s: {percentile([r['seconds'] for r in rows], 50):.1f}")



def report(rows: list[dict], first_pass: float, args) -> str:
    secs = [r["seconds"] for r in rows]
    cmd = f"python -m benchmarks.freshness --tasks {args.tasks} --backbone {args.backbone} --labels {args.labels}" + \
        (f" --prelabel {args.prelabel}" if args.prelabel else "") + "".join(f" --env {e}" for e in args.env)
    lines = [f"### {args.tasks:,} tasks, {args.backbone}" + (f" ({', '.join(args.env)})" if args.env else ""), "",
             f"`{cmd}`", "",
             f"First pass (connect to every task ordered, {args.prelabel or 'no'} label{'' if args.prelabel == 1 else 's'}): "
             f"{first_pass:.1f} s. "
             f"Per label: p50 {percentile(secs, 50):.1f} s, p95 {percentile(secs, 95):.1f} s, "
             f"mean {statistics.mean(secs):.1f} s, max {max(secs):.1f} s over {len(secs)} labels. Load average (1 min) at the start: "
             f"{args.load_at_start:.1f} (2 cores)."
             + (f" Label Studio answered /next with an error {len(NEXT_ERRORS)} times (asked again; before a label's "
                "clock starts)." if NEXT_ERRORS else ""), "",
             "| label | fresh after s | version | kind | strategy | steps | cycle | load | " + " | ".join(f"{p} s" for p in PHASES) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(PHASES)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['seconds']:.1f} | {r['version']} | {r['status']} | {r['strategy']} | "
                     f"{'' if r['steps'] is None else r['steps']} | {r['cycle']} | {r['load']:.1f} | "
                     + " | ".join("" if r[p] is None else f"{r[p]:.1f}" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
