"""Helpers for the worker tests: a class set up as `POST /v1/classes` does, a task queue that
runs tasks in this process, and real worker processes that tests can stop or kill."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from aligndiff.inversion import initial_embedding, save_embedding
from aligndiff.shots import load_shots
from aligndiff.synth import Models
from service.contexts import classes
from service.contexts.uploads import Upload
from service.db import make_engine, make_session_factory, session_scope
from service.models import Base, Job, Owner, Sample, SegClass
from service.queue import TaskFailed, TaskTimeout
from service.schemas import ClassCreate
from service.settings import Settings
from service.storage import Storage, class_key, make_storage
from worker import synthesis
from worker.celery_app import AlignDiffCelery, make_celery

T = TypeVar("T")


@dataclass
class Service:
    """The database and blob store a test shares with its workers."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage

    @classmethod
    def create(cls, settings: Settings) -> Service:
        engine = make_engine(settings.resolved_database_url)
        Base.metadata.create_all(engine)
        return cls(
            settings, make_session_factory(engine), make_storage(settings.resolved_storage_url)
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessions) as session:
            yield session

    def job(self, job_id: uuid.UUID) -> Job:
        with self.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def segclass(self, class_id: uuid.UUID) -> SegClass:
        with self.session() as session:
            row = session.get(SegClass, class_id)
            assert row is not None
            return row

    def samples(self, class_id: uuid.UUID) -> list[Sample]:
        with self.session() as session:
            query = select(Sample).where(Sample.class_id == class_id).order_by(Sample.index)
            return list(session.scalars(query))


@dataclass(frozen=True)
class CreatedClass:
    class_id: uuid.UUID
    job_id: uuid.UUID


def create_class(
    service: Service,
    shots_dir: Path,
    *,
    name: str,
    num_samples: int,
    seed: int = 7,
    prompts: tuple[str, ...] = (),
    bg_lambda: float | str | None = None,
) -> CreatedClass:
    """What `POST /v1/classes` does (through its business function): check and store the
    shots, and commit the class with its queued synthesis job. Nothing is enqueued."""
    with service.session() as session:
        owner = Owner(name="worker tests")
        session.add(owner)
    uploads = [_shot_files(shots_dir, shot.stem) for shot in load_shots(shots_dir)]
    with service.session() as session:
        accepted = classes.create_class(
            session=session,
            storage=service.storage,
            settings=service.settings,
            owner_id=owner.id,
            class_in=ClassCreate(
                name=name,
                num_samples=num_samples,
                seed=seed,
                prompts=list(prompts),
                bg_lambda=bg_lambda,  # type: ignore[arg-type]
            ),
            images=[Upload(image.name, image.read_bytes()) for image, _ in uploads],
            masks=[Upload(mask.name, mask.read_bytes()) for _, mask in uploads],
            idempotency_key=None,
            location_of=lambda class_id: f"/v1/classes/{class_id}",
        )
    assert accepted.start is not None
    class_id = uuid.UUID(json.loads(accepted.answer.body)["id"])
    return CreatedClass(class_id=class_id, job_id=accepted.start.job_id)


def _shot_files(shots_dir: Path, stem: str) -> tuple[Path, Path]:
    """The original image and mask files of a shot, in either shots-folder layout."""
    flat = sorted(p for p in shots_dir.glob(f"{stem}.*") if p.suffix.lower() != ".png")
    if flat:
        return flat[0], shots_dir / f"{stem}.png"
    return next((shots_dir / "images").glob(f"{stem}.*")), shots_dir / "masks" / f"{stem}.png"


def give_embedding(service: Service, class_id: uuid.UUID, embedding: bytes, token: str) -> None:
    """Store a learned token for the class, as a finished inversion would have."""
    key = class_key(class_id, "embedding.safetensors")
    service.storage.put(key, embedding, content_type="application/octet-stream")
    with service.session() as session:
        segclass = session.get(SegClass, class_id)
        assert segclass is not None
        segclass.embedding_key, segclass.token = key, token


def token_embedding(models: Models, token: str) -> bytes:
    """An embedding file as inversion writes it (holding the initializer word's vector)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "embedding.safetensors"
        save_embedding(path, token, initial_embedding(models.diffusion))
        return path.read_bytes()


@dataclass
class InProcessQueue:
    """A task queue that holds messages until `drain` runs them, in order, in this process,
    through the app's real tasks (base class and failure handling included)."""

    deliveries: int = 1  # >1 delivers every message that many times (a redelivering broker)
    worker: AlignDiffCelery | None = None  # what runs the tasks `call` waits on
    pending: deque[tuple[str, tuple[Any, ...]]] = field(default_factory=deque)
    sent: Counter[str] = field(default_factory=Counter)

    def enqueue(self, task_name: str, *args: Any, queue: str | None = None) -> None:
        self.sent[task_name] += 1
        self.pending.append((task_name, args))

    def call(self, task_name: str, *args: Any, timeout: float) -> Any:
        """Run a task the caller waits on at once, through `worker`'s real task (set it
        first), and return its result as a worker's would come back."""
        if self.worker is None:
            raise TaskTimeout("this in-process queue has no worker app to run it")
        self.sent[task_name] += 1
        result = self.worker.tasks[task_name].apply(args=list(args))
        if result.failed():
            raise TaskFailed(f"{type(result.result).__name__}: {result.result}")
        return result.get(timeout=timeout)

    def drain(
        self,
        app: AlignDiffCelery,
        *,
        after_each: Callable[[], None] | None = None,
        limit: int = 500,
    ) -> None:
        for _ in range(limit):
            if not self.pending:
                return
            name, args = self.pending.popleft()
            for _ in range(self.deliveries):
                app.tasks[name].apply(args=list(args), throw=True)
                if after_each is not None:
                    after_each()
        raise AssertionError(f"the queue did not drain in {limit} tasks")


def local_settings(folder: Path, **overrides: Any) -> Settings:
    """A worker's settings on SQLite, a local blob folder and the in-memory broker, all under
    `folder` (and any other settings in `overrides`)."""
    return Settings(
        data_dir=folder,
        database_url=f"sqlite:///{folder / 'aligndiff.db'}",
        broker_url="memory://",
        storage_url=f"file://{folder / 'blobs'}",
        **overrides,
    )


def in_process_app(
    tmp_path: Path,
    models: Models,
    *,
    sample_chunk_size: int,
    deliveries: int = 1,
    **overrides: Any,
) -> tuple[AlignDiffCelery, InProcessQueue, Service]:
    """The worker's Celery app on SQLite and a local blob folder (and any other settings in
    `overrides`), its tasks run in process."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = local_settings(
        tmp_path, sample_chunk_size=sample_chunk_size, annotation_chunk_size=2, **overrides
    )
    queue = InProcessQueue(deliveries=deliveries)
    app = make_celery(settings, queue=queue, models=models)
    app.loader.import_default_modules()  # the task modules, as a worker imports them at start
    return app, queue, Service.create(settings)


def run_job(
    app: AlignDiffCelery,
    queue: InProcessQueue,
    job_id: uuid.UUID,
    *,
    after_each: Callable[[], None] | None = None,
) -> None:
    """What the API does after committing a class (enqueue start), then the workers' part."""
    queue.enqueue(synthesis.START, str(job_id))
    queue.drain(app, after_each=after_each)


def wait_for(
    check: Callable[[], T | None], *, timeout: float, what: str, log: Path | None = None
) -> T:
    """Poll `check` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(0.05)


def worker_env(settings: Settings, model_cache: Path, **extra: str) -> dict[str, str]:
    """The environment that gives a worker process `settings`."""
    values = {
        "DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.resolved_database_url,
        "BROKER_URL": settings.resolved_broker_url,
        "STORAGE_URL": settings.resolved_storage_url,
        "MODEL_CACHE_DIR": str(model_cache),
        "SAMPLE_CHUNK_SIZE": str(settings.sample_chunk_size),
        "ANNOTATION_CHUNK_SIZE": str(settings.annotation_chunk_size),
        "JOB_LEASE_SECONDS": str(settings.job_lease_seconds),
        "TASK_VISIBILITY_TIMEOUT": str(settings.task_visibility_timeout),
        "MAX_JOB_ATTEMPTS": str(settings.max_job_attempts),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    env.update({f"ALIGNDIFF_{k}": v for k, v in values.items()})
    # NOTE: one thread per worker process: the tiny models run an order of magnitude faster
    # so than with threads contending for the test machine's two cores.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A Redis server of this test's own on a free port (no persistence), so that no other
    test run on the machine's shared Redis can flush or consume its queues; stopped after."""
    from tests.serve_support import free_port

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        wait_for(lambda: _pings(client), timeout=10, what=f"redis-server on port {port}")
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# A run of hex digits longer than any id (a UUID has at most 12 in a row): a payload, such as
# a PNG that Celery logged as the task's result.
HEX_PAYLOAD = re.compile(r"[0-9a-fA-F]{64,}")
# What a progress bar leaves in a log: its percentage and bar, or its rate.
PROGRESS_BAR = re.compile(r"\d+%\||it/s\]|s/it\]")


def unreadable_log_lines(log: str) -> list[str]:
    """The lines of a worker's log that an operator should not have to read past: payloads
    and progress bars."""
    return [
        line[:160]
        for line in log.splitlines()
        if HEX_PAYLOAD.search(line) or PROGRESS_BAR.search(line)
    ]


class WorkerProcess:
    """`python -m worker.main` in its own process group, logging to a file (serving `model`,
    a name in ALIGNDIFF_MODELS, when given)."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        pool: str,
        concurrency: int,
        queues: str = "",
        model: str = "",
    ) -> None:
        self.log = log
        self._log_handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.main", f"--pool={pool}",
             f"--concurrency={concurrency}", "--loglevel=INFO", f"--queues={queues}",
             *([f"--model={model}"] if model else [])],
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a machine losing power, say)."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the whole process group (SIGSTOP): it does nothing until `resume` or `kill`."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def stop(self) -> None:
        """A warm shutdown, then SIGKILL for whatever is left."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self._signal_group(signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        self._log_handle.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


def load_worker_healthcheck() -> ModuleType:
    """docker/worker_healthcheck.py (a script the worker image runs, not a package module),
    loaded afresh: it takes what it imports from the service as the modules are now."""
    spec = importlib.util.spec_from_file_location(
        "worker_healthcheck",
        Path(__file__).resolve().parents[1] / "docker" / "worker_healthcheck.py",
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
