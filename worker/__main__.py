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
    if settings.log_format == "json":
        # transformers and diffusers print through handlers of their own, and draw
        # progress bars: hand their lines to the root handler, and no bars.
        import diffusers.utils.logging
        import transformers.utils.logging

        for library in (transformers.utils.logging, diffusers.utils.logging):
            library.disable_default_handler()
            library.enable_propagation()
            library.disable_progress_bar()
    # Imported once the settings are valid, so a bad setting stops the worker before torch loads.
    from worker.process import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
