"""Stand-in judges speaking the OpenAI chat completions API, with closed-form answers: for
``vlm_judge``, a probability of "Yes" equal to the image's mean brightness; for the RationalRewards
judges, a rubric judgement whose scores are functions of the images' brightness."""

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


async def recorded(state: dict, request: Request, seconds: float) -> dict:
    """The request's JSON body, recorded in ``state`` with its auth header, after ``seconds`` of
    "thinking" counted as in flight (so tests can see how many requests overlap)."""
    body = await request.json()
    state["bodies"].append(body)
    state["auth"].append(request.headers.get("authorization"))
    state["inflight"] += 1
    state["max_inflight"] = max(state["max_inflight"], state["inflight"])
    await asyncio.sleep(seconds)
    state["inflight"] -= 1
    return body


def scripted_failure(state: dict, text: str) -> JSONResponse | None:
    """The failure a request's text asks for: "broken" always 500, "flaky" 503 twice (then None,
    an answer), else None."""
    if "broken" in text:
        return JSONResponse({"error": "judge crashed"}, status_code=500)
    if "flaky" in text:
        state["flaky"] += 1
        if state["flaky"] <= 2:
            return JSONResponse({"error": "overloaded"}, status_code=503)
    return None


async def image_question(state: dict, request: Request, seconds: float):
    """``(png bytes, question text, None)`` of a one-image request, recorded as :func:`recorded`
    does, or ``(None, None, failure)`` when the question asks for one (:func:`scripted_failure`)."""
    body = await recorded(state, request, seconds)
    image_part, text_part = body["messages"][0]["content"]
    question = text_part["text"]
    failure = scripted_failure(state, question)
    if failure is not None:
        return None, None, failure
    return base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1]), question, None


def judge_app(state: dict) -> FastAPI:
    """p(Yes) = the image's mean brightness, answered as " yes" and "Yes" halves (canonicalization
    must add them up); prompts containing "riddle" get neither answer; "flaky" fails twice with
    503; "broken" always fails with 500."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        png, question, failure = await image_question(state, request, 0.05)
        if failure is not None:
            return failure
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


def _brightness(data_url: str) -> float:
    png = base64.b64decode(data_url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64).mean() / 255.0)


def rational_scores(judged: float, source: float | None, quoted: bool) -> dict[str, float | None]:
    """The stand-in RationalRewards judge's scores (1-4) of an image of mean brightness ``judged``
    (``source``: the source image's, for an edit), as :func:`rational_app` writes them; text
    rendering is N/A unless the prompt quotes text."""
    scores = {"text_faithfulness": 1 + 3 * judged, "physical_quality": 1 + 3 * judged ** 2,
              "text_rendering": 4.0 if quoted else None}
    if source is not None:
        scores["image_faithfulness"] = 4 - 3 * abs(judged - source)
    return scores


def rational_app(state: dict) -> FastAPI:
    """A RationalRewards stand-in: it writes a judgement in the rubric's format whose scores are
    :func:`rational_scores` of the last image shown (the judged one) and the first (the source,
    when there are two or more). The analysis before the judgement and the summary after it carry
    decoy scores on lines of their own. Prompts with "riddle" get prose without scores, "empty
    reply" an empty reply, "truncated" the first aspect only, cut off at max_tokens; "flaky" fails
    twice with 503, "broken" always with 500."""
    app = FastAPI()
    headings = {"text_faithfulness": "Text Faithfulness", "image_faithfulness": "Image Faithfulness",
                "physical_quality": "Physical and Visual Quality", "text_rendering": "Text Rendering"}

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await recorded(state, request, 0.02)
        parts = body["messages"][-1]["content"]
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        failure = scripted_failure(state, text)
        if failure is not None:
            return failure
        finish = "stop"
        if "riddle" in text:
            reply = "# User Request Analysis\nI cannot tell what is asked.\n# Summary: none"
        elif "empty reply" in text:
            reply = ""
        else:
            source = _brightness(urls[0]) if len(urls) > 1 else None
            scores = rational_scores(_brightness(urls[-1]), source, '"' in text.split("Instruction:")[-1][:200])
            lines = ["# User Request Analysis", "1. Text Faithfulness:", "## Score: 1", "# Detailed Judgement"]
            for k, (aspect, value) in enumerate(scores.items(), 1):
                lines += [f"{k}. {headings[aspect]}:", "## Justification: looked closely.",
                          f"## Score: {'N/A' if value is None else f'{value:.6f}'}"]
            lines += ["# Summary: fine.", "## Score: 1", "# User Request Refinement:", "## Refined Request: more"]
            if "truncated" in text:  # cut off after the first aspect
                lines, finish = lines[:7], "length"
            reply = "\n".join(lines)
        return {"choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": finish}]}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "RationalRewards-8B-T2I"}]}

    return app


def score_app(state: dict) -> FastAPI:
    """A judge that rates on a scale: it reasons first (quoting the answer format with a decoy
    score), then writes ``Final Score: {1 + 4 b}`` for an image of mean brightness b, or, when the
    question says "Rating:", ``Rating: {round(10 b)}``. Prompts with "riddle" get prose without a
    score, "offscale" a score of 9; "flaky" fails twice with 503, "broken" always with 500. The
    image's size is recorded in ``state["sizes"]``."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        png, question, failure = await image_question(state, request, 0.02)
        if failure is not None:
            return failure
        image = Image.open(io.BytesIO(png)).convert("RGB")
        state.setdefault("sizes", []).append(image.size)
        b = float(np.asarray(image, dtype=np.float64).mean() / 255.0)
        if "riddle" in question:
            reply = "I cannot judge this image."
        elif "Rating:" in question:
            reply = f"Looked at it. Rating: {round(10 * b)}"
        else:
            score = 9.0 if "offscale" in question else 1 + 4 * b
            reply = f"I must answer as 'Final Score: 1' after weighing both criteria.\nFinal Score: {score:.4f}"
        return {"choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "UnifiedReward-7b-v1.5"}]}

    return app
