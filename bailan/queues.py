"""One RQ queue per API key, served round robin: a fair share of the workers for every client.

The API enqueues a job on its key's own queue (`key_queue_name`): the one
`anonymous` key of open mode uses the base queue (BAILAN_QUEUE_NAME) itself,
every named key `<base>:k:<16 hex of sha256(name)>`. It also records the key
queue in a set (Keys.key_queues), in the same transaction as the job.

A worker slot asks `fair_order` which queues to listen on, in which order,
before each dequeue: every queue in the set plus the base queue, rotated to
start just after the queue served last (Keys.fair_cursor, shared by every
slot of every worker), and RQ pops the first job of the first non-empty one.
So a key with 200 jobs waiting gets one turn, then every other key with work
gets one, and a lone job of another key waits for one freed slot at most.

Key queues are never dropped from the set: an empty one costs one more key in
the worker's BLPOP, and dropping it would race with a submit refilling it.
The set is bounded by the number of API keys that ever submitted.

Each model has its own base queue too (`model_base`: `<base>:m:<model>`),
with its own key queues hanging off it, so a worker only takes jobs for the
model it holds. A worker listens on its model's queues and on the plain base
queue, which holds jobs that name no model when the API has no default model
(one model per deployment, the common case). Every model a worker ever served
is in Keys.models(base), so sweeps visit its queues after its workers stop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import redis

from bailan.jobs import Keys
from bailan.keys import ANONYMOUS

RQ_QUEUE_PREFIX = "rq:queue:"  # RQ's key for a queue's list of job ids


def key_digest(name: str) -> str:
    """A short stable digest of a key name, for Redis key names (names stay out of them)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def key_queue_name(base: str, key_name: str) -> str:
    """The RQ queue that holds `key_name`'s queued jobs."""
    return base if key_name == ANONYMOUS else f"{base}:k:{key_digest(key_name)}"


# Between a base queue's name and a model's in that model's base queue.
MODEL_QUEUE_INFIX = ":m:"


def model_base(base: str, model: str | None) -> str:
    """The base queue of `model`'s jobs; `base` itself for jobs that name no model."""
    return f"{base}{MODEL_QUEUE_INFIX}{model}" if model else base


def registered_models(conn: redis.Redis, base: str) -> list[str]:
    """Every model a worker of `base` ever served (Keys.models), sorted."""
    return sorted(_text(m) or "" for m in conn.smembers(Keys.models(base)))


def round_robin(names: Iterable[str], last: str | None) -> list[str]:
    """`names` sorted, rotated so that the one after `last` comes first (`last` itself last).

    Sorting gives every slot the same ring; starting after the last served
    queue gives each non-empty queue its turn before any gets a second.
    """
    ring = sorted(set(names))
    if last is None or not ring:
        return ring
    # The first name after `last` on the ring, whether `last` is still in it or not.
    start = next((i for i, name in enumerate(ring) if name > last), 0)
    return ring[start:] + ring[:start]


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def fair_order(conn: redis.Redis, bases: list[str]) -> list[str]:
    """Every queue a worker serves (each of its base queues and their key queues), in this
    turn's order; the cursor is the last base's (the worker's model's: bailan.queues)."""
    pipe = conn.pipeline(transaction=False)
    for base in bases:
        pipe.smembers(Keys.key_queues(base))
    pipe.get(Keys.fair_cursor(bases[-1]))
    *members, last = pipe.execute()
    names = [*bases, *(_text(m) or "" for group in members for m in group)]
    return round_robin(names, _text(last))


def mark_served(conn: redis.Redis, base: str, queue_name: str) -> None:
    """Move the shared cursor: the next dequeue, on any slot, starts after `queue_name`."""
    conn.set(Keys.fair_cursor(base), queue_name)


def queues_by_model(conn: redis.Redis, base: str) -> list[tuple[str, str]]:
    """Every RQ queue of `base` with the model it feeds: the base queue and its key queues
    ("" : jobs that name no model), then each registered model's and its key queues."""
    found = []
    for model in ["", *registered_models(conn, base)]:
        root = model_base(base, model)
        found += [(root, model), *((_text(m) or "", model) for m in sorted(conn.smembers(Keys.key_queues(root))))]
    return found


def all_queue_names(conn: redis.Redis, base: str) -> list[str]:
    """The base queue, every model's, and every key queue of each, for sweeps that must
    visit each (reaper)."""
    return [name for name, _ in queues_by_model(conn, base)]
