"""`bailan`: generate images, follow and cancel jobs from the command line.

    bailan generate "a red circle on a blue background" -o out.png --steps 20 --previews previews/
    bailan status JOB_ID
    bailan cancel JOB_ID

Every field of a job request is a flag (--negative-prompt, --width, --scheduler, ...),
made from JobRequest itself, so a new request field is a new flag. The server and
key come from --url/--key or BAILAN_URL/BAILAN_API_KEY.
"""

from __future__ import annotations

import argparse
import base64
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, TextIO

import httpx

from app.schemas import JobOut
from bailan.client import ApiError, Client, lost_frame
from bailan.jobs import TERMINAL_STATES, JobRequest, JobState

# Request fields that take a picture: the flag names a file, sent as base64.
IMAGE_FIELDS = frozenset({"init_image", "mask_image"})
BAR_WIDTH = 30


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(annotation: Any) -> Any:
    """`int` for `int | None`, and so on."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per JobRequest field but the prompt; unset flags are not sent (the server's defaults apply)."""
    group = parser.add_argument_group("job parameters (omitted: the server's default)")
    for name, field in JobRequest.model_fields.items():
        if name == "prompt":
            continue
        kind = _plain_type(field.annotation)
        help_text = (field.description or "").replace("%", "%%")
        if name in IMAGE_FIELDS:
            group.add_argument(_flag(name), dest=name, type=Path, metavar="FILE",
                               help=f"{help_text} Here: a PNG, JPEG or WebP file.")
        elif kind is bool:
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif typing.get_origin(kind) is list:
            item = (typing.get_args(kind) or (str,))[0]
            choices = [m.value for m in item] if isinstance(item, type) and issubclass(item, enum.Enum) else None
            group.add_argument(_flag(name), dest=name, nargs="+", choices=choices,
                               type=None if choices else item, help=help_text)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            group.add_argument(_flag(name), dest=name, choices=[m.value for m in kind], help=help_text)
        else:
            group.add_argument(_flag(name), dest=name, type=kind if kind in (int, float) else str,
                               metavar=name.upper(), help=help_text)


def request_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in JobRequest.model_fields:
        value = getattr(args, name, None)
        if value is None or name == "prompt":
            continue
        if name in IMAGE_FIELDS:
            value = base64.b64encode(Path(value).read_bytes()).decode()
        params[name] = value
    return params


class ProgressBar:
    """A plain bar on stderr: redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = ""

    def show(self, view: JobOut) -> None:
        if view.status is JobState.queued:
            where = f" (position {view.queue_position})" if view.queue_position else ""
            # The wait estimate (bailan.eta) moves with every heartbeat; whole seconds are enough.
            eta = f", done in about {max(round(view.eta_s), 1)} s" if view.eta_s is not None else ""
            text = f"queued{where}{eta}"
        else:
            done, total = view.progress.step, max(view.progress.total_steps, 1)
            filled = round(BAR_WIDTH * done / total)
            text = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{view.progress.total_steps} steps"
            if view.status in TERMINAL_STATES:
                text += f" {view.status.value}"
        if text == self.last:
            return
        self.last = text
        if self.tty:
            self.out.write("\r\033[K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")
            self.out.flush()


# What an -o file's extension asks for, as image tools read it.
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _output_format(output: Path | None, asked: str | None) -> str | None:
    """The format to ask for: --output-format, else what the -o file's extension names (a PNG
    saved as photo.jpg is not what anyone meant); the two disagreeing is an error."""
    suffix = output.suffix.lower() if output is not None else ""
    implied = SUFFIX_FORMATS.get(suffix)
    if asked is not None and implied is not None and asked != implied:
        raise ValueError(f"--output-format {asked} contradicts -o {output}: its extension means {implied}")
    if asked is None and suffix and implied is None:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise ValueError(f"-o {output}: Bailan writes no {suffix} files; use {known}, or name --output-format")
    return asked or implied


def _outputs(output: Path | None, job: JobOut) -> list[Path]:
    """Where each image goes: `output` for one image, `stem-i.ext` for several; `<id>-i.ext` by default."""
    fmt = job.params.output_format.value if job.params is not None else "png"
    count = len(job.images)
    if output is None:
        return [Path(f"{job.id}-{i}.{fmt}") for i in range(count)]
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.' + fmt}") for i in range(count)]


def _cancel(client: Client, job_id: str) -> None:
    """Cancel a job this command gave up on; it may have ended meanwhile, or be unreachable."""
    try:
        client.cancel(job_id)
        print(f"canceled job {job_id}", file=sys.stderr)
    except (ApiError, httpx.HTTPError) as exc:
        print(f"job {job_id} not canceled: {exc}", file=sys.stderr)


def generate(client: Client, args: argparse.Namespace) -> int:
    args.output_format = _output_format(args.output, args.output_format)  # refused before anything is made
    if args.previews is not None:
        args.previews.mkdir(parents=True, exist_ok=True)  # before the job: a bad directory queues nothing
    job = client.submit(prompt=args.prompt, **request_params(args))
    print(f"job {job.id}", file=sys.stderr)
    bar = ProgressBar(sys.stderr)
    saved: set[int] = set()
    view = job
    try:
        for view in client.watch(job.id):
            bar.show(view)
            if args.previews is not None:
                for ref in view.previews:
                    if ref.step not in saved:
                        saved.add(ref.step)
                        try:
                            data = client.preview(job.id, ref.step)
                        except (ApiError, httpx.HTTPError) as exc:
                            # A frame that fails to load (expired, a passing break) is skipped, as
                            # the page skips it: not a reason to give up on (and cancel) the job.
                            if not lost_frame(exc):
                                raise
                            continue
                        (args.previews / f"{job.id}-step{ref.step:04d}.jpg").write_bytes(data)
    except KeyboardInterrupt:
        bar.end()
        # The job would otherwise run on with nobody waiting for it.
        _cancel(client, job.id)
        return 130
    except Exception:
        # Giving up (the API gone, a previews directory unwritable): nobody would fetch its images.
        bar.end()
        if view.status not in TERMINAL_STATES:
            _cancel(client, job.id)
        raise
    bar.end()
    if view.status is not JobState.succeeded:
        reason = view.error.message if view.error is not None else view.status.value
        print(f"error: job {job.id} {view.status.value}: {reason}", file=sys.stderr)
        return 1
    for ref, path in zip(view.images, _outputs(args.output, view), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.image(job.id, ref.index))
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bailan", description="Generate images with a Bailan server.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="The server (default: BAILAN_URL, else http://127.0.0.1:8000).")
    common.add_argument("--key", help="API key (default: BAILAN_API_KEY; none in open mode).")
    sub = top.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="Submit a job, show its progress, save its images.",
                         description="Submit a job, follow it with a progress bar, and save its images.")
    gen.add_argument("prompt", help="What to paint.")
    gen.add_argument("-o", "--output", type=Path,
                     help="Image file; with several images, STEM-0.EXT, STEM-1.EXT... (default: JOB_ID-N.FORMAT).")
    gen.add_argument("--previews", type=Path, metavar="DIR", help="Save each preview here as it arrives.")
    add_request_flags(gen)

    status = sub.add_parser("status", parents=[common], help="Print a job's view (JSON).")
    status.add_argument("job_id")
    cancel = sub.add_parser("cancel", parents=[common], help="Cancel a job; print its view (JSON).")
    cancel.add_argument("job_id")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(args.url, args.key) as client:
            if args.command == "generate":
                return generate(client, args)
            view = client.get(args.job_id) if args.command == "status" else client.cancel(args.job_id)
            print(view.model_dump_json(indent=2))
            return 0
    except ApiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a flag value JobRequest refuses (pydantic's ValidationError names it)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, OSError) as exc:  # an unreachable server, an unreadable or unwritable file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a job's wait (that one cancels the job): no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
