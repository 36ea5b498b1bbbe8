"""The math of comfyui-trainfree: plain torch functions over tensors, with no ComfyUI import.

One module per technique (``pag.py``, ...), plus helpers every technique shares (``layers.py`` for
layer-selection text, ``batch.py`` for locating a sub-batch inside a batched model call).
"""
