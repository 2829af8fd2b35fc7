"""A ComfyUI 0.8.0 stand-in for tests: a real aiohttp HTTP + WebSocket server with a few real nodes.

``async with run_standin(tmp_path) as standin:`` in-process, or ``python -m tests.fakes.comfyui
--port P ...`` as a process started like ComfyUI's ``main.py``. See README in this folder for knobs.
"""

from .config import Dirs, StandinConfig
from .nodes import NODES
from .server import Standin, run_standin

__all__ = ["NODES", "Dirs", "Standin", "StandinConfig", "run_standin"]
