"""A dual encoder in the sentence-transformers folder format: the export, the import, and a hub-ready model card.

**Export** (:func:`export_sentence_transformers`, called by :meth:`DualEncoder.save_pretrained`) writes, next to
kdir's own files, the files that make ``SentenceTransformer(folder)`` compute kdir's embeddings
(https://sbert.net/docs/sentence_transformer/usage/custom_models.html): ``modules.json``,
``config_sentence_transformers.json`` (prompts = kdir's text prefixes, ``similarity_fn_name``), the transformer's
``sentence_bert_config.json`` (lengths), ``1_Pooling/config.json``, a ``Dense`` module for a projection and
``Normalize`` for cosine. One shared tower is one ``Transformer`` (query and document lengths as its
``query_length`` / ``document_length``); separate towers are a ``Router`` (``query/`` and ``doc/`` routes, so
``encode_query`` / ``encode_document`` take each side's tower, text layout, pooling and projection). What
sentence-transformers cannot express, ``[MASK]`` query padding, texts without a final ``[SEP]`` (TCT-ColBERT) and
mean pooling that skips leading positions, is done by the modules of :mod:`kdir.models.st_modules`, copied into the
folder as ``kdir_st_modules.py`` (loaded with ``trust_remote_code=True``). Plain ``encode`` gives document embeddings.

**Import** (:func:`read_sentence_transformers`, used by :meth:`DualEncoder.from_pretrained` for a folder with a
``modules.json`` and no ``kdir_model.json``) reads the same files of any sentence-transformers folder, written by
kdir or not, and refuses clearly what a kdir dual encoder cannot compute (other pooling modes, activations, modules).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdir.errors import ConfigError, MissingFileError
from kdir.models.base import CONFIG_NAME
from kdir.models.hf import fast_tokenizer

if TYPE_CHECKING:
    from kdir.models.dual_encoder import DualEncoder, SideSettings

ST_NAMES = "sentence_transformers.models."  # module type names read by sentence-transformers 5 and 6 alike
CUSTOM_FILE = "kdir_st_modules.py"  # the copy of kdir/models/st_modules.py in an exported folder
CUSTOM = CUSTOM_FILE.removesuffix(".py") + "."
IDENTITY = "torch.nn.modules.linear.Identity"
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json")
DOC_PROMPTS = ("document", "passage", "corpus")  # the prompt names encode_document tries, in its order
LEGACY_POOLING = {  # Pooling's boolean keys of sentence-transformers < 6 and the modes they name
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


# ----------------------------------------------------------------------------------------------------------- export
def export_sentence_transformers(model: DualEncoder, path: Path) -> None:
    """Write the sentence-transformers files of ``model`` into ``path``, beside the towers :meth:`DualEncoder._save`
    wrote (the query tower at the top level, or in ``query/`` too when the towers are separate)."""
    cfg = model.config
    q, d = model.side("query"), model.side("doc")
    custom = any(_needs_custom(s) for s in (q, d))  # custom modules are written for sentence-transformers >= 6
    needs_v6 = custom
    if cfg["shared"]:
        lengths = {"max_seq_length": d.max_length}
        if q.max_length != d.max_length or q.mask_padding:
            lengths |= {"query_length": q.max_length, "document_length": d.max_length}
            needs_v6 = True  # per-task lengths: sentence-transformers >= 6
        mask_length = q.max_length if q.mask_padding else None
        modules = [("", _write_transformer(path, lengths, mask_length, q.add_sep))]
        hidden = model.query_encoder.config.hidden_size
        modules.append(("1_Pooling", _write_pooling(path / "1_Pooling", hidden, q.pooling, q.skipped)))
        if model.query_projection is not None:
            modules.append(("2_Dense", _write_dense(path / "2_Dense", model.query_projection)))
    else:
        modules = [("", _write_router(model, path))]
    if cfg["similarity"] == "cosine":
        modules.append((f"{len(modules)}_Normalize", ST_NAMES + "Normalize"))
    entries = [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)]
    _write_json(path / "modules.json", entries)
    versions = {"transformers": _version("transformers"), "pytorch": torch.__version__}
    if (st := _version("sentence-transformers")) is not None:
        versions = {"sentence_transformers": st} | versions
    _write_json(
        path / "config_sentence_transformers.json",
        {
            "__version__": versions,
            "model_type": "SentenceTransformer",
            "prompts": {"query": q.prefix, "document": d.prefix},
            "default_prompt_name": "document" if d.prefix else None,  # plain encode() = documents
            "similarity_fn_name": cfg["similarity"],
            "requirements": {"sentence_transformers": ">=6.0" if needs_v6 else ">=5.0"},
        },
    )
    if custom:
        shutil.copyfile(Path(__file__).with_name("st_modules.py"), path / CUSTOM_FILE)


def _needs_custom(side: SideSettings) -> bool:
    """What sentence-transformers' own modules cannot do: [MASK] padding, no final [SEP], skipped positions."""
    return side.mask_padding or not side.add_sep or bool(side.skipped)


def _write_transformer(folder: Path, lengths: dict[str, int], mask_length: int | None, add_sep: bool) -> str:
    config: dict[str, Any] = {**lengths, "do_lower_case": False}
    if mask_length is not None:
        config["query_mask_length"] = mask_length
    if not add_sep:
        config["add_sep"] = False
    _write_json(folder / "sentence_bert_config.json", config)
    return CUSTOM + "KdirTransformer" if mask_length is not None or not add_sep else ST_NAMES + "Transformer"


def _write_pooling(folder: Path, dim: int, pooling: str, skip: int) -> str:
    config: dict[str, Any] = {  # the legacy keys: read by sentence-transformers 5 and (converted) 6
        "word_embedding_dimension": dim,
        **{key: name == pooling for key, name in LEGACY_POOLING.items()},
        "include_prompt": True,
    }
    if skip:
        config |= {"include_prompt": False, "skip_tokens": skip}
    _write_json(folder / "config.json", config)
    return CUSTOM + "SkipTokensPooling" if skip else ST_NAMES + "Pooling"


def _write_dense(folder: Path, linear: nn.Linear) -> str:
    config = {
        "in_features": linear.in_features,
        "out_features": linear.out_features,
        "bias": True,
        "activation_function": IDENTITY,
    }
    _write_json(folder / "config.json", config)
    weights = {"linear.weight": linear.weight, "linear.bias": linear.bias}
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    return ST_NAMES + "Dense"


def _write_router(model: DualEncoder, path: Path) -> str:
    """Routes ``query`` (``query/``: the query tower) and ``document`` (``doc/``), each with its own tower, layout,
    pooling and projection."""
    q, d = model.side("query"), model.side("doc")
    mask = q.max_length if q.mask_padding else None
    q_lengths = {"max_seq_length": q.max_length} | ({"query_length": mask} if mask else {})
    sides = {
        "query": ("query", model.query_encoder, model.query_projection, q, q_lengths, mask),
        "document": ("doc", model.doc_encoder, model.doc_projection, d, {"max_seq_length": d.max_length}, None),
    }
    types, structure = {}, {}
    for route, (tower, encoder, projection, side, lengths, mask_length) in sides.items():
        modules = [(tower, _write_transformer(path / tower, lengths, mask_length, side.add_sep))]
        hidden = encoder.config.hidden_size
        pooling = f"{tower}_1_Pooling"
        modules.append((pooling, _write_pooling(path / pooling, hidden, side.pooling, side.skipped)))
        if projection is not None:
            modules.append((f"{tower}_2_Dense", _write_dense(path / f"{tower}_2_Dense", projection)))
        types |= dict(modules)
        structure[route] = [name for name, _ in modules]
    parameters = {"default_route": "document", "allow_empty_key": True}  # plain encode(): documents
    config = {"types": types, "structure": structure, "parameters": parameters}
    _write_json(path / "router_config.json", config)
    return ST_NAMES + "Router"


def save_tower_twice(encoder: nn.Module, tokenizer: Any, path: Path) -> None:
    """Save a query tower in ``path/query`` (the sentence-transformers route) and at the top level of ``path``
    (``AutoModel.from_pretrained(path)``) as hard links to the same files (copies where links are impossible)."""
    folder = path / "query"
    if folder.exists():
        shutil.rmtree(folder)  # unlinks only: top-level files still linked to the old ones keep their bytes
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for file in folder.iterdir():
        if file.is_file():
            top = path / file.name
            top.unlink(missing_ok=True)
            try:
                os.link(file, top)
            except OSError:
                shutil.copy2(file, top)


# ----------------------------------------------------------------------------------------------------------- import
@dataclass
class _Side:
    """One side's pipeline as read: the tower folder and its settings, pooling, optional projection, normalising."""

    tower: Path
    lengths: dict[str, int]
    mask_length: int | None
    add_sep: bool
    pooling: str
    skip_tokens: int
    include_prompt: bool
    pooling_file: Path
    dense: Path | None = None
    normalize: bool = False


@dataclass
class STModel:
    """What :func:`read_sentence_transformers` found: :class:`DualEncoder` settings (``model_name_or_path`` included)
    and the projection weights to load (``query`` / ``doc``: ``{"weight", "bias"}``)."""

    settings: dict[str, Any]
    projections: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    source: Path | None = None
    doc_vocabulary: bool = False  # the document tower brings a vocabulary of its own

    def load_projections(self, model: DualEncoder) -> None:
        """Copy the ``Dense`` weights into ``model``'s projections (where an override left them the same shape)."""
        for side, linear in (("query", model.query_projection), ("doc", model.doc_projection)):
            weights = self.projections.get(side)
            if linear is not None and weights is not None and linear.weight.shape == weights["weight"].shape:
                linear.load_state_dict(weights)


def is_sentence_transformers_folder(path: str | Path) -> bool:
    """A local folder with a ``modules.json`` and without kdir's own settings file."""
    folder = Path(str(path))
    return (folder / "modules.json").is_file() and not (folder / CONFIG_NAME).is_file()


def read_sentence_transformers(path: str | Path) -> STModel:
    """The :class:`DualEncoder` a local sentence-transformers folder describes (see the module docstring)."""
    root = Path(str(path))
    modules_file = root / "modules.json"
    entries = _read_json(modules_file)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{modules_file}: expected a list of modules")
    routes: dict[str, list[tuple[str, Path, Path]]] = {"query": [], "document": []}
    source = modules_file
    for i, entry in enumerate(entries):
        kind, folder = _kind(entry.get("type", "")), root / entry.get("path", "")
        if kind in ("Router", "Asym"):
            if i:
                raise ConfigError(f"{modules_file}: a Router is supported as the first module only")
            source, chosen = _read_router(folder)
            for route in routes:
                routes[route] += chosen[route]
        else:
            for route in routes:
                routes[route].append((entry.get("type", ""), folder, modules_file))
    q, d = (_read_side(routes[r], source) for r in ("query", "document"))
    return _combine(root, q, d, source)


def _read_router(folder: Path) -> tuple[Path, dict[str, list[tuple[str, Path, Path]]]]:
    file = next((f for f in (folder / "router_config.json", folder / "config.json") if f.is_file()), None)
    if file is None:
        raise MissingFileError(f"{folder}: no router_config.json for the Router of modules.json")
    config = _read_json(file)
    types, structure = config.get("types", {}), config.get("structure", {})
    params = config.get("parameters", {})
    mappings = {}
    for key, value in (params.get("route_mappings") or {}).items():
        try:
            mappings[ast.literal_eval(key) if isinstance(key, str) else tuple(key)] = value
        except (ValueError, SyntaxError):
            raise ConfigError(f"{file}: route_mappings key {key!r} is not a (task, modality) pair") from None
    chosen = {}
    for task in ("query", "document"):
        route = next(
            (mappings[k] for k in ((task, "text"), (task, None), (None, "text"), (None, None)) if k in mappings),
            task if task in structure else params.get("default_route"),
        )
        if route not in structure:
            raise ConfigError(f"{file}: no route for task {task!r} (routes: {', '.join(structure)})")
        chosen[task] = [(types.get(m, f"<{m}: no type>"), folder / m, file) for m in structure[route]]
    return file, chosen


def _read_side(modules: list[tuple[str, Path, Path]], source: Path) -> _Side:
    """``Transformer → Pooling → [Dense] → [Normalize]``, or a clear refusal naming the file."""
    expected = "a Transformer, a Pooling, an optional Dense (Identity activation) and an optional Normalize"
    kinds = [_kind(t) for t, _, _ in modules]
    if (
        len(kinds) < 2
        or kinds[0] not in ("Transformer", "KdirTransformer", "MaskPaddedTransformer")  # the last: older kdir
        or kinds[1] not in ("Pooling", "SkipTokensPooling")
        or kinds[2:] not in ([], ["Dense"], ["Normalize"], ["Dense", "Normalize"])
    ):
        got = ", ".join(t for t, _, _ in modules)
        raise ConfigError(f"{modules[0][2] if modules else source}: kdir reads {expected}, got {got}")
    tower, pooling_folder = modules[0][1], modules[1][1]
    lengths, mask_length, add_sep = _read_transformer(tower)
    pooling_file = pooling_folder / "config.json"
    pool = _read_json(pooling_file)
    mode = pool.get("pooling_mode")
    if mode is None:  # the legacy boolean keys (none set: mean, as in sentence-transformers)
        mode = [name for key, name in LEGACY_POOLING.items() if pool.get(key)] or ["mean"]
    mode = [mode] if isinstance(mode, str) else list(mode)
    if len(mode) != 1 or mode[0] not in ("cls", "mean"):
        raise ConfigError(
            f"{pooling_file}: pooling mode {'+'.join(mode)!r} is not supported (kdir pools by 'cls' or 'mean')"
        )
    side = _Side(
        tower=tower,
        lengths=lengths,
        mask_length=mask_length,
        add_sep=add_sep,
        pooling=mode[0],
        skip_tokens=int(pool.get("skip_tokens", 0)),
        include_prompt=bool(pool.get("include_prompt", True)) or _kind(modules[1][0]) == "SkipTokensPooling",
        pooling_file=pooling_file,
    )
    for kind, (_, folder, _) in zip(kinds[2:], modules[2:]):
        if kind == "Dense":
            side.dense = folder
        else:
            side.normalize = True
    return side


def _read_transformer(folder: Path) -> tuple[dict[str, int], int | None, bool]:
    """The lengths (``max_seq_length`` / ``query_length`` / ``document_length``, with sentence-transformers' fallback:
    the tokenizer's, capped by the position embeddings), the ``[MASK]`` length and whether texts end with ``[SEP]``
    (``add_sep``, kdir's ``KdirTransformer``) of a transformer module."""
    file = next((folder / n for n in TRANSFORMER_CONFIGS if (folder / n).is_file()), None)
    config = _read_json(file) if file is not None else {}
    where = file or folder
    if config.get("do_lower_case"):
        raise ConfigError(f"{where}: do_lower_case=true is not supported (kdir tokenises with the tokenizer as saved)")
    if config.get("query_expansion"):
        raise ConfigError(f"{where}: query_expansion is not supported (kdir's [MASK] padding replaces the [SEP] too)")
    if config.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise ConfigError(f"{where}: transformer_task {config['transformer_task']!r} is not a plain encoder")
    if config.get("processing_kwargs"):
        raise ConfigError(f"{where}: processing_kwargs are not supported (kdir tokenises with its own settings)")
    lengths = {k: int(config[k]) for k in ("max_seq_length", "query_length", "document_length") if config.get(k)}
    if "max_seq_length" not in lengths:
        sources = (("tokenizer_config.json", "model_max_length"), ("config.json", "max_position_embeddings"))
        limits = [_read_json(folder / f).get(key) for f, key in sources if (folder / f).is_file()]
        limits = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 1_000_000]
        if limits:
            lengths["max_seq_length"] = min(limits)
    mask = config.get("query_mask_length")
    return lengths, int(mask) if mask else None, bool(config.get("add_sep", True))


def _read_dense(folder: Path) -> dict[str, Tensor]:
    file = folder / "config.json"
    config = _read_json(file)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # Dense's default is Tanh
    if activation not in (IDENTITY, "torch.nn.Identity"):
        raise ConfigError(f"{file}: Dense activation {activation} is not supported (kdir projects linearly: Identity)")
    if config.get("use_residual") or config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ConfigError(f"{file}: only a plain Dense on the sentence embedding is supported")
    if (folder / "model.safetensors").is_file():
        weights = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise MissingFileError(f"{folder}: no model.safetensors or pytorch_model.bin for the Dense module")
    if "linear.weight" not in weights:
        raise ConfigError(f"{folder}: the Dense weights hold no linear.weight (got {', '.join(sorted(weights))})")
    weight = weights["linear.weight"].float()
    bias = weights.get("linear.bias")
    return {"weight": weight, "bias": bias.float() if bias is not None else torch.zeros(weight.shape[0])}


def _combine(root: Path, q: _Side, d: _Side, source: Path) -> STModel:
    if q.normalize != d.normalize:
        raise ConfigError(f"{source}: only one route normalises its embeddings (kdir: both or neither)")
    st_file = root / "config_sentence_transformers.json"
    st = _read_json(st_file) if st_file.is_file() else {}
    prompts = st.get("prompts") or {}
    q_prefix = prompts.get("query") or ""
    d_prefix = next((prompts[n] for n in DOC_PROMPTS if n in prompts), "") or ""
    similarity = st.get("similarity_fn_name") or "cosine"  # sentence-transformers' default: cosine
    if similarity not in ("cosine", "dot"):
        raise ConfigError(f"{st_file}: similarity_fn_name {similarity!r} is not supported (kdir: 'cosine' or 'dot')")
    if q.normalize:  # normalised embeddings: their inner product is the cosine
        similarity = "cosine"
    q_skip, d_skip = _skip(q, q_prefix), _skip(d, d_prefix)
    shared = q.tower == d.tower
    if shared and (q.pooling, q_skip, q.add_sep) != (d.pooling, d_skip, d.add_sep):
        raise ConfigError(
            f"{source}: the query and document routes of one tower pool or lay out texts differently (kdir: one "
            "shared tower treats both sides alike)"
        )
    settings: dict[str, Any] = {
        "model_name_or_path": str(q.tower),
        "pooling": q.pooling,
        "skip_tokens": q_skip,
        "shared": shared,
        "similarity": similarity,
        "query_prefix": q_prefix,
        "doc_prefix": d_prefix,
        "query_mask_padding": q.mask_length is not None,
        "add_sep": q.add_sep,
        "doc_pooling": d.pooling,  # DualEncoder keeps the document side's own values only where they differ
        "doc_skip_tokens": d_skip,
        "doc_add_sep": d.add_sep,
    }
    q_len = q.mask_length or q.lengths.get("query_length") or q.lengths.get("max_seq_length")
    d_len = d.lengths.get("document_length") or d.lengths.get("max_seq_length")
    settings |= {k: v for k, v in (("query_max_length", q_len), ("doc_max_length", d_len)) if v}
    out = STModel(settings, source=source)
    if not shared:
        settings["doc_model_name_or_path"] = str(d.tower)
        out.doc_vocabulary = _vocabulary(q.tower) != _vocabulary(d.tower)
    if shared and q.dense != d.dense:
        raise ConfigError(f"{source}: one tower with a different Dense per route is not supported (kdir: one Dense)")
    if q.dense is not None:
        out.projections["query"] = _read_dense(q.dense)
        settings["projection_dim"] = out.projections["query"]["weight"].shape[0]
    if not shared and d.dense is not None:
        out.projections["doc"] = _read_dense(d.dense)
        doc_dim = out.projections["doc"]["weight"].shape[0]
        if q.dense is None:  # a projection of the document side only: a frozen tower's own (kdir's asymmetric DE)
            settings |= {"freeze_doc_encoder": True, "doc_projection_dim": doc_dim}
        elif doc_dim != settings["projection_dim"]:
            raise ConfigError(f"{source}: the query and document Dense modules have different output sizes")
    elif not shared and q.dense is not None:
        settings["freeze_doc_encoder"] = True  # kdir's one-sided projection: onto an inherited, frozen document tower
    return out


def _skip(side: _Side, prompt: str) -> int:
    """The leading positions a route's pooling leaves out: its ``skip_tokens``, or the prompt's tokens for a
    ``Pooling(include_prompt=False)`` (kdir skips a fixed count of positions)."""
    if side.include_prompt or not prompt:
        return side.skip_tokens if side.pooling == "mean" else 0
    if side.pooling == "cls":
        raise ConfigError(f"{side.pooling_file}: cls pooling without the prompt is not supported (kdir: position 0)")
    return _prompt_tokens(side.tower, prompt)


def _prompt_tokens(tower: Path, prompt: str) -> int:
    """The positions sentence-transformers counts as the prompt: its tokens, less a trailing special token."""
    if not prompt:
        return 0
    tok = fast_tokenizer(tower)
    ids = tok(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tok.all_special_ids else 0)


def _vocabulary(tower: Path) -> dict[str, int]:
    return fast_tokenizer(tower).get_vocab()


def _kind(type_name: str) -> str:
    """The class name of a ``modules.json`` type (``sentence_transformers.models.Pooling`` → ``Pooling``)."""
    return type_name.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------------------- model card
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def write_model_card(path: str | Path, info: dict[str, Any]) -> Path:
    """Write ``README.md`` of an exported dual-encoder folder: hub metadata (``library_name: sentence-transformers``,
    tags, ``base_model``) and a body describing the model, how it was trained, its test metrics and its use.

    Args:
        path: the folder :meth:`DualEncoder.save_pretrained` wrote.
        info: ``base_model`` (hub id or folder), ``teacher``, ``loss``, ``data``, ``steps``, ``metrics``
            (``{measure: value}`` or ``{column: {measure: value}}``, e.g. before / after training); optional
            ``name``, ``model_id`` (the hub repository, for the usage snippet), ``datasets`` (hub dataset ids),
            ``language``, ``license``, ``tags``. A ``base_model`` that is a local folder is named in the text only
            (hub metadata takes repository ids).

    Returns:
        The path of ``README.md``.
    """
    from huggingface_hub import ModelCardData

    folder = Path(path)
    settings = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    st = _read_json(folder / "config_sentence_transformers.json")
    custom = (folder / CUSTOM_FILE).is_file()
    base = str(info.get("base_model") or "")
    data = ModelCardData(
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=[
            "sentence-transformers",
            "sentence-similarity",
            "feature-extraction",
            "dense-retrieval",
            "knowledge-distillation",
            "kdir",
            *info.get("tags", []),
        ],  # fmt: skip
        base_model=base if base and HUB_ID.match(base) and not Path(base).exists() else None,
        datasets=list(info["datasets"]) if info.get("datasets") else None,
        language=info.get("language"),
        license=info.get("license"),
    )
    name = info.get("name") or folder.name
    model_id = info.get("model_id") or name
    teacher = info.get("teacher") or "no teacher (hard labels)"
    lines = [
        f"# {name}",
        "",
        f"A dense retrieval dual encoder trained with kdir (knowledge distillation into dense retrievers): teacher "
        f"**{teacher}**, loss **{info.get('loss', '?')}**, data **{info.get('data', '?')}**, "
        f"{info.get('steps', '?')} steps, from `{base or '?'}`.",
        "",
        "## Model",
        "",
        *_settings_table(settings, st),
        "",
    ]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["## Test metrics", "", *_metrics_table(metrics), ""]
    trust = ", trust_remote_code=True" if custom else ""
    lines += [
        "## Usage (sentence-transformers)",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{model_id}"{trust})',
        'queries = model.encode_query(["what is knowledge distillation?"])',
        'documents = model.encode_document(["Distillation trains a small model on a large model\'s scores."])',
        "print(model.similarity(queries, documents))",
        "```",
        "",
    ]
    if custom:
        lines += [
            f"`trust_remote_code=True` loads `{CUSTOM_FILE}` (in this repository): the `[MASK]` query padding, texts "
            "without a final `[SEP]` and the pooling that skips leading positions, which sentence-transformers has no "
            "module for.",
            "",
        ]
    lines += [
        "## Usage (kdir)",
        "",
        "```bash",
        "python -m kdir.evaluate student=checkpoint student.path=<a local copy of this folder> eval=<eval>",
        "```",
        "",
        "kdir reads its settings from `kdir_model.json`; `AutoModel.from_pretrained` loads the query tower.",
        "",
    ]
    readme = folder / "README.md"
    readme.write_text(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines), encoding="utf-8")
    return readme


def _settings_table(settings: dict[str, Any], st: dict[str, Any]) -> list[str]:
    from kdir.models.dual_encoder import sides_of

    q, d = sides_of(settings)

    def pooling(side: SideSettings) -> str:
        return side.pooling + (f" (from position {side.skipped} on)" if side.skipped else "")

    rows = [
        ("towers", "shared" if settings.get("shared", True) else "separate", ""),
        ("max length (tokens)", q.max_length, d.max_length),
        ("text prefix", repr(q.prefix), repr(d.prefix)),
        ("[MASK] padding to the max length", "yes" if q.mask_padding else "no", "no"),
        ("final [SEP]", "yes" if q.add_sep else "no", "yes" if d.add_sep else "no"),
        ("pooling", pooling(q), pooling(d)),
        ("projection", settings.get("projection_dim") or "none", settings.get("doc_projection_dim") or ""),
        ("similarity", st.get("similarity_fn_name", settings.get("similarity")), ""),
    ]
    return ["| setting | query | document |", "|---|---|---|"] + [
        f"| {k} | {q} | {d if d != '' else q} |" for k, q, d in rows
    ]


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    if all(isinstance(v, dict) for v in metrics.values()):
        columns = list(metrics)
        measures = list(dict.fromkeys(m for col in metrics.values() for m in col))
        table = {m: [metrics[c].get(m) for c in columns] for m in measures}
    else:
        columns, table = ["value"], {m: [v] for m, v in metrics.items()}
    out = ["| measure | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for measure, values in table.items():
        out.append(f"| {measure} | " + " | ".join("" if v is None else _number(v) for v in values) + " |")
    return out


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------------------ files
def _read_json(file: Path) -> Any:
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{file}: no such file (the sentence-transformers folder is incomplete)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}:{e.lineno}: expected JSON ({e.msg})") from None


def _write_json(file: Path, value: Any) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
