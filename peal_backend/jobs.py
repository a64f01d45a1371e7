"""The training queue: keeps training out of Label Studio's webhook request.

Label Studio sends webhooks synchronously with a 1 s timeout, often several at once, so `/webhook` only
records the event here and returns. Per project there is at most ONE queued and ONE running training:

* ``queued`` flag: set (atomically, if absent) when a training is requested; later requests coalesce
  into it. The job clears it when it starts, so a request arriving during a training queues one more.
* ``running`` lock: taken by the job when it starts, atomically with clearing the flag. It is a lease
  (``lock_ttl`` seconds, refreshed by a heartbeat thread), so a worker killed with SIGKILL does not
  block the project forever: the lease expires, the next job (or a status read) reports the dead job
  as ``abandoned`` and the next job runs. A job that finds the lock taken waits for it to go away; it
  never runs beside another job for the same project.

Two flavours, same job code (`execute_job`):

* `RedisQueue` (``REDIS_URL`` set): state in Redis (flags, leases, a status hash per project, updated by
  small Lua scripts so each transition is atomic), jobs on an RQ queue run by ``peal-backend worker``
  processes (`run_worker`), which may sit on other machines sharing ``MODEL_DIR``. This is the only
  correct choice when the server runs several processes (gunicorn ``--workers`` > 1) or machines.
* `InProcessQueue` (embedded default): one daemon thread in this process, state in memory. Under
  gunicorn every server process has its own queue, so two processes may train the same project at
  once: use Redis there.

The job is a dotted path called as ``fn(project_id, settings, reason)`` returning a JSON-able summary.
RQ messages carry the server's settings without secrets; a worker takes LABEL_STUDIO_API_KEY,
BASIC_AUTH_PASS and REDIS_URL from its own environment, so give workers the server's env file.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import logging
import queue as queue_module
import re
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from .config import Settings, SettingsError

log = logging.getLogger(__name__)

TRAIN_JOB = "peal_backend.labelstudio_job.train_project"
LOCK_TTL = 30.0            # seconds a running/waiting lease lives without a heartbeat (setting PEAL_JOB_LOCK_TTL)
JOB_TIMEOUT = 6 * 3600     # RQ kills a job after this many seconds (setting PEAL_JOB_TIMEOUT)
MAX_ERROR_CHARS = 500
MAX_RESULT_CHARS = 20_000
# Not sent to workers; they use their own. The basic-auth user travels with its password: a worker
# given the server's user but its own empty password would refuse the half-configured pair.
_SECRET_FIELDS = ("label_studio_api_key", "basic_auth_user", "basic_auth_pass", "redis_url")


class QueueError(RuntimeError):
    """The queue cannot take the request (Redis unreachable, queue closed); the message says why."""


class JobQueue(Protocol):
    def note_annotation(self, project_id: int) -> bool: ...
    def request_training(self, project_id: int, reason: str) -> dict: ...
    def status(self, project_id: int | None = None) -> dict: ...
    def close(self) -> None: ...


# --- small pure helpers ----------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_project(project_id) -> int:
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 0:
        raise ValueError(f"project_id must be a non-negative int, got {project_id!r}")
    return project_id


def _check_reason(reason) -> str:
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"reason must be a non-empty str, got {reason!r}")
    return reason[:200]


def _check_job_path(job: str) -> str:
    if not isinstance(job, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", job):
        raise ValueError(f"job must be a dotted path like 'package.module.function', got {job!r}")
    return job


def resolve_job(path: str) -> Callable:
    """Import ``package.module.function`` and return the function."""
    module_name, _, name = _check_job_path(path).rpartition(".")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise QueueError(f"job {path!r}: module {module_name} has no attribute {name!r}") from None


def _secrets(settings: Settings) -> list[str]:
    found = [settings.label_studio_api_key, settings.basic_auth_pass]
    for url in (settings.redis_url, settings.label_studio_url):
        if "@" in url:  # scheme://user:password@host: the credentials part
            found.append(url.split("://", 1)[-1].rsplit("@", 1)[0])
    return [s for s in found if s]


def safe_error(exc: BaseException, settings: Settings) -> str:
    """``Type: message``, with the settings' secrets blanked out and the length capped."""
    text = f"{type(exc).__name__}: {exc}"
    for secret in _secrets(settings):
        text = text.replace(secret, "***")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def _result_json(result: Any) -> str:
    text = json.dumps(result, default=str)
    if len(text) > MAX_RESULT_CHARS:
        return json.dumps({"truncated": True, "chars": len(text)})
    return text


def _status_view(project_id: int, raw: dict, queued: bool, running: bool) -> dict:
    """The public status of one project, from the stored fields (same shape for both flavours)."""
    result = raw.get("last_result")
    if isinstance(result, str):
        result = json.loads(result)
    duration = raw.get("last_duration_s")
    return {
        "project_id": project_id,
        "state": "running" if running else "queued" if queued else "idle",
        "queued": queued,                      # a training waits (possibly behind a running one)
        "queued_at": raw.get("queued_at") if queued else None,
        "started_at": raw.get("started_at"),   # of the running job, else of the last one
        "reason": raw.get("reason"),           # why the running / last job was requested
        "last_finished_at": raw.get("last_finished_at"),
        "last_outcome": raw.get("last_outcome"),  # finished | failed | abandoned | None
        "last_duration_s": float(duration) if duration is not None else None,
        "last_result": result,                 # summary returned by the last successful job
        "last_error": raw.get("last_error"),   # most recent failure, kept after later successes
        "last_failed_at": raw.get("last_failed_at"),
        "runs": int(raw.get("runs", 0)),       # jobs that finished without error
        "failures": int(raw.get("failures", 0)),  # jobs that raised or were abandoned
    }


def _new_token(queue_name: str, project_id: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", queue_name)[:60]  # RQ job ids allow [A-Za-z0-9_-]
    return f"{safe}-p{project_id}-{uuid.uuid4().hex[:16]}"


# --- state stores: the per-project flags, leases and status, in memory or in Redis ------------------

class MemoryStore:
    """State for the in-process queue. Leases never expire: the worker thread dies only with us."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queued: dict[int, str] = {}
        self._running: dict[int, str] = {}
        self._counts: dict[int, int] = {}
        self._status: dict[int, dict] = {}

    def try_enqueue(self, project_id: int, token: str, reason: str) -> tuple[bool, str]:
        with self._lock:
            if project_id in self._queued:
                return False, self._queued[project_id]
            self._queued[project_id] = token
            self._status.setdefault(project_id, {}).update(queued_at=_now(), queued_reason=reason)
            return True, token

    def clear_queued(self, project_id: int, token: str) -> None:
        with self._lock:
            if self._queued.get(project_id) == token:
                del self._queued[project_id]

    def try_start(self, project_id: int, token: str, ttl: float, reason: str) -> bool:
        with self._lock:
            if project_id in self._running:
                return False
            self._running[project_id] = token
            if self._queued.get(project_id) == token:
                del self._queued[project_id]
            self._status.setdefault(project_id, {}).update(started_at=_now(), reason=reason)
            self._counts.pop(project_id, None)  # this run sees every annotation made so far
            return True

    def refresh(self, key_kind: str, project_id: int, token: str, ttl: float) -> bool:
        return True

    def finish(self, project_id: int, token: str, outcome: str, result: str, error: str, duration: float) -> None:
        with self._lock:
            if self._running.get(project_id) == token:
                del self._running[project_id]
            st = self._status.setdefault(project_id, {})
            st.update(last_outcome=outcome, last_duration_s=round(duration, 3), last_finished_at=_now())
            if outcome == "finished":
                st["runs"] = st.get("runs", 0) + 1
                st["last_result"] = result
            else:
                st["failures"] = st.get("failures", 0) + 1
                st.update(last_error=error, last_failed_at=st["last_finished_at"])

    def count_annotation(self, project_id: int, every: int) -> bool:
        """Count one annotation; True (and reset) when the count reaches `every`."""
        with self._lock:
            self._status.setdefault(project_id, {})
            n = self._counts.get(project_id, 0) + 1
            if every > 0 and n >= every:
                self._counts.pop(project_id, None)
                return True
            self._counts[project_id] = n
            return False

    def is_queued(self, project_id: int) -> bool:
        with self._lock:
            return project_id in self._queued

    def running_token(self, project_id: int) -> str | None:
        with self._lock:
            return self._running.get(project_id)

    def status(self, project_id: int) -> dict:
        with self._lock:
            return _status_view(project_id, dict(self._status.get(project_id, {})),
                                project_id in self._queued, project_id in self._running)

    def projects(self) -> list[int]:
        with self._lock:
            return sorted(self._status)


# Lua keeps every transition atomic across server processes and workers. Shared prelude: a job whose
# lease expired while the status still names it as running died without finishing -> abandoned.
_REAP = """
local function reap(running, status, now, suffix)
  if redis.call('EXISTS', running) == 1 then return end
  local prev = redis.call('HGET', status, 'running_job')
  if prev then
    redis.call('HINCRBY', status, 'failures', 1)
    redis.call('HSET', status, 'last_outcome', 'abandoned', 'last_failed_at', now,
               'last_error', 'job ' .. prev .. suffix)
    redis.call('HDEL', status, 'running_job')
  end
end
"""
_ABANDONED_SUFFIX = " was abandoned: its worker stopped without finishing (running lock expired)"

_LUA_ENQUEUE = """
-- KEYS: queued, status, projects; ARGV: token, now, project, reason
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('HSET', KEYS[2], 'queued_at', ARGV[2], 'queued_reason', ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[3])
  return {1, ARGV[1]}
end
return {0, redis.call('GET', KEYS[1])}
"""

_LUA_START = _REAP + """
-- KEYS: running, queued, status, count; ARGV: token, ttl_ms, now, reason, abandoned-suffix
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
reap(KEYS[1], KEYS[3], ARGV[3], ARGV[5])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[3], 'running_job', ARGV[1], 'started_at', ARGV[3], 'reason', ARGV[4])
redis.call('DEL', KEYS[4])
return 1
"""

_LUA_REAP = _REAP + """
-- KEYS: running, status; ARGV: now, abandoned-suffix
reap(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return 1
"""

_LUA_REFRESH = """
-- KEYS: lease; ARGV: token, ttl_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_LUA_CLEAR = """
-- KEYS: key; ARGV: token
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_LUA_FINISH = """
-- KEYS: running, status; ARGV: token, now, outcome, result_json, error, duration
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[2], 'running_job') == ARGV[1] then redis.call('HDEL', KEYS[2], 'running_job') end
redis.call('HSET', KEYS[2], 'last_outcome', ARGV[3], 'last_duration_s', ARGV[6], 'last_finished_at', ARGV[2])
if ARGV[3] == 'finished' then
  redis.call('HINCRBY', KEYS[2], 'runs', 1)
  redis.call('HSET', KEYS[2], 'last_result', ARGV[4])
else
  redis.call('HINCRBY', KEYS[2], 'failures', 1)
  redis.call('HSET', KEYS[2], 'last_error', ARGV[5], 'last_failed_at', ARGV[2])
end
return 1
"""

_LUA_COUNT = """
-- KEYS: count, projects; ARGV: every, project
redis.call('SADD', KEYS[2], ARGV[2])
local n = redis.call('INCR', KEYS[1])
if tonumber(ARGV[1]) > 0 and n >= tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]); return 1 end
return 0
"""


class RedisStore:
    """The same state as `MemoryStore`, in Redis under ``key_prefix``."""

    def __init__(self, redis_url: str, key_prefix: str):
        import redis

        self.redis = redis.Redis.from_url(redis_url, decode_responses=True,
                                          socket_timeout=5, socket_connect_timeout=3)
        self.prefix = key_prefix
        self._enqueue = self.redis.register_script(_LUA_ENQUEUE)
        self._start = self.redis.register_script(_LUA_START)
        self._reap = self.redis.register_script(_LUA_REAP)
        self._refresh = self.redis.register_script(_LUA_REFRESH)
        self._clear = self.redis.register_script(_LUA_CLEAR)
        self._finish = self.redis.register_script(_LUA_FINISH)
        self._count = self.redis.register_script(_LUA_COUNT)

    def key(self, kind: str, project_id: int | None = None) -> str:
        return f"{self.prefix}{kind}" if project_id is None else f"{self.prefix}{kind}:{project_id}"

    def try_enqueue(self, project_id: int, token: str, reason: str) -> tuple[bool, str]:
        reply = self._enqueue(keys=[self.key("queued", project_id), self.key("status", project_id),
                                    self.key("projects")], args=[token, _now(), project_id, reason])
        return bool(reply[0]), (reply[1] if len(reply) > 1 else None)  # Lua drops a trailing nil

    def clear_queued(self, project_id: int, token: str) -> None:
        self._clear(keys=[self.key("queued", project_id)], args=[token])

    def try_start(self, project_id: int, token: str, ttl: float, reason: str) -> bool:
        return bool(self._start(
            keys=[self.key("running", project_id), self.key("queued", project_id),
                  self.key("status", project_id), self.key("count", project_id)],
            args=[token, int(ttl * 1000), _now(), reason, _ABANDONED_SUFFIX]))

    def refresh(self, key_kind: str, project_id: int, token: str, ttl: float) -> bool:
        """Extend our lease (``queued`` while waiting, ``running`` while running) if we still hold it."""
        return bool(self._refresh(keys=[self.key(key_kind, project_id)], args=[token, int(ttl * 1000)]))

    def finish(self, project_id: int, token: str, outcome: str, result: str, error: str, duration: float) -> None:
        self._finish(keys=[self.key("running", project_id), self.key("status", project_id)],
                     args=[token, _now(), outcome, result or "", error or "", round(duration, 3)])

    def count_annotation(self, project_id: int, every: int) -> bool:
        return bool(self._count(keys=[self.key("count", project_id), self.key("projects")],
                                args=[every, project_id]))

    def is_queued(self, project_id: int) -> bool:
        return bool(self.redis.exists(self.key("queued", project_id)))

    def queued_token(self, project_id: int) -> str | None:
        return self.redis.get(self.key("queued", project_id))

    def running_token(self, project_id: int) -> str | None:
        return self.redis.get(self.key("running", project_id))

    def queued_lease_ms(self, project_id: int) -> int:
        """Milliseconds left on the queued flag's lease: -1 if it has none yet (its job has not
        begun waiting), -2 if there is no flag."""
        return int(self.redis.pttl(self.key("queued", project_id)))

    def status(self, project_id: int) -> dict:
        self._reap(keys=[self.key("running", project_id), self.key("status", project_id)],
                   args=[_now(), _ABANDONED_SUFFIX])
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(self.key("queued", project_id))
        pipe.exists(self.key("running", project_id))
        pipe.hgetall(self.key("status", project_id))
        queued, running, raw = pipe.execute()
        return _status_view(project_id, raw, bool(queued), bool(running))

    def projects(self) -> list[int]:
        return sorted(int(p) for p in self.redis.smembers(self.key("projects")))


# --- the job, identical for both flavours ----------------------------------------------------------

class LeaseLost(RuntimeError):
    """This job's running lock expired or was taken over: it must not save or push anything."""


_lease = threading.local()  # the running job's heartbeat, for `check_lease` in the job's own thread


def check_lease() -> None:
    """Fence: raise LeaseLost if the job running in this thread has lost its running lock (another
    training of the project may be running now). Jobs call it before every write that matters: a
    new version, predictions pushed, the project's model version. Outside a queued job: no-op."""
    heartbeat = getattr(_lease, "heartbeat", None)
    if heartbeat is None:
        return
    heartbeat.beat()  # asks Redis now: a lease can be lost between two beats
    if heartbeat.lost:
        raise LeaseLost(f"project {heartbeat.project_id}: job {heartbeat.token} lost its running lock; "
                        "nothing saved or pushed from here")


def another_requested() -> bool:
    """Whether a training of the job's project was requested since this job started (a label submitted
    meanwhile): a job may then defer work that can wait (`labelstudio_job`: an adapter training after
    a head refresh) so that the next job makes the queue fresh sooner. Outside a queued job: False."""
    return request_watch()()


def request_watch(running_too: bool = False) -> Callable[[], bool]:
    """`another_requested` for the job running in this thread, callable from any thread; with
    `running_too` it also says True while another training of the project runs (the job's background
    pruning asks it after the job has ended, and gives way to the next job's push)."""
    heartbeat = getattr(_lease, "heartbeat", None)
    if heartbeat is None:
        return lambda: False
    store, project_id, token = heartbeat.store, heartbeat.project_id, heartbeat.token

    def requested() -> bool:
        try:
            if store.is_queued(project_id):
                return True
            return running_too and store.running_token(project_id) not in (None, token)
        except Exception as exc:  # Redis unreachable: go on with the work rather than fail the job
            log.warning("project %s: could not tell whether a training is waiting: %s", project_id, exc)
            return False
    return requested


class _Heartbeat(threading.Thread):
    """Keeps our lease alive: the queued flag while we wait, the running lock while we run."""

    def __init__(self, store, project_id: int, token: str, ttl: float):
        super().__init__(name=f"peal-heartbeat-{project_id}", daemon=True)
        self.store, self.project_id, self.token, self.ttl = store, project_id, token, ttl
        self.kind = "queued"
        self.lost = False  # once lost, a running lock is never ours again
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # stop() waits for a beat in flight, so none follows finish()

    def beat(self) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            try:
                if not self.store.refresh(self.kind, self.project_id, self.token, self.ttl) and self.kind == "running":
                    self.lost = True
                    log.warning("project %s: job %s lost its running lock", self.project_id, self.token)
            except Exception as exc:  # a Redis blip must not kill the heartbeat; the lease covers a few misses
                log.warning("project %s: heartbeat failed: %s", self.project_id, exc)

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()

    def run(self) -> None:
        while not self._stopped.wait(self.ttl / 3):
            self.beat()


def execute_job(store, project_id: int, settings: Settings, reason: str, job: str, token: str,
                lock_ttl: float = LOCK_TTL) -> Any:
    """Wait for the project's running lock, run ``job(project_id, settings, reason)``, record the outcome.

    The outcome (result or error) goes to the store; an error is re-raised after recording so RQ
    marks the job failed too (and logs it).
    """
    heartbeat = _Heartbeat(store, project_id, token, lock_ttl)
    heartbeat.beat()  # the queued flag gets a lease now: if we die while waiting, it expires
    heartbeat.start()
    try:
        try:
            while not store.try_start(project_id, token, lock_ttl, reason):
                time.sleep(min(0.5, lock_ttl / 4))
        except BaseException:
            store.clear_queued(project_id, token)  # killed by a timeout while waiting: let others queue
            raise
        heartbeat.kind = "running"
        heartbeat.beat()
        started = time.monotonic()
        log.info("project %s: training started (%s)", project_id, reason)
        _lease.heartbeat = heartbeat
        try:
            result = resolve_job(job)(project_id, settings, reason)
            result_text = _result_json(result)
        except BaseException as exc:
            heartbeat.stop()
            error = safe_error(exc, settings)
            store.finish(project_id, token, "failed", "", error, time.monotonic() - started)
            log.warning("project %s: training failed after %.1f s (%s): %s", project_id, time.monotonic() - started,
                        reason, error)
            raise
        heartbeat.stop()
        store.finish(project_id, token, "finished", result_text, "", time.monotonic() - started)
        outcome = result.get("model_version") or result.get("status") if isinstance(result, dict) else None
        log.info("project %s: training ended in %.1f s (%s): %s", project_id, time.monotonic() - started, reason, outcome)
        return result
    finally:
        _lease.heartbeat = None
        heartbeat.stop()


# --- in-process flavour ----------------------------------------------------------------------------

def _process_id() -> str:
    """This process, as `pid:start-time` (a pid alone is reused, e.g. by a restarted container's PID 1)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command name
    except (OSError, IndexError):
        return "?"


def _process_alive(owner: str) -> bool:
    pid, _, started = str(owner).partition(":")
    try:
        return pid.isdigit() and started != "?" and _start_time(int(pid)) == started
    except ValueError:
        return False


class InProcessQueue:
    """One daemon thread in this process runs the jobs one after another (started on first use)."""

    backend = "in-process"

    def __init__(self, settings: Settings, job: str = TRAIN_JOB, lock_ttl: float | None = None):
        self.settings = settings
        self.job = _check_job_path(job)
        self.lock_ttl = float(lock_ttl or settings.job_lock_ttl)
        self._store = MemoryStore()
        self._pending: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._closed = False
        # Requested trainings are journaled in MODEL_DIR/.jobs until they end, so that one lost with its
        # process (SIGKILL, OOM, a crash) is recorded as abandoned and retried by the next process.
        self._journal = os.path.join(settings.model_dir, ".jobs")
        self._recover()

    def _journal_add(self, project_id: int, reason: str, token: str) -> None:
        try:
            os.makedirs(self._journal, exist_ok=True)
            tmp = os.path.join(self._journal, f".tmp-{token}")
            with open(tmp, "w") as f:
                json.dump({"project": project_id, "reason": reason, "queued_at": _now(), "owner": _process_id()}, f)
            os.replace(tmp, os.path.join(self._journal, f"{token}.json"))
        except OSError as exc:  # the queue still works; only the crash recovery is lost
            log.warning("cannot journal training %s: %s", token, exc)

    def _journal_done(self, token: str) -> None:
        try:
            os.unlink(os.path.join(self._journal, f"{token}.json"))
        except OSError:
            pass

    def _recover(self) -> None:
        try:
            names = sorted(n for n in os.listdir(self._journal) if n.endswith(".json"))
        except OSError:
            return
        for name in names:
            path = os.path.join(self._journal, name)
            claimed = os.path.join(self._journal, f".claimed-{name}")
            try:
                with open(path) as f:
                    owner = json.load(f).get("owner")
                if owner and _process_alive(owner):  # another live process's training (several server processes)
                    continue
                os.rename(path, claimed)  # one process takes each entry
                with open(claimed) as f:
                    entry = json.load(f)
                os.unlink(claimed)
                project_id, reason = int(entry["project"]), str(entry["reason"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            self._store.finish(project_id, name[:-5], "abandoned", "",
                               f"the process running this training stopped before it ended (reason: {reason})", 0.0)
            log.warning("project %s: a training lost with its process (%s) is retried", project_id, reason)
            self.request_training(project_id, f"retry after restart: {reason}")

    def note_annotation(self, project_id: int) -> bool:
        project_id = _check_project(project_id)
        if self._store.count_annotation(project_id, self.settings.retrain_every):
            return self.request_training(project_id, "annotations")["queued"]
        return self._store.is_queued(project_id)

    def request_training(self, project_id: int, reason: str) -> dict:
        project_id, reason = _check_project(project_id), _check_reason(reason)
        if self._closed:
            raise QueueError("the training queue is closed")
        token = _new_token(self.settings.queue_name, project_id)
        queued, job_id = self._store.try_enqueue(project_id, token, reason)
        if queued:
            self._journal_add(project_id, reason, token)
            self._ensure_thread()
            self._pending.put((project_id, reason, token))
        return {"project_id": project_id, "queued": True, "coalesced": not queued, "job_id": job_id}

    def status(self, project_id: int | None = None) -> dict:
        if project_id is not None:
            return self._store.status(_check_project(project_id))
        return {"backend": self.backend, "queue": self.settings.queue_name,
                "projects": {str(p): self._store.status(p) for p in self._store.projects()}}

    def close(self) -> None:
        """Refuse new requests and let the thread stop after the job at hand (it is a daemon)."""
        self._closed = True
        if self._thread is not None:
            self._pending.put(None)

    def _ensure_thread(self) -> None:
        with self._thread_lock:  # started lazily so that a forking server starts it in the child
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="peal-train-queue", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            project_id, reason, token = item
            try:
                execute_job(self._store, project_id, self.settings, reason, self.job, token, self.lock_ttl)
            except BaseException:  # recorded in the status; log it and keep serving
                log.exception("project %s: training job %s failed", project_id, token)
            finally:
                self._journal_done(token)


# --- Redis + RQ flavour ----------------------------------------------------------------------------

def default_key_prefix(settings: Settings) -> str:
    return f"peal:{settings.queue_name}:"


def settings_payload(settings: Settings) -> dict:
    """Settings for the job message, without secrets: workers take those from their own environment."""
    payload = dataclasses.asdict(settings)
    for name in _SECRET_FIELDS:
        payload.pop(name, None)
    return payload


_WORKER_SETTINGS: Settings | None = None  # set by run_worker; the source of secrets in this process


def settings_from_payload(payload: dict, local: Settings | None = None) -> Settings:
    """Rebuild the server's settings in a worker, with secrets from the worker's own settings."""
    local = local or _WORKER_SETTINGS or Settings.from_env()
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(payload) - names)
    if unknown:  # a server newer than this worker: run with what we understand
        log.warning("ignoring settings this worker does not know: %s", ", ".join(unknown))
    values = {k: v for k, v in payload.items() if k in names}
    values.update({name: getattr(local, name) for name in _SECRET_FIELDS})
    return Settings(**values)


def run_rq_job(project_id: int, settings: dict, reason: str, job: str, key_prefix: str, token: str,
               lock_ttl: float) -> Any:
    """What RQ runs: rebuild settings and the store here, then the shared `execute_job`."""
    full = settings_from_payload(settings)
    store = RedisStore(full.redis_url, key_prefix)
    return execute_job(store, project_id, full, reason, job, token, lock_ttl)


@contextmanager
def _redis_errors(settings: Settings):
    import redis

    try:
        yield
    except redis.RedisError as exc:
        where = settings.redacted()["redis_url"]
        raise QueueError(f"Redis at {where} failed: {type(exc).__name__}: {exc}") from exc


_OVER = {"finished", "failed", "stopped", "canceled"}


class RedisQueue:
    """Jobs on the RQ queue ``settings.queue_name``; flags, leases and status in Redis."""

    backend = "redis"

    def __init__(self, settings: Settings, job: str = TRAIN_JOB, key_prefix: str | None = None,
                 lock_ttl: float | None = None):
        import redis
        import rq

        if not settings.redis_url:
            raise SettingsError("REDIS_URL is empty: RedisQueue needs a Redis server")
        self.settings = settings
        self.job = _check_job_path(job)
        self.key_prefix = key_prefix or default_key_prefix(settings)
        self.lock_ttl = float(lock_ttl or settings.job_lock_ttl)
        self.job_timeout = int(settings.job_timeout)
        self._store = RedisStore(settings.redis_url, self.key_prefix)
        self._rq_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        self.rq_queue = rq.Queue(settings.queue_name, connection=self._rq_redis)

    def note_annotation(self, project_id: int) -> bool:
        project_id = _check_project(project_id)
        with _redis_errors(self.settings):
            if self._store.count_annotation(project_id, self.settings.retrain_every):
                return self.request_training(project_id, "annotations")["queued"]
            return self._store.is_queued(project_id)

    def request_training(self, project_id: int, reason: str) -> dict:
        project_id, reason = _check_project(project_id), _check_reason(reason)
        with _redis_errors(self.settings):
            for _ in range(2):  # a second pass only after clearing a stale flag
                token = _new_token(self.settings.queue_name, project_id)
                queued, job_id = self._store.try_enqueue(project_id, token, reason)
                if queued:
                    self._enqueue(project_id, reason, token)
                    return {"project_id": project_id, "queued": True, "coalesced": False, "job_id": token}
                if not self._is_stale(project_id, job_id):
                    return {"project_id": project_id, "queued": True, "coalesced": True, "job_id": job_id}
                log.warning("project %s: queued job %s is gone from RQ; queueing a new one", project_id, job_id)
                self._store.clear_queued(project_id, job_id)
            raise QueueError(f"project {project_id}: could not queue a training (flag keeps reappearing)")

    def _enqueue(self, project_id: int, reason: str, token: str) -> None:
        try:
            self.rq_queue.enqueue_call(
                "peal_backend.jobs.run_rq_job",
                kwargs=dict(project_id=project_id, settings=settings_payload(self.settings), reason=reason,
                            job=self.job, key_prefix=self.key_prefix, token=token, lock_ttl=self.lock_ttl),
                job_id=token, timeout=self.job_timeout, failure_ttl=7 * 24 * 3600,
                description=f"train project {project_id} ({reason})")
        except BaseException:
            self._store.clear_queued(project_id, token)
            raise

    def _is_stale(self, project_id: int, job_id: str | None) -> bool:
        """A queued flag whose RQ job no longer exists or is over (e.g. the queue was emptied)."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if not job_id:
            return False  # the flag vanished between the two reads: the next pass will queue
        try:
            job = Job.fetch(job_id, connection=self._rq_redis)
        except NoSuchJobError:
            return True
        status = job.get_status(refresh=False)
        status = str(getattr(status, "value", status)) if status is not None else None
        if status in _OVER:
            return True
        if status == "started" and self._store.queued_lease_ms(project_id) == -1 and job.started_at:
            # execute_job leases the flag as its first act; a job RQ started more than a lease ago
            # whose flag still has no lease lost its worker in between (e.g. a SIGKILL right after
            # the pick-up), and RQ would call it "started" until the job timeout
            return (datetime.now(timezone.utc) - job.started_at).total_seconds() > self.lock_ttl  # RQ's dates are UTC-aware
        return False

    def status(self, project_id: int | None = None) -> dict:
        with _redis_errors(self.settings):
            if project_id is not None:
                return self._store.status(_check_project(project_id))
            return {"backend": self.backend, "queue": self.settings.queue_name,
                    "projects": {str(p): self._store.status(p) for p in self._store.projects()}}

    def close(self) -> None:
        self._store.redis.close()
        self._rq_redis.close()


def make_queue(settings: Settings, job: str = TRAIN_JOB, key_prefix: str | None = None,
               lock_ttl: float | None = None) -> JobQueue:
    """`RedisQueue` if ``settings.redis_url`` is set, else `InProcessQueue`."""
    if settings.redis_url:
        return RedisQueue(settings, job, key_prefix=key_prefix, lock_ttl=lock_ttl)
    return InProcessQueue(settings, job, lock_ttl=lock_ttl)


def run_worker(settings: Settings, burst: bool = False) -> None:
    """``peal-backend worker``: run training jobs from the RQ queue ``settings.queue_name``, and
    pool-scoring shards from ``<queue_name>-score`` (see sharding.fill_cache_sharded).

    It is an RQ SimpleWorker: the job runs in this process, not in a forked child. Forking a process
    that holds torch's thread pools is fragile, and a SIGKILL must take the job down with the worker
    (a forked horse would keep training unseen after its parent died). Run several workers for
    several projects at once; each project still trains one job at a time.
    """
    global _WORKER_SETTINGS
    import redis
    from rq import Queue, SimpleWorker

    if not settings.redis_url:
        raise SettingsError("REDIS_URL is empty: `peal-backend worker` needs the Redis the server uses")
    _WORKER_SETTINGS = settings
    from .training import configure_torch
    configure_torch(settings)
    connection = redis.Redis.from_url(settings.redis_url)
    from .sharding import score_queue_name
    # pool-scoring shards first: they help a training that is already running finish sooner
    queues = [Queue(score_queue_name(settings), connection=connection), Queue(settings.queue_name, connection=connection)]
    while True:
        worker = SimpleWorker(queues, connection=connection)
        try:
            worker.work(burst=burst, logging_level=settings.log_level)
        except redis.exceptions.ConnectionError as exc:  # raised from RQ's teardown with Redis gone
            log.warning("worker lost Redis: %s", exc)
        # a SIGTERM/SIGINT (warm shutdown) sets one of these, a crash neither
        if burst or worker._stop_requested or getattr(worker, "_shutdown_requested_date", None) is not None:
            return
        # RQ's worker quits on an error it did not expect, such as Redis vanishing as a job ends;
        # a training worker should outlive a Redis restart, so wait for Redis and serve again
        _wait_for_redis(connection)


def _wait_for_redis(connection, max_delay: float = 10.0) -> None:
    import redis

    delay = 0.5
    while True:
        try:
            connection.ping()
            log.warning("Redis is back; the worker serves again")
            return
        except redis.exceptions.ConnectionError:
            time.sleep(delay)
            delay = min(max_delay, delay * 2)
