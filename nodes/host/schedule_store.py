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
    return _STORE.read(name, schedules.load_schedule, schedules.ScheduleError)


def save(schedule, prefix):
    """Write to ComfyUI's output/cache_schedules as ``<prefix>_NNNNN.json``; returns the file name."""
    return _STORE.write(schedules.dump_schedule(schedule), prefix)
