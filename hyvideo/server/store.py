"""The job queue, persisted in SQLite (one file beside the outputs), shared by the page and the API.

A job is `queued`, then `in_progress` (claimed by the worker), then `completed` or `failed` (OpenAI's four
statuses); a failed job says why in `error_code`: `error` (the sampler raised), `cancelled`, or
`interrupted`. Restart policy: a job that was `in_progress` when the server died is marked failed with
`interrupted`, not run again — the crash may have been that job's own doing (out of memory, a driver
fault), and re-queueing it could crash every restart. Queued jobs stay queued and run after the restart;
finished jobs stay listed.

An image-to-video job's reference image (the client's encoded bytes, up to a few MB) is a row of its own
table, written in the same transaction as the job: a queued job and its image survive a restart together,
and the `jobs` rows (listed and polled often) stay small. The image is dropped once the job has finished or
is deleted; the sidecar keeps its sha256.

Every method is one short transaction under one lock, so the HTTP threads and the worker thread can share
a store. Deleted jobs are kept as tombstones (`deleted = 1`) until the worker has let go of them.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_NAME = "jobs.sqlite3"
ACTIVE = ("queued", "in_progress")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    seed INTEGER,
    outputs TEXT NOT NULL DEFAULT '[]',
    error_code TEXT,
    error_message TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT PRIMARY KEY,
    data BLOB NOT NULL
)
"""


class QueueFull(Exception):
    """The queue holds as many jobs as the server allows."""


@dataclass(frozen=True)
class Job:
    """One row of the queue."""

    seq: int
    id: str
    status: str
    request: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    step: int
    total_steps: int
    seed: int | None
    outputs: list[str]  # mp4 file names in the output folder (sidecars share the stem)
    error_code: str | None
    error_message: str | None
    cancel_requested: bool

    @property
    def progress(self) -> int:
        """Percent done: 100 once completed, else the share of denoising steps run."""
        if self.status == "completed":
            return 100
        return int(100 * self.step / self.total_steps) if self.total_steps else 0


def new_job_id() -> str:
    return f"video_{secrets.token_hex(12)}"


class JobStore:
    """SQLite-backed job queue; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a job accepted is a job kept, even on power loss
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _one(self, sql: str, params: tuple = ()) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, params).fetchone()
        return _job(row) if row is not None else None

    # ---- lifecycle -------------------------------------------------------------------------------

    def recover_interrupted(self) -> list[str]:
        """At start-up: jobs left in_progress by a dead server become failed/interrupted (see module doc)."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'in_progress'")]
            self._db.execute(
                "UPDATE jobs SET status = 'failed', error_code = 'interrupted', finished_at = ?, "
                "error_message = 'the server stopped while this job was running; submit it again' "
                "WHERE status = 'in_progress'", (time.time(),))
            # Images of jobs that will never run again (a crash can skip complete/fail's clean-up).
            self._db.execute("DELETE FROM images WHERE job_id NOT IN (SELECT id FROM jobs WHERE status = "
                             "'queued' AND deleted = 0)")
        return ids

    def add(self, request: dict[str, Any], *, max_queue: int, image: bytes | None = None) -> Job:
        """Queue a validated request (and its reference image); raise QueueFull when `max_queue` jobs are
        already waiting or running."""
        job_id = new_job_id()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (active,) = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'in_progress') AND deleted = 0"
                ).fetchone()
                if active >= max_queue:
                    raise QueueFull(f"the queue is full ({active} jobs); try again when one has finished")
                self._db.execute("INSERT INTO jobs (id, status, request, created_at, total_steps) "
                                 "VALUES (?, 'queued', ?, ?, ?)",
                                 (job_id, json.dumps(request), time.time(), int(request.get("steps", 0))))
                if image is not None:
                    self._db.execute("INSERT INTO images (job_id, data) VALUES (?, ?)", (job_id, image))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def claim_next(self) -> Job | None:
        """Mark the oldest queued job in_progress and return it (None when nothing waits)."""
        with self._lock:
            row = self._db.execute("UPDATE jobs SET status = 'in_progress', started_at = ? WHERE seq = ("
                                   "SELECT MIN(seq) FROM jobs WHERE status = 'queued' AND deleted = 0) "
                                   "RETURNING *", (time.time(),)).fetchone()
        return _job(row) if row is not None else None

    def image(self, job_id: str) -> bytes | None:
        """The reference image stored with a job (None: it has none, or it was dropped when it finished)."""
        with self._lock:
            row = self._db.execute("SELECT data FROM images WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row["data"]) if row is not None else None

    def _drop_image(self, job_id: str) -> None:
        self._run("DELETE FROM images WHERE job_id = ?", (job_id,))

    def set_seed(self, job_id: str, seed: int) -> None:
        self._run("UPDATE jobs SET seed = ? WHERE id = ?", (seed, job_id))

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        self._run("UPDATE jobs SET step = ?, total_steps = ? WHERE id = ?", (step, total, job_id))

    def complete(self, job_id: str, outputs: list[str]) -> None:
        self._run("UPDATE jobs SET status = 'completed', outputs = ?, finished_at = ?, step = total_steps "
                  "WHERE id = ?", (json.dumps(outputs), time.time(), job_id))
        self._drop_image(job_id)

    def fail(self, job_id: str, code: str, message: str) -> None:
        self._run("UPDATE jobs SET status = 'failed', error_code = ?, error_message = ?, finished_at = ? "
                  "WHERE id = ? AND status IN ('queued', 'in_progress')",
                  (code, message, time.time(), job_id))
        self._drop_image(job_id)

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel: a queued job fails at once; a running one is flagged and stops at its next step."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'failed', error_code = 'cancelled', finished_at = ?, "
                             "error_message = 'cancelled before it started' "
                             "WHERE id = ? AND status = 'queued'", (time.time(), job_id))
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'in_progress'",
                             (job_id,))
            self._db.execute("DELETE FROM images WHERE job_id = ? AND job_id IN (SELECT id FROM jobs WHERE "
                             "status = 'failed')", (job_id,))
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel_requested, deleted FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return row is None or bool(row["cancel_requested"] or row["deleted"])

    def delete(self, job_id: str) -> Job | None:
        """Hide a job from every listing (a running one is cancelled too); returns it as it was."""
        job = self.get(job_id)
        if job is not None:
            self.request_cancel(job_id)
            self._run("UPDATE jobs SET deleted = 1 WHERE id = ?", (job_id,))
        return job

    def is_deleted(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT deleted FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row["deleted"])

    # ---- queries ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (job_id,))

    def list(self, *, limit: int = 20, after: str | None = None, newest_first: bool = True,
             status: str | None = None) -> list[Job]:
        """Jobs in submission order (newest first by default), starting after the job `after`."""
        op, order = ("<", "DESC") if newest_first else (">", "ASC")
        where, params = ["deleted = 0"], []
        if after is not None:
            where.append(f"seq {op} COALESCE((SELECT seq FROM jobs WHERE id = ?), -1)")
            params.append(after)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [_job(r) for r in rows]

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None unless queued."""
        if job.status != "queued":
            return None
        with self._lock:
            (ahead,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND deleted = 0 "
                                        "AND seq < ?", (job.seq,)).fetchone()
        return ahead + 1


def _job(row: sqlite3.Row) -> Job:
    return Job(
        seq=row["seq"], id=row["id"], status=row["status"], request=json.loads(row["request"]),
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        step=row["step"], total_steps=row["total_steps"], seed=row["seed"],
        outputs=json.loads(row["outputs"]),
        error_code=row["error_code"], error_message=row["error_message"],
        cancel_requested=bool(row["cancel_requested"]),
    )
