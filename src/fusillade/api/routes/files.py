"""`/v1/files`: upload (streamed, validated, then stored), list, retrieve, download and delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from fusillade import errors
from fusillade.api import schemas
from fusillade.api.auth import Caller
from fusillade.api.context import context_of
from fusillade.api.errors import ApiError
from fusillade.api.uploads import MultipartUpload, check_declared_size
from fusillade.domain import ids, states

router = APIRouter(prefix="/v1/files", tags=["files"], responses=schemas.ERROR_RESPONSES)

CONTENT_TYPE = "application/jsonl"
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["purpose", "file"],
                    "properties": {
                        "purpose": {"type": "string", "enum": ["batch"]},
                        "file": {"type": "string", "format": "binary", "description": "The JSONL input file."},
                    },
                }
            }
        },
    }
}
"""The body as OpenAPI describes it (the route reads the stream itself, so FastAPI cannot infer it)."""


@router.post("", response_model=schemas.FileObject, summary="Upload a batch input file", openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, caller: Caller) -> schemas.FileObject:
    """multipart/form-data with `purpose=batch` and `file` (JSONL). The file is streamed to disk and checked
    line by line; a bad file is refused with every bad line's number (400), and nothing is stored. A body whose
    `Content-Length` is over the file size limit is refused (400) before it is read."""
    service = context_of(request).service
    check_declared_size(request.headers.get("content-length"), service.limits.max_bytes)
    upload = MultipartUpload(request.headers.get("content-type"), request.stream().__aiter__())
    try:
        filename = await upload.open_file()
        file = await service.upload_file(owner=caller.owner, filename=filename, chunks=upload.file_chunks())
    except errors.ValidationError:
        await upload.drain(service.limits.max_bytes)
        raise
    return schemas.FileObject.of(file)


@router.get("", response_model=schemas.FileList, summary="List files")
async def list_files(
    request: Request,
    caller: Caller,
    purpose: Annotated[states.FilePurpose | None, Query()] = None,
    after: Annotated[str | None, Query(description="Id of the last file of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> schemas.FileList:
    """Input files (`batch`) and batch results (`batch_output`, `batch_error`), by creation time."""
    try:
        cursor = ids.parse_file_id(after) if after is not None else None
        page = await context_of(request).service.list_files(
            owner=caller.scope, purpose=purpose, after=cursor, limit=limit, order=order
        )
    except errors.NotFound as exc:
        raise ApiError(400, f"after: {exc.message}", code="invalid_value", param="after") from exc
    data = [schemas.FileObject.of(file) for file in page.items]
    return schemas.FileList(data=data, **schemas.ListEnvelope.cursors(data, has_more=page.has_more))


@router.get("/{file_id}", response_model=schemas.FileObject, summary="Retrieve a file")
async def retrieve_file(request: Request, caller: Caller, file_id: str) -> schemas.FileObject:
    file = await context_of(request).service.get_file(ids.parse_file_id(file_id), owner=caller.scope)
    return schemas.FileObject.of(file)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "The file's JSONL lines."}},
    summary="Download a file's content",
)
async def file_content(request: Request, caller: Caller, file_id: str) -> StreamingResponse:
    """Streamed from the database page by page. Output and error files hold the lines of the requests finished
    so far, so they can be read while the batch runs."""
    chunks = await context_of(request).service.open_file_content(ids.parse_file_id(file_id), owner=caller.scope)
    return StreamingResponse(chunks, media_type=CONTENT_TYPE)


@router.delete("/{file_id}", response_model=schemas.FileDeleted, summary="Delete a file")
async def delete_file(request: Request, caller: Caller, file_id: str) -> schemas.FileDeleted:
    """Batches already created from an input file keep running."""
    await context_of(request).service.delete_file(ids.parse_file_id(file_id), owner=caller.scope)
    return schemas.FileDeleted(id=file_id)
