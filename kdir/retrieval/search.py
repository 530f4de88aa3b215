"""Search: FAISS (exact inner product by default, any ``index_factory`` string), exact torch top-k, and exhaustive
MaxSim top-k for multi-vector models.

Where the search runs (``search_backend``, :func:`resolve_backend`):

* ``auto`` (the default): FAISS on every GPU the installed faiss build sees (``faiss-gpu``); else, for an exact
  ``Flat`` index while torch sees CUDA (``faiss-cpu`` on a GPU node), torch's exact search on the current CUDA
  device (:class:`TorchFlatIndex`, when the corpus fits in 80 % of its free memory); else FAISS on the CPU.
* ``faiss``: FAISS only (GPU with faiss-gpu, else CPU).
* ``torch``: :class:`TorchFlatIndex` (``Flat`` only), on CUDA when torch sees it, else on the CPU.

``use_gpu=false`` keeps every backend on the CPU; ``use_gpu=true`` needs a GPU (an error naming the setting
without one). On faiss GPUs, flat and IVF indexes (``IVF..,Flat``, ``IVF..,PQ..``) are cloned to every GPU
(``faiss.index_cpu_to_all_gpus``, one replica each); HNSW graphs have no GPU form in faiss and stay on the CPU (a
log line says so), as does an index faiss cannot clone (a warning with faiss's reason; an error under
``use_gpu=true``). :class:`TorchFlatIndex` keeps the documents in fp32 (or fp16/bf16 storage, converted to fp32
once per document chunk) and computes every score in fp32 (TF32 off): its top-k equals FAISS ``Flat``'s up to
float rounding and the order of exact ties.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

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

    if isinstance(index, TorchFlatIndex):
        return {"nlist": None, "hnsw": False, "hnsw_quantizer": False}
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


SearchBackend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")
FREE_MEMORY_SHARE = 0.8  # auto: the torch search holds the corpus on the GPU only within this share of free memory


def check_backend(backend: str, factory: str = "Flat", setting: str = "search_backend") -> None:
    """A :class:`ConfigError` naming ``setting`` for an unknown backend or ``torch`` with an approximate index."""
    if backend not in BACKENDS:
        raise ConfigError(f"{setting}={backend!r}: expected auto, faiss or torch")
    if backend == "torch" and not _exact_flat(factory):
        raise ConfigError(
            f"{setting}=torch searches exactly (index_factory=Flat); index_factory={factory!r} needs faiss "
            f"({setting}=faiss or auto)"
        )


def _exact_flat(factory: str) -> bool:
    return str(factory).replace(" ", "") == "Flat"


def faiss_gpus() -> int:
    """How many GPUs the installed faiss build sees (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(
    factory: str = "Flat",
    use_gpu: bool | None = None,
    backend: SearchBackend = "auto",
    n_bytes: int | None = None,
    inner_product: bool = True,
) -> str:
    """Where a search of ``factory`` runs: ``faiss-gpu``, ``faiss-cpu``, ``torch-cuda`` or ``torch-cpu``.

    The rules of the module docstring; ``n_bytes`` (the fp32 corpus, when known) lets ``auto`` keep a corpus that
    does not fit in the GPU's free memory on the CPU (with a warning). ``inner_product=False`` (an L2 index):
    faiss only.
    """
    check_backend(backend, factory)
    if backend == "torch" and not inner_product:
        raise ConfigError("search_backend=torch searches by inner product; this index is L2 (search_backend=faiss)")
    cuda = torch.cuda.is_available()
    if backend == "torch":
        if use_gpu and not cuda:
            raise ConfigError("use_gpu=true but torch sees no CUDA device (search_backend=torch)")
        return "torch-cuda" if cuda and use_gpu is not False else "torch-cpu"
    gpus = faiss_gpus()
    if use_gpu is False:
        return "faiss-cpu"
    if gpus:
        return "faiss-gpu"
    if backend == "auto" and _exact_flat(factory) and inner_product and cuda:
        if n_bytes is None or _fits_on_gpu(n_bytes) or use_gpu:
            return "torch-cuda"
        log.warning("exact search: the corpus (%.1f GiB) exceeds %d %% of the GPU's free memory: FAISS on the CPU",
                    n_bytes / 2**30, 100 * FREE_MEMORY_SHARE)  # fmt: skip
    if use_gpu:
        hint = "" if cuda else "; torch sees no CUDA device either"
        raise ConfigError(
            f"use_gpu=true but faiss sees no GPU (install faiss-gpu on GPU nodes; index_factory=Flat would search "
            f"on the GPU with torch){hint}"
        )
    return "faiss-cpu"


def _fits_on_gpu(n_bytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return n_bytes <= FREE_MEMORY_SHARE * free


def build_index(
    docs: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None, backend: SearchBackend = "auto"
) -> Any:
    """Index ``docs [N, dim]`` (float32) for inner-product search: a faiss index, or a :class:`TorchFlatIndex`.

    Args:
        factory: a FAISS ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF1024,PQ64``, ...).
        use_gpu: ``None`` = a GPU when there is one (faiss's, or torch's for ``Flat``), ``False`` = CPU.
        backend: ``auto``, ``faiss`` or ``torch`` (the module docstring).
    """
    docs = np.ascontiguousarray(docs, dtype=np.float32)
    where = resolve_backend(factory, use_gpu, backend, n_bytes=docs.nbytes)
    if where.startswith("torch"):
        index = TorchFlatIndex(docs.shape[1], device=_torch_device(where))
        index.add(docs)
        log.info("exact search in torch on %s (%d documents)", index.device, index.ntotal)
        return index
    index = new_index(docs.shape[1], factory)
    if where == "faiss-gpu":
        index = _faiss_to_gpus(index, factory, use_gpu)
    if not index.is_trained:
        index.train(docs)
    index.add(docs)
    return index


def to_gpu(index: Any, factory: str, use_gpu: bool | None, backend: SearchBackend = "auto") -> Any:
    """A CPU faiss ``index`` (empty or filled) placed where :func:`resolve_backend` says: cloned to faiss's GPUs, as
    a :class:`TorchFlatIndex` on CUDA (an inner-product ``Flat`` index without faiss-gpu), or left on the CPU."""
    import faiss

    ip = index.metric_type == faiss.METRIC_INNER_PRODUCT
    where = resolve_backend(factory, use_gpu, backend, n_bytes=int(index.ntotal) * int(index.d) * 4, inner_product=ip)
    if where.startswith("torch"):
        out = TorchFlatIndex.from_faiss(index, device=_torch_device(where))
        log.info("exact search in torch on %s (%d documents)", out.device, out.ntotal)
        return out
    if where == "faiss-gpu":
        return _faiss_to_gpus(index, factory, use_gpu)
    return index


def _torch_device(where: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if where == "torch-cuda" else torch.device("cpu")


_GPU_RESOURCES: dict[int, Any] = {}


def gpu_resources(device: int) -> Any:
    """One ``faiss.StandardGpuResources`` per GPU, shared by every index placed there (each reserves scratch
    memory of its own)."""
    import faiss

    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]


def gpu_clone(index: Any, factory: str, use_gpu: bool | None, device: int | None = None) -> Any:
    """``index`` on faiss's GPUs: on GPU ``device``, or replicated on all of them (``None``). HNSW graphs, which
    faiss cannot put on a GPU, stay on the CPU (logged); another index faiss cannot clone too (a warning), or a
    :class:`ConfigError` under ``use_gpu=true``."""
    import faiss

    if index_knobs(index)["hnsw"]:
        log.info("faiss: %s is an HNSW graph, which has no GPU form: searched on the CPU", factory)
        return index
    try:
        if device is None:
            return faiss.index_cpu_to_all_gpus(index)
        return faiss.index_cpu_to_gpu(gpu_resources(device), device, index)
    except RuntimeError as e:
        if use_gpu:
            raise ConfigError(f"use_gpu=true: faiss cannot put index_factory={factory!r} on a GPU: "
                              f"{_faiss_reason(e)}") from None  # fmt: skip
        log.warning("faiss cannot put %s on a GPU (%s): searched on the CPU", factory, _faiss_reason(e))
        return index


def _faiss_to_gpus(index: Any, factory: str, use_gpu: bool | None) -> Any:
    out = gpu_clone(index, factory, use_gpu)
    if out is not index:
        log.info("faiss: %s on %d GPU(s)", factory, faiss_gpus())
    return out


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
    backend: SearchBackend = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents per query by inner product: ``(scores [Nq, k], doc_rows [Nq, k])``, best first.

    ``nprobe`` / ``ef_search``: the IVF / HNSW knobs of the module docstring (checked by :func:`check_index`);
    ``use_gpu`` / ``backend``: where it runs (:func:`resolve_backend`).
    """
    knobs = check_index(factory, docs.shape[1], len(docs), nprobe, ef_search)
    index = build_index(docs, factory, use_gpu, backend)
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
    if isinstance(index, TorchFlatIndex):
        cpu = index.to_faiss()
    else:
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


# ---------------------------------------------------------------- exact search in torch


@contextmanager
def _fp32_matmul(device: torch.device) -> Iterator[None]:
    """Full-precision fp32 matrix products inside the block: autocast off (a search called inside a bf16 loop) and,
    on CUDA, TF32 off; both restored afterwards."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)


def merge_topk(best: tuple[Tensor, Tensor], scores: Tensor, offset: int, k: int) -> tuple[Tensor, Tensor]:
    """The running top-``k`` ``best = (scores [b, k'], rows [b, k'])`` merged with a chunk's ``scores [b, n]``, whose
    column ``j`` is row ``offset + j``: ``(scores [b, min(k, k' + n)], rows)``, best first."""
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    values, rows = torch.cat([best[0], top.values], 1), torch.cat([best[1], top.indices + offset], 1)
    keep = values.topk(min(k, values.shape[1]), dim=1)
    return keep.values, rows.gather(1, keep.indices)


def _empty_topk(like: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    return like.new_empty(rows, 0, dtype=torch.float32), like.new_empty(rows, 0, dtype=torch.long)


def _topk_inner_product(queries: Tensor, blocks: Iterable[Tensor], k: int, query_batch: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of ``queries [Nq, dim]`` (fp32, on the device) over the documents of
    ``blocks`` (consecutive rows): each block is converted to fp32 on the device once and scored against every
    block of ``query_batch`` queries, the running top-k per query merged (:func:`merge_topk`)."""
    starts = range(0, len(queries), query_batch)
    best = [_empty_topk(queries, min(query_batch, len(queries) - s)) for s in starts]
    offset = 0
    with _fp32_matmul(queries.device):
        for block in blocks:
            d = block.to(queries.device, torch.float32)
            for i, s in enumerate(starts):
                best[i] = merge_topk(best[i], queries[s : s + query_batch] @ d.T, offset, k)
            offset += len(block)
    if not best:
        return queries.new_empty(0, k), queries.new_empty(0, k, dtype=torch.long)
    return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])


class TorchFlatIndex:
    """Exact inner-product search in torch with faiss ``IndexFlatIP``'s interface (``add``, ``search``, ``ntotal``,
    ``d``, ``is_trained``, ``metric_type``, ``reconstruct_n``): the GPU search where faiss has no GPU build.

    Documents live on ``device`` in ``dtype`` (``float32``; ``float16`` / ``bfloat16`` halve the memory at the cost
    of rounding the stored vectors), in chunks of at most ``chunk_size`` rows. A search converts each chunk to fp32
    once, scores every block of ``query_batch`` queries against it with fp32 matrix products (TF32 off) and keeps a
    running top-k per query (:func:`torch.topk`, merged across chunks): with fp32 storage, FAISS ``Flat``'s results
    up to float rounding and the order of exact ties. As faiss does, ``k`` beyond ``ntotal`` pads rows with ``-1``
    and scores with ``-3.4e38``.
    """

    is_trained = True

    def __init__(
        self,
        dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_size: int = 65536,
        query_batch: int = 1024,
    ):
        self.d, self.device, self.dtype = int(dim), torch.device(device), dtype
        self.chunk_size, self.query_batch = int(chunk_size), int(query_batch)
        self.ntotal = 0
        self._chunks: list[Tensor] = []
        self._tail: list[Tensor] = []  # pieces added since the last full chunk, joined when they fill one

    @property
    def metric_type(self) -> int:
        import faiss

        return faiss.METRIC_INNER_PRODUCT

    def add(self, x: np.ndarray | Tensor) -> None:
        """Append the rows of ``x [n, d]`` (copied to the device in the storage dtype)."""
        x = x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected vectors [n, {self.d}], got {tuple(x.shape)}")
        for s in range(0, len(x), self.chunk_size):
            self._tail.append(x[s : s + self.chunk_size].to(self.device, self.dtype, copy=True))
            if len(self._tail) == 1 and len(self._tail[0]) == self.chunk_size:
                self._chunks.append(self._tail.pop())  # a full chunk as it came: no second copy
            elif sum(len(t) for t in self._tail) >= self.chunk_size:
                joined = torch.cat(self._tail)
                self._chunks.append(joined[: self.chunk_size].clone())
                self._tail = [joined[self.chunk_size :].clone()] if len(joined) > self.chunk_size else []
        self.ntotal += len(x)

    def _blocks(self) -> list[Tensor]:
        if len(self._tail) > 1:
            self._tail = [torch.cat(self._tail)]
        return self._chunks + self._tail

    @torch.no_grad()
    def search(self, queries: np.ndarray | Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [Nq, k], rows int64 [Nq, k])``, best first."""
        q = queries if isinstance(queries, Tensor) else torch.from_numpy(np.ascontiguousarray(queries, np.float32))
        q = q.to(self.device, torch.float32)
        kk = min(int(k), self.ntotal)
        scores, rows = _topk_inner_product(q, self._blocks(), kk, self.query_batch)
        scores, rows = scores.cpu().numpy(), rows.cpu().numpy()
        if kk < k:  # faiss's filler for the slots an index of fewer than k vectors cannot fill
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.finfo(np.float32).max)
            rows = np.pad(rows, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, rows

    def reconstruct_n(self, start: int = 0, n: int | None = None) -> np.ndarray:
        """Rows ``start : start + n`` as fp32 numpy (all from ``start`` when ``n`` is ``None``)."""
        stored = torch.cat([b.float().cpu() for b in self._blocks()]) if self.ntotal else torch.zeros(0, self.d)
        return stored[start : None if n is None else start + n].numpy()

    def to_faiss(self) -> Any:
        """The same vectors in a CPU ``faiss.IndexFlatIP`` (to save it; :func:`save_index` calls this)."""
        import faiss

        index = faiss.IndexFlatIP(self.d)
        for block in self._blocks():
            index.add(np.ascontiguousarray(block.float().cpu().numpy()))
        return index

    @classmethod
    def from_faiss(cls, index: Any, device: str | torch.device = "cpu", **kw: Any) -> TorchFlatIndex:
        """A :class:`TorchFlatIndex` holding the vectors of a CPU faiss flat index (empty or filled)."""
        out = cls(index.d, device, **kw)
        for s in range(0, index.ntotal, out.chunk_size):
            out.add(index.reconstruct_n(s, min(out.chunk_size, index.ntotal - s)))
        return out


@torch.no_grad()
def exact_search(
    queries: Tensor, docs: Tensor, k: int, batch_size: int = 1024, doc_chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product in torch, on the documents' device (a GPU without faiss-gpu, too):
    ``(scores [Nq, k], doc_rows [Nq, k])``, best first, ``k`` capped at the number of documents. Each chunk of
    ``doc_chunk`` documents is converted to fp32 once and scored against blocks of ``batch_size`` queries in fp32
    (TF32 off), as :class:`TorchFlatIndex` does."""
    k = min(k, len(docs))
    q = queries.to(docs.device, torch.float32)
    blocks = (docs[c : c + doc_chunk] for c in range(0, len(docs), doc_chunk))
    scores, rows = _topk_inner_product(q, blocks, k, batch_size)
    return scores.cpu().numpy(), rows.cpu().numpy()


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

    ``queries`` / ``docs`` are ``(token embeddings [N, L, dim], mask [N, L])`` (fp16 is fine). The queries move to
    ``device`` (default: the documents') once, in fp32; each chunk of ``doc_chunk`` documents moves there and is
    converted to fp32 once, then scored against every block of ``batch_size`` queries, the running top-k of each
    query merged chunk by chunk (:func:`merge_topk`): memory holds one chunk and ``[Nq, k]``, not ``[Nq, Nd]``.
    ``masked_doc_tokens`` is the model's (:func:`kdir.models.colbert.maxsim`): retrieval scores as training did.
    """
    from kdir.models.colbert import maxsim

    (q, q_mask), (d, d_mask) = queries, docs
    device = torch.device(device) if device is not None else d.device
    q, q_mask = q.to(device, torch.float32), q_mask.to(device)
    k = min(k, len(d))
    starts = range(0, len(q), batch_size)
    best = [_empty_topk(q, min(batch_size, len(q) - s)) for s in starts]
    for c in range(0, len(d), doc_chunk):
        dc, mc = d[c : c + doc_chunk].to(device, torch.float32), d_mask[c : c + doc_chunk].to(device)
        for i, s in enumerate(starts):
            scores = maxsim(
                q[s : s + batch_size], q_mask[s : s + batch_size], dc, mc, similarity,
                masked_doc_tokens=masked_doc_tokens,
            )  # fmt: skip
            best[i] = merge_topk(best[i], scores, c, k)
    if not best:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat([b[0] for b in best]).cpu().numpy(), torch.cat([b[1] for b in best]).cpu().numpy()
