"""Key groups: the unit of work of the Ray executor (runtime/ray/executor.py), and what
`kmx plan --executor ray` shows.

Consecutive keys of the schedule are packed into a group until it would read more than
GROUP_BYTES or hold more than its key cap; a key that alone reads more is a group by itself.
One group is one Ray task: big enough that a task's fixed cost (milliseconds) is lost in its
reads, small enough that a lost task or a cancelled run wastes little. The key cap also makes a
small merge at least MIN_GROUPS groups, so it still spreads over the workers. The grouping
depends only on the schedule, so the plan shows the groups a fresh run sends.
"""

from __future__ import annotations

from dataclasses import dataclass

from karmixlang.io.dtypes import nbytes
from karmixlang.plan.executable import KeyJob

GROUP_BYTES = 256 * 10**6  # bytes read per group
GROUP_KEYS = 64  # keys per group at most
MIN_GROUPS = 16  # fewer keys per group when a merge has too few keys for this many groups


@dataclass(frozen=True)
class KeyGroup:
    keys: tuple[str, ...]  # in schedule order
    bytes_read: int
    result_bytes: int  # the output bytes its worker sends back to the driver
    peak_bytes: int  # the largest per-key estimate: a worker computes one key at a time


def group_keys(jobs: list[KeyJob], target_bytes: int = GROUP_BYTES,
               max_keys: int = GROUP_KEYS, min_groups: int = MIN_GROUPS) -> list[KeyGroup]:
    cap = max(1, min(max_keys, -(-len(jobs) // min_groups)))
    groups: list[KeyGroup] = []
    current: list[KeyJob] = []
    read = 0
    for job in jobs:
        if current and (len(current) == cap or read + job.read_bytes > target_bytes):
            groups.append(_group(current))
            current, read = [], 0
        current.append(job)
        read += job.read_bytes
    if current:
        groups.append(_group(current))
    return groups


def _group(jobs: list[KeyJob]) -> KeyGroup:
    return KeyGroup(tuple(j.key for j in jobs), sum(j.read_bytes for j in jobs),
                    sum(nbytes(o.dtype, o.shape) or 0 for j in jobs for o in j.outputs),
                    max(j.est_bytes for j in jobs))
