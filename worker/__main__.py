"""`python -m worker`: load the model once and serve the queue until signalled."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from bailan.logs import configure as configure_logging
from worker.settings import WorkerSettings


def main() -> int:
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"invalid worker settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    # Imported once the settings are valid, so a bad setting stops the worker before torch loads.
    from worker.process import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
