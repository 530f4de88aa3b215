"""kdir: knowledge distillation into dense retrievers (Hydra + PyTorch Lightning + FAISS + ir-measures).

The package root holds the commands (``python -m kdir.<command>``), each glue only (Hydra apps, but ``report``,
which reads finished folders):

==================== ==========================================================================
``run``              distil a student from a teacher signal (the default: the offline quickstart)
``evaluate``         end-to-end retrieval evaluation of any encoder
``evaluate_teacher`` evaluate a teacher as it is (re-ranking, or MaxSim retrieval)
``train_teacher``    train a teacher with hard labels
``audit``            the teacher against the untrained student before distilling (also run by ``run``)
``score``            score candidate pairs with a teacher into a score store (resumable, multi-process)
``mine``             hard negatives from a student's own index
``encode``           a corpus (or queries) into an embedding store on disk (streamed, resumable, multi-process)
``expand``           CollectiveKD's PRF collective knowledge into an expansion store
``generate_queries`` EmbedDistill's unlabelled generated queries
``store``            score stores from the shell: info, verify, import, export, merge
``report``           plots and result tables (mean ± std over seeds) of runs and sweeps
==================== ==========================================================================

The library lives in role-named subpackages, each importing only the layers below it:
``errors`` / ``utils.io`` / ``utils.report`` → ``data`` → ``stores`` → ``models`` → ``losses`` → ``retrieval``
→ ``training`` → ``utils.config`` / ``utils.settings`` / ``utils.task`` / ``utils.plots`` → the commands.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kdir.utils.config import register_resolvers  # noqa: E402

register_resolvers()  # ${quickstart:...}, ${pypi_model:...}, ${wandb_offline:} for every compose, apps and tests alike
