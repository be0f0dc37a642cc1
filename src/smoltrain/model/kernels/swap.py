"""How a kernel replaces a module: by changing its class (a leaf: the kernels and the decode
modules import it, it imports none of them)."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def swap_class(module: nn.Module, kernel: type[M]) -> M:
    """Make `module` an instance of `kernel`, a subclass of its class that overrides methods
    only (no state of its own), keeping every parameter, buffer and hook."""
    if not issubclass(kernel, type(module)):
        raise TypeError(f"{kernel.__name__} does not specialize {type(module).__name__}")
    module.__class__ = kernel
    return module  # type: ignore[return-value]
