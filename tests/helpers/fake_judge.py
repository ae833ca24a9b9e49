"""A stand-in VLM judge speaking the OpenAI chat completions API (for ``vlm_judge``'s tests): its
probability of "Yes" is the image's mean brightness, so the reward has a closed form."""

from __future__ import annotations

import asyncio
import base64
import io
import math

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image


def judge_state() -> dict:
    """What :func:`judge_app` records: request bodies, auth headers, requests in flight."""
    return {"bodies": [], "auth": [], "inflight": 0, "max_inflight": 0, "flaky": 0}


def judge_app(state: dict) -> FastAPI:
    """p(Yes) = the image's mean brightness, answered as " yes" and "Yes" halves (canonicalization
    must add them up); prompts containing "riddle" get neither answer; "flaky" fails twice with
    503; "broken" always fails with 500."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        state["bodies"].append(body)
        state["auth"].append(request.headers.get("authorization"))
        state["inflight"] += 1
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        await asyncio.sleep(0.05)
        state["inflight"] -= 1
        image_part, text_part = body["messages"][0]["content"]
        question = text_part["text"]
        if "broken" in question:
            return JSONResponse({"error": "judge crashed"}, status_code=500)
        if "flaky" in question:
            state["flaky"] += 1
            if state["flaky"] <= 2:
                return JSONResponse({"error": "overloaded"}, status_code=503)
        png = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
        b = float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64).mean() / 255.0)
        if "riddle" in question:
            alternatives = [{"token": "Maybe", "logprob": -0.1}, {"token": "Perhaps", "logprob": -2.0}]
        else:
            alternatives = [{"token": "Yes", "logprob": math.log(b / 2)}, {"token": " yes", "logprob": math.log(b / 2)},
                            {"token": "No", "logprob": math.log(1 - b)}, {"token": "The", "logprob": -30.0}]
        return {"choices": [{"message": {"role": "assistant", "content": alternatives[0]["token"]},
                             "logprobs": {"content": [{"token": alternatives[0]["token"],
                                                       "logprob": alternatives[0]["logprob"],
                                                       "top_logprobs": alternatives}]}}]}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "judge"}]}

    return app
