"""Teachers of the offline quickstart, built once on its data and cached beside it (like its data and tiny model).

``python -m kdir.run teacher=<colbert|cross_encoder|collective|ensemble> loss=margin_mse`` then runs as typed on
the quickstart: the teacher options' paths default to the folders built here (``${quickstart_teacher:...}``), a
cached teacher's score store to one scored here over the run's training pool (``${quickstart_store:...}``), and
the collective teacher's expansion store to one built here with its ColBERT (``${quickstart_expansion:}``). On
any other data these stay settings to fill in.

Teachers are trained with hard labels from the quickstart's tiny BERT, with settings under which they become real
teachers there (nDCG@10 far above the untrained student's 0.01): ColBERT with in-batch InfoNCE over the lexical-run
negatives, cross-encoders (from the ColBERT's backbone) with softmax cross-entropy over ``1 + 3`` run candidates
(two seeds: the members of the quickstart's ensemble, Margin-MSE's T2 idea). Everything runs under its own random
generators, so the calling run's seeded state is left as it was. Stores and expansions are named by a hash of the
settings that produced them, so a changed setting builds its own instead of reusing another's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdir.data.quickstart import ensure, own_generators
from kdir.errors import ConfigError
from kdir.utils.io import build_folder

log = logging.getLogger(__name__)

TEACHERS = ("colbert", "cross_encoder")


def settings_key(*settings: Any) -> str:
    """12 hex digits of sha256 over the JSON of ``settings``: the name of what they produce."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fit(model, loss, examples, data: Path, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    import pytorch_lightning as pl

    from kdir.data.datamodule import DistillDataModule
    from kdir.data.dataset import IRDataset
    from kdir.training.module import DistillModule

    train = IRDataset.from_beir(data, "train", name="quickstart")
    datamodule = DistillDataModule(train, examples, batch_size=batch_size, seed=seed)
    datamodule.attach(model.preparer(), loss.layout)
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)
    module = DistillModule(model, loss, optimizer, warmup=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)


def _train_colbert(out: Path, data: Path, model: Path, seed: int) -> None:
    from kdir.data.examples import QrelsExamples, RunNegatives
    from kdir.losses import InfoNCE
    from kdir.models import ColBERT

    colbert = ColBERT(model, dim=128, query_max_length=32, doc_max_length=180)
    examples = QrelsExamples(RunNegatives(data / "runs" / "train.trec", depth=30), n_negatives=1)
    _fit(colbert, InfoNCE(layout="inbatch", temperature=1.0), examples, data, 5, 3e-3, 32, seed)
    colbert.save_pretrained(out)


def _train_cross_encoder(out: Path, data: Path, model: Path, seed: int) -> None:
    from kdir.data.examples import QrelsExamples, RunNegatives
    from kdir.losses import InfoNCE
    from kdir.models import CrossEncoder

    # The tiny BERT is random: the quickstart's ColBERT stands in for the pre-trained language model a cross-encoder
    # starts from. Re-ranking the ColBERT's top 100 of 60 test queries, nDCG@10: from the random BERT 0.05-0.10
    # (8-15 epochs); from the ColBERT, 0.49 with these settings (6 epochs, 1 + 3 candidates) and 0.69 with 12 epochs
    # of 1 + 7 (four times the cost, too slow for a first run).
    ce = CrossEncoder(ensure_teacher("colbert"), query_max_length=64, max_length=128)
    examples = QrelsExamples(RunNegatives(data / "runs" / "train.trec", depth=30), n_negatives=3)
    _fit(ce, InfoNCE(layout="pairwise", temperature=1.0), examples, data, 6, 2e-3, 32, seed)
    ce.save_pretrained(out)


TRAINERS: dict[str, Callable[[Path, Path, Path, int], None]] = {
    "colbert": _train_colbert,
    "cross_encoder": _train_cross_encoder,
}


def ensure_teacher(kind: str, seed: int = 0) -> str:
    """The folder of the quickstart's ``kind`` teacher trained with ``seed``, trained (once, atomically) if missing."""
    if kind not in TRAINERS:
        raise ConfigError(f"the quickstart has no {kind!r} teacher (it has: {', '.join(TRAINERS)})")
    data, model = Path(ensure("data")), Path(ensure("model"))
    folder = data.parent / "teachers" / (kind if seed == 0 else f"{kind}-seed{seed}")
    if (folder / "kdir_model.json").is_file():
        return str(folder)
    log.info("training the quickstart's %s teacher once (cached in %s)", kind, folder)

    with own_generators(seed):  # the caller's seeded run draws as if nothing happened
        build_folder(folder, lambda tmp: TRAINERS[kind](tmp, data, model, seed))
    return str(folder)


def pool_is_fixed(examples: Any) -> bool:
    """Whether the training pairs of ``examples`` are known before training (fixed triples or run negatives), so
    that a store of them can be scored in advance (:func:`kdir.stores.scoring.candidate_pairs`)."""
    from kdir.data.examples import QrelsExamples, RunNegatives, TripleExamples

    return isinstance(examples, TripleExamples) or (
        isinstance(examples, QrelsExamples) and isinstance(examples.sampler, RunNegatives)
    )


def ensure_store(name: str, key: str, teacher: Callable[[], Any], dataset: Callable[[], Any], examples: Any) -> str:
    """The quickstart's score store ``<name>-<key>.store`` of ``teacher()`` over the training pool of ``examples``
    on ``dataset()``, scored once (atomically) if missing. ``key`` names the settings that produce it."""
    from lightning_fabric import Fabric

    from kdir.stores import ScoreStore
    from kdir.stores.scoring import candidate_pairs, missing_pairs, score_into_store

    folder = Path(ensure("data")).parent / "teacher_scores" / f"{name}-{key}.store"
    if (folder / "meta.json").is_file():
        return str(folder)
    log.info("scoring the quickstart's training pool with its %s teacher once (cached in %s)", name, folder)

    def build(tmp: Path) -> None:
        model, data = teacher().freeze(), dataset()
        pairs = candidate_pairs(data, examples)
        source = {"dataset": data.name, "pairs": len(pairs), "source": "quickstart training pool"}
        store = ScoreStore.create(tmp, {"teacher": model.provenance(), "data": source})
        score_into_store(Fabric(accelerator="cpu", devices=1), model, data, pairs, store, 20000, 64)
        if len(missing_pairs(data, pairs, store)):
            raise RuntimeError(f"{tmp}: pairs missing after scoring")
        store.compact()
        store.update_meta(count=len(store))

    with own_generators():  # the caller's seeded run draws as if nothing happened
        build_folder(folder, build)
    return str(folder)


def ensure_expansion(key: str, colbert: Callable[[], Any], dataset: Callable[[], Any]) -> str:
    """The quickstart's collective knowledge ``expansions/collective-<key>`` (CollectiveKD's PRF expansion of every
    training query with ``colbert()``, the paper's settings), built once (atomically) if missing."""
    from kdir.retrieval.expansion import expand_queries

    folder = Path(ensure("data")).parent / "expansions" / f"collective-{key}"
    if (folder / "meta.json").is_file():
        return str(folder)
    log.info("expanding the quickstart's training queries with its ColBERT once (cached in %s)", folder)

    def build(tmp: Path) -> None:
        expand_queries(colbert().freeze(), dataset(), tmp, seed=0, progress=False)

    with own_generators():
        build_folder(folder, build)
    return str(folder)
