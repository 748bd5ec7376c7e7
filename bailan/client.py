"""A Python client for the Bailan HTTP API, sync (`Client`) and async (`AsyncClient`), on httpx.

    from bailan.client import Client

    with Client("http://127.0.0.1:8000", key="bl_...") as bailan:
        job = bailan.submit(prompt="a red circle on a blue background", steps=20)
        for view in bailan.follow(job.id):          # each change: queue position, step, preview
            print(view.status.value, view.progress.step)
        png = bailan.image(job.id, 0)

Results are the API's own models (app.schemas.JobOut, which loads no torch,
FastAPI or worker code); every non-2xx answer raises ApiError with the API's
message. The URL and key default to BAILAN_URL and BAILAN_API_KEY.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from app.schemas import JobOut, ModelsOut
from bailan.jobs import TERMINAL_STATES, JobRequest, JobState

DEFAULT_URL = "http://127.0.0.1:8000"
# Event streams send a keepalive every 15 s, so a read may wait that long.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=60.0)
QUIET_S = 10.0
# A stream broken this many times in a row, no view between, is given up: the API is down.
RECONNECTS = 8
# The longest a held poll (Prefer: wait) waits, when the key's stream places are all taken.
HOLD_S = 30


class ApiError(Exception):
    """A non-2xx answer: `message` is the API's own (its `detail`, or each invalid field)."""

    def __init__(self, status_code: int, message: str, body: Any = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.body = body
        self.retry_after = retry_after


class JobEnded(ApiError):
    """The job ended without images (failed or canceled); `job` is its final view."""

    def __init__(self, job: JobOut) -> None:
        reason = job.error.message if job.error is not None else job.status.value
        super().__init__(200, f"job {job.id} {job.status.value}: {reason}", job.model_dump(mode="json"))
        self.job = job


class JobGone(ApiError):
    """The job expired (or the job store became unreachable) while it was being followed."""


class WaitTimeout(TimeoutError):
    """wait() gave up; the job goes on."""

    def __init__(self, job: JobOut, timeout: float) -> None:
        super().__init__(f"job {job.id} is still {job.status.value} after {timeout:g} s; it goes on")
        self.job = job


@dataclass(frozen=True)
class Preview:
    """A preview as it arrived: the step it was taken after, and its JPEG bytes."""

    step: int
    data: bytes
    job: JobOut


def _message(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error"))
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):  # FastAPI's 422: one entry per invalid field
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                    parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
            return "; ".join(parts) or fallback
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            return detail["message"]
    return fallback


def _raise_for(response: httpx.Response) -> None:
    """ApiError carrying the API's message for a non-2xx `response` (already read)."""
    if response.is_success:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    retry = response.headers.get("Retry-After")
    raise ApiError(
        response.status_code,
        _message(body, response.text or response.reason_phrase),
        body,
        float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
    )


def job_body(request: JobRequest | Mapping[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """The JSON body of a submit: `request`'s fields (only those set) with `params` on top.
    Checked against JobRequest here, so a typo'd field fails before any request."""
    values: dict[str, Any] = {}
    if isinstance(request, JobRequest):
        values.update(request.model_dump(mode="json", exclude_unset=True))
    elif request is not None:
        values.update(request)
    values.update({name: value for name, value in params.items() if value is not None})
    checked = JobRequest.model_validate(values)  # raises pydantic's ValidationError naming the field
    return checked.model_dump(mode="json", exclude_unset=True)


def _job_event(sse: ServerSentEvent, job_id: str) -> JobOut:
    if sse.event == "job":
        return JobOut.model_validate_json(sse.data)
    if sse.event in ("gone", "error"):
        raise JobGone(404 if sse.event == "gone" else 503, sse.data or f"job {job_id}: {sse.event}")
    raise ApiError(502, f"unexpected event {sse.event!r} in the stream of job {job_id}")


def _timeout(read: float | None) -> httpx.Timeout:
    return DEFAULT_TIMEOUT if read is None else httpx.Timeout(DEFAULT_TIMEOUT.connect, read=read)


def _quiet(deadline: float | None) -> float | None:
    """How long a wait may read nothing before it checks its deadline: shorter than the
    stream's keepalive, so a quiet stream times out instead of waiting past the deadline."""
    if deadline is None:
        return None
    return max(0.05, min(deadline - time.monotonic(), QUIET_S))


def passing(exc: Exception) -> bool:
    """Whether an error is a break that may pass: the connection (an API restart), the store's
    `event: error`, or the API or a proxy answering that it cannot serve now (502, 503 with
    Retry-After while its Redis is away, 504). Not: a job that expired (404), a refusal."""
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, JobGone):
        return exc.status_code != 404
    return isinstance(exc, ApiError) and exc.status_code in (502, 503, 504)


def lost_frame(exc: Exception) -> bool:
    """Whether a preview that failed to load is only skipped (the next frame replaces it): it
    expired already (404), or the break may pass."""
    return passing(exc) or (isinstance(exc, ApiError) and exc.status_code == 404)


class _Watch:
    """How watch() goes on when its event stream breaks; shared by Client and AsyncClient.

    A quiet stream (a queued job) is followed again; one that broke (an API restart, a
    proxy's idle timeout, the store's `event: error`) is followed again after a backoff,
    RECONNECTS times in a row at most; a 429 (the key's stream places all taken) turns
    the watch into held polls (`Prefer: wait`). Anything else is raised.
    """

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.failures = 0
        self.held = False

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def saw(self) -> None:
        self.failures = 0

    def broke(self, exc: Exception) -> float:
        """Seconds to wait before following again; re-raises `exc` when it is no passing break."""
        if isinstance(exc, httpx.ReadTimeout):
            return 0.0
        if isinstance(exc, ApiError) and not isinstance(exc, JobGone) and exc.status_code == 429:
            if self.held:  # a held poll refused too (a proxy's limit): wait as told, never spin
                return exc.retry_after or 1.0
            self.held = True
            return 0.0
        self.failures += 1
        if not passing(exc) or self.failures > RECONNECTS:
            raise exc
        left = self.remaining()
        wait = min(0.25 * 2**self.failures, 5.0)
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            wait = min(max(exc.retry_after, 0.0), 5.0)  # the API says when to come back (its store away)
        return min(wait, max(left, 0.0) if left is not None else wait)

    def hold_s(self) -> int:
        left = self.remaining()
        return HOLD_S if left is None else max(1, min(HOLD_S, math.ceil(left)))


def _held_view(response: httpx.Response) -> tuple[JobOut, bool]:
    """A held poll's view, and whether the server held it (else the next poll waits a second)."""
    return JobOut.model_validate_json(response.content), "preference-applied" in response.headers


class BadKey(ValueError):
    """An API key no HTTP header can carry (a character beyond ASCII, a space: a bad copy)."""


def _settings(url: str | None, key: str | None) -> tuple[str, dict[str, str]]:
    url = (url or os.environ.get("BAILAN_URL") or DEFAULT_URL).rstrip("/")
    key = key if key is not None else os.environ.get("BAILAN_API_KEY")
    bad = next((i for i, c in enumerate(key or "") if not (c.isascii() and c.isprintable()) or c == " "), None)
    if bad is not None:
        raise BadKey(f"the API key (--key or BAILAN_API_KEY) holds a character no HTTP header carries (at {bad}); "
                     "was it copied whole?")
    return url, ({"Authorization": f"Bearer {key}"} if key else {})


class Client:
    """Synchronous client; a context manager (or call close())."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base, headers = _settings(url, key)
        self.url = base
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    def submit(
        self, request: JobRequest | Mapping[str, Any] | None = None, *, idempotency_key: str | None = None,
        **params: Any,
    ) -> JobOut:
        """Queue a job (POST /v1/jobs); `params` are JobRequest's fields."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/jobs", json=job_body(request, **params), headers=headers)
        return JobOut.model_validate_json(response.content)

    def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json(self._request("GET", f"/v1/jobs/{job_id}").content)

    def follow(self, job_id: str, read_timeout: float | None = None) -> Iterator[JobOut]:
        """The job's view each time it changes (the event stream), until it ends; the first is
        its view now. `read_timeout` bounds each wait for data (httpx.ReadTimeout past it)."""
        with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events", timeout=_timeout(read_timeout)) as source:
            if not source.response.is_success:
                source.response.read()
                _raise_for(source.response)
            for sse in source.iter_sse():
                view = _job_event(sse, job_id)
                yield view
                if view.status in TERMINAL_STATES:
                    return
        raise JobGone(502, f"the event stream of job {job_id} ended before the job did")

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobOut]:
        """As follow(), but it rides out a broken stream (followed again) and a full set of
        stream places (held polls instead); it stops when the job ends or `timeout` s pass."""
        state = _Watch(timeout)
        while not state.expired():
            try:
                if state.held:
                    seconds = state.hold_s()
                    view, held = _held_view(self._request(
                        "GET", f"/v1/jobs/{job_id}", headers={"Prefer": f"wait={seconds}"},
                        timeout=_timeout(seconds + QUIET_S)))
                    state.saw()
                    yield view
                    if view.status in TERMINAL_STATES:
                        return
                    if not held:
                        time.sleep(min(1.0, max(state.remaining() or 1.0, 0.0)))
                    continue
                for view in self.follow(job_id, _quiet(state.deadline)):
                    state.saw()
                    yield view
                    if view.status in TERMINAL_STATES or state.expired():
                        return
            except (httpx.HTTPError, ApiError) as exc:
                time.sleep(state.broke(exc))

    def wait(self, job_id: str, timeout: float | None = None) -> JobOut:
        """The job's final view (succeeded, failed or canceled); WaitTimeout after `timeout` s."""
        view = None
        for view in self.watch(job_id, timeout):
            if view.status in TERMINAL_STATES:
                return view
        view = view if view is not None else self.get(job_id)  # timeout 0: the job as it is
        if view.status in TERMINAL_STATES:
            return view
        raise WaitTimeout(view, timeout or 0.0)

    def previews(self, job_id: str) -> Iterator[Preview]:
        """Each preview as it arrives (oldest first), until the job ends. A frame that fails
        to load (expired already, or a passing break) is skipped: the next one replaces it."""
        seen: set[int] = set()
        for view in self.watch(job_id):
            for ref in view.previews:
                if ref.step not in seen:
                    seen.add(ref.step)
                    try:
                        data = self._request("GET", ref.url).content
                    except (httpx.HTTPError, ApiError) as exc:
                        if not lost_frame(exc):
                            raise
                        continue
                    yield Preview(ref.step, data, view)

    def preview(self, job_id: str, step: int | None = None) -> bytes:
        """A preview's JPEG: after `step`, or the newest."""
        path = f"/v1/jobs/{job_id}/previews/{'latest' if step is None else step}"
        return self._request("GET", path).content

    def image(self, job_id: str, index: int = 0) -> bytes:
        return self._request("GET", f"/v1/jobs/{job_id}/images/{index}").content

    def images(self, job: JobOut) -> list[bytes]:
        return [self._request("GET", ref.url).content for ref in job.images]

    def cancel(self, job_id: str) -> JobOut:
        """Cancel: a queued job ends canceled at once; a running one stops at its next step."""
        return JobOut.model_validate_json(self._request("POST", f"/v1/jobs/{job_id}/cancel").content)

    def models(self) -> ModelsOut:
        return ModelsOut.model_validate_json(self._request("GET", "/v1/models").content)

    def generate(self, prompt: str, *, timeout: float | None = None, **params: Any) -> tuple[JobOut, list[bytes]]:
        """Submit, wait and fetch: the final view and the images; JobEnded if it failed or was canceled."""
        job = self.wait(self.submit(prompt=prompt, **params).id, timeout)
        if job.status is not JobState.succeeded:
            raise JobEnded(job)
        return job, self.images(job)


class AsyncClient:
    """The same client for asyncio; an async context manager (or await aclose())."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base, headers = _settings(url, key)
        self.url = base
        self.http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    async def submit(
        self, request: JobRequest | Mapping[str, Any] | None = None, *, idempotency_key: str | None = None,
        **params: Any,
    ) -> JobOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self._request("POST", "/v1/jobs", json=job_body(request, **params), headers=headers)
        return JobOut.model_validate_json(response.content)

    async def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json((await self._request("GET", f"/v1/jobs/{job_id}")).content)

    async def follow(self, job_id: str, read_timeout: float | None = None) -> AsyncIterator[JobOut]:
        async with aconnect_sse(
            self.http, "GET", f"/v1/jobs/{job_id}/events", timeout=_timeout(read_timeout)
        ) as source:
            if not source.response.is_success:
                await source.response.aread()
                _raise_for(source.response)
            async for sse in source.aiter_sse():
                view = _job_event(sse, job_id)
                yield view
                if view.status in TERMINAL_STATES:
                    return
        raise JobGone(502, f"the event stream of job {job_id} ended before the job did")

    async def watch(self, job_id: str, timeout: float | None = None) -> AsyncIterator[JobOut]:
        state = _Watch(timeout)
        while not state.expired():
            try:
                if state.held:
                    seconds = state.hold_s()
                    view, held = _held_view(await self._request(
                        "GET", f"/v1/jobs/{job_id}", headers={"Prefer": f"wait={seconds}"},
                        timeout=_timeout(seconds + QUIET_S)))
                    state.saw()
                    yield view
                    if view.status in TERMINAL_STATES:
                        return
                    if not held:
                        await asyncio.sleep(min(1.0, max(state.remaining() or 1.0, 0.0)))
                    continue
                async for view in self.follow(job_id, _quiet(state.deadline)):
                    state.saw()
                    yield view
                    if view.status in TERMINAL_STATES or state.expired():
                        return
            except (httpx.HTTPError, ApiError) as exc:
                await asyncio.sleep(state.broke(exc))

    async def wait(self, job_id: str, timeout: float | None = None) -> JobOut:
        view = None
        async for view in self.watch(job_id, timeout):
            if view.status in TERMINAL_STATES:
                return view
        view = view if view is not None else await self.get(job_id)  # timeout 0: the job as it is
        if view.status in TERMINAL_STATES:
            return view
        raise WaitTimeout(view, timeout or 0.0)

    async def previews(self, job_id: str) -> AsyncIterator[Preview]:
        seen: set[int] = set()
        async for view in self.watch(job_id):
            for ref in view.previews:
                if ref.step not in seen:
                    seen.add(ref.step)
                    try:
                        data = (await self._request("GET", ref.url)).content
                    except (httpx.HTTPError, ApiError) as exc:
                        if not lost_frame(exc):
                            raise
                        continue  # as Client.previews
                    yield Preview(ref.step, data, view)

    async def preview(self, job_id: str, step: int | None = None) -> bytes:
        path = f"/v1/jobs/{job_id}/previews/{'latest' if step is None else step}"
        return (await self._request("GET", path)).content

    async def image(self, job_id: str, index: int = 0) -> bytes:
        return (await self._request("GET", f"/v1/jobs/{job_id}/images/{index}")).content

    async def images(self, job: JobOut) -> list[bytes]:
        return [(await self._request("GET", ref.url)).content for ref in job.images]

    async def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json((await self._request("POST", f"/v1/jobs/{job_id}/cancel")).content)

    async def models(self) -> ModelsOut:
        return ModelsOut.model_validate_json((await self._request("GET", "/v1/models")).content)

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **params: Any
    ) -> tuple[JobOut, list[bytes]]:
        job = await self.wait((await self.submit(prompt=prompt, **params)).id, timeout)
        if job.status is not JobState.succeeded:
            raise JobEnded(job)
        return job, await self.images(job)
