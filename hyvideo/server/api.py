"""The OpenAI-style video API under /v1, and the FastAPI app that also carries the web page.

    POST   /v1/videos                  create a job (JSON, or form fields as OpenAI's SDK sends them)
    GET    /v1/videos                  list jobs (newest first; ?limit, ?after, ?order=asc|desc)
    GET    /v1/videos/{id}             one job: status queued | in_progress | completed | failed, progress %
    GET    /v1/videos/{id}/content     the mp4 (?index=i for the i-th of n videos)
    DELETE /v1/videos/{id}             delete the job and its files (cancels it if it runs)
    POST   /v1/videos/{id}/cancel      ours: cancel, keep the job listed as failed/cancelled
    GET    /v1/videos/{id}/sidecar     ours: the JSON sidecar of the i-th video
    GET    /v1/server                  ours: model, demo-weights flag, defaults, limits, loaded LoRAs

Every refusal is a JSON error object `{"error": {"message", "type", "param", "code"}}` with a 4xx status;
an unexpected fault is a 500 with the same shape and no traceback (the log has it).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyvideo.server.schema import RequestError
from hyvideo.server.service import Service
from hyvideo.server.store import QueueFull

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # every field but an I2V server's "image"
MAX_LIST = 100
_JOB_ID = re.compile(r"^video_[0-9a-f]{24}$")
# Form fields arrive as text: these are converted before the same checks as JSON.
_INT_FIELDS = ("steps", "seed", "n", "frames")
_FLOAT_FIELDS = ("guidance_scale", "embedded_guidance_scale", "flow_shift")
_JSON_FIELDS = ("loras",)  # an object in JSON; a form field carries it as JSON text


class ApiError(Exception):
    """A refusal with its HTTP status."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_body(message: str, *, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(service: Service) -> FastAPI:
    """The FastAPI app with the /v1 routes and JSON error handlers (the page is mounted by the caller)."""
    app = FastAPI(title="hyvideo", docs_url="/v1/docs", openapi_url="/v1/openapi.json", redoc_url=None)
    app.include_router(_router(service), prefix="/v1", dependencies=[Depends(_auth(service.token))])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(str(exc), code=exc.code, param=exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return JSONResponse(error_body(f"{where or 'request'}: {first.get('msg', 'invalid value')}",
                                       param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error; the server log has the details",
                                       kind="server_error"), status_code=500)

    return app


def _auth(token: str | None):
    async def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                           code="unauthorized")

    return check


def _router(service: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/videos")
    async def create_video(request: Request):
        body = await _read_body(request, body_limit(service))
        try:
            job = service.submit(body)
        except RequestError as exc:
            raise ApiError(400, str(exc), code="invalid_request") from None
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from None
        return JSONResponse(service.describe(job), status_code=200)

    @router.get("/videos")
    async def list_videos(limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= MAX_LIST:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIST}, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        if after is not None:
            _job(service, after)
        jobs = service.store.list(limit=limit + 1, after=after, newest_first=order == "desc")
        data = [service.describe(j) for j in jobs[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    @router.get("/videos/{video_id}")
    async def get_video(video_id: str):
        return service.describe(_job(service, video_id))

    @router.get("/videos/{video_id}/content")
    async def get_content(video_id: str, variant: str = "video", index: int = 0):
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not offered; only 'video'", param="variant")
        return _file(service, video_id, index, ".mp4", "video/mp4")

    @router.get("/videos/{video_id}/sidecar")
    async def get_sidecar(video_id: str, index: int = 0):
        return _file(service, video_id, index, ".json", "application/json")

    @router.post("/videos/{video_id}/cancel")
    async def cancel_video(video_id: str):
        _job(service, video_id)
        return service.describe(service.store.request_cancel(video_id))

    @router.delete("/videos/{video_id}")
    async def delete_video(video_id: str):
        _job(service, video_id)
        service.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @router.get("/server")
    async def server_info():
        return service.server_info()

    return router


def body_limit(service: Service) -> int:
    """The largest request body: the fields, plus on an I2V server the image as base64 (4 chars per 3 bytes)
    with its data URL prefix, so that an image within --max-image-bytes always fits."""
    if service.i2v_resolution is None:
        return MAX_BODY_BYTES
    return MAX_BODY_BYTES + 4 * (service.limits.max_image_bytes // 3 + 1) + 64


async def _read_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="too_large")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=limit)  # Starlette's default (1 MiB) is below an image
        if any(not isinstance(v, str) for v in form.values()):
            raise ApiError(400, "file uploads (input_reference) are not supported: send an image-to-video "
                           "server's image as a data URL in the text field image", param="input_reference")
        return _typed_form(dict(form))
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object") from None


def _typed_form(form: dict[str, str]) -> dict[str, Any]:
    for names, kind in ((_INT_FIELDS, int), (_FLOAT_FIELDS, float)):
        for name in names:
            if name in form:
                try:
                    form[name] = kind(form[name])
                except ValueError:
                    raise ApiError(400, f"{name} must be a number, got {form[name]!r}", param=name) from None
    for name in _JSON_FIELDS:
        if name in form:
            try:
                form[name] = json.loads(form[name])
            except json.JSONDecodeError:
                raise ApiError(400, f'{name} must be a JSON object such as {{"name": 0.8}} in a form field',
                               param=name) from None
    return form


def _job(service: Service, video_id: str):
    job = service.store.get(video_id) if _JOB_ID.match(video_id) else None
    if job is None:
        raise ApiError(404, f"no video {video_id!r} (deleted, or never created here)", code="not_found")
    return job


def _file(service: Service, video_id: str, index: int, suffix: str, media_type: str) -> FileResponse:
    job = _job(service, video_id)
    if job.status != "completed":
        raise ApiError(409, f"video {video_id} is {job.status}, not completed: poll GET "
                            f"/v1/videos/{video_id}",
                       code="not_ready")
    path = service.output_file(job, index, suffix)
    if path is None:
        raise ApiError(404, f"video {video_id} has no file {index} (it has {len(job.outputs)}; the file may "
                            "have been removed from the output folder)", param="index")
    return FileResponse(path, media_type=media_type, filename=path.name)
