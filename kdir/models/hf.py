"""Hugging Face loading, once for every model: fp32 weights, fast tokenizers, backbones without pooler heads."""

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

from kdir.errors import KdirError, MissingFileError

# Weights are loaded in fp32 whatever dtype they were saved in (transformers >= 5 keeps the saved dtype by
# default, and fp16/bf16 parameters would silently train in half precision): mixed precision is the trainer's job.
FP32 = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}


@contextmanager
def loading(name_or_path: str | Path) -> Iterator[None]:
    """A model folder or hub name that cannot be read is a user error naming it (not a traceback)."""
    path = str(name_or_path)
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise MissingFileError(f"{path}: no such model folder (expected a kdir or Hugging Face model folder)")
    try:
        yield
    except KdirError:
        raise
    except (OSError, ValueError) as e:  # transformers: no config.json / weights, not on the hub, not a model folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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


def load_backbone(name_or_path: str | Path) -> nn.Module:
    """An encoder (``AutoModel``) in fp32, without the pooler head of BERT-like models."""
    with loading(name_or_path), quiet_load_report():
        try:  # BERT-like models: skip the pooler head, unused by kdir's pooling
            model = AutoModel.from_pretrained(str(name_or_path), add_pooling_layer=False, **FP32)
        except TypeError:
            model = AutoModel.from_pretrained(str(name_or_path), **FP32)
    return _drop_pooler(model)


def backbone_from_config(name_or_path: str | Path) -> nn.Module:
    """A newly initialised encoder with the architecture of ``name_or_path`` (weights loaded by the caller)."""
    with loading(name_or_path):
        config = AutoConfig.from_pretrained(str(name_or_path))
    try:
        model = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_config(config)
    return _drop_pooler(model)


def load_sequence_classifier(name_or_path: str | Path, num_labels: int = 1) -> nn.Module:
    """A sequence-classification model in fp32 (a plain encoder gets a newly initialised head)."""
    with loading(name_or_path), quiet_load_report():
        return AutoModelForSequenceClassification.from_pretrained(str(name_or_path), num_labels=num_labels, **FP32)


def load_seq2seq(name_or_path: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A seq2seq generator (e.g. doc2query T5, BART) in fp32, in eval mode, and its tokenizer."""
    with loading(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        return AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path), **FP32).eval(), tokenizer
