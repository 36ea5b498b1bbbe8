"""Files the pack keeps in ComfyUI's folders (output/<subfolder>, then input/<subfolder>, then any folders the pack
ships): listing, lookup by plain name only, a stamp that changes with the file, and numbered new names."""
import os

import folder_paths


class FileStore:
    def __init__(self, subfolder, suffix, noun, how_to_make, shipped=()):
        self.subfolder, self.suffix, self.noun, self.how_to_make = subfolder, suffix, noun, how_to_make
        self.shipped = tuple(shipped)

    def folders(self):
        return [os.path.join(folder_paths.get_output_directory(), self.subfolder),
                os.path.join(folder_paths.get_input_directory(), self.subfolder), *self.shipped]

    def names(self):
        found = set()
        for folder in self.folders():
            if os.path.isdir(folder):
                found.update(f for f in os.listdir(folder) if f.endswith(self.suffix))
        return sorted(found)

    def path(self, name):
        if os.path.basename(name) != name or name not in self.names():
            raise FileNotFoundError(f"no {self.noun} named {name!r} in ComfyUI's output/{self.subfolder} or "
                                    f"input/{self.subfolder} folders: {self.how_to_make}, or copy the file there")
        return next(os.path.join(f, name) for f in self.folders() if os.path.isfile(os.path.join(f, name)))

    def stamp(self, name):
        """Changes when the file does (ComfyUI then reloads it)."""
        try:
            stat = os.stat(self.path(name))
        except FileNotFoundError:
            return float("nan")  # never equal: the loader runs and reports the missing file
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def new_path(self, prefix):
        """``(name, path)`` for ``<prefix>_NNNNN<suffix>`` in output/<subfolder>, the first number not taken."""
        if not prefix or any(c in prefix for c in "/\\:") or prefix.startswith("."):
            raise ValueError(f"filename_prefix {prefix!r} must be a plain name (no folders, no leading dot); "
                             f"{self.noun}s always go to ComfyUI's output/{self.subfolder} folder")
        folder = self.folders()[0]
        os.makedirs(folder, exist_ok=True)
        taken = set(os.listdir(folder))
        number = 1
        while f"{prefix}_{number:05d}{self.suffix}" in taken:
            number += 1
        name = f"{prefix}_{number:05d}{self.suffix}"
        return name, os.path.join(folder, name)

    def read(self, name, parse, error):
        """``parse(text)`` of the listed file ``name``; an ``error`` it raises is raised again naming the file."""
        with open(self.path(name), encoding="utf-8") as handle:
            text = handle.read()
        try:
            return parse(text)
        except error as e:
            raise error(f"{name}: {e}") from None

    def write(self, text, prefix):
        """``text`` saved as ``<prefix>_NNNNN<suffix>`` in output/<subfolder>; returns the file name."""
        name, path = self.new_path(prefix)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return name
