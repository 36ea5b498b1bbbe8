"""Test and demo harness: boots a real ComfyUI in-process, builds tiny models from ComfyUI's own classes and runs
workflows through ComfyUI's execution engine. Not part of the node pack (ComfyUI never imports it)."""
