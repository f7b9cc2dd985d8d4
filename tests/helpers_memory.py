"""Peak bytes of the tensors a computation allocates, traced at the torch level (issue 16).

CPU torch has no allocator statistics, and tracemalloc does not see tensor memory, so
``TensorMemory`` follows every tensor storage an aten op creates, in a dispatch mode: its bytes
count from the op that made it until the storage is freed (a weakref finalizer; torch keeps one
Python object per storage). Outputs that share an input's storage (views, in-place ops) are not
new memory. The mode is per thread: run the traced code with one torch thread, so that
``compute.policy`` keeps its eigenproblems on this thread (results do not depend on the pool).
Memory that is not a torch tensor (Python objects, LAPACK workspaces) is not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """``with TensorMemory() as mem: ...`` -> ``mem.peak`` and ``mem.live`` in bytes (allocated
    inside the block only), ``mem.peak_op``: the op at which the peak was reached."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._tracked: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            s = t.untyped_storage()
            key, nbytes = s.data_ptr(), s.nbytes()
            if nbytes == 0 or key in inputs or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += nbytes
            weakref.finalize(s, self._freed, key, nbytes)
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, str(func)
        return out
