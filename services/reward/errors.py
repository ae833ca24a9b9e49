"""The one error type the reward server's handlers raise; it becomes ``{"error": message}``.

Both protocols answer errors as JSON ``{"error": "..."}`` (the v2 spec's error object, and
what Flow-Factory's client turns into a ``RuntimeError``). Status codes:

* 400: the body cannot be parsed (bad JSON, broken binary framing, bad compression);
* 401: missing or wrong bearer token;
* 404: unknown model;
* 413: body larger than ``max_request_bytes`` (or an image above ``max_image_pixels``);
* 422: parsed but invalid (missing input, wrong datatype/shape, undecodable image,
  mismatched lengths, inputs the reward rejects);
* 500: the reward model failed or returned NaN/inf (the message names the reward and sample);
* 503: the model is still loading, failed to load, or its queue is full (``Retry-After`` set).
"""

from __future__ import annotations

import json
from typing import Any


class RequestError(Exception):
    """An HTTP error with a teaching message.

    Args:
        status: the HTTP status code.
        message: what was wrong and how to fix it (sent to the client as ``{"error": message}``).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def parse_json(body: bytes, hint: str = "") -> Any:
    """``body`` as JSON, or a 400 naming the problem (``hint`` is appended to the message).

    Nesting deeper than Python's recursion limit is a 400 too, not a RecursionError (500)."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}{hint}") from None
    except RecursionError:
        raise RequestError(400, "request body is JSON nested too deeply to parse; send the documented "
                                "shape (lists of strings / integers)") from None
