"""Reading one uploaded image from a request into memory, within a size limit, and checking what it is.

The body is read as it streams in and counted: a declared `Content-Length` over the limit is refused
before any byte is read, and a body that grows past it is refused at that byte. Nothing is written to
disk (Starlette's own form parser spools files over 1 MB to a temporary file, so multipart bodies are
parsed here with python-multipart's streaming parser). The client's file name is never used.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

MB = 1 << 20
# multipart framing around the file: boundaries, part headers and a few small fields
MULTIPART_SLACK = 64 * 1024
MAX_FIELD_BYTES = 1024
FORMATS = ("png", "jpeg", "dicom")


class UploadError(Exception):
    """A request the server refuses: HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def too_large(limit: int) -> UploadError:
    return UploadError(413, f"upload is larger than the limit of {format_size(limit)}; send a smaller file")


def format_size(n: int) -> str:
    return f"{n / MB:g} MB ({n:,} bytes)" if n >= MB else f"{n:,} bytes"


def sniff(data: bytes | bytearray) -> str | None:
    """'png', 'jpeg' or 'dicom' from the first bytes (DICOM: 'DICM' after the 128-byte preamble)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def check_content(data: bytes | bytearray) -> str:
    """The upload's format, or a 400 (empty) / 415 (anything but PNG, JPEG, DICOM)."""
    if not data:
        raise UploadError(400, "empty upload: send a PNG, JPEG or DICOM file")
    fmt = sniff(data)
    if fmt is None:
        raise UploadError(
            415,
            "unsupported file type: expected PNG, JPEG or DICOM (with the 'DICM' marker at byte 128), "
            "judged by the file's first bytes",
        )
    return fmt


async def read_upload(request: Request, limit: int) -> bytearray:
    """The uploaded file's bytes: the form field `file` of a multipart/form-data body, or the whole
    body for any other content type (e.g. `curl --data-binary @x.png -H 'Content-Type: image/png'`)."""
    from python_multipart.multipart import parse_options_header

    mime, params = parse_options_header(request.headers.get("content-type", ""))
    multipart = mime == b"multipart/form-data"
    bound = limit + (MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise UploadError(400, "malformed Content-Length header") from None
        if n > bound:
            raise too_large(limit)
    try:
        if multipart:
            return await _read_multipart(request, params.get(b"boundary"), limit, bound)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(limit)
        return body
    except ClientDisconnect:
        raise UploadError(400, "the client disconnected during the upload") from None


async def _read_multipart(request: Request, boundary: bytes | None, limit: int, bound: int) -> bytearray:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary: let the client build the form")
    state = {"field": bytearray(), "value": bytearray(), "headers": {}, "sink": None, "ended": False}
    file: bytearray | None = None
    fields = 0

    def on_part_begin() -> None:
        state["headers"] = {}
        state["sink"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][bytes(state["field"]).lower()] = bytes(state["value"])
        state["field"], state["value"] = bytearray(), bytearray()

    def on_headers_finished() -> None:
        nonlocal file, fields
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disp.get(b"name") == b"file" or b"filename" in disp:
            if file is not None:
                raise UploadError(400, "more than one file in the form: send one image per request")
            file = bytearray()
            state["sink"] = file
        else:  # other fields are read (bounded) and ignored: options travel in the query string
            fields += 1
            if fields > 16:
                raise UploadError(400, "too many form fields: send the image as the field 'file'")
            state["sink"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        sink = state["sink"]
        sink += data[start:end]
        if sink is file and len(sink) > limit:
            raise too_large(limit)
        if sink is not file and len(sink) > MAX_FIELD_BYTES:
            raise UploadError(400, f"a form field other than 'file' is over {MAX_FIELD_BYTES} bytes")

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_end": on_end,
        },
    )
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > bound:
            raise too_large(limit)
        try:
            parser.write(chunk)
        except MultipartParseError:
            raise UploadError(400, "malformed multipart/form-data body") from None
    if not state["ended"]:
        raise UploadError(400, "incomplete multipart/form-data body (no closing boundary)")
    if file is None:
        raise UploadError(400, "no file in the form: send the image as the field 'file' (curl -F file=@x.png)")
    return file
