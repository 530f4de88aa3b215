"""Teachers of the offline quickstart, trained once on its data and cached beside it (like its data and tiny model).

``python -m kdir.run teacher=colbert loss=margin_mse`` then runs as typed on the quickstart: ``teacher.path``
defaults to :func:`ensure_teacher`'s folder when the run's data is the quickstart's (``${quickstart_teacher:...}``),
and stays a setting to fill in on any other data. A teacher is trained with hard labels (in-batch InfoNCE over
the quickstart's lexical-run negatives) from the quickstart's tiny BERT, with settings under which it becomes a
real teacher there (nDCG@10 far above the untrained student's 0.01), under its own random generators so the
calling run's seeded state is left as it was.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from kdir.errors import ConfigError
from kdir.utils.io import build_folder

log = logging.getLogger(__name__)

TEACHERS = ("colbert",)


def _train_colbert(out: Path, data: Path, model: Path) -> None:
    import pytorch_lightning as pl

    from kdir.data.datamodule import DistillDataModule
    from kdir.data.dataset import IRDataset
    from kdir.data.examples import QrelsExamples, RunNegatives
    from kdir.losses import InfoNCE
    from kdir.models import ColBERT
    from kdir.training.module import DistillModule

    train = IRDataset.from_beir(data, "train", name="quickstart")
    examples = QrelsExamples(RunNegatives(data / "runs" / "train.trec", depth=30), n_negatives=1)
    colbert = ColBERT(model, dim=128, query_max_length=32, doc_max_length=180)
    loss = InfoNCE(layout="inbatch", temperature=1.0)
    datamodule = DistillDataModule(train, examples, batch_size=32, seed=0).attach(colbert.preparer(), loss.layout)
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.01)
    module = DistillModule(colbert, loss, optimizer, warmup=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    colbert.save_pretrained(out)


def ensure_teacher(kind: str) -> str:
    """The folder of the quickstart's ``kind`` teacher, trained (once, atomically) if missing."""
    from kdir.data.quickstart import ensure

    if kind not in TEACHERS:
        raise ConfigError(f"the quickstart has no {kind!r} teacher (it has: {', '.join(TEACHERS)})")
    data, model = Path(ensure("data")), Path(ensure("model"))
    folder = data.parent / "teachers" / kind
    if (folder / "kdir_model.json").is_file():
        return str(folder)
    log.info("training the quickstart's %s teacher once (cached in %s)", kind, folder)

    def build(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # the caller's seeded run draws as if nothing happened
            torch.manual_seed(0)
            _train_colbert(tmp, data, model)

    build_folder(folder, build)
    return str(folder)
