"""``python -m tests.fakes.comfyui``: start the stand-in the way a supervisor starts ComfyUI's main.py.

ComfyUI's own flag names are accepted; flags the stand-in has no use for (``--cpu``,
``--disable-auto-launch``, ...) are ignored so the same command line works for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path

from .config import StandinConfig
from .server import Standin, make_dirs


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.comfyui", description=__doc__)
    # ComfyUI: a bare --listen means every interface.
    parser.add_argument("--listen", nargs="?", const="0.0.0.0", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", type=Path, default=None)
    parser.add_argument("--input-directory", type=Path, default=None)
    parser.add_argument("--output-directory", type=Path, default=None)
    parser.add_argument("--temp-directory", type=Path, default=None)
    parser.add_argument("--user-directory", type=Path, default=None)
    parser.add_argument("--database-url", default=None, help="accepted for compatibility; unused")
    parser.add_argument("--preview-method", default="none")
    parser.add_argument("--disable-metadata", action="store_true")
    parser.add_argument("--node-delay", type=float, default=0.0, help="seconds every node takes")
    parser.add_argument(
        "--node-delays", type=json.loads, default={}, help='per class, JSON: {"ImageBlur": 0.5}'
    )
    args, _unknown = parser.parse_known_args(argv)
    return args


async def serve(args: argparse.Namespace, argv: list[str]) -> None:
    if args.base_directory is None:
        # Folders not given on the command line live in a scratch "installation" removed at exit.
        with tempfile.TemporaryDirectory(prefix="comfyui-standin-") as scratch:
            await _serve(args, argv, Path(scratch))
    else:
        await _serve(args, argv, args.base_directory.resolve())


async def _serve(args: argparse.Namespace, argv: list[str], base: Path) -> None:
    # ComfyUI puts its temp folder *inside* --temp-directory (main.py: <dir>/temp).
    temp = args.temp_directory.resolve() / "temp" if args.temp_directory else None
    dirs = make_dirs(
        base,
        input_dir=args.input_directory.resolve() if args.input_directory else None,
        output_dir=args.output_directory.resolve() if args.output_directory else None,
        temp_dir=temp,
        user_dir=args.user_directory.resolve() if args.user_directory else None,
    )
    config = StandinConfig(
        node_delay=args.node_delay,
        node_delays=dict(args.node_delays),
        preview_method=args.preview_method,
        disable_metadata=args.disable_metadata,
    )
    standin = Standin(dirs, config, argv=["main.py", *argv])
    await standin.start(args.listen.split(",")[0], args.port)  # ComfyUI accepts a comma list
    # The line ComfyUI prints once it serves; supervisors may wait for it.
    print(f"To see the GUI go to: {standin.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    asyncio.run(serve(parse_args(argv), argv))


if __name__ == "__main__":
    main()
