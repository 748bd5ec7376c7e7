"""Request and response bodies of the HTTP API.

The request model is JobRequest narrowed by the settings, so that the
configured caps are enforced by validation (422 naming the field) and shown
in the OpenAPI docs.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, create_model, field_validator

from app.settings import ApiSettings
from bailan.jobs import DEFAULT_STEPS, SIZE_MULTIPLE, JobParams, JobRequest, JobState, ModelDefaults


def _narrowed(name: str, **overrides: Any) -> Any:
    """JobRequest's field `name` with `overrides` on top; its other bounds, default and examples stay.

    A FieldInfo taken from model_fields, placed first in Annotated, is merged
    whole by pydantic; the Field after it adds a constraint or replaces a text.
    """
    inherited = JobRequest.model_fields[name]
    return Annotated[inherited.annotation, inherited, Field(**overrides)]


def make_request_model(settings: ApiSettings) -> type[JobRequest]:
    """JobRequest narrowed by this deployment's caps; still a JobRequest.

    Only the caps, and the descriptions that state them, are set here.
    """
    chars = settings.max_prompt_chars
    pixels = settings.max_pixels
    steps: dict[str, Any] = {"le": settings.max_steps, "description": f"Denoising steps, 1–{settings.max_steps}. "
                             "Omitted: the model's default (/v1/models), else the default shown."}
    if settings.max_steps < DEFAULT_STEPS:
        # The default must itself be a request this server accepts.
        steps["default"] = settings.max_steps

    def side(name: str, cap: int) -> Any:
        return _narrowed(
            name,
            le=cap,
            description=(
                f"Image {name} in pixels: a multiple of {SIZE_MULTIPLE}, {SIZE_MULTIPLE}–{cap}, and "
                f"width × height ≤ {pixels}. Omit for the model's native {name}."
            ),
        )

    preview_every = JobRequest.model_fields["preview_every"].description
    fields: dict[str, Any] = {
        "prompt": _narrowed("prompt", max_length=chars, description=f"What to paint. 1–{chars} characters."),
        "negative_prompt": _narrowed(
            "negative_prompt", max_length=chars, description=f"What to steer away from. At most {chars} characters."
        ),
        "width": side("width", settings.max_width),
        "height": side("height", settings.max_height),
        "steps": _narrowed("steps", **steps),
        "preview_every": _narrowed(
            "preview_every", description=f"{preview_every} Previews are kept {settings.preview_ttl_s} s."
        ),
    }
    validators: dict[str, Any] = {}
    if settings.webhook_secret is None:
        # Webhooks off: the schema says so (null only), and a URL gets a 422 saying why.
        def null_only(schema: dict[str, Any]) -> None:
            description = schema.get("description")
            schema.clear()
            schema.update(type="null", default=None, description=description)

        fields["webhook_url"] = _narrowed(
            "webhook_url", json_schema_extra=null_only,
            description="Webhooks are off on this server (BAILAN_WEBHOOK_SECRET is unset): null only.",
        )

        def webhooks_off(cls: type, value: Any) -> Any:
            if value is not None:
                raise ValueError("webhooks are off on this server (BAILAN_WEBHOOK_SECRET is unset)")
            return value

        validators["_webhooks_off"] = field_validator("webhook_url", mode="before")(webhooks_off)
    else:
        # Here, not at the top: bailan.webhooks brings RQ and httpx, and bailan.client reads
        # this module's response models without running a server.
        from bailan.webhooks import check_submitted

        cap = settings.webhook_url_max_chars
        fields["webhook_url"] = _narrowed(
            "webhook_url", max_length=cap,
            description=f"{JobRequest.model_fields['webhook_url'].description} At most {cap} characters.",
        )

        def webhook_url_here(cls: type, value: str | None) -> str | None:
            # This deployment's check: no internal address written out, unless allow-listed.
            if value is not None:
                check_submitted(value, settings.webhook_allow_hosts)
            return value

        validators["_webhook_url_here"] = field_validator("webhook_url")(webhook_url_here)
    return create_model(
        "JobRequest", __base__=JobRequest, __module__=__name__, __validators__=validators, **fields
    )


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done so far.")
    total_steps: int = Field(description="Denoising steps the job runs in all.")


class PreviewRef(BaseModel):
    step: int = Field(description="Step after which the preview was taken.")
    url: str = Field(description="Where to GET the preview (image/jpeg).")


class ImageRef(BaseModel):
    index: int = Field(description="0-based image index within the job.")
    url: str = Field(description="Where to GET the image, encoded as params.output_format.")
    seed: int | None = Field(None, description="Seed that produced this image.")


class JobError(BaseModel):
    code: str = Field(
        description="Machine-readable reason: out_of_memory, worker_lost, invalid_for_model or internal."
    )
    message: str = Field(description="Human-readable explanation.")


class JobOut(BaseModel):
    """Everything a client needs to follow one job."""

    id: str
    status: JobState = Field(description="queued, running, succeeded, failed or canceled.")
    progress: Progress
    queue_position: int | None = Field(
        None, description="1-based position in the queue while queued; null otherwise."
    )
    eta_s: float | None = Field(
        None,
        description=(
            "While queued: estimated seconds until the job finishes, from the live workers' measured "
            "step rates (assumptions in the README); null otherwise, or when no worker has measured one."
        ),
    )
    cancel_requested: bool = Field(False, description="A client asked to cancel this job.")
    previews: list[PreviewRef] = Field(default_factory=list, description="Previews still available, oldest first.")
    images: list[ImageRef] = Field(default_factory=list, description="Final images, once written.")
    error: JobError | None = Field(None, description="Why the job failed; null unless status is failed.")
    params: JobParams | None = Field(None, description="The request as resolved by the server (seed, size).")
    unknown_words: list[str] = Field(
        default_factory=list, description="Prompt words the model's vocabulary lacks (ignored by the model)."
    )
    model: str | None = Field(
        None, description="Model that runs (or ran) the job: the one it named, else the worker's once it starts."
    )
    waiting_for_worker: bool = Field(
        False,
        description=(
            "Queued for a model that no live worker serves right now: it waits in that model's queue "
            "until one starts (see /v1/models)."
        ),
    )
    worker: str | None = Field(None, description="Worker that ran (or runs) the job.")
    created_at: str | None = Field(None, description="ISO 8601 UTC time of submission.")
    started_at: str | None = Field(None, description="ISO 8601 UTC time sampling began.")
    finished_at: str | None = Field(None, description="ISO 8601 UTC time the job ended.")


class ModelOut(BaseModel):
    model: str = Field(description="Model name as the workers report it.")
    width: int | None = Field(None, description="Native width: the default when a request omits width.")
    height: int | None = Field(None, description="Native height: the default when a request omits height.")
    workers: int = Field(description="Live workers serving this model.")
    devices: list[str] = Field(default_factory=list, description="Devices those workers run on.")
    dtypes: list[str] = Field(default_factory=list, description="Weight dtypes those workers use.")
    max_batch: int | None = Field(None, description="Largest batch any of those workers runs at once.")
    hashes: list[str] = Field(
        default_factory=list,
        description="Model hashes those workers loaded (sha256 of the weights, 10 hex digits), as images carry them.",
    )
    defaults: ModelDefaults = Field(
        default_factory=ModelDefaults,
        description=(
            "What a request that omits steps, guidance_scale or scheduler gets for this model (from its "
            "directory's bailan_defaults.json); a field left out here keeps the service-wide default."
        ),
    )
    samplers: list[str] = Field(default_factory=list, description="Values `scheduler` may take for this model.")


class ModelsOut(BaseModel):
    models: list[ModelOut]
    default: str | None = Field(
        None, description="Model a request that names none runs on (BAILAN_DEFAULT_MODEL); null: any worker's."
    )


class Detail(BaseModel):
    """Error body of every non-2xx answer except 422 (FastAPI's validation list)."""

    detail: str
