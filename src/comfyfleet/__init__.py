"""comfyfleet: ComfyUI workflows as a multi-tenant job service (Comfy API v2)."""

__version__ = "0.1.0"
