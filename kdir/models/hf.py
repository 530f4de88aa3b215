"""Hugging Face loading, once for every model: fp32 weights, fast tokenizers, backbones without pooler heads.

``attn_implementation`` picks the attention kernel of a backbone (transformers' ``attn_implementation=``): ``None``
leaves transformers' default (transformers 5.x gives BERT-like models ``sdpa``), ``sdpa`` asks for PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs; an error for an architecture without
it), ``eager`` for the plain matmul-softmax-matmul. It changes speed and memory, not the model: scores agree to
floating-point rounding. It is not written to a saved folder (transformers leaves it out of ``config.json``, kdir
out of ``kdir_model.json``), so a folder never imposes a kernel on whoever loads it.

``encode_chunk_size`` (:func:`hidden_states`) runs a backbone over a batch of more sequences in chunks of that
many, one after the other, and joins the hidden states: one graph, one backward, the same numbers up to
floating-point rounding. A speed setting too (not saved): on CPUs, a training forward over the 64 documents of 32
(query, positive, negative) triples runs about 7 % faster as two passes of 32 than as one (cache-sized
activations); on GPUs one large pass is usually fastest, the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from kdir.errors import ConfigError, KdirError, MissingFileError

# Weights are loaded in fp32 whatever dtype they were saved in (transformers >= 5 keeps the saved dtype by
# default, and fp16/bf16 parameters would silently train in half precision): mixed precision is the trainer's job.
FP32 = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
ATTN_IMPLEMENTATIONS = (None, "sdpa", "eager")


def check_chunk_size(encode_chunk_size: int | None) -> int | None:
    """``encode_chunk_size``: a positive number of sequences, or ``None`` (every batch in one pass)."""
    if encode_chunk_size is not None and (
        isinstance(encode_chunk_size, bool) or not isinstance(encode_chunk_size, int) or encode_chunk_size < 1
    ):
        raise ConfigError(
            f"encode_chunk_size={encode_chunk_size!r}: expected a positive number of sequences per backbone pass, or "
            "null (a batch in one pass)"
        )
    return encode_chunk_size


def hidden_states(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The backbone's last hidden states ``[N, L, h]`` of ``ids`` / ``mask [N, L]``, in passes of at most ``chunk``
    sequences (``None``: one pass)."""
    if chunk is None or len(ids) <= chunk:
        return backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    return torch.cat([
        backbone(input_ids=ids[s : s + chunk], attention_mask=mask[s : s + chunk]).last_hidden_state
        for s in range(0, len(ids), chunk)
    ])  # fmt: skip


def attention_kwargs(attn_implementation: str | None) -> dict[str, str]:
    """The ``from_pretrained`` / ``from_config`` keyword for ``attn_implementation`` (``{}`` for ``None``: the
    default); any other value than :data:`ATTN_IMPLEMENTATIONS` is a :class:`ConfigError`."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"attn_implementation={attn_implementation!r}: expected null (transformers' default), sdpa or eager"
        )
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


@contextmanager
def loading(name_or_path: str | Path, attn_implementation: str | None = None) -> Iterator[None]:
    """A model folder or hub name that cannot be read is a user error naming it (not a traceback); so is an
    ``attn_implementation`` its architecture does not offer."""
    path = str(name_or_path)
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise MissingFileError(f"{path}: no such model folder (expected a kdir or Hugging Face model folder)")
    try:
        yield
    except KdirError:
        raise
    except (OSError, ValueError) as e:  # transformers: no config.json / weights, not on the hub, not a model folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, ValueError) and "attn_implementation" in str(e):  # no such kernel for this architecture
            raise ConfigError(
                f"attn_implementation={attn_implementation}: not offered for {name_or_path} ({first})"
            ) from None
        raise MissingFileError(f"{name_or_path}: cannot load a Hugging Face model or tokenizer ({first})") from None


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report (it lists skipped pooler weights or a newly initialised head)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def fast_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The fast (Rust) tokenizer of a folder or hub name; kdir's formatters rely on its offsets and speed."""
    with loading(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if not tokenizer.is_fast:
        raise KdirError(f"{name_or_path}: kdir needs a fast tokenizer")
    return tokenizer


def _drop_pooler(model: nn.Module) -> nn.Module:
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused by kdir's pooling; would leave DDP with parameters without gradients
    return model


def load_backbone(name_or_path: str | Path, attn_implementation: str | None = None) -> nn.Module:
    """An encoder (``AutoModel``) in fp32, without the pooler head of BERT-like models, with the attention kernel
    ``attn_implementation`` (:func:`attention_kwargs`)."""
    kw = FP32 | attention_kwargs(attn_implementation)
    with loading(name_or_path, attn_implementation), quiet_load_report():
        try:  # BERT-like models: skip the pooler head, unused by kdir's pooling
            model = AutoModel.from_pretrained(str(name_or_path), add_pooling_layer=False, **kw)
        except TypeError:
            model = AutoModel.from_pretrained(str(name_or_path), **kw)
    return _drop_pooler(model)


def backbone_from_config(name_or_path: str | Path, attn_implementation: str | None = None) -> nn.Module:
    """A newly initialised encoder with the architecture of ``name_or_path`` (weights loaded by the caller)."""
    kw = attention_kwargs(attn_implementation)
    with loading(name_or_path, attn_implementation):
        config = AutoConfig.from_pretrained(str(name_or_path))
        try:
            model = AutoModel.from_config(config, add_pooling_layer=False, **kw)
        except TypeError:
            model = AutoModel.from_config(config, **kw)
    return _drop_pooler(model)


def load_sequence_classifier(
    name_or_path: str | Path, num_labels: int = 1, attn_implementation: str | None = None
) -> nn.Module:
    """A sequence-classification model in fp32 (a plain encoder gets a newly initialised head)."""
    kw = FP32 | attention_kwargs(attn_implementation)
    with loading(name_or_path, attn_implementation), quiet_load_report():
        return AutoModelForSequenceClassification.from_pretrained(str(name_or_path), num_labels=num_labels, **kw)


def load_seq2seq(name_or_path: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A seq2seq generator (e.g. doc2query T5, BART) in fp32, in eval mode, and its tokenizer."""
    with loading(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        return AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path), **FP32).eval(), tokenizer
