"""Small pieces every store module uses: job ids, the record TTL margin, tolerant JSON."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

# A queued job's record must outlive its wait in the queue; the worker resets
# the TTL to result_ttl_s when the job ends.
RECORD_TTL_MARGIN_S = 3600


def new_job_id() -> str:
    return uuid.uuid4().hex


# Ids are uuid4 hex; refusing anything else early keeps arbitrary client
# strings out of Redis key names.
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def looks_like_job_id(job_id: str) -> bool:
    return _JOB_ID.fullmatch(job_id) is not None


def parse_json(raw: str | None, default: Any) -> Any:
    """`raw` decoded, or `default` when it is empty or not JSON (a record another version wrote)."""
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default
