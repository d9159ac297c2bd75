"""What the launchers share: small integer helpers, and :class:`CompileCase`, the form in which each
op module lists the launches ``python -m neuroflow.tooling.compile_check`` compiles (here, below the ops, so
that the ops never import the compile check: it imports them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division for grid sizes."""
    return -(-a // b)


@dataclass
class CompileCase:
    """One launcher call whose kernel launches are compiled.

    Attributes:
        name: label for reports (kernel and config).
        launch: calls the launcher on CPU tensors (run inside :func:`neuroflow.ops.dispatch.recording_launches`).
        uses_dot: whether the kernel uses ``tl.dot`` (then tensor-core instructions are required).
        tensor_cores: architectures on which tensor-core instructions are required (default: both);
            wgmma needs tiles of at least 64 rows, which small-tile configs do not have.
        no_dot: names of kernels among the case's launches that use no ``tl.dot`` (the gate's
            per-frame select kernel), exempt from the tensor-core check.
    """

    name: str
    launch: Callable[[], None]
    uses_dot: bool = False
    tensor_cores: tuple[int, ...] = field(default=(80, 90))
    no_dot: tuple[str, ...] = ()
