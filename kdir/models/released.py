"""The papers' released checkpoints as folders kdir reads (teachers, students, expansion stores).

* **ColBERT v1 / CollectiveKD** ``colbert.dnn`` (``colbert/utils/utils.py: save_checkpoint``): a ``torch.save`` dict
  with ``model_state_dict`` (``bert.*`` + ``linear.weight``, a ``module.`` prefix under DDP), ``arguments`` (the
  training command's ``query_maxlen``, ``doc_maxlen``, ``dim``, ``similarity``, ``mask_punctuation``), ``batch``
  and ``optimizer_state_dict``. The BERT configuration and tokenizer are not in it: ``base`` gives them
  (``bert-base-uncased``). The folder is a kdir :class:`~kdir.models.ColBERT` with the v1 code's behaviour:
  ``[MASK]`` query padding not attended, masked document tokens as zero vectors (``masked_doc_tokens=zero``).
* **CollectiveKD** ``collective_knowledge.pt`` / ``expansion.pt`` (``colbert/label.py``): a dict of ``qid_to_embs``
  (qid → ``[k, dim]``), ``qid_to_weights`` (qid → ``[k]``) and ``qid_to_tokens`` (qid → ``k`` strings), written
  as a kdir :class:`~kdir.stores.ExpansionStore` (queries keyed by their id as a string).
* **TCT-ColBERT** students on the hub (``castorini/tct_colbert-msmarco``, ``castorini/tct_colbert-v2-hnp-msmarco``:
  BERT weights, with or without pre-training heads) and pyserini's encoder conventions (``pyserini/encode/
  _tct_colbert.py``: ``"[CLS] [Q] " + q + "[MASK]" * 36`` truncated to 36, ``"[CLS] [D] " + d``, mean over
  positions 4..): a kdir :class:`~kdir.models.DualEncoder` folder with those settings, usable as a student or as a
  ``teacher=bi_encoder``.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code.

``python -m kdir.models.released colbert-v1 --checkpoint colbert.dnn --base bert-base-uncased --out <dir>``
``python -m kdir.models.released collective-knowledge --file collective_knowledge.pt --out <dir> [--teacher <dir>]``
``python -m kdir.models.released tct-colbert --model castorini/tct_colbert-msmarco --out <dir>``
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from kdir.errors import DataFormatError, KdirError, MissingFileError, OutputExistsError
from kdir.models.colbert import ColBERT
from kdir.models.dual_encoder import DualEncoder
from kdir.models.hf import fast_tokenizer, loading
from kdir.stores import ExpansionStore, id_hashes
from kdir.utils.io import temp_path

# ColBERT v1's argument names -> kdir's ColBERT settings (colbert/utils/parser.py add_model_parameters)
V1_ARGUMENTS = {
    "query_maxlen": ("query_max_length", 32),
    "doc_maxlen": ("doc_max_length", 180),
    "dim": ("dim", 128),
    "similarity": ("similarity", "cosine"),
    "mask_punctuation": ("mask_punctuation", False),
}
# pyserini's TCT-ColBERT encoders as DualEncoder settings (query length: the hard-coded 36; documents: the length of
# TCT-ColBERT's training tfrecords, 154)
TCT_STUDENT = dict(
    pooling="mean",
    skip_tokens=4,
    shared=True,
    similarity="dot",
    query_prefix="[Q] ",
    doc_prefix="[D] ",
    query_mask_padding=True,
    add_sep=False,
)


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors for a missing or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        expected = "a file of tensors and plain containers (torch.load weights_only)"
        raise DataFormatError(path, None, expected, first) from None
    except (RuntimeError, EOFError) as e:
        raise DataFormatError(path, None, "a torch.save file", f"{type(e).__name__}: {e}") from None


def colbert_v1_state(checkpoint: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``bert.*`` / ``linear.*`` tensors (``module.`` prefix removed) and the kdir ColBERT settings of a
    ``colbert.dnn``."""
    ckpt = load_torch_file(checkpoint)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model_state_dict"), Mapping):
        raise DataFormatError(checkpoint, None, "a ColBERT v1 checkpoint: a dict with 'model_state_dict'")
    state = {k.removeprefix("module."): v for k, v in ckpt["model_state_dict"].items()}
    if "linear.weight" not in state or not any(k.startswith("bert.") for k in state):
        raise DataFormatError(
            checkpoint, None, "a model_state_dict with bert.* and linear.weight", str(list(state)[:4])
        )
    state = {k: v for k, v in state.items() if k.startswith(("bert.", "linear."))}
    arguments = ckpt.get("arguments") or {}
    settings = {name: arguments.get(key, default) for key, (name, default) in V1_ARGUMENTS.items()}
    settings["dim"] = int(state["linear.weight"].shape[0])
    settings |= dict(attend_to_mask_tokens=False, masked_doc_tokens="zero", query_marker="[unused0]")
    settings |= dict(doc_marker="[unused1]", normalize_queries=True, bias="linear.bias" in state)
    return state, settings


def _fresh(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def convert_colbert_v1(checkpoint: str | Path, base: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a ColBERT v1 / CollectiveKD ``colbert.dnn`` as a kdir ColBERT folder.

    Args:
        checkpoint: the ``colbert.dnn`` file.
        base: the BERT the checkpoint was trained from (its configuration and tokenizer), e.g. ``bert-base-uncased``.
        out: the folder to write (teacher or student: ``teacher.path=<out>``, ``student.path=<out>``).
        overwrite: replace a non-empty ``out``.
    """
    out = Path(out)
    _fresh(out, overwrite)
    state, settings = colbert_v1_state(checkpoint)
    staging = temp_path(out)
    staging.mkdir(parents=True)
    try:
        from transformers import AutoConfig

        with loading(base):
            AutoConfig.from_pretrained(str(base)).save_pretrained(staging)
        fast_tokenizer(base).save_pretrained(staging)
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, staging / "model.safetensors")
        ColBERT(staging, **settings).save_pretrained(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _pad(rows: Sequence[Tensor], k: int, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((len(rows), k, *shape), dtype=np.float32)
    for i, r in enumerate(rows):
        r = np.asarray(r, dtype=np.float32)
        out[i, : len(r)] = r
    return out


def convert_collective_knowledge(
    file: str | Path, out: str | Path, teacher: str | Path | None = None, overwrite: bool = False
) -> ExpansionStore:
    """Write CollectiveKD's ``collective_knowledge.pt`` (``expansion.pt``) as a kdir expansion store.

    Queries with fewer than ``k`` expansions are padded with zero vectors and weights (no effect on the score).

    Args:
        file: the ``torch.save`` dict of ``qid_to_embs``, ``qid_to_weights``, ``qid_to_tokens``.
        out: the store folder (``teacher.expansion=<out>``).
        teacher: the converted ColBERT folder the expansions were built with (recorded, so the collective teacher
            can check it is given the same weights); ``None``: not recorded.
        overwrite: replace an existing store.
    """
    data = load_torch_file(file)
    fields = ("qid_to_embs", "qid_to_weights", "qid_to_tokens")
    if not isinstance(data, Mapping) or not all(isinstance(data.get(f), Mapping) for f in fields):
        raise DataFormatError(file, None, "CollectiveKD's expansion dict with " + ", ".join(fields))
    embs, weights, tokens = (data[f] for f in fields)
    qids = list(embs)
    if not qids:
        raise DataFormatError(file, None, "at least one query in qid_to_embs")
    missing = [q for q in qids if q not in weights or q not in tokens]
    if missing:
        raise DataFormatError(file, None, "qid_to_weights and qid_to_tokens entries for every query", str(missing[:3]))
    k = max(len(embs[q]) for q in qids)
    dim = int(next(iter(embs.values())).shape[-1])
    vectors = _pad([embs[q] for q in qids], k, (dim,))
    w = _pad([weights[q] for q in qids], k, ())
    strings = [[str(t) for t in tokens[q]] + [""] * (k - len(tokens[q])) for q in qids]
    meta: dict[str, Any] = {"source": {"file": str(Path(file).resolve()), "format": "CollectiveKD expansion.pt"}}
    if teacher is not None:
        meta["teacher"] = ColBERT.from_pretrained(teacher).provenance()
    keys = id_hashes([str(q) for q in qids])
    return ExpansionStore.write(out, keys, vectors, w, strings, meta, overwrite=overwrite)


def convert_tct_colbert(
    model: str | Path,
    out: str | Path,
    query_max_length: int = 36,
    doc_max_length: int = 154,
    overwrite: bool = False,
) -> Path:
    """Write a released TCT-ColBERT encoder (HF folder or hub name) as a kdir dual-encoder folder.

    The folder carries pyserini's conventions (mean over positions 4.., literal ``"[Q] "``/``"[D] "``, queries
    ``[MASK]``-padded to ``query_max_length``, dot product), so ``student=checkpoint student.path=<out>`` or
    ``teacher=bi_encoder teacher.path=<out>`` use them without further settings.
    """
    out = Path(out)
    _fresh(out, overwrite)
    encoder = DualEncoder(
        model, query_max_length=query_max_length, doc_max_length=doc_max_length, **TCT_STUDENT
    )  # AutoModel: BERT weights with or without their "bert." prefix; pre-training heads are skipped
    return encoder.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdir.models.released <colbert-v1 | collective-knowledge | tct-colbert> ...``; exit status 2 on
    a user error (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m kdir.models.released", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("colbert-v1", help="ColBERT v1 / CollectiveKD colbert.dnn -> kdir ColBERT folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--base", default="bert-base-uncased", help="BERT configuration and tokenizer")
    p.add_argument("--out", required=True)
    p = sub.add_parser("collective-knowledge", help="CollectiveKD expansion.pt -> kdir expansion store")
    p.add_argument("--file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="the converted ColBERT folder (recorded in the store)")
    p = sub.add_parser("tct-colbert", help="TCT-ColBERT encoder (HF) -> kdir dual-encoder folder")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--query-max-length", type=int, default=36)
    p.add_argument("--doc-max-length", type=int, default=154)
    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        if args.what == "colbert-v1":
            done = convert_colbert_v1(args.checkpoint, args.base, args.out, args.overwrite)
        elif args.what == "collective-knowledge":
            done = convert_collective_knowledge(args.file, args.out, args.teacher, args.overwrite).path
        else:
            done = convert_tct_colbert(
                args.model, args.out, args.query_max_length, args.doc_max_length, args.overwrite
            )
    except KdirError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
