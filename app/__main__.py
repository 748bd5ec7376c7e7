"""`python -m app`: the API alone under uvicorn, with the limits `make run` gives it
(app.server); the container image's command. Settings: BAILAN_HOST, BAILAN_PORT,
BAILAN_API_PROCESSES and BAILAN_API_* (README, "`make run` settings")."""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError

from app.server import ApiServerSettings, uvicorn_argv


def main() -> int:
    try:
        settings = ApiServerSettings()
    except ValidationError as exc:
        print(f"invalid API server settings:\n{exc}", file=sys.stderr)
        return 2
    argv = uvicorn_argv(settings)
    # Replaced, not wrapped: uvicorn gets this process's pid and its signals (a container's stop).
    os.execv(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main())
