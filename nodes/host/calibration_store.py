"""LinearAG calibrations as JSON files in ComfyUI's folders (output/linear_ag, input/linear_ag)."""
from ...guidance_ops import linear_ag
from .files import FileStore

SUBFOLDER = "linear_ag"
_STORE = FileStore(SUBFOLDER, ".json", "LinearAG calibration", "make one with TrainFree LinearAG Calibrate")
saved_names, file_stamp = _STORE.names, _STORE.stamp


def load(name):
    return _STORE.read(name, linear_ag.load, linear_ag.CalibrationError)


def save(text, prefix):
    return _STORE.write(text, prefix)
