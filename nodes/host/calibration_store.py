"""LinearAG calibrations as JSON files in ComfyUI's folders (output/linear_ag, input/linear_ag)."""
from ...guidance_ops import linear_ag
from .files import FileStore

SUBFOLDER = "linear_ag"
_STORE = FileStore(SUBFOLDER, ".json", "LinearAG calibration", "make one with TrainFree LinearAG Calibrate")
saved_names, file_stamp = _STORE.names, _STORE.stamp


def load(name):
    with open(_STORE.path(name), encoding="utf-8") as handle:
        text = handle.read()
    try:
        return linear_ag.load(text)
    except linear_ag.CalibrationError as error:
        raise linear_ag.CalibrationError(f"{name}: {error}") from None


def save(text, prefix):
    name, path = _STORE.new_path(prefix)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return name
