"""Collective knowledge of CollectiveKD (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273): ``python -m kdir.expand``.

Offline, once per training query, ColBERT-PRF expansion embeddings (Wang et al., ICTIR 2021) of the query's
feedback passages, computed with the ColBERT teacher::

    python -m kdir.expand teacher.path=<ColBERT folder> data=<training data> out=<store dir>

The stage is :func:`kdir.retrieval.expansion.expand_queries`; this command runs it and writes a
:class:`kdir.stores.ExpansionStore` at ``out`` (plus the teacher's top-``depth`` ranking, ``<out>/ranking.trec``:
CollectiveKD's hard-negative pool).
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.retrieval.expansion import check_settings, expand_queries
from kdir.stores import ExpansionStore
from kdir.utils import Setting, resolve_device, task_wrapper
from kdir.utils.settings import count, positive_int

SETTINGS = (
    "mode",
    "ranking",
    "depth",
    "fb_docs",
    "fb_clusters",
    "fb_k",
    "beta",
    "neighbours",
    "overwrite",
    "candidates",
    "token_store",
    "token_index",
    "faiss_depth",
)


def expand(cfg: DictConfig) -> ExpansionStore:
    """Run the stage; returns the written store (its folder also holds ``ranking.trec``)."""
    settings = {k: cfg[k] for k in SETTINGS}
    check_settings(cfg.out, **settings)  # before loading and encoding anything
    model = instantiate(cfg.teacher).freeze().to(resolve_device(cfg.device))
    dataset = instantiate(cfg.get("dataset") or cfg.data.train)
    return expand_queries(
        model,
        dataset,
        cfg.out,
        **settings,
        batch_size=cfg.batch_size,
        faiss_gpu=cfg.faiss_gpu,
        train_sample=cfg.train_sample,
        seed=cfg.seed,
        progress=cfg.progress,
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="expand")
@task_wrapper(
    settings={"depth": count(), "beta": Setting(float, 0)}  # depth=0: no teacher ranking (rf mode)
    | dict.fromkeys(("fb_docs", "fb_clusters", "fb_k", "neighbours", "faiss_depth"), positive_int())
)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`expand`."""
    expand(cfg)


if __name__ == "__main__":
    main()
