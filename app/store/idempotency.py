"""Idempotency-Key claims: a retried submit finds the job its first attempt created."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import redis

from app.settings import ApiSettings
from app.store.common import RECORD_TTL_MARGIN_S, looks_like_job_id, new_job_id, parse_json
from bailan.jobs import JobRequest, Keys, dumps, now

# A claim whose job record is missing is a submit still in flight for this
# long (its MULTI has not run yet); after that the job expired and the key may
# start a new one.
IDEMPOTENCY_IN_FLIGHT_S = 10.0


# Delete a claim only if it still holds what was read: between a read and a plain DEL another
# request may have replaced a stale claim with its own live one, whose job would then be made
# twice (that request's, and the next retry's on the key it found free).
_delete_if_unchanged = redis.client.Script(None, b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")  # type: ignore[arg-type]


def delete_if_unchanged(conn: redis.Redis, redis_key: str, raw: bytes) -> bool:
    """Delete the claim at `redis_key` if its value is still `raw`, as read; whether it did."""
    return bool(_delete_if_unchanged(keys=[redis_key], args=[raw], client=conn))


class IdempotencyMismatch(Exception):
    pass


class IdempotencyInFlight(Exception):
    pass


@dataclass(frozen=True)
class IdempotencyClaim:
    redis_key: str
    job_id: str
    fresh: bool  # False: an earlier request with this key created job_id


def request_fingerprint(request: JobRequest) -> str:
    """The body as sent: a field left out takes the model's default (resolve_params), which a
    body spelling out the service's default does not, so the two are different jobs."""
    return hashlib.sha256(request.model_dump_json(exclude_unset=True).encode()).hexdigest()


def idempotency_digest(owner: str, header: str) -> str:
    """The key's Redis name: scoped by API key, so two clients' equal keys never meet."""
    return hashlib.sha256(f"{owner}\n{header}".encode()).hexdigest()


def claim_idempotency(
    settings: ApiSettings, conn: redis.Redis, header: str, fingerprint: str, owner: str
) -> IdempotencyClaim:
    """Bind an Idempotency-Key of API key `owner` to a new job id, or return the job it already names."""
    redis_key = Keys.idempotency(idempotency_digest(owner, header))
    ttl = settings.result_ttl_s + RECORD_TTL_MARGIN_S
    for _ in range(3):
        job_id = new_job_id()
        value = dumps({"job_id": job_id, "fingerprint": fingerprint, "claimed_at": now()})
        if conn.set(redis_key, value, nx=True, ex=ttl):
            return IdempotencyClaim(redis_key, job_id, fresh=True)
        raw = conn.get(redis_key)
        if raw is None:
            continue  # expired meanwhile: claim afresh
        existing = parse_json(raw.decode(errors="replace"), None)
        if not isinstance(existing, dict) or not looks_like_job_id(str(existing.get("job_id"))):
            delete_if_unchanged(conn, redis_key, raw)  # garbage: claim afresh
            continue
        if existing.get("job_id") == job_id:
            # This claim's own SET ran, its answer lost and the command sent again: it is ours.
            return IdempotencyClaim(redis_key, job_id, fresh=True)
        if existing.get("fingerprint") != fingerprint:
            raise IdempotencyMismatch()
        if conn.exists(Keys.job(existing["job_id"])):
            return IdempotencyClaim(redis_key, existing["job_id"], fresh=False)
        if now() - float(existing.get("claimed_at") or 0) < IDEMPOTENCY_IN_FLIGHT_S:
            raise IdempotencyInFlight()
        delete_if_unchanged(conn, redis_key, raw)  # its job expired: the key may start a new one
    raise IdempotencyInFlight()


def names_job(raw: bytes | None, job_id: str) -> bool:
    """Whether a claim's stored value (raw, as read) still binds its key to `job_id`."""
    current = parse_json((raw or b"").decode(), None)
    return isinstance(current, dict) and current.get("job_id") == job_id


def release_idempotency(conn: redis.Redis, claim: IdempotencyClaim) -> None:
    """Undo a fresh claim whose submit failed, so a retry with the key can succeed."""
    try:
        raw = conn.get(claim.redis_key)
        if raw is not None and names_job(raw, claim.job_id):
            delete_if_unchanged(conn, claim.redis_key, raw)
    except redis.RedisError:
        pass  # a retry gets 409 for IDEMPOTENCY_IN_FLIGHT_S, then claims the key afresh
