"""``compile: true``: regional ``torch.compile`` of the transformer's blocks, with a fallback to eager.

Regional compilation (PyTorch's recipe for repeated blocks) compiles ``Block.forward`` once and reuses the
code for every block (parameters are graph inputs), so compile time does not grow with depth. The
embedding, head and loss stay eager. A whole-sequence forward compiles with static shapes; KV-cached
decoding (sampling) passes ``dynamic=True`` so chunks of every length share one graph.

Where torch.compile cannot run (no C++ compiler for the CPU backend, a platform dynamo does not support,
ZeRO-3's parameter gathering inside the blocks) the model stays eager and the stage says why in one line; a
block that fails to compile later, at its first call, runs eagerly too (dynamo's ``suppress_errors``).
"""

from __future__ import annotations

import os
import shutil

import torch

from .transformer import Transformer


def compile_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile cannot compile the blocks on ``device`` here, or None when it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if torch.device(device).type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
            return f"the CPU backend needs a C++ compiler and none was found ({compiler}, c++, clang++)"
    return None


def compile_blocks(model: Transformer, *, dynamic: bool | None = None, zero_stage: int = 0,
                   device: torch.device | str = "cpu") -> str | None:
    """Compile each of ``model``'s blocks in place; where it cannot, leave it eager and say why (else None)."""
    why = compile_unavailable(device)
    if why is None and zero_stage >= 3:
        why = "ZeRO-3 gathers each block's parameters inside its forward, which the compiled blocks do not see"
    if why is not None:
        return why
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True   # a block that fails to compile at its first call runs eagerly
    for block in model.blocks:
        block.compile(dynamic=dynamic)
    return None
