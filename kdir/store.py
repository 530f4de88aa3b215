"""Score stores from the shell: ``python -m kdir.store <action> store=<folder> [...]`` (or ``action=<action>``).

``info`` (teacher, origin, pairs, queries, segments, size, checksums), ``verify`` (re-hash every segment, check
completeness), ``import`` (a score file into a new store, atomically), ``export`` (to TSV, JSONL, a TREC run or
pair keys; streamed) and ``merge`` (stores of one teacher into one). The work is :mod:`kdir.stores.tools`.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import ConfigError, KdirError
from kdir.stores import tools
from kdir.utils import task_wrapper

log = logging.getLogger("kdir.store")
ACTIONS = ("info", "verify", "import", "export", "merge")


def _need(cfg: DictConfig, key: str, what: str) -> str:
    if cfg.get(key) in (None, ""):
        raise ConfigError(f"{key}: {cfg.action} needs {what} ({key}=...)")
    return str(cfg[key])


def store(cfg: DictConfig) -> dict:
    action = cfg.action
    if action not in ACTIONS:
        raise ConfigError(f"action={action!r}: expected one of {', '.join(ACTIONS)}")
    path = str(cfg.store)
    if action == "info":
        info = tools.store_info(path)
        print("\n".join(tools.info_lines(info)))
        return {"pairs": info["entries"]}
    if action == "verify":
        report = tools.verify_store(path, cfg.pairs, cfg.pairs_format, cfg.chunk_size)
        print("\n".join(tools.verify_lines(report)))
        if report["problems"]:
            raise KdirError(f"{path}: the store is incomplete: {'; '.join(report['problems'])}")
        return {"pairs": report["unique"]}
    if action == "import":
        file = _need(cfg, "file", "the score file to import")
        st = tools.import_scores(path, file, cfg.format, cfg.teacher_name, cfg.replace, cfg.chunk_size)
        record = st.meta["imported"]
        print(f"imported {record['pairs']} pairs ({record['queries']} queries) from {file} into {st.path}")
        return {"pairs": record["pairs"]}
    if action == "export":
        out = _need(cfg, "out", "the file to write")
        done = tools.export_scores(
            path, out, cfg.format, cfg.pairs, cfg.pairs_format, cfg.queries, cfg.missing, cfg.tag, cfg.chunk_size
        )
        skipped = f"; {done['missing']} of them not in the store, skipped" if done["missing"] else ""
        print(f"wrote {done['written']} pairs to {out} ({done['requested']} requested from {done['source']}{skipped})")
        return {"pairs": done["written"]}
    inputs = [str(p) for p in OmegaConf.to_container(cfg.inputs)] if cfg.inputs else []
    merged = tools.merge_stores(inputs, path, cfg.on_conflict, cfg.replace, cfg.chunk_size)
    counts = merged.meta["merged"]
    print(
        f"merged {len(inputs)} stores into {merged.path}: {len(merged)} pairs ({counts['overlaps']} stored in "
        f"several inputs, {counts['conflicts']} of them with different scores, on_conflict={cfg.on_conflict})"
    )
    return {"pairs": len(merged)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="store")
@task_wrapper
def main(cfg: DictConfig) -> dict:
    """Hydra entry point: :func:`store`."""
    return store(cfg)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ACTIONS:  # `python -m kdir.store info ...` = `action=info`
        sys.argv[1] = f"action={sys.argv[1]}"
    main()
