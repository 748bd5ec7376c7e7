"""Small pieces every store module uses: job ids, the record TTL margin, tolerant JSON."""

from __future__ import annotations

import json
import uuid
from typing import Any

# A queued job's record must outlive its wait in the queue; the worker resets
# the TTL to result_ttl_s when the job ends.
RECORD_TTL_MARGIN_S = 3600


def new_job_id() -> str:
    return uuid.uuid4().hex


def looks_like_job_id(job_id: str) -> bool:
    # Ids are uuid4 hex; refusing anything else early keeps arbitrary client
    # strings out of Redis key names.
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def parse_json(raw: str | None, default: Any) -> Any:
    """`raw` decoded, or `default` when it is empty or not JSON (a record another version wrote)."""
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default
