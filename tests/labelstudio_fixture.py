"""A real Label Studio 1.23.2 for tests, started headless on loopback.

Use it from a test module with::

    from tests.labelstudio_fixture import label_studio  # noqa: F401  (the fixture)

and mark tests `@pytest.mark.labelstudio`. The server comes from its own venv (`.ls-venv`, made by
`scripts/install_label_studio.sh`, path overridable with LS_VENV). Without it the tests skip, unless
PEAL_REQUIRE_LABEL_STUDIO is set (CI), where a missing Label Studio is a failure.

The first start runs Django migrations (about 30 s); the migrated, empty data folder is then kept as
a template inside the LS venv, and later sessions start from a copy of it (a few seconds).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LS_VERSION = "1.23.2"
# Loopback-only throwaway credentials: the server lives for one test session.
USERNAME = "admin@example.com"
PASSWORD = "peal-test-password"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
START_TIMEOUT = float(os.environ.get("PEAL_LS_START_TIMEOUT", "180"))


def ls_venv() -> Path:
    return Path(os.environ.get("LS_VENV", REPO_ROOT / ".ls-venv"))


def ls_executable() -> Path | None:
    exe = ls_venv() / "bin" / "label-studio"
    return exe if exe.exists() else None


def require_label_studio() -> Path:
    """The label-studio executable, or skip (fail under PEAL_REQUIRE_LABEL_STUDIO)."""
    exe = ls_executable()
    if exe is None:
        msg = (f"Label Studio not installed at {ls_venv()} "
               f"(run scripts/install_label_studio.sh, or set LS_VENV)")
        if os.environ.get("PEAL_REQUIRE_LABEL_STUDIO"):
            pytest.fail(msg + "; PEAL_REQUIRE_LABEL_STUDIO is set", pytrace=False)
        pytest.skip(msg)
    return exe


@dataclass
class LabelStudioServer:
    url: str
    token: str
    document_root: Path
    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def client(self):
        from label_studio_sdk import LabelStudio
        return LabelStudio(base_url=self.url, api_key=self.token, timeout=60)

    def personal_access_token(self) -> str:
        """The admin's personal access token (a JWT refresh token), created on first use: Label
        Studio keeps one per user and never shows it again, so it is cached here."""
        if not getattr(self, "_pat", None):
            r = requests.post(f"{self.url}/api/token/", headers={"Authorization": f"Token {self.token}"}, timeout=30)
            r.raise_for_status()
            self._pat = r.json()["token"]
        return self._pat

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def server_env(data_dir: Path, document_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        # Our ML backend runs on loopback: Label Studio refuses it, and its webhooks, by default.
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    # The project venv must not shadow Label Studio's own packages.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join([str(ls_venv() / "bin")] + [
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO_ROOT / ".venv"))])
    return env


def start_server(exe: Path, data_dir: Path, document_root: Path, log_path: Path) -> LabelStudioServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--port", str(port), "--internal-host", "127.0.0.1",
         "--host", url, "--enable-legacy-api-token"],
        env=server_env(data_dir, document_root), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(data_dir))
    log.close()
    server = LabelStudioServer(url, TOKEN, document_root, data_dir, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            r = requests.get(f"{url}/health", timeout=2)
            if r.ok:
                # /health answers before the admin token is usable on a first start.
                r = requests.get(f"{url}/api/projects/", headers={"Authorization": f"Token {TOKEN}"}, timeout=5)
                if r.ok:
                    return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"label-studio did not become healthy in {START_TIMEOUT:.0f} s:\n{server.log_tail()}")


def stop_server(server: LabelStudioServer) -> None:
    """Stop the server's whole process group (label-studio forks workers)."""
    proc = server.process
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def template_dir() -> Path:
    return ls_venv() / f"peal-test-template-{LS_VERSION}"


def ensure_template(exe: Path, scratch: Path) -> Path:
    """A migrated data folder with the admin user, made once per LS venv (atomically)."""
    template = template_dir()
    if (template / "label_studio.sqlite3").exists():
        return template
    building = Path(tempfile.mkdtemp(prefix="template-", dir=str(ls_venv())))
    docroot = scratch / "template-docroot"
    docroot.mkdir(exist_ok=True)
    server = start_server(exe, building, docroot, scratch / "template.log")
    stop_server(server)
    try:
        building.rename(template)
    except OSError:  # another session made it first
        shutil.rmtree(building, ignore_errors=True)
    return template


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A running Label Studio: `.url`, `.token` (legacy), `.document_root`, `.client` (SDK)."""
    exe = require_label_studio()
    root = tmp_path_factory.mktemp("label-studio")
    template = ensure_template(exe, root)
    data_dir = root / "data"
    shutil.copytree(template, data_dir)
    document_root = root / "files"
    document_root.mkdir()
    server = start_server(exe, data_dir, document_root, root / "label-studio.log")
    try:
        yield server
    finally:
        stop_server(server)
