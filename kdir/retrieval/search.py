"""Search: FAISS (exact inner product by default, any ``index_factory`` string), exact torch top-k, and exhaustive
MaxSim top-k for multi-vector models.

GPU indexes are used when the installed faiss build sees a GPU (``faiss-gpu``); otherwise CPU.

Search knobs (faiss's own parameters, set through ``faiss.ParameterSpace``):

* ``nprobe`` — IVF indexes: how many of the ``nlist`` inverted lists a query visits. ``None`` (the default) starts
  at ``max(ceil(sqrt(nlist)), ceil(2 k nlist / ntotal))`` (about ``2k`` candidates on average) and searches every
  query that got fewer than ``k`` hits again with ``nprobe`` doubled, up to ``nlist`` (exhaustive): at depth ``k``
  every query gets ``min(k, ntotal)`` hits. An explicit ``nprobe`` is used as given (faiss's default is 1, which at
  depth 1000 leaves most slots of a small IVF index empty); queries left short are counted in a warning.
* ``ef_search`` — HNSW graphs (also an IVF's HNSW quantizer): faiss's ``efSearch``, the candidate list of the
  graph search; a larger one finds more of the true top ``k``, slower. For an HNSW index it is at least ``k`` (with
  fewer candidates than ``k`` faiss leaves slots empty): ``max(k, ef_search)``, ``max(k, 16)`` by default. For a
  quantizer it is used as given (``None``: faiss's default).

:func:`check_index` builds the index of a factory string on a zero-vector dummy of the model's dimension, so a bad
string, a dimension it cannot take, a metric other than inner product, more IVF lists than documents, or a knob the
index does not have is a :class:`~kdir.errors.ConfigError` naming the setting before anything is encoded.
:func:`save_index` / :func:`load_index` write and read an index with a JSON record of what it was built from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdir.errors import ConfigError
from kdir.utils.io import atomic_write, temp_path

log = logging.getLogger(__name__)

_PROBE_DIMS = (768, 384, 1024, 512, 256, 128, 64, 32)  # config-time check when the model's dimension is unknown


def _faiss_reason(exc: BaseException) -> str:
    """The useful part of a faiss C++ error (its condition or parse message, without the source location)."""
    msg = " ".join(str(exc).split())
    if "could not parse" in msg:
        return msg[msg.index("could not parse") :]
    if "failed: " in msg:
        return msg.rsplit("failed: ", 1)[1]
    if "Error: " in msg:
        reason = msg.rsplit("Error: ", 1)[1]
        return reason + (" (kdir searches by inner product)" if "METRIC" in reason else "")
    return msg


def new_index(dim: int, factory: str = "Flat", setting: str = "index_factory", dim_known: bool = True) -> Any:
    """An empty CPU faiss index for ``dim``-d inner-product search; a :class:`ConfigError` naming ``setting`` if
    faiss cannot build ``factory`` so (``dim_known=False``: the message leaves the dimension out)."""
    import faiss  # imported here: stages that never search (teacher training on a GPU node) need no faiss

    try:
        index = faiss.index_factory(int(dim), str(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(
            f"{setting}={factory!r}: faiss cannot build this index for {f'{dim}-d ' if dim_known else ''}"
            f"inner-product search: "
            f"{_faiss_reason(e)} (see faiss's index_factory strings: Flat, HNSW32, IVF1024,Flat, IVF256,PQ16, ...)"
        ) from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ConfigError(f"{setting}={factory!r}: this index does not search by inner product; kdir needs it to")
    return index


def index_knobs(index: Any) -> dict[str, Any]:
    """Which search knobs a CPU index has: ``{"nlist": IVF lists or None, "hnsw": bool, "hnsw_quantizer": bool}``."""
    import faiss

    while isinstance(index, (faiss.IndexShards, faiss.IndexReplicas)) and index.count():
        index = index.at(0)  # sharded or replicated: the knobs of its parts (alike)
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexRefine, faiss.IndexIDMap)):
        inner = faiss.downcast_index(inner.index if not isinstance(inner, faiss.IndexRefine) else inner.base_index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    return {
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "hnsw": isinstance(inner, faiss.IndexHNSW),
        "hnsw_quantizer": isinstance(quantizer, faiss.IndexHNSW),
    }


def check_factory(factory: str, setting: str = "index_factory") -> None:
    """Config-time check of a factory string while the model's dimension is not known yet: a :class:`ConfigError`
    if faiss can build it for none of the usual dimensions for a reason other than the dimension (a typo, a
    metric). Dimension-specific problems are :func:`check_index`'s, once the dimension is known."""
    if factory == "Flat":
        return
    first: ConfigError | None = None
    for dim in _PROBE_DIMS:
        try:
            new_index(dim, factory, setting, dim_known=False)
            return
        except ConfigError as e:
            first = first or e
    if first is not None and "dimension" not in str(first):
        raise first


def check_index(
    factory: str,
    dim: int,
    n_docs: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    setting: str = "index_factory",
) -> dict[str, Any]:
    """Build ``factory`` (empty) for ``dim``-d inner product and check the knobs against it, before any encoding.

    Returns :func:`index_knobs`. :class:`ConfigError` (naming ``setting``, ``nprobe`` or ``ef_search``) when faiss
    cannot build it, when an IVF index has more lists than ``n_docs`` documents to train them on, or when a knob
    is set that the index does not have.
    """
    knobs = index_knobs(new_index(dim, factory, setting))
    nlist = knobs["nlist"]
    if n_docs is not None and nlist is not None and n_docs < nlist:
        fit = 2 ** max(0, int(math.log2(max(1.0, math.sqrt(n_docs)))))
        raise ConfigError(
            f"{setting}={factory!r}: its {nlist} IVF lists need at least {nlist} documents to train, the corpus "
            f"has {n_docs}; use fewer lists (about sqrt(documents), e.g. IVF{fit},Flat) or Flat"
        )
    if nprobe is not None and nlist is None:
        raise ConfigError(f"nprobe={nprobe}: {setting}={factory!r} is not an IVF index (nprobe = IVF lists visited)")
    if ef_search is not None and not (knobs["hnsw"] or knobs["hnsw_quantizer"]):
        raise ConfigError(f"ef_search={ef_search}: {setting}={factory!r} has no HNSW graph (ef_search = its efSearch)")
    return knobs


def _param_space() -> Any:
    import faiss

    return faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()


def build_index(docs: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None):
    """Index ``docs [N, dim]`` (float32) for inner-product search.

    Args:
        factory: a FAISS ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF1024,PQ64``, ...).
        use_gpu: ``None`` = use every GPU faiss can see.
    """
    docs = np.ascontiguousarray(docs, dtype=np.float32)
    index = new_index(docs.shape[1], factory)
    index = to_gpu(index, factory, use_gpu)
    if not index.is_trained:
        index.train(docs)
    index.add(docs)
    return index


def to_gpu(index: Any, factory: str, use_gpu: bool | None) -> Any:
    import faiss

    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if (use_gpu is None and n_gpus > 0) or use_gpu:
        if n_gpus == 0:
            raise ConfigError("use_gpu=true but faiss sees no GPU (install faiss-gpu on GPU nodes)")
        index = faiss.index_cpu_to_all_gpus(index)
        log.info("faiss: %s on %d GPU(s)", factory, n_gpus)
    return index


def auto_nprobe(nlist: int, ntotal: int, k: int) -> int:
    """The first ``nprobe`` of the default (``nprobe=None``): ``max(ceil(sqrt(nlist)), ceil(2 k nlist / ntotal))``,
    at most ``nlist``."""
    return int(min(nlist, max(math.ceil(math.sqrt(nlist)), math.ceil(2 * k * nlist / max(ntotal, 1)))))


def search_index(
    index: Any,
    queries: np.ndarray,
    k: int,
    knobs: dict[str, Any],
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of a built index with the knobs of the module docstring: ``(scores [Nq, k], rows [Nq, k])``, best
    first, row ``-1`` (score ``-inf``) where an explicit ``nprobe`` left a query short. ``knobs``:
    :func:`index_knobs` of the CPU index."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    space = _param_space()
    if knobs["hnsw"]:
        space.set_index_parameter(index, "efSearch", max(k, ef_search or 16))
    elif knobs["hnsw_quantizer"] and ef_search is not None:
        space.set_index_parameter(index, "quantizer_efSearch", ef_search)
    nlist = knobs["nlist"]
    if nlist is None:
        return index.search(queries, k)
    probe = nprobe or auto_nprobe(nlist, index.ntotal, k)
    space.set_index_parameter(index, "nprobe", min(probe, nlist))
    scores, rows = index.search(queries, k)
    short = np.flatnonzero((rows < 0).any(axis=1))
    if nprobe is None:
        while len(short) and probe < nlist:
            probe = min(nlist, 2 * probe)
            space.set_index_parameter(index, "nprobe", probe)
            s, r = index.search(queries[short], k)
            scores[short], rows[short] = s, r
            short = short[(r < 0).any(axis=1)]
    elif len(short):
        log.warning(
            "nprobe=%d: %d of %d queries got fewer than %d hits (of %d IVF lists); nprobe=null widens them",
            nprobe,
            len(short),
            len(queries),
            k,
            nlist,
        )
    return scores, rows


def search(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    factory: str = "Flat",
    use_gpu: bool | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents per query by inner product: ``(scores [Nq, k], doc_rows [Nq, k])``, best first.

    ``nprobe`` / ``ef_search``: the IVF / HNSW knobs of the module docstring (checked by :func:`check_index`).
    """
    knobs = check_index(factory, docs.shape[1], len(docs), nprobe, ef_search)
    index = build_index(docs, factory, use_gpu)
    return search_index(index, queries, k, knobs, nprobe, ef_search)


# ---------------------------------------------------------------- saved indexes


def index_record_path(path: str | Path) -> Path:
    """The JSON record written next to a saved index: ``<index file>.json``."""
    return Path(f"{path}.json")


def save_index(index: Any, path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``index`` (a GPU index is copied to the CPU first) to ``path`` and ``record`` (what it was built from)
    to ``<path>.json``, each atomically; the record also holds the index file's size, checked by
    :func:`load_index`. Returns ``path``."""
    import faiss

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and _on_gpu(index) else index
    tmp = temp_path(path)
    try:
        faiss.write_index(cpu, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with atomic_write(index_record_path(path)) as f:
        f.write(json.dumps(record | {"index_bytes": size}, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _on_gpu(index: Any) -> bool:
    return "Gpu" in type(index).__name__ or type(index).__name__ in ("IndexReplicas", "IndexShards")


def load_index(path: str | Path, record: dict[str, Any]) -> tuple[Any | None, list[str]]:
    """The CPU index saved at ``path`` if its record matches ``record``: ``(index, [])``; else ``(None, what
    differs)`` (also when a file is missing, unreadable or of another size than recorded)."""
    import faiss

    path = Path(path)
    if not path.is_file():
        return None, ["no saved index"]
    try:
        saved = json.loads(index_record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, [f"no readable record {index_record_path(path)}"]
    differs = _differences(saved, json.loads(json.dumps(record, default=str)))
    if saved.get("index_bytes") != os.path.getsize(path):
        differs.append(f"index file size {os.path.getsize(path)} bytes, recorded {saved.get('index_bytes')}")
    if differs:
        return None, differs
    try:
        return faiss.read_index(str(path)), []
    except RuntimeError as e:
        return None, [f"unreadable index file ({_faiss_reason(e)})"]


def _differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``key old -> new`` for each value of ``wanted`` that ``saved`` does not have (nested keys dotted)."""
    out = []
    for key, value in wanted.items():
        old = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            out += _differences(old, value, f"{prefix}{key}.")
        elif old != value:
            out.append(f"{prefix}{key} {_short(old)} -> {_short(value)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    text = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{4,}\b", r"\1", text)  # hashes: 12 digits
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- exact search without faiss


@torch.no_grad()
def exact_search(queries: Tensor, docs: Tensor, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product in torch, on the tensors' device (a GPU without faiss-gpu, too):
    ``(scores [Nq, k], doc_rows [Nq, k])``, best first."""
    k = min(k, len(docs))
    scores, rows = [], []
    for s in range(0, len(queries), batch_size):
        top = (queries[s : s + batch_size].float() @ docs.float().T).topk(k, dim=1)
        scores.append(top.values.cpu())
        rows.append(top.indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(rows).numpy()


@torch.no_grad()
def maxsim_search(
    queries: tuple[Tensor, Tensor],
    docs: tuple[Tensor, Tensor],
    k: int,
    similarity: str = "cosine",
    batch_size: int = 64,
    doc_chunk: int = 1024,
    device: str | torch.device | None = None,
    masked_doc_tokens: str | float = "exclude",
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive late-interaction top-``k``: ``(scores [Nq, k], doc_rows [Nq, k])``, best first.

    ``queries`` / ``docs`` are ``(token embeddings [N, L, dim], mask [N, L])`` (fp16 is fine); the corpus moves to
    ``device`` once and each block of ``batch_size`` queries is scored against chunks of ``doc_chunk`` documents.
    ``masked_doc_tokens`` is the model's (:func:`kdir.models.colbert.maxsim`): retrieval scores as training did.
    """
    from kdir.models.colbert import maxsim

    (q, q_mask), (d, d_mask) = queries, docs
    device = device or d.device
    d, d_mask = d.to(device), d_mask.to(device)
    k = min(k, len(d))
    top_scores, top_rows = [], []
    for s in range(0, len(q), batch_size):
        qb, mb = q[s : s + batch_size].to(device).float(), q_mask[s : s + batch_size].to(device)
        scores = torch.cat(
            [
                maxsim(
                    qb,
                    mb,
                    d[c : c + doc_chunk].float(),
                    d_mask[c : c + doc_chunk],
                    similarity,
                    masked_doc_tokens=masked_doc_tokens,
                )
                for c in range(0, len(d), doc_chunk)
            ],
            dim=1,
        )
        top = scores.topk(k, dim=1)
        top_scores.append(top.values.cpu())
        top_rows.append(top.indices.cpu())
    return torch.cat(top_scores).numpy(), torch.cat(top_rows).numpy()
