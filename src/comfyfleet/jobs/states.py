"""The job state machine of the Comfy API v2 contract.

    queued ──claim──> running ──> succeeded | failed
      │  ▲              │   └──lease lost, budget left──> queued
      │  └──────────────┘
      │                 └──cancel──> canceling ──> canceled
      ├──cancel──> canceled
      └──queue deadline──> expired

Every arrow is one conditional UPDATE in ``jobs.repository`` (``... WHERE status IN (<from>)``), never a
read-modify-write. Terminal states are final, and a job that is canceling can only end canceled: once a
cancel was accepted the job never becomes succeeded.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELING = "canceling"
    CANCELED = "canceled"
    FAILED = "failed"
    EXPIRED = "expired"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.CANCELED, JobStatus.FAILED, JobStatus.EXPIRED})
ACTIVE = frozenset({JobStatus.RUNNING, JobStatus.CANCELING})

# from-state(s) → to-state; the repository's WHERE clauses follow this table.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.EXPIRED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELING, JobStatus.QUEUED, JobStatus.CANCELED}
    ),
    JobStatus.CANCELING: frozenset({JobStatus.CANCELED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.CANCELED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    return frozenset(src for src, targets in TRANSITIONS.items() if target in targets)
