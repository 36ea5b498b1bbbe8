import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: the pack's folder has a ``nodes`` package, and ComfyUI's own ``nodes`` module must win.
if REPO not in sys.path:
    sys.path.append(REPO)

