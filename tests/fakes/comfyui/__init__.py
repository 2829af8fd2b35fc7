"""A ComfyUI 0.8.0 stand-in for tests: a real aiohttp HTTP + WebSocket server with a few real nodes.

Built from the recordings in shared/comfyui (PROTOCOL.md, transcripts/); ``test_standin_contract``
replays them against it. Nodes: EmptyImage, EmptyLatentImage, LoadImage, ImageInvert, ImageScale,
ImageBlur, SaveImage, PreviewImage, SaveImageWebsocket and StandinSlowSampler (inputs ``image``,
``steps``, ``seconds_per_step``: one ``progress`` per step, a JPEG preview per step when
``extra_data.preview_method`` asks, interrupt honoured within a step). Pixels are real (Pillow).

In-process::

    async with run_standin(tmp_path, node_delays={"ImageBlur": 0.1}) as standin:
        standin.url, standin.input_dir, standin.output_dir, standin.temp_dir

As a process, like ComfyUI's main.py (its flag names; unknown flags are ignored)::

    python -m tests.fakes.comfyui --listen 127.0.0.1 --port 8188 --input-directory D \\
        --output-directory D --temp-directory D [--user-directory D] [--database-url U] \\
        [--node-delay S] [--node-delays '{"ImageBlur": 0.5}'] [--preview-method auto]

Knobs (:class:`StandinConfig`; keyword arguments of ``run_standin``):

- ``node_delay`` / ``node_delays``: seconds a node (every one / per class) takes. Like a long real
  node, it does not poll the interrupt flag: an interrupt lands at the next node start.
- ``hold``: class types that park before running until released -- ``standin.hold("ImageBlur")``,
  ``await standin.wait_held("100")``, ``await standin.release(1)`` (one node) or ``release()`` (all).
- ``preview_method``: server default for previews (``extra_data.preview_method`` overrides).
- ``disable_metadata``: no tEXt chunks in saved PNGs.

Control routes (test-only, not under ``/api``):

- ``GET /__standin/log``: prompts received, interrupts received (``flag_set``: did it match a
  running prompt; ``stopped_prompt_id``: which prompt it actually stopped), queue deletes, and the
  node parked by ``hold``. ``POST /__standin/log/clear`` empties it.
- ``GET|POST /__standin/config``: read or change the knobs at run time.
- ``POST /__standin/release`` ``{"count": n}`` (or ``{}`` for all).
- ``POST /__standin/drop_ws`` ``{"client_id": ...}``: close that client's socket from the server side.
"""

from .config import Dirs, StandinConfig
from .nodes import NODES
from .server import Standin, run_standin

__all__ = ["NODES", "Dirs", "Standin", "StandinConfig", "run_standin"]
