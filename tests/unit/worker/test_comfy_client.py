"""ComfyClient against a ComfyUI: the in-process stand-in, or a real one when
COMFYFLEET_TEST_COMFYUI_URL is set (tests that need stand-in knobs skip then).

Graphs get a fresh colour and output prefix per test, so a real ComfyUI's cache never answers
for an earlier run.
"""

from __future__ import annotations

import asyncio
import io
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio
from PIL import Image
from tests.fakes.fixtures import ComfyTarget

from comfyfleet.worker.comfy.client import ComfyClient, ComfyUnavailable, ComfyValidationError
from comfyfleet.worker.comfy.events import (
    Cached,
    ComfyEvent,
    Done,
    Executed,
    Executing,
    Failed,
    Interrupted,
    Lost,
    Preview,
    Progress,
    ProgressState,
    Started,
    Succeeded,
    event_from_message,
    parse_preview_frame,
    terminal_from_history,
)

FOLLOW_TIMEOUT = 120.0  # generous for a real ComfyUI on a CPU; the stand-in takes milliseconds


def unique() -> str:
    return uuid.uuid4().hex[:12]


def colour() -> int:
    return random.randrange(0, 0xFFFFFF)


def empty_save(prefix: str, *, size: int = 64, batch: int = 1) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": batch, "color": colour()},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def blur_chain(prefix: str, *, blurs: int, size: int) -> dict[str, Any]:
    """EmptyImage -> ImageBlur x n -> SaveImage: slow on a real ComfyUI at 1024 px, and on the
    stand-in through its ImageBlur delay. Blur nodes are "100", "101", ..."""
    graph: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": colour()},
        }
    }
    previous = "1"
    for index in range(blurs):
        node = str(100 + index)
        graph[node] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [previous, 0], "blur_radius": 31, "sigma": 10.0},
        }
        previous = node
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": [previous, 0], "filename_prefix": prefix}}
    return graph


def png_bytes(size: tuple[int, int], rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def slow_size(comfyui_target: ComfyTarget) -> int:
    return 1024 if comfyui_target.is_real else 64


@pytest_asyncio.fixture
async def comfy(comfyui_url: str) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(comfyui_url, client_id=f"test-{unique()}", timeout=10, stall_timeout=5) as client:
        await client.connect()
        yield client


async def collect(client: ComfyClient, prompt_id: str) -> list[ComfyEvent]:
    async with asyncio.timeout(FOLLOW_TIMEOUT):
        return [event async for event in client.follow(prompt_id)]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = FOLLOW_TIMEOUT) -> None:
    """Poll ``check`` until it holds (no fixed sleeps in the assertions themselves)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


class Follower:
    """Consumes ``follow`` in the background so a test can act while a prompt runs."""

    def __init__(self, client: ComfyClient, prompt_id: str) -> None:
        self.events: list[ComfyEvent] = []
        self.task = asyncio.create_task(self._run(client, prompt_id))

    async def _run(self, client: ComfyClient, prompt_id: str) -> None:
        async for event in client.follow(prompt_id):
            self.events.append(event)

    async def seen(self, predicate: Callable[[ComfyEvent], bool]) -> ComfyEvent:
        async with asyncio.timeout(FOLLOW_TIMEOUT):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"follow ended without the event; got {self.events}")
                await asyncio.sleep(0.01)

    async def done(self) -> Done:
        async with asyncio.timeout(FOLLOW_TIMEOUT):
            await self.task
        last = self.events[-1]
        assert isinstance(last, Done)
        return last


# --- the happy path --------------------------------------------------------------------------------


async def test_a_prompt_streams_typed_events_and_its_output_downloads(
    comfy: ComfyClient, tmp_path: Path
) -> None:
    prefix = f"comfyfleet-test/{unique()}/out"
    prompt_id = f"job-{unique()}"
    result = await comfy.submit(empty_save(prefix), prompt_id=prompt_id)
    assert (result.prompt_id, result.node_errors) == (prompt_id, {})

    events = await collect(comfy, prompt_id)
    kinds = [type(e) for e in events]
    assert kinds[:2] == [Started, Cached]
    assert kinds[-2:] == [Succeeded, Done]
    assert Executing in kinds and ProgressState in kinds
    executed = [e for e in events if isinstance(e, Executed)]
    assert [e.node for e in executed] == ["2"]
    done = events[-1]
    assert isinstance(done, Done) and (done.outcome, done.recovered) == ("success", False)
    [file] = done.files()
    assert (file.node_id, file.subfolder, file.type) == ("2", prefix.rsplit("/", 1)[0], "output")
    assert file.filename.startswith("out_") and file.filename.endswith("_.png")

    dest = tmp_path / "out.png"
    size = await comfy.download_output(file.filename, file.subfolder, file.type, dest)
    assert size == dest.stat().st_size
    assert Image.open(dest).size == (64, 64)

    entry = await comfy.history(prompt_id)
    assert entry is not None and entry["status"]["status_str"] == "success"
    job = await comfy.job(prompt_id)
    assert job is not None and job["status"] == "completed"
    assert await comfy.history("no-such-prompt") is None
    assert await comfy.job("no-such-prompt") is None


async def test_one_connection_serves_prompts_one_after_another(
    comfy: ComfyClient, comfyui_target: ComfyTarget
) -> None:
    for _ in range(3):
        prompt_id = f"job-{unique()}"
        await comfy.submit(empty_save(f"comfyfleet-test/{unique()}/seq"), prompt_id=prompt_id)
        done = (await collect(comfy, prompt_id))[-1]
        assert isinstance(done, Done) and done.outcome == "success"
    assert comfy.connected
    if comfyui_target.standin is not None:
        assert list(comfyui_target.standin.hub.sockets) == [comfy.client_id]  # still the first socket


async def test_upload_input_returns_the_name_to_load(comfy: ComfyClient, tmp_path: Path) -> None:
    folder = f"comfyfleet-test-{unique()}"
    green = png_bytes((16, 12), (0, 255, 0))
    name = await comfy.upload_input(green, name="in.png", subfolder=folder)
    assert name == f"{folder}/in.png"
    # Same bytes again: the same name; other bytes under that name: renamed, not overwritten.
    assert await comfy.upload_input(green, name="in.png", subfolder=folder) == name
    source = tmp_path / "red.png"
    source.write_bytes(png_bytes((16, 12), (255, 0, 0)))
    assert await comfy.upload_input(source, name="in.png", subfolder=folder) == f"{folder}/in (1).png"

    prompt_id = f"job-{unique()}"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": f"{folder}/inverted"},
        },
    }
    await comfy.submit(graph, prompt_id=prompt_id)
    done = (await collect(comfy, prompt_id))[-1]
    assert isinstance(done, Done) and done.outcome == "success"
    [file] = done.files()
    await comfy.download_output(file.filename, file.subfolder, file.type, tmp_path / "inv.png")
    assert Image.open(tmp_path / "inv.png").convert("RGB").getpixel((5, 5)) == (255, 0, 255)


# --- errors ----------------------------------------------------------------------------------------


async def test_validation_errors_raise_with_comfyuis_body(comfy: ComfyClient) -> None:
    missing_input = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    with pytest.raises(ComfyValidationError) as caught:
        await comfy.submit(missing_input, prompt_id=f"job-{unique()}")
    assert caught.value.error_type == "prompt_outputs_failed_validation"
    assert caught.value.node_errors["1"]["errors"][0]["type"] == "required_input_missing"
    assert caught.value.status_code == 422

    with pytest.raises(ComfyValidationError) as caught:
        await comfy.submit({"1": {"class_type": "NoSuchNode", "inputs": {}}}, prompt_id=f"job-{unique()}")
    assert caught.value.error_type == "invalid_prompt"

    # One valid output is enough: accepted, with the other output's errors reported.
    partial = empty_save(f"comfyfleet-test/{unique()}/ok")
    partial["3"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "bad"}}
    prompt_id = f"job-{unique()}"
    result = await comfy.submit(partial, prompt_id=prompt_id)
    assert list(result.node_errors) == ["3"]
    done = (await collect(comfy, prompt_id))[-1]
    assert isinstance(done, Done) and list(done.outputs) == ["2"]


async def test_a_node_that_raises_ends_the_prompt_as_failed(comfy: ComfyClient) -> None:
    name = await comfy.upload_input(b"not an image", name=f"corrupt-{unique()}.png", subfolder="")
    prompt_id = f"job-{unique()}"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
    }
    await comfy.submit(graph, prompt_id=prompt_id)
    events = await collect(comfy, prompt_id)
    [failed] = [e for e in events if isinstance(e, Failed)]
    assert (failed.node_id, failed.node_type) == ("1", "LoadImage")
    assert failed.exception_type == "PIL.UnidentifiedImageError"
    assert "cannot identify image file" in failed.exception_message and failed.traceback
    done = events[-1]
    assert isinstance(done, Done) and (done.outcome, dict(done.outputs)) == ("error", {})


async def test_nothing_listening_is_unavailable(unused_tcp_port: int) -> None:
    async with ComfyClient(f"http://127.0.0.1:{unused_tcp_port}", timeout=0.5) as client:
        assert await client.health() is False
        with pytest.raises(ComfyUnavailable):
            await client.system_stats()
        with pytest.raises(ComfyUnavailable):
            await client.submit(empty_save("x"), prompt_id="never")


# --- interrupt, delete, cancel ---------------------------------------------------------------------


async def test_targeted_interrupt_stops_the_running_prompt(comfy: ComfyClient, slow_size: int) -> None:
    prompt_id = f"job-{unique()}"
    await comfy.submit(
        blur_chain(f"comfyfleet-test/{unique()}/slow", blurs=30, size=slow_size), prompt_id=prompt_id
    )
    follower = Follower(comfy, prompt_id)
    await follower.seen(lambda e: isinstance(e, Executing) and e.node == "100")
    await comfy.interrupt("some-other-prompt")  # not running: ComfyUI ignores it
    await comfy.interrupt(prompt_id)
    done = await follower.done()
    [interrupted] = [e for e in follower.events if isinstance(e, Interrupted)]
    assert interrupted.node_type == "ImageBlur" and "1" in interrupted.executed
    assert done.outcome == "interrupted"
    job = await comfy.job(prompt_id)
    assert job is not None and job["status"] == "failed" and "execution_error" not in job


async def test_deleting_a_queued_prompt_ends_it_as_lost(comfy: ComfyClient, slow_size: int) -> None:
    running, queued = f"job-{unique()}", f"job-{unique()}"
    await comfy.submit(
        blur_chain(f"comfyfleet-test/{unique()}/a", blurs=30, size=slow_size), prompt_id=running
    )
    first = Follower(comfy, running)
    await first.seen(lambda e: isinstance(e, Started))
    await comfy.submit(empty_save(f"comfyfleet-test/{unique()}/b"), prompt_id=queued)
    state = await comfy.queue()
    assert [e.prompt_id for e in state.running] == [running]
    assert queued in [e.prompt_id for e in state.pending]

    await comfy.delete_queued(queued)
    events = await collect(comfy, queued)
    assert [type(e) for e in events] == [Lost, Done]
    assert isinstance(events[-1], Done) and events[-1].outcome == "lost"
    assert await comfy.job(queued) is None
    assert queued not in [e.prompt_id for e in (await comfy.queue()).pending]

    await comfy.interrupt(running)
    assert (await first.done()).outcome == "interrupted"


async def test_cancel_picks_dequeue_or_interrupt(comfy: ComfyClient, slow_size: int) -> None:
    running, queued = f"job-{unique()}", f"job-{unique()}"
    await comfy.submit(
        blur_chain(f"comfyfleet-test/{unique()}/a", blurs=30, size=slow_size), prompt_id=running
    )
    first = Follower(comfy, running)
    await first.seen(lambda e: isinstance(e, Started))
    await comfy.submit(empty_save(f"comfyfleet-test/{unique()}/b"), prompt_id=queued)
    assert await comfy.cancel(queued) == "dequeued"
    assert await comfy.cancel(running) == "interrupt_sent"
    assert (await first.done()).outcome == "interrupted"
    assert await comfy.cancel(running) == "finished"
    assert await comfy.cancel("no-such-prompt") == "not_found"
    assert [type(e) for e in await collect(comfy, queued)] == [Lost, Done]


# --- a dropped socket ------------------------------------------------------------------------------


async def test_outcome_comes_from_history_when_the_socket_dropped(
    comfy: ComfyClient, slow_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt_id = f"job-{unique()}"
    await comfy.submit(
        blur_chain(f"comfyfleet-test/{unique()}/drop", blurs=3, size=slow_size), prompt_id=prompt_id
    )
    follower = Follower(comfy, prompt_id)
    await follower.seen(lambda e: isinstance(e, Started))

    # Drop the socket and keep it down until the prompt has finished: its events are lost.
    gate = asyncio.Event()
    reopen = comfy._open_ws

    async def held_open() -> aiohttp.ClientWebSocketResponse:
        await gate.wait()
        return await reopen()

    monkeypatch.setattr(comfy, "_open_ws", held_open)
    await comfy.reconnect()

    async def finished() -> bool:
        job = await comfy.job(prompt_id)
        return job is not None and job["status"] == "completed"

    await eventually(finished)
    gate.set()
    done = await follower.done()
    assert (done.outcome, done.recovered) == ("success", True)
    assert list(done.outputs) == ["9"]
    assert sum(isinstance(e, Succeeded) for e in follower.events) == 1
    assert comfy.connected


async def test_server_side_drop_reconnects_and_keeps_streaming(
    comfy: ComfyClient, comfyui_target: ComfyTarget
) -> None:
    standin = comfyui_target.require_standin("parks the prompt with the stand-in's hold gate")
    standin.hold("ImageBlur")
    prompt_id = f"job-{unique()}"
    await comfy.submit(blur_chain("drop/server", blurs=2, size=64), prompt_id=prompt_id)
    follower = Follower(comfy, prompt_id)
    await standin.wait_held("100")
    assert await standin.drop_ws(comfy.client_id)

    async def reconnected() -> bool:
        return comfy.client_id in standin.hub.sockets and comfy.connected

    await eventually(reconnected)
    await standin.release()
    done = await follower.done()
    assert (done.outcome, done.recovered) == ("success", False)  # the end came over the new socket
    # The greeting of a reconnecting owner names the running node without a prompt_id.
    assert sum(isinstance(e, Executing) and e.node == "100" for e in follower.events) == 2


async def test_following_a_prompt_submitted_elsewhere(comfy: ComfyClient, comfyui_url: str) -> None:
    prompt_id = f"job-{unique()}"
    async with httpx.AsyncClient(base_url=comfyui_url) as raw:
        body = {
            "prompt": empty_save(f"comfyfleet-test/{unique()}/x"),
            "prompt_id": prompt_id,
            "client_id": "someone-else",
        }
        assert (await raw.post("/prompt", json=body)).status_code == 200

    async def finished() -> bool:
        return await comfy.history(prompt_id) is not None

    await eventually(finished)
    events = await collect(comfy, prompt_id)
    assert [type(e) for e in events] == [Executed, Succeeded, Done]
    assert isinstance(events[-1], Done) and events[-1].recovered
    assert [type(e) for e in await collect(comfy, "never-submitted")] == [Lost, Done]


# --- previews and progress -------------------------------------------------------------------------


async def test_websocket_images_arrive_as_previews(comfy: ComfyClient) -> None:
    if "SaveImageWebsocket" not in await comfy.object_info():
        pytest.skip("this ComfyUI lacks custom_nodes/websocket_image_save.py")
    prompt_id = f"job-{unique()}"
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": colour()},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    await comfy.submit(graph, prompt_id=prompt_id)
    events = await collect(comfy, prompt_id)
    previews = [e for e in events if isinstance(e, Preview)]
    assert [(p.node_id, p.format) for p in previews] == [("2", "PNG")] * 2
    assert Image.open(io.BytesIO(previews[0].image)).size == (32, 32)
    assert [(p.value, p.max) for p in events if isinstance(p, Progress)] == [(0, 2), (1, 2)]
    done = events[-1]
    assert isinstance(done, Done) and (done.outcome, dict(done.outputs)) == ("success", {})


async def test_sampler_progress_and_jpeg_previews(comfy: ComfyClient, comfyui_target: ComfyTarget) -> None:
    comfyui_target.require_standin("uses the stand-in's StandinSlowSampler node")
    prompt_id = f"job-{unique()}"
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": colour()},
        },
        "3": {
            "class_type": "StandinSlowSampler",
            "inputs": {"image": ["1", 0], "steps": 3, "seconds_per_step": 0.0},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "sampler/out"}},
    }
    await comfy.submit(graph, prompt_id=prompt_id, extra_data={"preview_method": "latent2rgb"})
    events = await collect(comfy, prompt_id)
    assert [(p.node, p.value, p.max) for p in events if isinstance(p, Progress)] == [
        ("3", 1, 3),
        ("3", 2, 3),
        ("3", 3, 3),
    ]
    previews = [e for e in events if isinstance(e, Preview)]
    assert [(p.node_id, p.format) for p in previews] == [("3", "JPEG")] * 3
    assert Image.open(io.BytesIO(previews[-1].image)).format == "JPEG"


# --- information -----------------------------------------------------------------------------------


async def test_health_and_server_information(comfy: ComfyClient) -> None:
    assert await comfy.health() is True
    stats = await comfy.system_stats()
    assert "comfyui_version" in stats["system"]
    assert (await comfy.features())["supports_preview_metadata"] is True
    assert comfy.server_features.get("supports_preview_metadata") is True  # negotiated on the socket
    everything = await comfy.object_info()
    assert await comfy.object_info() is everything  # cached
    assert everything["EmptyImage"]["output"] == ["IMAGE"]
    assert list(await comfy.object_info("SaveImage")) == ["SaveImage"]
    assert await comfy.object_info("NoSuchNode") == {}


# --- wire parsing (no server) ----------------------------------------------------------------------


def test_terminal_events_are_rebuilt_from_history_entries() -> None:
    def entry(status_str: str, *messages: list[Any]) -> dict[str, Any]:
        return {
            "status": {
                "status_str": status_str,
                "completed": status_str == "success",
                "messages": list(messages),
            }
        }

    start = ["execution_start", {"prompt_id": "p", "timestamp": 1}]
    assert terminal_from_history(
        "p", entry("success", start, ["execution_success", {"prompt_id": "p", "timestamp": 2}])
    ) == Succeeded("p", 2)
    error = {
        "node_id": "3",
        "node_type": "LoadImage",
        "exception_type": "E",
        "exception_message": "m\n",
        "traceback": ["t"],
        "executed": [],
    }
    failed = terminal_from_history("p", entry("error", start, ["execution_error", error]))
    assert isinstance(failed, Failed) and (failed.node_id, failed.traceback) == ("3", ("t",))
    stopped = {"node_id": "104", "node_type": "ImageBlur", "executed": ["1", "100"]}
    interrupted = terminal_from_history("p", entry("error", start, ["execution_interrupted", stopped]))
    assert interrupted == Interrupted("p", "104", "ImageBlur", ("1", "100"))


def test_preview_frames_of_both_kinds_decode() -> None:
    legacy = parse_preview_frame((1).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"\x89PNG")
    assert legacy is not None and (legacy.prompt_id, legacy.format, legacy.image) == (None, "PNG", b"\x89PNG")
    meta = b'{"node_id": "9", "prompt_id": "p", "image_type": "image/jpeg"}'
    modern = parse_preview_frame((4).to_bytes(4, "big") + len(meta).to_bytes(4, "big") + meta + b"\xff\xd8")
    assert modern is not None and (modern.prompt_id, modern.node_id, modern.format) == ("p", "9", "JPEG")
    assert parse_preview_frame((3).to_bytes(4, "big") + b"\x00\x00\x00\x01" + b"9text") is None
    assert event_from_message("status", {}, "p") is None
