"""A recorder of the aten ops a block of code dispatches: what the tests read to prove that a step builds no tensor
from host values (`lift_fresh`) and reads nothing back (`_local_scalar_dense`), which a CUDA graph cannot hold."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpsSeen(TorchDispatchMode):
    """`with OpsSeen() as ops: ...`, then `ops.seen`: the names of the ops run inside."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))
