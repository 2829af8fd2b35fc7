"""The stand-in against the recordings of a real ComfyUI 0.8.0 (shared/comfyui/transcripts).

Each test replays one recorded scenario and checks message types, their order and payload keys,
and HTTP status codes and body keys, against the transcript. Where a recording depended on timing
(how long ImageBlur took before an interrupt landed), the stand-in's hold gate parks the prompt on
the same node, so the replay reaches the same state without sleeping.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from PIL import Image

from tests.fakes.comfyui import Standin
from tests.fakes.comfyui.recorder import WsRecorder
from tests.fakes.comfyui.transcripts import (
    LOCAL,
    assert_same_messages,
    assert_same_shape,
    between,
    flatten,
    load,
    node_block,
    of_prompt,
    recorded_http,
    split_markers,
    type_names,
)

CLIENT = "standin-contract-client"


@pytest_asyncio.fixture
async def http(standin: Standin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=standin.url, timeout=10) as client:
        yield client


@pytest_asyncio.fixture
async def ws(standin: Standin) -> AsyncIterator[WsRecorder]:
    async with WsRecorder(standin.url, CLIENT) as recorder:
        yield recorder


def body_for(request: dict[str, Any], client_id: str | None = CLIENT) -> dict[str, Any]:
    """A recorded POST /prompt body, re-addressed to our socket."""
    body = copy.deepcopy(request)
    if "client_id" in body:
        if client_id is None:
            del body["client_id"]
        else:
            body["client_id"] = client_id
    return body


def check_http(
    recorded: dict[str, Any],
    response: httpx.Response,
    *,
    shape: bool = True,
    ids: dict[str, str] | None = None,
) -> None:
    """Status, content type and body shape as recorded; ``ids`` renames recorded prompt ids (history
    bodies are keyed by them)."""
    assert response.status_code == recorded["status"], recorded.get("note")
    expected_type = recorded["content_type"]
    if expected_type in (
        "application/json; charset=utf-8",
        "image/png",
        "image/webp",
        "text/plain; charset=utf-8",
    ):
        assert response.headers.get("content-type") == expected_type
    if "content_disposition" in recorded:
        assert response.headers.get("content-disposition") == recorded["content_disposition"]
    body = recorded.get("response_body")
    ids = dict(ids or {})
    recorded_path = recorded["path"].split("?")[0]
    if recorded_path.startswith(("/history/", "/api/jobs/")):
        ids[recorded_path.rsplit("/", 1)[1]] = response.request.url.path.rsplit("/", 1)[1]
    for theirs, mine in ids.items():
        body = json.loads(json.dumps(body).replace(theirs, mine))
    if shape and isinstance(body, dict | list):
        assert_same_shape(body, response.json())
    elif body == "":
        assert response.content == b""


async def post_prompt(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await http.post("/prompt", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["prompt_id"])


async def history(http: httpx.AsyncClient, prompt_id: str) -> dict[str, Any]:
    response = await http.get(f"/history/{prompt_id}")
    assert response.status_code == 200
    return dict(response.json())


def only_entry(history_response: dict[str, Any]) -> dict[str, Any]:
    assert len(history_response) == 1
    return dict(next(iter(history_response.values())))


# --- 01 -------------------------------------------------------------------------------------------


async def test_01_empty_image_save(standin: Standin, http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("01_empty_image_save")
    recorded_post = recorded_http(t, "/prompt", "POST")
    response = await http.post("/prompt", json=body_for(t["request"]))
    check_http(recorded_post, response)
    prompt_id = response.json()["prompt_id"]
    await ws.wait_done(prompt_id)

    # The whole socket, greeting included, message for message.
    assert_same_messages(flatten(t["ws_messages"]), ws.messages)

    recorded_pid = recorded_post["response_body"]["prompt_id"]
    h = await http.get(f"/history/{prompt_id}")
    check_http(recorded_http(t, "/history/"), h)
    assert h.json()[prompt_id]["outputs"] == t["history"][recorded_pid][recorded_pid]["outputs"]
    check_http(recorded_http(t, "/api/jobs/"), await http.get(f"/api/jobs/{prompt_id}"))
    for exchange in t["http_responses"]:
        if (
            exchange["path"].startswith(("/view", "/queue", "/prompt", "/api/prompt"))
            and exchange["method"] == "GET"
        ):
            check_http(exchange, await http.get(exchange["path"]))
    assert (standin.output_dir / "lab" / "empty_00001_.png").is_file()


# --- 02 -------------------------------------------------------------------------------------------


def _two_colour_png(width: int = 80, height: int = 60) -> bytes:
    img = Image.new("RGB", (width, height), (0, 255, 0))
    img.paste((255, 0, 0), (width // 2, 0, width, height))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_02_upload_invert_scale_and_cache(
    standin: Standin, http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("02_upload_invert_scale")
    uploads = [h for h in t["http_responses"] if h["path"] == "/upload/image"]
    png = _two_colour_png()
    other = _two_colour_png(81, 60)
    calls = [
        ({"type": "input", "subfolder": "lab", "overwrite": "true"}, ("lab_upload.png", png)),
        ({"type": "input", "subfolder": "lab"}, ("lab_upload.png", png)),
        ({"type": "input", "subfolder": "lab"}, ("lab_upload.png", other)),
        ({"type": "input"}, ("..%2Fevil.png", png)),  # what the recording's client put on the wire
    ]
    for recorded, (form, file) in zip(uploads, calls, strict=False):
        response = await http.post("/upload/image", data=form, files={"image": file})
        check_http(recorded, response)
        assert response.json() == recorded["response_body"], recorded["note"]
    check_http(
        uploads[4], await http.post("/upload/image", data={"type": "input"}, files={"other": ("x", b"x")})
    )
    # A real traversal in the name is refused.
    refused = await http.post(
        "/upload/image", data={"subfolder": "../.."}, files={"image": ("evil.png", png)}
    )
    assert refused.status_code == 400

    requests = t["request"]
    first = await post_prompt(http, body_for(requests[0]))
    await ws.wait_done(first)
    second = await post_prompt(http, body_for(requests[1]))
    await ws.wait_done(second)

    recorded = flatten(t["ws_messages"])
    recorded_posts = [h for h in t["http_responses"] if h["path"] == "/prompt" and h["method"] == "POST"]
    for mine, rec in zip((first, second), recorded_posts, strict=True):
        assert_same_messages(of_prompt(recorded, rec["response_body"]["prompt_id"]), ws.of_prompt(mine))
        rec_history = t["history"][rec["response_body"]["prompt_id"]][rec["response_body"]["prompt_id"]]
        mine_history = only_entry(await history(http, mine))
        assert_same_shape(rec_history, mine_history)
        assert mine_history["outputs"] == rec_history["outputs"]

    # The cached run wrote nothing new and replayed the first file.
    assert sorted(p.name for p in (standin.output_dir / "lab").iterdir()) == ["inverted_00001_.png"]
    view = await http.get(
        "/view", params={"filename": "inverted_00001_.png", "subfolder": "lab", "type": "output"}
    )
    check_http(recorded_http(t, "/view?filename=inverted"), view)
    out = Image.open(io.BytesIO(view.content))
    assert (out.size, out.mode) == ((128, 96), "RGB")
    assert out.getpixel((10, 10)) == (255, 0, 255)  # green inverted
    assert out.getpixel((120, 50)) == (0, 255, 255)  # red inverted
    check_http(
        recorded_http(t, "/view?filename=lab_upload"),
        await http.get(recorded_http(t, "/view?filename=lab_upload")["path"]),
    )


# --- 03 -------------------------------------------------------------------------------------------


def _without_traceback(body: Any) -> Any:
    text = json.dumps(body)
    data = json.loads(text)
    for node in (data.get("node_errors") or {}).values():
        for error in node["errors"]:
            error["extra_info"].pop("traceback", None)
    return data


async def test_03_validation_errors(standin: Standin, http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("03_validation_errors")
    posts = [h for h in t["http_responses"] if h["path"] == "/prompt" and h["method"] == "POST"]
    accepted = None
    for recorded in posts:
        if "request_body_raw" in recorded:
            response = await http.post(
                "/prompt", content=recorded["request_body_raw"], headers=recorded["request_headers"]
            )
            check_http(recorded, response)
            assert response.text == recorded["response_body"]
            continue
        response = await http.post("/prompt", json=body_for(recorded["request_body"]))
        check_http(recorded, response)
        if recorded["status"] == 400:
            assert _without_traceback(response.json()) == _without_traceback(recorded["response_body"]), (
                recorded["note"]
            )
        else:
            assert response.json()["node_errors"] == recorded["response_body"]["node_errors"]
            # Rejected prompts moved the counter too (the malformed one never got that far).
            assert response.json()["number"] == 9
            accepted = response.json()["prompt_id"]
    assert accepted is not None
    await ws.wait_done(accepted)
    assert_same_messages(flatten(t["ws_messages"]), ws.messages)
    entry = only_entry(await history(http, accepted))
    assert entry["prompt"][4] == ["2"]  # only the valid output ran
    assert sorted(p.name for p in (standin.output_dir / "lab").iterdir()) == ["partial_ok_00001_.png"]


# --- 04 -------------------------------------------------------------------------------------------


async def test_04_runtime_error(standin: Standin, http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("04_runtime_error")
    upload = await http.post(
        "/upload/image", data={"type": "input"}, files={"image": ("corrupt.png", b"not an image")}
    )
    check_http(recorded_http(t, "/upload/image", "POST"), upload)
    prompt_id = await post_prompt(http, body_for(t["request"]))
    await ws.wait_done(prompt_id)
    assert_same_messages(flatten(t["ws_messages"]), ws.messages)

    error = next(m["data"] for m in ws.messages if m["kind"] == "text" and m["type"] == "execution_error")
    assert list(error) == list(
        next(m["msg"]["data"] for m in t["ws_messages"] if m.get("msg", {}).get("type") == "execution_error")
    )
    assert (error["node_id"], error["node_type"], error["executed"]) == ("3", "LoadImage", [])
    assert error["exception_type"] == "PIL.UnidentifiedImageError"
    assert error["exception_message"].startswith("cannot identify image file") and error[
        "exception_message"
    ].endswith("\n")
    assert error["current_inputs"] == {"image": ["corrupt.png"]}

    h = await http.get(f"/history/{prompt_id}")
    check_http(recorded_http(t, "/history/"), h)
    assert h.json()[prompt_id]["outputs"] == {}  # the other branch never ran
    job = await http.get(f"/api/jobs/{prompt_id}")
    check_http(recorded_http(t, "/api/jobs/"), job)
    assert list(job.json()) == list(recorded_http(t, "/api/jobs/")["response_body"])
    assert job.json()["status"] == "failed"
    assert not (standin.output_dir / "lab").exists()


# --- 05 and 14: progress, SaveImageWebsocket frames, a sampler's steps and previews -----------------


async def test_05_slow_chain_then_websocket_images(http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("05_slow_chain_and_ws_images")
    recorded = flatten(t["ws_messages"])
    posts = [h for h in t["http_responses"] if h["path"] == "/prompt" and h["method"] == "POST"]
    for request, post in zip(t["request"], posts, strict=True):
        prompt_id = await post_prompt(http, body_for(request))
        await ws.wait_done(prompt_id)
        expected = of_prompt(recorded, post["response_body"]["prompt_id"], binary=True)
        assert_same_messages(expected, ws.of_prompt(prompt_id, binary=True))
    frames = [m["binary"] for m in ws.messages if m["kind"] == "binary"]
    assert [(f["event_type"], f["image_format"]) for f in frames] == [(1, "PNG")] * 4  # no flags negotiated
    assert all(Image.open(io.BytesIO(f["image"])).size == (32, 32) for f in frames)


SAMPLER_PROMPT: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
    "3": {
        "class_type": "StandinSlowSampler",
        "inputs": {"image": ["1", 0], "steps": 2, "seconds_per_step": 0.0},
    },
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "lab/sampler"}},
}


async def test_14_sampler_progress_and_previews_like_ksampler(
    http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("14_sd15_random_weights_ksampler")
    recorded = flatten(t["ws_messages"])
    first_run = t["http_responses"][0]["response_body"]["prompt_id"]
    expected = node_block(of_prompt(recorded, first_run, binary=True), "3")
    body = {"prompt": SAMPLER_PROMPT, "client_id": CLIENT, "extra_data": {"preview_method": "latent2rgb"}}
    prompt_id = await post_prompt(http, body)
    await ws.wait_done(prompt_id)
    block = node_block(ws.of_prompt(prompt_id, binary=True), "3")
    assert type_names(block) == type_names(expected)
    for theirs, mine in zip(expected, block, strict=True):
        if theirs["kind"] == "text" and theirs["type"] == "progress_state":
            # Other nodes differ between the graphs; the sampler's own entry must not.
            assert_same_shape(theirs["data"]["nodes"]["3"], mine["data"]["nodes"]["3"])
        elif theirs["kind"] == "text":
            assert_same_shape(theirs["data"], mine["data"])
    frames = [m["binary"] for m in block if m["kind"] == "binary"]
    assert [(f["event_type"], f["image_format"]) for f in frames] == [(1, "JPEG")] * 2
    progress = [m["data"] for m in block if m["kind"] == "text" and m["type"] == "progress"]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 2), (2, 2)]  # like KSampler: steps 1..n

    # Without preview_method there are no frames at all (previews are off by default).
    quiet = {
        "prompt": {
            **SAMPLER_PROMPT,
            "1": {**SAMPLER_PROMPT["1"], "inputs": {**SAMPLER_PROMPT["1"]["inputs"], "color": 7}},
        }
    }
    prompt_id = await post_prompt(http, {**quiet, "client_id": CLIENT})
    await ws.wait_done(prompt_id)
    assert "BIN" not in type_names(node_block(ws.of_prompt(prompt_id, binary=True), "3"))


async def test_15_interrupt_within_a_sampler_step(
    standin: Standin, http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("15_interrupt_during_ksampler")
    recorded = flatten(t["ws_messages"])
    prompt = copy.deepcopy(SAMPLER_PROMPT)
    # One step takes far longer than the test: only an interrupt inside the step can end it.
    prompt["3"]["inputs"].update(steps=8, seconds_per_step=30.0)
    prompt_id = await post_prompt(http, {"prompt": prompt, "client_id": CLIENT})
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"].get("node") == "3")
    await http.post("/interrupt", json={"prompt_id": prompt_id})
    await ws.wait_done(prompt_id)
    expected = between(recorded, "execution_interrupted", "executing")
    start = next(
        i for i, m in enumerate(ws.messages) if m["kind"] == "text" and m["type"] == "execution_interrupted"
    )
    assert_same_messages(expected, ws.messages[start:])
    interrupted = ws.messages[start]["data"]
    assert (interrupted["node_id"], interrupted["node_type"], interrupted["executed"]) == (
        "3",
        "StandinSlowSampler",
        ["1"],
    )
    assert standin.log.interrupts[-1].stopped_prompt_id == prompt_id


# --- 06 -------------------------------------------------------------------------------------------


async def test_06_feature_flags_and_preview_metadata(standin: Standin, http: httpx.AsyncClient) -> None:
    t = load("06_feature_flags_preview_metadata")
    recorded = flatten(t["ws_messages"])
    async with WsRecorder(standin.url, CLIENT, feature_flags=True) as ws:
        await ws.wait_for(lambda m: m["type"] == "feature_flags")
        prompt_id = await post_prompt(http, body_for(t["request"]))
        await ws.wait_done(prompt_id)
        # The recording shows the frame racing its progress message; the order of text is fixed.
        assert_same_messages(recorded, ws.messages, binary=False)
        assert ws.messages[1]["data"] == recorded[1]["data"]
        frames = [m["binary"] for m in ws.messages if m["kind"] == "binary"]
        expected = [m["binary"] for m in recorded if m["kind"] == "binary"]
        assert len(frames) == len(expected) == 2
        for mine, rec in zip(frames, expected, strict=True):
            assert mine["event_type"] == 4
            assert mine["metadata"] == {**rec["metadata"], "prompt_id": prompt_id}
    features = await http.get("/features")
    check_http(recorded_http(t, "/features"), features)
    assert features.json() == recorded_http(t, "/features")["response_body"]


# --- 07 and 08: interrupts ------------------------------------------------------------------------


async def test_07_targeted_interrupt(standin: Standin, http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("07_interrupt_targeted")
    standin.hold("ImageBlur")
    prompt_id = await post_prompt(http, body_for(t["request"]))
    await standin.wait_held("100")
    other = await http.post("/interrupt", json={"prompt_id": "not-the-running-one"})
    check_http(recorded_http(t, "/interrupt", "POST", 0), other)
    for node in ("100", "101", "102"):  # the recording interrupted while node 103 ran
        await standin.release(1)
        await standin.wait_held(str(int(node) + 1))
    check_http(recorded_http(t, "/queue"), await http.get("/queue"))
    check_http(recorded_http(t, "/api/jobs/", occurrence=0), await http.get(f"/api/jobs/{prompt_id}"))
    targeted = await http.post("/interrupt", json={"prompt_id": prompt_id})
    check_http(recorded_http(t, "/interrupt", "POST", 1), targeted)
    await standin.release()
    await ws.wait_done(prompt_id)

    recorded = flatten(t["ws_messages"])
    recorded_pid = t["http_responses"][0]["response_body"]["prompt_id"]
    assert_same_messages(of_prompt(recorded, recorded_pid), ws.of_prompt(prompt_id))
    mine = next(
        m["data"] for m in ws.messages if m["kind"] == "text" and m["type"] == "execution_interrupted"
    )
    theirs = next(m["data"] for m in recorded if m["kind"] == "text" and m["type"] == "execution_interrupted")
    assert (mine["node_id"], sorted(mine["executed"])) == (theirs["node_id"], sorted(theirs["executed"]))
    check_http(recorded_http(t, "/history/"), await http.get(f"/history/{prompt_id}"))
    job = await http.get(f"/api/jobs/{prompt_id}")
    check_http(recorded_http(t, "/api/jobs/", occurrence=1), job)
    assert job.json()["status"] == "failed" and "execution_error" not in job.json()
    first, second = standin.log.interrupts
    assert (first.flag_set, first.stopped_prompt_id) == (False, None)
    assert (second.flag_set, second.stopped_prompt_id) == (True, prompt_id)


async def test_08_global_interrupt_spares_the_queue(
    standin: Standin, http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("08_interrupt_global")
    recorded = flatten(t["ws_messages"])
    posts = [h for h in t["http_responses"] if h["path"] == "/prompt" and h["method"] == "POST"]
    pids = [h["response_body"]["prompt_id"] for h in posts]
    standin.hold("ImageBlur")
    a = await post_prompt(http, body_for(t["request"][0]))
    await standin.wait_held("100")
    b = await post_prompt(http, body_for(t["request"][1]))
    assert (await http.post("/interrupt")).status_code == 200
    await standin.release()
    await ws.wait_done(b)
    for mine, theirs in ((a, pids[0]), (b, pids[1])):
        assert_same_messages(of_prompt(recorded, theirs), ws.of_prompt(mine))
    # An interrupt while idle does not leak into the next prompt (the flag resets at prompt start).
    assert (await http.post("/interrupt", json={})).status_code == 200
    c = await post_prompt(http, body_for(t["request"][2]))
    await ws.wait_done(c)
    assert_same_messages(of_prompt(recorded, pids[2]), ws.of_prompt(c))
    assert [r.stopped_prompt_id for r in standin.log.interrupts] == [a, None]


# --- 09 -------------------------------------------------------------------------------------------


async def test_09_queue_delete_and_clear(standin: Standin, http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("09_queue_delete_and_clear")
    recorded = flatten(t["ws_messages"])
    req = t["request"]
    ids = t["ids"]
    standin.hold("ImageBlur")
    a = await post_prompt(http, body_for(req[0]))
    await standin.wait_held("100")
    b, c, d = [await post_prompt(http, body_for(r)) for r in req[1:4]]
    queue = await http.get("/queue")
    check_http(recorded_http(t, "/queue", occurrence=0), queue)
    assert [row[1] for row in queue.json()["queue_running"]] == [a]
    assert sorted(row[1] for row in queue.json()["queue_pending"]) == sorted([b, c, d])
    listing = await http.get("/api/jobs")
    assert [j["status"] for j in listing.json()["jobs"]] == ["pending", "pending", "pending", "in_progress"]
    page = await http.get("/api/jobs?status=pending&sort_order=asc&limit=2")
    check_http(recorded_http(t, "/api/jobs?status=pending"), page)
    assert [j["id"] for j in page.json()["jobs"]] == [b, c]
    assert (
        page.json()["pagination"]
        == recorded_http(t, "/api/jobs?status=pending")["response_body"]["pagination"]
    )
    check_http(recorded_http(t, f"/api/jobs/{ids['B']}"), await http.get(f"/api/jobs/{b}"))

    mark = len(ws.messages)
    for path, payload in (
        ("/queue", {"delete": [b]}),
        ("/interrupt", {"prompt_id": c}),
        ("/queue", {"delete": [a]}),
        ("/queue", {"delete": ["no-such-id"]}),
    ):
        assert (await http.post(path, json=payload)).status_code == 200
    queue = await http.get("/queue")
    assert [row[1] for row in queue.json()["queue_pending"]] == [c, d]
    await ws.wait_for(lambda m: m["type"] == "status", start=mark)
    # Only the delete that removed something told the sockets.
    assert [
        m["data"]["status"]["exec_info"]["queue_remaining"] for m in ws.messages[mark:] if m["kind"] == "text"
    ] == [3]
    await standin.release()
    await ws.wait_done(d)
    for mine, theirs in ((c, ids["C"]), (d, ids["D"])):
        assert_same_messages(of_prompt(recorded, theirs), ws.of_prompt(mine))
    assert await history(http, b) == {}
    assert only_entry(await history(http, a))["status"]["status_str"] == "success"
    gone = await http.get(f"/api/jobs/{b}")
    check_http(recorded_http(t, f"/api/jobs/{ids['B']}", occurrence=1), gone)
    assert gone.json() == {"error": "Job not found"}
    assert [r.removed for r in standin.log.deletes] == [True, False, False]

    # Part two: clear everything pending behind a running prompt.
    standin.hold("ImageBlur")
    h = await post_prompt(http, body_for(req[4]))
    await standin.wait_held("100")
    rest = [await post_prompt(http, body_for(r)) for r in req[5:8]]
    check_http(recorded_http(t, "/queue", occurrence=2), await http.get("/queue"))
    assert (await http.post("/queue", json={"clear": True})).status_code == 200
    cleared = await http.get("/queue")
    assert cleared.json()["queue_pending"] == [] and [r[1] for r in cleared.json()["queue_running"]] == [h]
    await standin.release()
    await ws.wait_done(h)
    for prompt_id in rest:
        assert await history(http, prompt_id) == {}


# --- 10 -------------------------------------------------------------------------------------------


def _drained(m: dict[str, Any]) -> bool:
    """A status message saying the queue is empty again."""
    return bool(m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0)


async def test_10_client_id_routing(standin: Standin, http: httpx.AsyncClient) -> None:
    t = load("10_client_id_routing")
    recorded_x = split_markers(flatten(t["ws_messages"]))
    recorded_y = split_markers(flatten(t["other_ws_messages"]))
    async with WsRecorder(standin.url, "client-x") as x, WsRecorder(standin.url, "client-y") as y:
        phases: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
        for request, owner in zip(t["request"], ("client-x", None, "client-y"), strict=True):
            start_x, start_y = len(x.messages), len(y.messages)
            prompt_id = await post_prompt(http, body_for(request, owner))
            # Without a client_id nobody gets a done marker: watch the queue drain instead.
            await x.wait_for(_drained, start=start_x)
            await y.wait_for(_drained, start=start_y)
            if owner is not None:
                await (x if owner == "client-x" else y).wait_done(prompt_id)
            assert await history(http, prompt_id) != {}
            phases.append((x.messages[start_x:], y.messages[start_y:]))
    for phase, (mine_x, mine_y) in enumerate(phases):
        # Phase 0 of the recording starts with the greeting, which the recorder took before.
        skip = 1 if phase == 0 else 0
        assert_same_messages(recorded_x[phase][skip:], mine_x)
        assert_same_messages(recorded_y[phase][skip:], mine_y)


# --- 11 -------------------------------------------------------------------------------------------


async def test_11_prompt_id_priority_and_duplicates(
    standin: Standin, http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("11_client_prompt_id_and_priority")
    posts = [h for h in t["http_responses"] if h["path"] == "/prompt" and h["method"] == "POST"]
    standin.hold("ImageBlur")
    numbers = []
    for index, post in enumerate(posts):
        response = await http.post("/prompt", json=body_for(post["request_body"]))
        check_http(post, response)
        assert response.json()["prompt_id"] == post["response_body"]["prompt_id"]
        numbers.append(response.json()["number"])
        if index == 0:
            await standin.wait_held("100")
    # Same counter moves as recorded: 35, 36, 37, -38, -100.0 (explicit: no move), 39, 40.
    recorded_numbers = [p["response_body"]["number"] for p in posts]
    offset = recorded_numbers[0] - numbers[0]
    assert numbers == [
        n if isinstance(n, float) else (n - offset if n >= 0 else n + offset) for n in recorded_numbers
    ]
    assert [type(n) for n in numbers] == [type(n) for n in recorded_numbers]
    await standin.release()
    await ws.wait_for(
        lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0,
        start=len(ws.messages) - 1,
        timeout=20,
    )
    started = [
        m["data"]["prompt_id"] for m in ws.messages if m["kind"] == "text" and m["type"] == "execution_start"
    ]
    observed = re.search(r"observed execution order: (\[.*\])", " ".join(t["notes"]))
    assert observed is not None
    assert started == json.loads(observed.group(1).replace("'", '"'))
    dup = only_entry(await history(http, "job-dup"))
    assert dup["prompt"][2]["2"]["inputs"]["filename_prefix"] == "lab/p_dup_b"  # the later one overwrote


# --- 12 -------------------------------------------------------------------------------------------


async def test_12_reconnect_with_the_same_client_id(
    standin: Standin, http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("12_ws_reconnect_same_clientId")
    before, after = split_markers(flatten(t["ws_messages"]))[1:]
    standin.hold("ImageBlur")
    prompt_id = await post_prompt(http, body_for(t["request"]))
    await standin.wait_held("100")
    await ws.disconnect()
    await standin.release(2)  # 100 and 101 finish while nobody listens
    await standin.wait_held("102")
    mark = len(ws.messages)
    await ws.open()
    await standin.release()
    await ws.wait_done(prompt_id)
    assert_same_messages(after, ws.messages[mark:])
    assert ws.messages[mark + 1]["data"] == {"node": "102"}  # where it is, without a prompt_id
    assert before == []  # the recording's socket also heard nothing while closed
    check_http(recorded_http(t, "/history/"), await http.get(f"/history/{prompt_id}"))


# --- 13 -------------------------------------------------------------------------------------------


async def test_13_misc_routes(standin: Standin, http: httpx.AsyncClient) -> None:
    t = load("13_misc_routes")
    by_note = {h["path"]: h for h in t["http_responses"]}
    check_http(by_note["/system_stats"], await http.get("/system_stats"))
    check_http(by_note["/api/system_stats"], await http.get("/api/system_stats"))
    for path in ("/features", "/object_info/EmptyImage", "/object_info/SaveImage", "/object_info/NoSuchNode"):
        response = await http.get(path)
        check_http(by_note[path], response)
        assert response.json() == by_note[path]["response_body"], path
    for path in (
        "/models",
        "/models/checkpoints",
        "/models/nonexistent",
        "/embeddings",
        "/history/unknown-id",
        "/api/jobs/unknown-id",
    ):
        check_http(by_note[path], await http.get(path))
    for path in ("/api/jobs?status=bogus", "/api/jobs?limit=0"):
        response = await http.get(path)
        check_http(by_note[path], response)
        assert response.json() == by_note[path]["response_body"]
    assert (await http.get("/jobs")).status_code == 404
    prompt: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
    }
    async with WsRecorder(standin.url, CLIENT) as ws:
        ids = []
        for color in (1, 2, 3):
            prompt["1"]["inputs"]["color"] = color
            ids.append(await post_prompt(http, {"prompt": prompt, "client_id": CLIENT}))
            await ws.wait_done(ids[-1])
    assert list((await http.get("/history?max_items=2")).json()) == ids[1:]
    assert list((await http.get("/history?max_items=1&offset=0")).json()) == ids[:1]
    check_http(
        by_note["/api/jobs?status=completed,failed&limit=3&offset=1&sort_by=execution_duration"],
        await http.get("/api/jobs?status=completed,failed&limit=3&offset=1&sort_by=execution_duration"),
    )
    api_api = await http.get("/api/api/jobs?limit=1")
    check_http(by_note["/api/api/jobs?limit=1"], api_api)
    assert api_api.json()["pagination"] == {"offset": 0, "limit": 1, "total": 3, "has_more": True}
    check_http(by_note["/free"], await http.post("/free", json={"unload_models": True, "free_memory": True}))
    assert (await http.post("/history", json={"delete": [ids[0]]})).status_code == 200
    assert await history(http, ids[0]) == {}
    assert (await http.post("/history", json={"clear": True})).status_code == 200
    assert (await http.get("/history")).json() == {}
    async with WsRecorder(standin.url) as anonymous:
        greeting = anonymous.messages[0]
        assert re.fullmatch(r"[0-9a-f]{32}", greeting["data"]["sid"])


async def test_view_refuses_traversal(standin: Standin, http: httpx.AsyncClient) -> None:
    (standin.output_dir / "x.png").write_bytes(b"png")
    assert (await http.get("/view", params={"filename": "x.png", "type": "output"})).status_code == 200
    assert (await http.get("/view", params={"filename": "../x.png", "type": "output"})).status_code == 400
    assert (await http.get("/view", params={"filename": "/etc/passwd", "type": "output"})).status_code == 400
    outside = {"filename": "x.png", "subfolder": "../..", "type": "output"}
    assert (await http.get("/view", params=outside)).status_code == 403
    assert (await http.get("/view", params={"filename": "x.png", "type": "bogus"})).status_code == 400


async def test_control_routes(standin: Standin, http: httpx.AsyncClient) -> None:
    config = await http.post(
        "/__standin/config", json={"node_delays": {"ImageBlur": 0.01}, "hold": ["ImageBlur"]}
    )
    assert config.json()["node_delays"] == {"ImageBlur": 0.01} and config.json()["hold"] == ["ImageBlur"]
    assert (await http.post("/__standin/config", json={"no_such_knob": 1})).status_code == 400
    async with WsRecorder(standin.url, CLIENT) as ws:
        prompt_id = await post_prompt(http, body_for(load("07_interrupt_targeted")["request"]))
        await standin.wait_held("100")
        assert (await http.get("/__standin/log")).json()["held_node"] == "100"
        await http.post("/interrupt", json={"prompt_id": prompt_id})
        assert (await http.post("/__standin/release", json={})).json()["hold"] == []
        await ws.wait_done(prompt_id)
        log = (await http.get("/__standin/log")).json()
        assert [(p["prompt_id"], p["accepted"]) for p in log["prompts"]] == [(prompt_id, True)]
        assert [(i["flag_set"], i["stopped_prompt_id"]) for i in log["interrupts"]] == [(True, prompt_id)]
        assert (await http.post("/__standin/drop_ws", json={"client_id": CLIENT})).json() == {"dropped": True}
    assert (await http.post("/__standin/log/clear")).status_code == 200
    assert (await http.get("/__standin/log")).json()["prompts"] == []


async def test_origin_guard(standin: Standin, http: httpx.AsyncClient) -> None:
    foreign = await http.get("/system_stats", headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    same = await http.get("/system_stats", headers={"Origin": f"http://127.0.0.1:{standin.port}"})
    assert same.status_code == 200


# --- 16 -------------------------------------------------------------------------------------------


async def test_16_output_naming_and_metadata(
    standin: Standin, http: httpx.AsyncClient, ws: WsRecorder
) -> None:
    t = load("16_output_naming_and_metadata")
    prompt_id = await post_prompt(http, body_for(t["request"]))
    await ws.wait_done(prompt_id)
    recorded = flatten(t["ws_messages"])
    recorded_pid = t["http_responses"][0]["response_body"]["prompt_id"]
    assert_same_messages(of_prompt(recorded, recorded_pid), ws.of_prompt(prompt_id))

    entry = only_entry(await history(http, prompt_id))
    assert entry["prompt"][4] == ["3", "2"]
    today = datetime.now().strftime("%Y-%m-%d")
    saved = entry["outputs"]["2"]["images"]
    assert saved == [
        {"filename": f"img_48x32_b{i}_0000{i + 1}_.png", "subfolder": f"lab/{today}", "type": "output"}
        for i in range(3)
    ]
    previews = entry["outputs"]["3"]["images"]
    assert all(re.fullmatch(r"ComfyUI_temp_[a-z]{5}_0000[1-3]_\.png", p["filename"]) for p in previews)
    assert {(p["subfolder"], p["type"]) for p in previews} == {("", "temp")}

    png = Image.open(standin.output_dir / "lab" / today / "img_48x32_b0_00001_.png")
    text: dict[str, str] = png.text  # type: ignore[attr-defined]  # PNG files have tEXt chunks
    assert sorted(text) == ["prompt", "workflow"]
    assert json.loads(text["workflow"]) == t["request"]["extra_data"]["extra_pnginfo"]["workflow"]
    temp = await http.get(
        "/view", params={"filename": previews[0]["filename"], "subfolder": "", "type": "temp"}
    )
    recorded_view = recorded_http(t, "/view?filename=ComfyUI_temp")
    disposition = f'filename="{previews[0]["filename"]}"'  # the random part differs per run
    check_http({**recorded_view, "content_disposition": disposition}, temp, shape=False)
    jobs = await http.get("/api/jobs?workflow_id=wf-123")
    check_http(recorded_http(t, "/api/jobs?workflow_id"), jobs)
    job = jobs.json()["jobs"][0]
    assert (job["outputs_count"], job["workflow_id"], job["preview_output"]["nodeId"]) == (6, "wf-123", "2")
    assert jobs.json()["pagination"]["limit"] is None


# --- 17 -------------------------------------------------------------------------------------------


async def test_17_cache_and_per_job_prefix(standin: Standin, http: httpx.AsyncClient, ws: WsRecorder) -> None:
    t = load("17_cache_and_per_job_prefix")
    recorded = flatten(t["ws_messages"])
    posts = [h for h in t["http_responses"] if h["path"] == "/prompt" and h["method"] == "POST"]
    for request, post in zip(t["request"], posts, strict=True):
        prompt_id = await post_prompt(http, body_for(request))
        await ws.wait_done(prompt_id)
        theirs = post["response_body"]["prompt_id"]
        assert_same_messages(of_prompt(recorded, theirs), ws.of_prompt(prompt_id))
        assert (
            only_entry(await history(http, prompt_id))["outputs"] == t["history"][theirs][theirs]["outputs"]
        )
    # The identical second run wrote no file; the third, with a new prefix, did.
    assert [p.name for p in (standin.output_dir / "jobs" / "A").iterdir()] == ["out_00001_.png"]
    assert [p.name for p in (standin.output_dir / "jobs" / "B").iterdir()] == ["out_00001_.png"]


# --- the stand-in as a process ----------------------------------------------------------------------


async def test_standin_runs_as_a_process_with_comfyui_flags(standin_process: Any) -> None:
    async with httpx.AsyncClient(base_url=standin_process.url, timeout=10) as http:
        stats = await http.get("/system_stats")
        assert stats.status_code == 200
        assert "--cpu" in stats.json()["system"]["argv"]
        async with WsRecorder(standin_process.url, CLIENT) as ws:
            prompt = {"prompt": load("01_empty_image_save")["request"]["prompt"], "client_id": CLIENT}
            prompt_id = await post_prompt(http, prompt)
            await ws.wait_done(prompt_id)
    assert (standin_process.root / "output" / "lab" / "empty_00001_.png").is_file()
    assert (standin_process.root / "temp").is_dir()  # ComfyUI's temp folder lives *inside* --temp-directory


USED = sorted(set(re.findall(r'load\("(\d\d_\w+)"\)', Path(__file__).read_text())))


@pytest.mark.parametrize("name", USED)
def test_the_replayed_transcripts_are_kept_in_the_repository(name: str) -> None:
    """So this file also runs where shared/ is absent (transcripts.load falls back to these)."""
    assert (LOCAL / f"{name}.json").is_file()


def test_transcripts_load_from_the_repository_without_shared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.fakes.comfyui import transcripts

    monkeypatch.setattr(transcripts, "SHARED", tmp_path / "absent")
    assert load("01_empty_image_save")["scenario"] == "01_empty_image_save"
