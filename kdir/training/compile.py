"""``torch.compile`` of a model's transformer encoders (``compile=true`` of ``kdir.run``).

Each outermost Hugging Face ``PreTrainedModel`` inside the model (a dual encoder's one or two towers, ColBERT's
backbone) is compiled in place with :meth:`torch.nn.Module.compile`: parameters, ``state_dict`` keys, checkpoints
and the exported folder are those of the eager model. Pooling, projections and scoring stay eager (they are a few
small ops). Sequence lengths vary from batch to batch: dynamo marks them dynamic after the first recompile.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def compile_encoders(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> list[str]:
    """Compile every outermost ``PreTrainedModel`` of ``model`` in place; returns their names (``[]``: none)."""
    names: list[str] = []
    for name, module in model.named_modules():  # each module once, even when shared by two attributes
        if isinstance(module, PreTrainedModel) and not any(name.startswith(n + ".") for n in names):
            module.compile(mode=mode, backend=backend)
            names.append(name)
    return names
