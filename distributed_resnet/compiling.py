"""`--compile`: the training forward and backward through `torch.compile` (Inductor), with an eager fallback.

Why: on a CPU, a ResNet-20 step spends about 40% of its time outside the convolutions, in BatchNorm, ReLU, adds
and casts, each a separate pass over memory in eager mode (docs/speed.md). Inductor fuses those passes around
oneDNN's convolutions. A compile failure (no C++ compiler, an unsupported op) must not end a run: the first
failure prints one warning and the run trains eagerly from there. Pure torch, no Ray.
"""

from __future__ import annotations

from typing import Callable

import torch


class CompiledOrEager(torch.nn.Module):
    """`module` compiled (static shapes: the full batch and the epoch's last, smaller one get a graph each), or
    `module` itself once compiling it has failed. `eager` is the module, for what needs it (DDP, parameters)."""

    def __init__(self, module: torch.nn.Module, warn: Callable[[str], None], backend="inductor"):
        super().__init__()
        self.eager = module
        self.__dict__["compiled"] = torch.compile(module, backend=backend, dynamic=False)  # not a second submodule
        self.failed, self._warn, self._worked = False, warn, False

    def forward(self, x):
        if not self.failed:
            try:
                out = self.compiled(x)
                self._worked = True
                return out
            except torch._dynamo.exc.TorchDynamoException as e:
                self._fall_back(e)
            except Exception as e:  # before the first compiled step: a failure to build, not to run
                if self._worked:
                    raise
                self._fall_back(e)
        return self.eager(x)

    def _fall_back(self, error: Exception) -> None:
        self.failed = True
        first = (str(error).strip().splitlines() or [""])[0][:160]
        self._warn(f"warning: torch.compile failed ({type(error).__name__}: {first}); training eagerly instead")


def unwrapped(net: torch.nn.Module) -> torch.nn.Module:
    """The module under a `CompiledOrEager` (the DDP wrapper or the model), else `net`."""
    return net.eager if isinstance(net, CompiledOrEager) else net
