"""The contract between the HTTP front end and the GPU workers.

Both sides import this module and nothing heavier: it must never import torch.
It holds the request schema, the job record stored in Redis, the Redis key
layout, and the single mapping from RQ's job status to Bailan's job state.
"""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

# The worker-side entry point, named by string so the API never imports it.
RQ_FUNC = "worker.slots.run_job"
KEY_PREFIX = "bailan"
SEED_MAX = 2**32 - 1
# Latents are 1/8 of the image size, so every side is a multiple of 8; a
# size cap that is not one would advertise a maximum no request could reach.
SIZE_MULTIPLE = 8
DEFAULT_STEPS = 25
# The most steps any setting may allow (BAILAN_MAX_STEPS' own bound), and so the largest
# preview_every that means anything: one beyond the steps asks for no preview.
STEPS_HARD_MAX = 100_000
# A model's name is its directory's name; it becomes part of Redis keys.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MODEL_NAME_MAX = 64


def model_dir_problem(path: Path) -> str | None:
    """Why the directory `path` cannot be served as a model, or None: checked by the launcher
    and the worker before any torch loads."""
    if not (path / "model_index.json").is_file():
        return "it does not exist" if not path.exists() else "it has no model_index.json"
    return model_name_problem(path.resolve().name)


def model_name_problem(name: str) -> str | None:
    """Why a model directory's name `name` cannot name its model, or None. Requests pick a
    model by that name, and its queues carry it (bailan.queues)."""
    if re.fullmatch(MODEL_NAME_PATTERN, name) and len(name) <= MODEL_NAME_MAX:
        return None
    return (f"the directory's name {name!r} names the model; use letters, digits, '.', '_' and '-' "
            f"(at most {MODEL_NAME_MAX})")


MAX_IMAGES = 4


def img2img_run_steps(steps: int, strength: float) -> int:
    """Steps an image-to-image job runs, as diffusers' pipelines count them: the last
    `int(steps * strength)`. Zero is a job the API refuses and a worker fails."""
    return min(int(steps * strength), steps)


# A hard bound on webhook_url in the request schema; BAILAN_WEBHOOK_URL_MAX_CHARS narrows it.
URL_HARD_MAX_CHARS = 8192


class WebhookEvent(str, Enum):
    started = "started"  # sampling began (a requeued job may start again)
    preview = "preview"  # a preview was stored
    completed = "completed"  # the job ended: succeeded, failed or canceled



def check_url(url: str) -> str:
    """`url` if it is an absolute http(s) URL with a host and no credentials; ValueError saying why not."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError on a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # Credentials in a URL end up in logs; the signature is what authenticates us.
        raise ValueError("must not carry credentials (user:password@)")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise ValueError("must not contain spaces or control characters")
    del port
    return url



class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.canceled})


class SchedulerName(str, Enum):
    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    dpmpp_2m = "dpmpp_2m"


class PreviewKind(str, Enum):
    """What a preview shows."""

    x0 = "x0"  # the model's current estimate of the finished picture
    xt = "xt"  # the sampler's raw, still noisy state


class OutputFormat(str, Enum):
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}
# Previews are always small JPEGs: cheap to encode and to poll.
PREVIEW_FORMAT = "jpeg"


class ErrorCode(str, Enum):
    """Stable machine-readable reasons a job failed."""

    out_of_memory = "out_of_memory"
    worker_lost = "worker_lost"
    invalid_for_model = "invalid_for_model"
    exceeds_device_limits = "exceeds_device_limits"  # over the caps of the worker's device (bailan.caps)
    internal = "internal"


# The message of a worker_lost failure, as the reaper records it and the API reports it.
WORKER_LOST_MESSAGE = "the worker running this job stopped responding"


def _whole_number(value: Any) -> Any:
    """A JSON number with no fraction (12 or 12.0, as JSON Schema's "integer" allows), never
    a boolean or a string: pydantic's lax mode reads `true` as 1 and "25" as 25, so a
    client's mistake would run as a job nobody asked for."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str):
        raise ValueError("must be a JSON number, not a string")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value



class JobRequest(BaseModel):
    """What a client may ask for. Hard bounds and defaults live here, once; the
    API narrows the configurable caps (app.schemas.make_request_model).

    Every numeric field is strict about types: whole-number fields take JSON
    numbers without a fraction (see _whole_number), float fields any JSON number
    (7 -> 7.0); booleans and strings are refused.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to paint.", examples=["a watercolor lighthouse at dawn"])
    negative_prompt: str = Field(
        "",
        description="What to steer away from (replaces the empty unconditional prompt).",
        examples=["blurry"],
    )
    width: int | None = Field(
        None,
        ge=SIZE_MULTIPLE,
        multiple_of=SIZE_MULTIPLE,
        description=f"Image width in pixels, a multiple of {SIZE_MULTIPLE}. Defaults to the model's native width.",
        examples=[512],
    )
    height: int | None = Field(
        None,
        ge=SIZE_MULTIPLE,
        multiple_of=SIZE_MULTIPLE,
        description=f"Image height in pixels, a multiple of {SIZE_MULTIPLE}. Defaults to the model's native height.",
        examples=[512],
    )
    steps: int = Field(
        DEFAULT_STEPS, ge=1, description="Denoising steps. Omitted: the model's default (/v1/models), else this."
    )
    guidance_scale: float = Field(
        7.5,
        ge=0.0,
        le=50.0,
        strict=True,
        # NaN compares false with every bound; refuse it (and the infinities) by name.
        allow_inf_nan=False,
        description=(
            "Classifier-free guidance scale; values <= 1 disable guidance (faster). "
            "Omitted: the model's default (/v1/models), else this."
        ),
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Random seed; the server picks and reports one when absent.",
    )
    scheduler: SchedulerName = Field(
        SchedulerName.dpmpp_2m,
        description="Sampling scheduler: " + ", ".join(s.value for s in SchedulerName)
        + ". Omitted: the model's default (/v1/models), else this.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=MODEL_NAME_MAX,
        pattern=MODEL_NAME_PATTERN,
        description="Model to run the job, by the name /v1/models lists. Omitted: the server's default model.",
        examples=["bailan-shapes"],
    )
    num_images: int = Field(
        1,
        ge=1,
        le=MAX_IMAGES,
        description=f"Images to generate, 1–{MAX_IMAGES}; image i uses seed + i.",
    )
    preview_every: int = Field(
        5, ge=0, le=STEPS_HARD_MAX, description="Steps between intermediate JPEG previews; 0 disables them."
    )
    preview_kind: PreviewKind = Field(
        PreviewKind.x0,
        description=(
            "x0: each preview shows the model's current estimate of the finished picture (the picture "
            "emerging); xt: the sampler's raw state, still covered in noise until the last steps."
        ),
    )
    # Strict, as the numbers are: lax mode reads "yes", "off" or 0 as booleans.
    preview_full_decode: StrictBool = Field(
        False, description="Decode previews with the full VAE instead of the cheap latent-to-RGB map (slower)."
    )
    output_format: OutputFormat = Field(OutputFormat.png, description="Encoding of the final images.")
    init_image: str | None = Field(
        None,
        description=(
            "Start from this picture (image to image): a PNG, JPEG or WebP image as base64 or a "
            "`data:` URL. Its size becomes the job's unless width/height are given; then it is resized "
            "(params.init_image.resized says so)."
        ),
    )
    strength: float = Field(
        0.75,
        gt=0.0,
        le=1.0,
        strict=True,
        description=(
            "With init_image: how much of the schedule to run, so how far the picture may move "
            "(the last strength x steps steps run; 1 keeps only its size and, for inpainting, what the mask keeps)."
        ),
    )
    mask_image: str | None = Field(
        None,
        description=(
            "With init_image: inpaint. Same forms; white repaints, black keeps (grey counts as its "
            "nearer end). Resized to the job's size."
        ),
    )

    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=URL_HARD_MAX_CHARS,
        description=(
            "POST the job's news here (signed per Standard Webhooks; see README, Webhooks): an http(s) URL "
            "without credentials whose host resolves to public addresses."
        ),
        examples=["https://example.com/hooks/bailan"],
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: [WebhookEvent.completed],
        min_length=1,
        max_length=len(WebhookEvent),
        json_schema_extra={"uniqueItems": True},  # what _distinct_events enforces
        description=(
            "Which deliveries webhook_url gets: started (sampling began), preview (each stored preview), "
            "completed (the final job view: succeeded, failed or canceled; retried until received)."
        ),
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return check_url(value) if value is not None else None

    @field_validator("webhook_events")
    @classmethod
    def _distinct_events(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        if len(set(value)) != len(value):
            raise ValueError("each event at most once")
        return value

    @field_validator("width", "height", "steps", "seed", "num_images", "preview_every", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        return _whole_number(value)

    # Field validators that read an earlier field (info.data), not model validators: an error
    # then names its field in `loc` (["body", "mask_image"]), as every other 422 does.
    @field_validator("mask_image")
    @classmethod
    def _a_mask_needs_a_picture(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("init_image") is None and "init_image" in info.data:
            raise ValueError("mask_image needs init_image: the mask says which parts of it to repaint")
        return value

    @field_validator("num_images")
    @classmethod
    def _every_image_seed_is_valid(cls, value: int, info: ValidationInfo) -> int:
        # Image i uses seed + i, and each of those must be resubmittable as a seed.
        seed = info.data.get("seed")
        if seed is not None and seed + value - 1 > SEED_MAX:
            raise ValueError(f"seed + num_images - 1 must be at most {SEED_MAX} (image i uses seed + i; "
                             f"seed is {seed})")
        return value


class InputImage(BaseModel):
    """An image a client sent with its job; its bytes live under Keys.input_image."""

    width: int = Field(description="Width of the image as sent.")
    height: int = Field(description="Height of the image as sent.")
    format: str = Field(description="png, jpeg or webp.")
    bytes: int = Field(description="Size of the encoded image.")
    resized: bool = Field(description="Whether the worker resizes it to the job's width and height.")


class JobParams(JobRequest):
    """A request after the API resolved it: the seed is always set, and input images are
    stored beside the record rather than carried in it."""

    seed: int = Field(ge=0, le=SEED_MAX)  # type: ignore[assignment]
    init_image: InputImage | None = Field(None, description="The picture the job starts from, if any.")  # type: ignore[assignment]
    mask_image: InputImage | None = Field(None, description="The inpainting mask, if any.")  # type: ignore[assignment]


# A model directory's own defaults for what a request leaves out (ModelDefaults).
MODEL_DEFAULTS_FILE = "bailan_defaults.json"


class ModelDefaults(BaseModel):
    """What a model directory says a request should get when it omits a field.

    Read by the worker from MODEL_DEFAULTS_FILE and published with its
    heartbeat; the API applies them at submit (app.store.records.resolve_params).
    A field absent here keeps JobRequest's default. The bounds are JobRequest's,
    so a file that would produce an invalid job fails the worker's start-up.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, strict=True, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=50.0, allow_inf_nan=False, description="Classifier-free guidance scale."
    )
    scheduler: SchedulerName | None = Field(None, description="Sampling scheduler.")


# The request fields a model's defaults may set (ModelDefaults' fields).
MODEL_DEFAULT_FIELDS = tuple(ModelDefaults.model_fields)


class Keys:
    """Every Redis key Bailan writes, in one place. RQ's own keys (rq:*) are RQ's."""

    @staticmethod
    def job(job_id: str) -> str:
        """Hash: the job record (see RecordField)."""
        return f"{KEY_PREFIX}:job:{job_id}"

    @staticmethod
    def previews(job_id: str) -> str:
        """Sorted set: preview steps stored so far (member = step, score = when its blob expires).
        The bytes of previews and final images live in the blob store (bailan.blobs), not in Redis."""
        return f"{KEY_PREFIX}:job:{job_id}:previews"

    @staticmethod
    def input_image(job_id: str, name: str) -> str:
        """String: an image the client sent (name: init_image or mask_image), as sent."""
        return f"{KEY_PREFIX}:job:{job_id}:input:{name}"

    @staticmethod
    def input_images(job_id: str) -> list[str]:
        """Every input_image key a job may have: what its end deletes."""
        return [Keys.input_image(job_id, name) for name in ("init_image", "mask_image")]

    @staticmethod
    def worker(name: str) -> str:
        """String with a TTL: a live worker process and the model it serves (JSON)."""
        return f"{KEY_PREFIX}:worker:{name}"

    @staticmethod
    def workers() -> str:
        """Sorted set: the names of workers that said they are alive, scored by when their key
        expires (bailan.presence: readers find live workers without scanning the keyspace)."""
        return f"{KEY_PREFIX}:workers"

    @staticmethod
    def idempotency(key_digest: str) -> str:
        """String with a TTL: JSON {job_id, fingerprint} of the job a client's
        Idempotency-Key created (API only; key_digest = sha256 of "<API key name>\\n<header>")."""
        return f"{KEY_PREFIX}:idempotency:{key_digest}"

    @staticmethod
    def job_events(job_id: str) -> str:
        """Pub/sub channel: a tiny message whenever a job's view may have changed (bailan.events)."""
        return f"{KEY_PREFIX}:job:{job_id}:events"

    @staticmethod
    def key_queues(queue_name: str) -> str:
        """Set: the per-API-key RQ queues of base queue `queue_name` (bailan.queues)."""
        return f"{KEY_PREFIX}:queues:{queue_name}"

    @staticmethod
    def models(queue_name: str) -> str:
        """Set: every model a worker of base queue `queue_name` ever served; each has its own
        queues (bailan.queues.model_base). Kept for good: a model whose workers are all down
        still takes jobs, which wait for one."""
        return f"{KEY_PREFIX}:models:{queue_name}"

    @staticmethod
    def model_live(model: str) -> str:
        """String with a TTL: some live worker serves `model` (renewed with its heartbeat)."""
        return f"{KEY_PREFIX}:model-live:{model}"

    @staticmethod
    def fair_cursor(queue_name: str) -> str:
        """String: the queue served last, where every worker's next round-robin turn starts."""
        return f"{KEY_PREFIX}:queues:{queue_name}:last"

    @staticmethod
    def waiting(queue_name: str) -> str:
        """Sorted set: jobs enqueued on RQ queue `queue_name`, scored by when; the reaper finds
        here a job a worker took off the queue but never started (bailan.reaper)."""
        return f"{KEY_PREFIX}:queues:{queue_name}:waiting"

    @staticmethod
    def lost(queue_name: str) -> str:
        """Sorted set: jobs of `waiting` found in no queue and not started, scored by when first
        seen so; still so a sweep later, they go back to their queue (bailan.reaper)."""
        return f"{KEY_PREFIX}:queues:{queue_name}:lost"

    @staticmethod
    def reservations(queue_name: str) -> str:
        """Sorted set: submits admitted but not yet enqueued ("<queue>\\n<job id>", scored by
        expiry), counted by the queue caps so concurrent submits cannot overshoot them (API only)."""
        return f"{KEY_PREFIX}:queues:{queue_name}:reserved"

    @staticmethod
    def rate(key_digest: str) -> str:
        """String with a TTL: an API key's submit-rate state (GCRA theoretical arrival time; API only)."""
        return f"{KEY_PREFIX}:rate:{key_digest}"

    @staticmethod
    def streams(key_digest: str) -> str:
        """Sorted set: an API key's open event streams, scored by lease expiry (API only)."""
        return f"{KEY_PREFIX}:streams:{key_digest}"

    @staticmethod
    def reaper_lock(queue_name: str) -> str:
        """String with a TTL: a sweep for abandoned jobs is under way (bailan.reaper)."""
        return f"{KEY_PREFIX}:reaper-lock:{queue_name}"

    @staticmethod
    def reaper_seen(queue_name: str) -> str:
        """String: unix time of the last sweep for abandoned jobs, by any process; a stale one
        means nobody reached Redis for a while (bailan.reaper)."""
        return f"{KEY_PREFIX}:reaper-seen:{queue_name}"

    @staticmethod
    def reaper_hold(queue_name: str) -> str:
        """String with a TTL: sweeps wait while workers renew leases after a silence (bailan.reaper)."""
        return f"{KEY_PREFIX}:reaper-hold:{queue_name}"

    @staticmethod
    def blob_sweep_lock(queue_name: str) -> str:
        """String with a TTL of one sweep interval: some API process swept the blob store (bailan.reaper)."""
        return f"{KEY_PREFIX}:blob-sweep-lock:{queue_name}"


class RecordField:
    """Fields of the job hash. Written by the API at submit and the worker afterwards."""

    params = "params"  # JSON of JobParams
    created_at = "created_at"  # unix seconds (float)
    started_at = "started_at"
    finished_at = "finished_at"
    step = "step"
    total_steps = "total_steps"
    images = "images"  # JSON list of {index, seed}
    error_code = "error_code"
    error_message = "error_message"
    cancel_requested = "cancel_requested"  # unix seconds when a client asked
    # The stamp of the cancel that took it off its queue: that cancel, sent again after its
    # answer was lost, knows it removed the job itself (app.store.records.cancel).
    taken_off_queue = "taken_off_queue"
    unknown_words = "unknown_words"  # JSON list of prompt words the model's vocabulary lacks
    model = "model"  # name of the model that ran it
    worker = "worker"  # RQ worker name that ran it
    width = "width"  # resolved size (the model's native size when the request omitted it)
    height = "height"
    owner = "owner"  # name of the API key that submitted it (bailan.keys); absent = anonymous


def now() -> float:
    return time.time()


def decode_record(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


def public_state(rq_status: str | None, record: Mapping[str, str]) -> JobState:
    """The one place RQ's status becomes a Bailan job state.

    RQ is the queue of record. But a worker writes a job's outcome to its record
    first (images stored, end time, error) and tells RQ after, in bookkeeping
    that takes several round trips per job; a burst of jobs ending at one step
    queues them up on the worker. So a job RQ still shows started has ended once
    its record says so, and its client need not wait for RQ. A worker that dies
    in between leaves the job to the reaper, which ends it in RQ as the record
    says (bailan.reaper). When RQ's job hash is gone (expired or never written)
    the record decides too, so an old job never reads as queued forever.
    """
    match rq_status:
        case "queued" | "deferred" | "scheduled":
            return JobState.queued
        case "started":
            return ended_state(record) if record.get(RecordField.finished_at) else JobState.running
        case "finished":
            return JobState.succeeded
        case "failed" | "stopped":
            return JobState.failed
        case "canceled":
            return JobState.canceled
    if record.get(RecordField.finished_at):
        return ended_state(record)
    if record.get(RecordField.started_at):
        return JobState.running
    return JobState.queued


def ended_state(record: Mapping[str, str]) -> JobState:
    """How a job whose record has an end time ended, as its worker then tells RQ: failed with
    an error, succeeded with images (also when a cancel came too late to stop it), else canceled."""
    if record.get(RecordField.error_code):
        return JobState.failed
    if record.get(RecordField.images) or not record.get(RecordField.cancel_requested):
        return JobState.succeeded
    return JobState.canceled


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
