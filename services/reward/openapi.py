"""Request bodies in the reward server's OpenAPI document (``GET /openapi.json``).

The scoring routes read their body themselves (size limit, decompression, the v2 binary
extension), so FastAPI cannot infer a body schema from their signatures; :func:`json_body`
writes it from the same pydantic models the parsers validate with. The document is what
clients and the fuzz test (``tests/services/test_reward_fuzz.py``, schemathesis) read.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions (non-recursive models)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(copy.deepcopy(defs[ref.rsplit("/", 1)[1]]))
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def json_body(model: type[BaseModel], *, binary: bool = False) -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON body shaped like ``model``.

    ``binary``: also accept ``application/octet-stream`` (v2's binary tensor extension: the JSON
    header, then raw tensor bytes; header length in ``Inference-Header-Content-Length``).
    """
    content: dict[str, Any] = {"application/json": {"schema": _inline(model.model_json_schema())}}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}
