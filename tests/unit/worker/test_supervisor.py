"""The ComfyUI supervisor against a fake ComfyUI install (tests/fixtures/fake_comfy_install/main.py):
real processes, real signals, no GPU."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from comfyfleet.worker.comfy.supervisor import (
    ComfyStartError,
    SlotSpec,
    Supervisor,
    build_slots,
)

FAKE_INSTALL = Path(__file__).resolve().parents[2] / "fixtures" / "fake_comfy_install"
FAST: dict[str, Any] = {
    "startup_timeout": 20.0,
    "stop_grace": 5.0,
    "health_interval": 0.1,
    "health_timeout": 0.5,
    "unhealthy_after": 2,
    "restart_backoff": 0.05,
    "restart_backoff_max": 0.2,
}


# ------------------------------------------------------------------------------------------ helpers


def free_base_port(count: int) -> int:
    """A port p such that p .. p+count-1 are free right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count <= 65535 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_supervisor(tmp_path: Path, **kwargs: Any) -> Supervisor:
    options = {**FAST, **kwargs}
    return Supervisor(
        FAKE_INSTALL,
        base_dir=tmp_path / "slots",
        base_port=free_base_port(4),
        python=sys.executable,
        **options,
    )


async def system_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        response = await client.get(f"{url}/system_stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_mps_tools(tmp_path: Path, *, fail_start: bool = False) -> tuple[Path, Path, Path]:
    """A fake nvidia-cuda-mps-control and nvidia-smi; the control records what it was asked."""
    record = tmp_path / "mps-control.log"
    control = write_script(
        tmp_path / "fake-mps-control",
        f"""import os, sys
from pathlib import Path
record = Path({str(record)!r})
marker = Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"]) / "fake-daemon"
if sys.argv[1:] == ["-d"]:
    with record.open("a") as out:
        out.write("-d " + os.environ["CUDA_VISIBLE_DEVICES"] + "\\n")
    if {fail_start!r}:
        print("fake MPS: cannot start")
        sys.exit(1)
    marker.touch()
    sys.exit(0)
command = sys.stdin.read().strip()
with record.open("a") as out:
    out.write(command + "\\n")
if command == "quit":
    marker.unlink(missing_ok=True)
sys.exit(0 if command == "quit" or marker.exists() else 1)
""",
    )
    smi = write_script(
        tmp_path / "fake-nvidia-smi",
        """import sys
print("GPU-fake-" + sys.argv[sys.argv.index("-i") + 1])
""",
    )
    return control, smi, record


# ------------------------------------------------------------------------------------ slot layout


def test_each_slot_gets_its_own_port_folders_database_and_env(tmp_path: Path) -> None:
    slots = build_slots(
        base_dir=tmp_path,
        base_port=9000,
        gpus=[0, 1],
        slots_per_gpu=2,
        env={"OMP_NUM_THREADS": "4", "EXTRA": "yes"},
        extra_args=("--preview-method", "none"),
    )

    assert [(s.index, s.gpu, s.port) for s in slots] == [
        (0, 0, 9000),
        (1, 0, 9001),
        (2, 1, 9002),
        (3, 1, 9003),
    ]
    assert len({s.base_dir for s in slots}) == 4
    slot = slots[2]
    assert slot.base_dir == tmp_path.absolute() / "slot-2"
    assert slot.database_url == f"sqlite:///{tmp_path.absolute()}/slot-2/user/comfyui.db"
    assert slot.env == {
        "OMP_NUM_THREADS": "4",
        "MKL_NUM_THREADS": "1",
        "EXTRA": "yes",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    argv = slot.argv("/usr/bin/python3", Path("/opt/ComfyUI"))
    assert argv[:2] == ["/usr/bin/python3", "/opt/ComfyUI/main.py"]
    assert flag(argv, "--listen") == "127.0.0.1"
    assert flag(argv, "--port") == "9002"
    assert flag(argv, "--input-directory") == str(slot.base_dir / "input")
    assert flag(argv, "--output-directory") == str(slot.base_dir / "output")
    assert flag(argv, "--temp-directory") == str(slot.base_dir / "temp")
    assert flag(argv, "--user-directory") == str(slot.base_dir / "user")
    assert flag(argv, "--database-url") == slot.database_url
    assert "--disable-auto-launch" in argv
    assert argv[-2:] == ["--preview-method", "none"]


def test_a_cpu_only_host_gets_cpu_slots(tmp_path: Path) -> None:
    slots = build_slots(base_dir=tmp_path, base_port=9000, gpus=None, cpu_slots=2)

    assert [(s.gpu, s.port) for s in slots] == [(None, 9000), (None, 9001)]
    assert all(s.env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} for s in slots)


def test_a_confusing_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Supervisor(FAKE_INSTALL, "http://127.0.0.1:8188", base_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        Supervisor(base_dir=tmp_path)
    with pytest.raises(ValueError, match="base_dir"):
        Supervisor(FAKE_INSTALL)
    with pytest.raises(ValueError, match="twice"):
        Supervisor(FAKE_INSTALL, base_dir=tmp_path, gpus=[0, 0])


# ---------------------------------------------------------------------------------- start and stop


async def test_slots_start_with_their_own_flags_folders_and_env(tmp_path: Path) -> None:
    supervisor = make_supervisor(tmp_path, gpus=[0, 1], env={"FAKE_COMFY_MARK": "marked"})
    await supervisor.start()
    try:
        status = supervisor.status()
        assert status.ready
        assert (status.mode, status.mode_reason) == ("plain", "MPS not requested")
        for slot in supervisor.slots:
            stats = await system_stats(slot.url)
            argv = stats["system"]["argv"]
            assert flag(argv, "--port") == str(slot.port)
            assert flag(argv, "--database-url") == slot.database_url
            assert flag(argv, "--user-directory") == str(slot.user_dir)
            assert stats["fake"]["env"]["OMP_NUM_THREADS"] == "1"
            assert stats["fake"]["env"]["MKL_NUM_THREADS"] == "1"
            assert stats["fake"]["env"]["CUDA_VISIBLE_DEVICES"] == str(slot.gpu)
            assert stats["fake"]["env"]["FAKE_COMFY_MARK"] == "marked"
            assert all(d.is_dir() for d in (slot.input_dir, slot.output_dir, slot.temp_dir, slot.user_dir))
            assert "listening" in slot.log_path.read_text()
    finally:
        await supervisor.stop()
    assert [s.state for s in supervisor.status().slots] == ["stopped", "stopped"]


async def test_start_returns_only_once_system_stats_answers(tmp_path: Path) -> None:
    supervisor = make_supervisor(tmp_path, env={"FAKE_COMFY_STARTUP_DELAY": "0.7"})
    await supervisor.start()
    try:
        (instance,) = supervisor.instances
        assert instance.status().state == "ready"
        assert await instance.healthy()
    finally:
        await supervisor.stop()


async def test_start_fails_with_the_log_when_comfyui_exits(tmp_path: Path) -> None:
    supervisor = make_supervisor(tmp_path, env={"FAKE_COMFY_EXIT_CODE": "3"})
    with pytest.raises(ComfyStartError, match="exited with code 3") as raised:
        await supervisor.start()
    assert "failing start-up on purpose" in str(raised.value)


async def test_start_gives_up_after_the_timeout_and_kills_the_process(tmp_path: Path) -> None:
    # Long enough for the fake to start and log its pid on a loaded machine, far below its 60 s delay.
    supervisor = make_supervisor(tmp_path, startup_timeout=3.0, env={"FAKE_COMFY_STARTUP_DELAY": "60"})
    with pytest.raises(ComfyStartError, match="did not answer"):
        await supervisor.start()
    match = re.search(r"fake comfy pid=(\d+) starting", supervisor.slots[0].log_path.read_text())
    assert match is not None
    await wait_until(lambda: not alive(int(match.group(1))), "the slow process is killed")


async def test_stop_terminates_the_whole_process_group(tmp_path: Path) -> None:
    supervisor = make_supervisor(tmp_path, env={"FAKE_COMFY_SPAWN_CHILD": "1"})
    await supervisor.start()
    stats = await system_stats(supervisor.slots[0].url)
    pid, child = stats["fake"]["pid"], stats["fake"]["child_pid"]
    assert alive(child)

    await supervisor.stop()

    # The child ignores SIGTERM; only the SIGKILL sent to the group ends it.
    await wait_until(lambda: not alive(pid) and not alive(child), "ComfyUI and its child are gone")


async def test_env_changes_apply_from_the_next_restart(tmp_path: Path) -> None:
    # What the Modal worker does after a snapshot restore with the snapshot-mode variable.
    supervisor = make_supervisor(tmp_path, env={"FAKE_COMFY_MARK": "snapshot"})
    await supervisor.start()
    try:
        supervisor.update_env({"FAKE_COMFY_MARK": None})
        assert "FAKE_COMFY_MARK" not in supervisor.slots[0].env
        url = supervisor.slots[0].url
        assert (await system_stats(url))["fake"]["env"]["FAKE_COMFY_MARK"] == "snapshot"

        assert await supervisor.instances[0].restart() is True

        assert (await system_stats(url))["fake"]["env"]["FAKE_COMFY_MARK"] is None
        assert supervisor.status().slots[0].restarts == 1
    finally:
        await supervisor.stop()


# ------------------------------------------------------------------------------------- watchdog


async def test_watchdog_restarts_a_killed_slot_and_reports_it_lost(tmp_path: Path) -> None:
    lost: list[SlotSpec] = []
    supervisor = make_supervisor(tmp_path, on_slot_lost=lost.append)
    await supervisor.start()
    try:
        old_pid = supervisor.status().slots[0].pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> bool:
            slot = supervisor.status().slots[0]
            return slot.ready and slot.pid not in (None, old_pid)

        await wait_until(restarted, "the killed slot is back")
        slot = supervisor.status().slots[0]
        assert slot.restarts == 1
        assert lost == [supervisor.slots[0]]
        assert (await system_stats(slot.url))["fake"]["pid"] == slot.pid
    finally:
        await supervisor.stop()


async def test_a_slot_that_stops_answering_is_reported_unhealthy(tmp_path: Path) -> None:
    supervisor = make_supervisor(tmp_path)
    await supervisor.start()
    pid = supervisor.status().slots[0].pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)
        await wait_until(lambda: supervisor.status().slots[0].state == "unhealthy", "reported unhealthy")
        assert not supervisor.status().ready
        assert not await supervisor.instances[0].healthy()

        os.kill(pid, signal.SIGCONT)
        await wait_until(lambda: supervisor.status().slots[0].state == "ready", "healthy again")
        assert supervisor.status().slots[0].restarts == 0
    finally:
        os.kill(pid, signal.SIGCONT)
        await supervisor.stop()


# ------------------------------------------------------------------------------------------- MPS


async def test_mps_falls_back_to_plain_slots_when_the_binary_is_missing(tmp_path: Path) -> None:
    supervisor = make_supervisor(
        tmp_path, gpus=[0], use_mps=True, mps_control="comfyfleet-no-such-mps-control"
    )
    await supervisor.start()
    try:
        status = supervisor.status()
        assert status.mode == "plain"
        assert "comfyfleet-no-such-mps-control not found" in status.mode_reason
        env = (await system_stats(supervisor.slots[0].url))["fake"]["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] is None
    finally:
        await supervisor.stop()


async def test_mps_falls_back_to_plain_slots_when_the_daemon_fails(tmp_path: Path) -> None:
    control, smi, _ = fake_mps_tools(tmp_path, fail_start=True)
    supervisor = make_supervisor(
        tmp_path, gpus=[0], use_mps=True, mps_control=str(control), nvidia_smi=str(smi)
    )
    await supervisor.start()
    try:
        status = supervisor.status()
        assert status.mode == "plain"
        assert "exited with 1" in status.mode_reason
        assert "fake MPS: cannot start" in status.mode_reason
        assert status.ready
    finally:
        await supervisor.stop()


async def test_mps_slots_use_the_gpu_daemon_and_restart_together(tmp_path: Path) -> None:
    control, smi, record = fake_mps_tools(tmp_path)
    lost: list[SlotSpec] = []
    supervisor = make_supervisor(
        tmp_path,
        gpus=[0],
        slots_per_gpu=2,
        use_mps=True,
        mps_control=str(control),
        nvidia_smi=str(smi),
        on_slot_lost=lost.append,
    )
    await supervisor.start()
    try:
        assert supervisor.status().mode == "mps"
        pipe_dir = tmp_path / "slots" / "mps" / "gpu0" / "pipe"
        for slot in supervisor.slots:
            env = (await system_stats(slot.url))["fake"]["env"]
            # A UUID, because the MPS server remaps device indices for its clients.
            assert env["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0"
            assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe_dir)
        old_pids = [s.pid for s in supervisor.status().slots]
        assert None not in old_pids

        assert old_pids[0] is not None
        os.kill(old_pids[0], signal.SIGKILL)

        def all_restarted() -> bool:
            slots = supervisor.status().slots
            return all(s.ready and s.pid not in (None, *old_pids) for s in slots)

        await wait_until(all_restarted, "both slots of GPU 0 restarted")
        assert sorted(spec.index for spec in lost) == [0, 1]
        assert [s.restarts for s in supervisor.status().slots] == [1, 1]
    finally:
        await supervisor.stop()
    assert record.read_text().split("\n")[:-1] == [
        "-d GPU-fake-0",
        "get_server_list",
        "quit",  # the GPU restart takes the daemon down and up again
        "-d GPU-fake-0",
        "get_server_list",
        "quit",  # supervisor.stop()
    ]


# -------------------------------------------------------------------------------------- attached


async def test_an_attached_comfyui_is_watched_but_never_restarted() -> None:
    async def system_stats_route(request: web.Request) -> web.Response:
        return web.json_response({"system": {}, "devices": []})

    app = web.Application()
    app.router.add_get("/system_stats", system_stats_route)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_base_port(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    supervisor = Supervisor(url=f"http://127.0.0.1:{port}/", **FAST)
    try:
        await supervisor.start()
        status = supervisor.status()
        assert status.mode == "attached"
        assert status.ready
        (instance,) = supervisor.instances
        assert instance.url == f"http://127.0.0.1:{port}"
        assert await instance.healthy()
        assert await instance.restart() is False
    finally:
        await supervisor.stop()
        await runner.cleanup()
