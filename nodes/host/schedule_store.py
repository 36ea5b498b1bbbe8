"""Cache schedules as JSON files in ComfyUI's folders (output/cache_schedules, input/cache_schedules) and the
pack's presets (cache_schedules/ in the pack)."""
import os

from ...guidance_ops import cache_schedule as schedules
from .files import FileStore

SUBFOLDER = "cache_schedules"
PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), SUBFOLDER)
_STORE = FileStore(SUBFOLDER, ".json", "cache schedule", "run the cache schedule search (it saves one)",
                   shipped=(PRESETS,))
saved_names, file_stamp = _STORE.names, _STORE.stamp


def load(name):
    with open(_STORE.path(name), encoding="utf-8") as handle:
        text = handle.read()
    try:
        return schedules.load_schedule(text)
    except schedules.ScheduleError as error:
        raise schedules.ScheduleError(f"{name}: {error}") from None


def save(schedule, prefix):
    """Write to ComfyUI's output/cache_schedules as ``<prefix>_NNNNN.json``; returns the file name."""
    name, path = _STORE.new_path(prefix)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(schedules.dump_schedule(schedule))
    return name
