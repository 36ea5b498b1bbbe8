"""comfyui-trainfree: training-free sampling techniques from recent diffusion papers as ComfyUI nodes.

SPDX-License-Identifier: GPL-3.0-or-later
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
