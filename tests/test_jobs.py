"""The training queue, against the real Redis on 127.0.0.1:6379 with real RQ worker processes, and the
in-process worker. Job functions live in tests/jobfuncs.py and log their runs to MODEL_DIR/runs.log."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import jobfuncs
from peal_backend import jobs
from peal_backend.config import Settings, SettingsError
from tests.conftest import forget_queue, wait_for

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
from tests.conftest import TEST_REDIS_URL as REDIS_URL  # noqa: E402
JOB = "jobfuncs.scripted"
SECRET = "s3cret-api-key-4217"


def starts(model_dir, project):
    return [r for r in jobfuncs.read_runs(model_dir) if r[0] == "start" and r[1] == project]


def assert_serial(model_dir, project):
    """Runs of one project never overlap: each start comes after the previous run's end."""
    rows = [r for r in jobfuncs.read_runs(model_dir) if r[1] == project]
    running = 0
    for kind, *_ in sorted(rows, key=lambda r: r[2]):
        running += 1 if kind == "start" else -1
        assert running <= 1, f"two jobs of project {project} ran at once: {rows}"


def timed(call):
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def burst(queue, project, calls=19):
    """`calls` webhook-like calls in quick succession; returns their results and the slowest call."""
    results, slowest = [], 0.0
    for i in range(calls):
        if i % 2 == 0:  # the first call queues the next training, the others coalesce into it
            out, took = timed(lambda: queue.request_training(project, "sleep=0.2"))
        else:
            out, took = timed(lambda: queue.note_annotation(project))
        results.append(out)
        slowest = max(slowest, took)
    return results, slowest


# --- pure parts ------------------------------------------------------------------------------------

def test_safe_error_hides_secrets_and_truncates():
    settings = Settings(label_studio_api_key=SECRET, redis_url="redis://u:pw-xyz@host:6379/0")
    text = jobs.safe_error(RuntimeError(f"auth {SECRET} failed on redis://u:pw-xyz@host " + "x" * 2000), settings)
    assert SECRET not in text and "pw-xyz" not in text
    assert text.startswith("RuntimeError: auth *** failed")
    assert len(text) <= jobs.MAX_ERROR_CHARS


def test_settings_reach_workers_without_secrets():
    server = Settings(label_studio_api_key=SECRET, epochs=7, redis_url="redis://:pw@r:6379/0")
    payload = jobs.settings_payload(server)
    assert "label_studio_api_key" not in payload and "redis_url" not in payload
    assert SECRET not in repr(payload)
    worker = Settings(label_studio_api_key=SECRET, redis_url="redis://:pw@r:6379/0")
    rebuilt = jobs.settings_from_payload({**payload, "from_the_future": 1}, worker)
    assert rebuilt == server  # the server's epochs, the worker's secrets; unknown keys dropped


def test_bad_input_is_named(tmp_path):
    settings = Settings(model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="dotted path"):
        jobs.make_queue(settings, "train")
    queue = jobs.make_queue(settings, JOB)
    assert isinstance(queue, jobs.InProcessQueue)
    with pytest.raises(ValueError, match="project_id"):
        queue.request_training("3", "x")
    with pytest.raises(ValueError, match="project_id"):
        queue.note_annotation(True)
    with pytest.raises(ValueError, match="reason"):
        queue.request_training(3, "")
    with pytest.raises(SettingsError, match="REDIS_URL"):
        jobs.RedisQueue(settings, JOB)
    with pytest.raises(SettingsError, match="REDIS_URL"):
        jobs.run_worker(settings, burst=True)
    queue.close()
    with pytest.raises(jobs.QueueError, match="closed"):
        queue.request_training(3, "x")


def test_unreachable_redis_is_a_clear_error():
    settings = Settings(redis_url="redis://:hunter2@127.0.0.1:1/0")
    queue = jobs.make_queue(settings, JOB)
    assert isinstance(queue, jobs.RedisQueue)
    with pytest.raises(jobs.QueueError, match="Redis at redis://\\*\\*\\*@127.0.0.1:1") as info:
        queue.request_training(1, "x")
    assert "hunter2" not in str(info.value)


# --- in-process worker -----------------------------------------------------------------------------

@pytest.fixture
def inproc(tmp_path):
    settings = Settings(model_dir=str(tmp_path), label_studio_api_key=SECRET, epochs=7)
    queue = jobs.make_queue(settings, JOB)
    yield queue
    queue.close()


def test_inprocess_burst_coalesces_into_two_runs(inproc):
    model_dir = inproc.settings.model_dir
    first, took_first = timed(lambda: inproc.request_training(1, "sleep=1.0"))
    assert first["queued"] and not first["coalesced"]
    wait_for(lambda: starts(model_dir, 1), "the first job to start")
    assert inproc.status(1)["state"] == "running"
    results, slowest = burst(inproc, 1)
    print(f"\nin-process: slowest enqueue call {max(slowest, took_first) * 1000:.2f} ms")
    # (how fast: benchmarks/load.py; what matters here is that the calls returned while it still runs)
    assert inproc.status(1)["state"] == "running" and inproc.status(1)["queued"]
    assert all(r is True for r in results[1::2])  # note_annotation: a training is queued
    assert sum(1 for r in results if isinstance(r, dict) and not r["coalesced"]) == 1
    wait_for(lambda: inproc.status(1)["runs"] == 2 and inproc.status(1)["state"] == "idle", "both runs")
    assert not inproc.status(1)["queued"]  # idle with nothing queued: nothing else can start
    assert len(starts(model_dir, 1)) == 2
    assert_serial(model_dir, 1)
    status = inproc.status(1)
    assert status["failures"] == 0 and status["last_outcome"] == "finished"
    assert status["last_result"]["project"] == 1


def test_inprocess_failure_is_recorded_and_the_worker_survives(inproc):
    inproc.request_training(5, "fail")
    wait_for(lambda: inproc.status(5)["failures"] == 1, "the failure to be recorded")
    status = inproc.status(5)
    assert status["last_outcome"] == "failed" and status["state"] == "idle"
    assert status["last_error"].startswith("RuntimeError: training exploded")
    assert SECRET not in status["last_error"] and "***" in status["last_error"]
    inproc.request_training(5, "after")
    wait_for(lambda: inproc.status(5)["runs"] == 1, "the next job")
    status = inproc.status(5)
    assert status["last_outcome"] == "finished" and status["failures"] == 1
    assert "RuntimeError" in status["last_error"]  # the last error stays visible
    assert set(inproc.status()["projects"]) == {"5"}


def test_inprocess_retrain_every_counts_annotations(tmp_path):
    settings = Settings(model_dir=str(tmp_path), retrain_every=3)
    queue = jobs.make_queue(settings, JOB)
    try:
        for _ in range(7):
            queue.note_annotation(2)
            wait_for(lambda: queue.status(2)["state"] == "idle", "idle")
        assert len(starts(str(tmp_path), 2)) == 2  # after the 3rd and the 6th annotation
        assert queue.status(2)["runs"] == 2
    finally:
        queue.close()


# --- Redis + real RQ workers -----------------------------------------------------------------------

def _redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    return client


class Workers:
    """Real `run_worker` subprocesses, killed at the end of the test."""

    def __init__(self, settings, log_dir):
        self.settings, self.log_dir, self.procs = settings, log_dir, []

    def start(self):
        code = ("from peal_backend.config import Settings; from peal_backend.jobs import run_worker; "
                f"run_worker(Settings(redis_url={REDIS_URL!r}, queue_name={self.settings.queue_name!r}, "
                f"label_studio_api_key={SECRET!r}, log_level='WARNING'))")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO_DIR, os.environ.get("PYTHONPATH", "")]))
        out = open(os.path.join(self.log_dir, f"worker{len(self.procs)}.log"), "wb")
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # idle workers shut down cleanly and unregister
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def redis_setup(tmp_path):
    client = _redis_or_skip()
    name = f"test-jobs-{uuid.uuid4().hex[:10]}"
    settings = Settings(redis_url=REDIS_URL, queue_name=name, model_dir=str(tmp_path), epochs=7,
                        label_studio_api_key=SECRET)
    workers = Workers(settings, str(tmp_path))
    queues = []

    def make(**kw):
        queue = jobs.make_queue(settings.replace(**kw.pop("settings", {})), JOB, **kw)
        queues.append(queue)
        return queue

    yield settings, make, workers
    workers.stop()
    for queue in queues:
        queue.close()
    forget_queue(client, name)
    client.close()


def test_redis_burst_coalesces_and_two_workers_never_overlap(redis_setup):
    settings, make, workers = redis_setup
    queue = make()
    workers.start()
    workers.start()
    first, took_first = timed(lambda: queue.request_training(1, "sleep=1.5"))
    assert first["queued"] and not first["coalesced"]
    wait_for(lambda: starts(settings.model_dir, 1), "the first job to start on a worker", timeout=20)
    results, slowest = burst(queue, 1)
    print(f"\nredis: slowest enqueue call {max(slowest, took_first) * 1000:.2f} ms")
    queued = [r for r in results if isinstance(r, dict) and not r["coalesced"]]
    assert len(queued) == 1  # one more training queued behind the running one, the rest coalesced
    status = queue.status(1)
    assert status["state"] == "running" and status["queued"]

    wait_for(lambda: queue.status(1)["runs"] == 2 and queue.status(1)["state"] == "idle", "both runs")
    assert not queue.status(1)["queued"]  # idle with nothing queued: nothing else can start
    runs = starts(settings.model_dir, 1)
    assert len(runs) == 2
    assert runs[0][3] != runs[1][3]  # the second ran on the other worker, which had to wait
    assert_serial(settings.model_dir, 1)
    # The server's settings reached the worker (epochs=7, the worker's own default is 10) and the API
    # key came from the worker's own settings, not from the message.
    assert all("epochs=7 key_set=True" in r[4] for r in runs)
    from rq.job import Job

    raw = queue._rq_redis.hgetall(f"rq:job:{queued[0]['job_id']}")
    assert raw and SECRET.encode() not in b"".join(raw.values())
    assert "label_studio_api_key" not in Job.fetch(queued[0]["job_id"], connection=queue._rq_redis).kwargs["settings"]
    assert queue.status()["projects"]["1"]["runs"] == 2


def test_redis_sigkilled_worker_does_not_block_the_project(redis_setup):
    settings, make, workers = redis_setup
    queue = make(lock_ttl=1.5)
    doomed = workers.start()
    killed_job = queue.request_training(2, "sleep=60")["job_id"]
    wait_for(lambda: starts(settings.model_dir, 2), "the long job to start", timeout=20)
    assert queue.status(2)["state"] == "running"
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()

    workers.start()
    again = queue.request_training(2, "after-kill")
    assert again["queued"] and not again["coalesced"]
    wait_for(lambda: queue.status(2)["runs"] == 1, "the next job to run after the kill", timeout=20)
    status = queue.status(2)
    assert status["state"] == "idle" and status["last_outcome"] == "finished"
    assert status["failures"] == 1
    assert killed_job in status["last_error"] and "abandoned" in status["last_error"]
    assert status["last_failed_at"] is not None
    runs = starts(settings.model_dir, 2)
    assert [r[4].split()[0] for r in runs] == ["sleep=60", "after-kill"]


def test_redis_failure_is_recorded_and_the_worker_keeps_serving(redis_setup):
    settings, make, workers = redis_setup
    queue = make()
    workers.start()
    failed_job = queue.request_training(3, "fail")["job_id"]
    wait_for(lambda: queue.status(3)["failures"] == 1, "the failure", timeout=20)
    status = queue.status(3)
    assert status["last_outcome"] == "failed" and status["state"] == "idle"
    assert status["last_error"].startswith("RuntimeError: training exploded")
    assert SECRET not in status["last_error"]
    queue.request_training(3, "after")
    wait_for(lambda: queue.status(3)["runs"] == 1, "the next job", timeout=20)
    from rq.registry import FailedJobRegistry

    assert failed_job in FailedJobRegistry(queue=queue.rq_queue).get_job_ids()  # RQ sees it failed too


def test_redis_counts_annotations_and_coalesces_without_a_worker(redis_setup):
    settings, make, _ = redis_setup
    queue = make(settings={"retrain_every": 3})
    assert [queue.note_annotation(4) for _ in range(2)] == [False, False]
    assert queue.status(4)["state"] == "idle"
    assert queue.note_annotation(4) is True
    status = queue.status(4)
    assert status["state"] == "queued" and status["queued_at"]
    assert queue.note_annotation(4) is True
    again = queue.request_training(4, "START_TRAINING")
    assert again["coalesced"] and queue.rq_queue.count == 1


def test_redis_queued_flag_whose_job_vanished_is_replaced(redis_setup):
    settings, make, _ = redis_setup
    queue = make()
    first = queue.request_training(6, "x")
    queue.rq_queue.empty()  # e.g. `rq empty`: the flag now points at nothing
    second = queue.request_training(6, "y")
    assert not second["coalesced"] and second["job_id"] != first["job_id"]
    assert queue.rq_queue.job_ids == [second["job_id"]]
    assert queue.request_training(6, "z")["coalesced"]


def test_redis_flag_of_a_worker_killed_before_its_first_heartbeat_is_replaced(redis_setup):
    """The state a worker SIGKILLed between RQ's pick-up and execute_job's first beat leaves: RQ
    calls the job started (until its timeout), the queued flag has no lease. A new request replaces
    it once the job is older than a lease, and not before."""
    from datetime import datetime, timedelta, timezone

    from rq.job import Job, JobStatus

    _, make, _ = redis_setup
    queue = make(lock_ttl=2)
    first = queue.request_training(9, "x")["job_id"]
    job = Job.fetch(first, connection=queue._rq_redis)
    queue.rq_queue.remove(job)  # what RQ does on pick-up: off the queue, marked started by a worker
    with queue._rq_redis.pipeline() as pipe:
        job.prepare_for_execution("peal-test-dead-worker", pipe)
        pipe.execute()
    assert queue._store.queued_lease_ms(9) == -1
    assert queue.request_training(9, "y")["coalesced"]  # just picked up: may still be about to beat

    job.started_at = datetime.now(timezone.utc) - timedelta(seconds=3)
    job.save()
    again = queue.request_training(9, "z")
    assert not again["coalesced"] and again["job_id"] != first
    assert queue.rq_queue.job_ids == [again["job_id"]]
    assert Job.fetch(first, connection=queue._rq_redis).get_status() == JobStatus.STARTED  # RQ's view, untouched


def test_redis_retrain_every_zero_never_queues(redis_setup):
    _, make, _ = redis_setup
    queue = make(settings={"retrain_every": 0})
    assert not any(queue.note_annotation(7) for _ in range(5))
    assert queue.rq_queue.count == 0 and queue.status(7)["state"] == "idle"


def test_redis_worker_killed_while_waiting_frees_the_queue_slot(redis_setup):
    """A job waiting behind a running one holds the project's queue slot only while its worker lives."""
    from rq.job import Job

    settings, make, workers = redis_setup
    queue = make(lock_ttl=1.5)
    runner = workers.start()
    queue.request_training(8, "sleep=60")
    wait_for(lambda: starts(settings.model_dir, 8), "the long job to start", timeout=20)
    waiter = workers.start()
    waiting_job = queue.request_training(8, "second")["job_id"]
    wait_for(lambda: Job.fetch(waiting_job, connection=queue._rq_redis).get_status() == "started",
             "the second job to wait on the other worker", timeout=20)
    # RQ says "started" a moment before execute_job's first beat leases the flag: wait for the lease
    wait_for(lambda: queue._store.queued_lease_ms(8) > 0, "the waiter to lease its queue slot", timeout=20)
    assert queue.request_training(8, "coalesced")["coalesced"]
    waiter.send_signal(signal.SIGKILL)
    waiter.wait()
    wait_for(lambda: not queue.status(8)["queued"], "the dead waiter's queue slot to expire", timeout=10)
    third = queue.request_training(8, "third")
    assert not third["coalesced"]

    runner.send_signal(signal.SIGKILL)
    runner.wait()
    workers.start()
    wait_for(lambda: queue.status(8)["runs"] == 1, "the third job", timeout=20)
    assert [r[4].split()[0] for r in starts(settings.model_dir, 8)] == ["sleep=60", "third"]
    assert queue.status(8)["failures"] == 1  # the running job; the waiter never started training


def test_redis_worker_stops_on_sigterm(redis_setup):
    """The worker outlives Redis outages (test_faults) but still stops when asked to."""
    settings, make, workers = redis_setup
    queue = make()
    proc = workers.start()
    queue.request_training(5, "sleep=0")
    wait_for(lambda: starts(settings.model_dir, 5), "the worker to run a job")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0  # a guard against a hang, not a time limit: it took over 15 s beside a busy Label Studio


def test_a_job_that_lost_its_lease_writes_nothing(redis_setup, tmp_path):
    """The running lock expired or was taken (a second training may run now): the fence before each
    write stops the job instead of letting two trainings of one project save and push."""
    settings, make, workers = redis_setup
    queue = jobs.make_queue(settings, "jobfuncs.fenced")
    workers.start()
    go = tmp_path / "go"
    queue.request_training(3, f"wait={go}")
    wait_for(lambda: queue.status(3)["state"] == "running", "the job to start", timeout=20)
    queue._store.redis.delete(queue._store.key("running", 3))  # the lease is gone (expired, or taken over)
    go.touch()
    kinds = lambda: [r[0] for r in jobfuncs.read_runs(settings.model_dir) if r[1] == 3]  # noqa: E731
    wait_for(lambda: len(kinds()) == 2, "the job to reach its first write", timeout=20)
    assert kinds() == ["start", "fenced"]  # stopped at the fence: nothing saved
    assert queue.status(3)["failures"] == 1  # recorded (as abandoned: its lock was gone)
    queue.close()


def test_inprocess_training_lost_with_its_process_is_recorded_and_retried(tmp_path):
    """A server process SIGKILLed mid-training used to leave /jobs idle with no failure and nothing
    retried: the next process finds the journal, records the run as abandoned and runs it again."""
    code = ("import sys, threading; sys.path.insert(0, 'tests'); from peal_backend import jobs; "
            "from peal_backend.config import Settings; "
            f"q = jobs.make_queue(Settings(model_dir={str(tmp_path)!r}), 'jobfuncs.scripted'); "
            "q.request_training(5, 'sleep=600'); threading.Event().wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        wait_for(lambda: starts(str(tmp_path), 5), "the training to start in the doomed process", timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    queue = jobs.make_queue(Settings(model_dir=str(tmp_path)), JOB)  # the next server process
    try:
        status = queue.status(5)
        assert status["failures"] == 1 and status["last_outcome"] == "abandoned" and "sleep=600" in status["last_error"]
        wait_for(lambda: len(starts(str(tmp_path), 5)) == 2, "the retry to start", timeout=60)
        assert "retry after restart: sleep=600" in starts(str(tmp_path), 5)[1][4]
    finally:
        queue.close()


def test_a_live_process_keeps_its_journaled_trainings(tmp_path):
    """Two queues on one MODEL_DIR (two server processes, or a test's second app): the second never
    takes over the first's pending training as if its process had died."""
    first = jobs.make_queue(Settings(model_dir=str(tmp_path)), JOB)
    try:
        first.request_training(6, "sleep=0.5")
        second = jobs.make_queue(Settings(model_dir=str(tmp_path)), JOB)
        second.close()
        assert second.status(6)["failures"] == 0 and second.status(6)["state"] == "idle"
        wait_for(lambda: first.status(6)["runs"] == 1, "the first queue's own run")
        assert len(starts(str(tmp_path), 6)) == 1
    finally:
        first.close()


@pytest.mark.parametrize("flavour", ["memory", "redis"])
def test_request_watch_sees_a_waiting_and_another_running_training(flavour, tmp_path):
    """What a job's watches say, asked from outside its thread and after it ended: another training
    waiting (both), another training running (only the pruning's), this job itself running (neither)."""
    from peal_backend.jobs import MemoryStore, RedisStore, execute_job
    store = MemoryStore() if flavour == "memory" else RedisStore(REDIS_URL, f"test-watch-{uuid.uuid4().hex[:8]}:")
    s = Settings(model_dir=str(tmp_path))
    out = execute_job(store, 7, s, "x", "jobfuncs.watching", "mine")
    assert out["during"] == [False, False]  # this job running is not another one
    requested, pruning = jobfuncs.WATCHES[7]
    assert (requested(), pruning()) == (False, False)
    assert store.try_enqueue(7, "next", "annotation")[0]
    assert (requested(), pruning()) == (True, True)
    assert store.try_start(7, "next", 30.0, "annotation")  # the next job runs
    assert (requested(), pruning()) == (False, True)
    store.finish(7, "next", "finished", "{}", "", 1.0)
    assert (requested(), pruning()) == (False, False)
