"""Shared test fakes (the ComfyUI stand-in and its pytest fixtures)."""
