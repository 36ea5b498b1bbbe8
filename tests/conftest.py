import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: the pack's folder has a ``nodes`` package, and ComfyUI's own ``nodes`` module must win.
if REPO not in sys.path:
    sys.path.append(REPO)

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, locally and in CI: a failure reproduces, a pass is not luck.
settings.register_profile("trainfree", derandomize=True, database=None)
settings.load_profile("trainfree")
