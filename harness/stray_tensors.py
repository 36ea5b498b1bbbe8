"""Find tensors that code under given folders creates on a default device or in a default dtype.

On a GPU a tensor made without naming its device lands on the CPU, and the first operation combining it with the
model's tensors fails; one made without naming its dtype is float32 (or int64) and silently widens a float16 latent.
On a CPU-only machine neither shows, so ``StrayTensorCheck``, a TorchFunctionMode held around sampling, inspects
every tensor factory call whose caller (the first frame outside torch) is a file under one of ``roots``:

- ``torch.zeros / ones / full / empty / tensor / arange / rand* / ...`` must name both ``device`` and ``dtype``, the
  device not as a string or index (``"cpu"``, ``0``): one taken from a tensor is a ``torch.device``;
- ``torch.tensor`` / ``as_tensor`` / ``asarray`` of a tensor pass without them (the tensor keeps its own);
- ``*_like`` functions and ``Tensor.new_*`` pass: they take both from a tensor unless told otherwise;
- ``Tensor.cpu / cuda / numpy`` and ``torch.from_numpy`` always count: they pin a tensor to one device.

Every offending call is kept in ``strays`` as ``(function, "file:line")``; ``seen`` counts the calls checked (those
that pass included). Not seen: a ``torch.device("cpu")`` written out (indistinguishable from a tensor's on a CPU),
and ``Tensor.to``, whose target the check cannot trace.
"""
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.empty_strided, torch.tensor, torch.as_tensor,
             torch.asarray, torch.scalar_tensor, torch.arange, torch.linspace, torch.logspace, torch.eye,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.tril_indices,
             torch.triu_indices}
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
FOLLOWING = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
             torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
             torch.Tensor.new_empty, torch.Tensor.new_tensor}
_PINNING = {"cpu", "cuda", "numpy"}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class StrayTensorCheck(TorchFunctionMode):
    def __init__(self, roots):
        super().__init__()
        self.roots = tuple(os.path.abspath(r) + os.sep for r in roots)
        self.strays = []
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES or func in FOLLOWING or func is torch.from_numpy or _pins(func):
            where = self._caller()
            if where is not None:
                self.seen += 1
                if func is torch.from_numpy or _pins(func) or func in FACTORIES and _unnamed(func, args, kwargs):
                    self.strays.append((getattr(func, "__name__", repr(func)), where))
        return func(*args, **kwargs)

    def _caller(self):
        """'file:line' of the first frame outside torch, if that file lies under one of the roots."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        if frame is None:
            return None
        path = os.path.abspath(frame.f_code.co_filename)
        return f"{path}:{frame.f_lineno}" if path.startswith(self.roots) else None


def _pins(func):
    owner = getattr(func, "__objclass__", None)
    return getattr(func, "__name__", None) in _PINNING and isinstance(owner, type) and issubclass(torch.Tensor, owner)


def _unnamed(func, args, kwargs):
    """Whether a factory call leaves its device or dtype to torch's defaults."""
    dtype, device = kwargs.get("dtype"), kwargs.get("device")
    if func is torch.as_tensor:  # as_tensor(data, dtype=None, device=None) also takes them by position
        dtype = args[1] if len(args) > 1 else dtype
        device = args[2] if len(args) > 2 else device
    if isinstance(device, (str, int)):
        return True  # a device written out ("cpu", "cuda", 0); one taken from a tensor is a torch.device
    if func in FROM_DATA and args and isinstance(args[0], torch.Tensor):
        return False  # a tensor keeps its own device and dtype unless told otherwise
    return dtype is None or device is None
