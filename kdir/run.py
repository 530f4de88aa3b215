"""Distillation training: ``python -m kdir.run [experiment=...] [group=option] [key=value]``.

Seed → student, loss, teacher signal, data, evaluators → Lightning trainer → fit → test the best
checkpoint → export the student (HF format) → metrics table, before vs after training.

``resume=true`` continues a killed run in its folder (``hydra.run.dir=<folder>``) from ``checkpoints/last.ckpt``;
``ckpt_path=<file>`` continues from any checkpoint. Either restores the weights, optimizer, schedule, loops, the
training stream's position and every random generator, so the run ends as it would have without the interruption.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import ConfigError, KdirError
from kdir.training.audit import run_audit
from kdir.training.compile import compile_encoders
from kdir.training.module import DistillModule
from kdir.training.resume import checkpoint_step, keep_logged_rows
from kdir.utils import instantiate_group, print_metrics, save_json, task_wrapper
from kdir.utils.rundir import resume_from

log = logging.getLogger("kdir.run")

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def train(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run one distillation job; returns ``{"untrained": {...}, "trained": {...}}`` test metrics and, after any
    validation, ``"val"``: the dev metrics (:func:`_dev_metrics`)."""
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)

    log.info("student <%s>", cfg.student._target_)
    student = instantiate(cfg.student)
    if cfg.get("gradient_checkpointing"):
        student.gradient_checkpointing_enable()
    loss = instantiate(cfg.loss)
    log.info("loss %r", loss)
    signal = None
    if loss.uses_teacher:
        if not cfg.get("signal"):
            raise KdirError(
                f"loss {loss.name!r} needs a teacher signal: choose one, e.g. signal=cached signal.store=..."
            )
        teacher = instantiate(cfg.teacher) if cfg.get("teacher") else None
        signal = instantiate(cfg.signal, model=teacher)
    val = instantiate(cfg.eval.val) if cfg.eval.get("val") else None
    test = instantiate(cfg.eval.test) if cfg.eval.get("test") else None
    _check_in_memory(cfg, val, test, out)

    datamodule = instantiate(cfg.data)  # the training split, its examples and batching
    if signal is not None:
        # open (or import, or create) the score store and check its provenance; fill cached teacher embeddings
        signal.bind(datamodule.train, datamodule.generated)
    formatters = {side: student.formatter(side) for side in ("query", "doc")}
    splits = {name: (ev.dataset, ev.batch_size) for name, ev in (("val", val), ("test", test)) if ev is not None}
    datamodule.attach(student.preparer(), loss.layout, signal, formatters, splits)
    module = DistillModule(
        student,
        loss,
        instantiate(cfg.optim.optimizer),
        cfg.optim.warmup,
        val,
        test,
        out,
        signal,
        cfg.get("gather_across_devices", False),
        cfg.optim.get("schedule", "linear"),
        cfg.get("finite_check", "step"),
    )
    if cfg.get("compile"):
        mode = cfg.get("compile_mode")
        if mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode={mode}: expected one of {', '.join(map(str, COMPILE_MODES))}")
        compiled = compile_encoders(student, mode, cfg.get("compile_backend") or "inductor")
        log.info("torch.compile (%s): %s", cfg.get("compile_mode") or "default", ", ".join(compiled))

    if val is None and cfg.get("callbacks") and "model_checkpoint" in cfg.callbacks:
        with open_dict(cfg):
            cfg.callbacks.model_checkpoint.monitor = None  # no validation: keep the last checkpoint
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt_path = resume_from(cfg, out)
    if ckpt_path is not None and rank_zero_only.rank == 0:  # (DDP ranks are set up by fit: read from the env)
        step = checkpoint_step(ckpt_path)
        kept = sum(keep_logged_rows(lg, step) for lg in loggers)
        log.info("resuming from %s (global step %d; %d logged rows kept)", ckpt_path, step, kept)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    results: dict[str, dict[str, float]] = {}
    if cfg.eval_untrained and test is not None and trainer.is_global_zero:
        log.info("evaluating the untrained student on %s", test.dataset.name)
        results["untrained"], _ = test.evaluate(student, device=module.device, progress=False)
        if ckpt_path is None:  # step 0 of the test curve (a resumed run has logged it already)
            for lg in loggers:
                lg.log_metrics({f"test/{k}": v for k, v in results["untrained"].items()}, step=0)

    audit = cfg.get("audit") or {}  # the teacher against the untrained student, before any training (rank 0)
    if signal is not None and audit.get("enabled") and ckpt_path is None and rank_zero_only.rank == 0:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        run_audit(student, signal, datamodule.train, datamodule.examples, val, out, loggers, audit,
                  name=choices.get("teacher"), seed=cfg.seed, device=trainer.strategy.root_device)  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    dev = _dev_metrics(trainer)  # before trainer.test replaces the callback metrics
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.best_model_path), None)
    if trainer.fast_dev_run:
        best = None
    if test is not None:
        log.info("testing %s", best or "the final weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        results["trained"] = {
            k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
    for lg in loggers:  # one W&B run per job, also in a multirun (all jobs share this process)
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()
    if trainer.is_global_zero:
        if cfg.export_student and not trainer.fast_dev_run:
            _export(cfg, student, out / "student", results, trainer.global_step)
        _report(results, test, out, best)
    _leave_process_group()
    return results | ({"val": dev} if dev else {})


def _dev_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The dev metrics returned to sweepers (``optimized_metric=val/<measure>``), by measure: a measure a checkpoint
    callback monitors is its *best* score (the checkpoint that is tested and exported: the trial's student, also
    under early stopping); any other is the last validation's value."""
    dev = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    for callback in trainer.checkpoint_callbacks:
        monitor = getattr(callback, "monitor", None) or ""
        if monitor.startswith("val/") and getattr(callback, "best_model_score", None) is not None:
            dev[monitor.removeprefix("val/")] = float(callback.best_model_score)
    return dev


def _check_optimized_metric(cfg: DictConfig) -> None:
    """Before training: a search selects on the dev split (``optimized_metric=test/...`` is refused under
    ``hparams_search`` or the Optuna sweeper), and a ``val/...`` metric needs a validation split (``eval.val``)."""
    metric = str(cfg.get("optimized_metric") or "")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    search = f"hparams_search={choices['hparams_search']}" if choices.get("hparams_search") else None
    if search is None and choices.get("hydra/sweeper") == "optuna":
        search = "hydra/sweeper=optuna"
    if search and metric.startswith("test/"):
        raise ConfigError(
            f"optimized_metric={metric}: {search} would select trials on the test split, which a search must never "
            f"see; select on dev: optimized_metric=val/{metric.removeprefix('test/')}"
        )
    if metric.startswith("val/") and not OmegaConf.select(cfg, "eval.val"):
        raise ConfigError(
            f"optimized_metric={metric}: this run has no validation (eval.val is null); choose an eval option with a "
            f"dev split (eval=quickstart, eval=scifact)" + ("" if search else " or optimized_metric=test/<measure>")
        )


def _check_in_memory(cfg: DictConfig, val, test, out: Path) -> None:
    """kdir.run evaluates through its Lightning loaders, in memory: refuse an evaluator's ``corpus_store``."""
    for stage, evaluator in (("val", val), ("test", test)):
        if getattr(evaluator, "corpus_store", None) is not None:
            choice = HydraConfig.get().runtime.choices.get("eval") if HydraConfig.initialized() else None
            raise ConfigError(
                f"eval.{stage}.corpus_store={evaluator.corpus_store}: kdir.run evaluates in memory through its "
                f"Lightning loaders; set eval.{stage}.corpus_store=null, and evaluate the exported student from a "
                f"store afterwards: python -m kdir.evaluate student=checkpoint student.path={out / 'student'} "
                f"eval={choice or '<eval>'} eval.test.corpus_store={evaluator.corpus_store}"
            )


def _export(cfg: DictConfig, student, folder: Path, results: dict, steps: int) -> None:
    """The student as a Hugging Face / sentence-transformers folder with its model card; pushed to the hub when
    ``push_to_hub=<repo id>`` (``huggingface_hub``'s ``upload_folder``; needs a token)."""
    from kdir.models.st_format import write_model_card

    student.save_pretrained(folder)
    if (folder / "modules.json").is_file():  # dual encoders (a ColBERT is no sentence-transformers model)
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        teacher = cfg.get("teacher") or {}
        write_model_card(
            folder,
            {
                "name": cfg.run_name,
                "model_id": cfg.get("push_to_hub"),
                "base_model": str(cfg.student.get("model_name_or_path") or cfg.student.get("path") or ""),
                "teacher": _teacher_text(choices.get("teacher", ""), teacher, cfg.get("signal")),
                "loss": f"{choices.get('loss', '')} ({cfg.loss._target_})",
                "data": str(OmegaConf.select(cfg, "data.train.name", default="")),
                "steps": steps,
                "metrics": results,
            },
        )
    log.info("student exported to %s (SentenceTransformer(path) and AutoModel.from_pretrained load it)", folder)
    if cfg.get("push_to_hub"):
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(cfg.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=cfg.push_to_hub, commit_message=f"kdir: {cfg.run_name}")
        log.info("student pushed to https://huggingface.co/%s", cfg.push_to_hub)


def _teacher_text(choice: str, teacher, signal) -> str:
    """The teacher, as the model card says it: the option and its folder, class or score store."""
    if teacher:
        return f"{choice} ({teacher.get('path') or teacher.get('_target_')})"
    if signal and signal.get("store"):
        return f"{choice} (scores of {signal.store})"
    return "none (hard labels)"


def _leave_process_group() -> None:
    """Under DDP: wait for every rank (rank 0 writes the report), then tear the process group down together."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _report(results: dict, test, out: Path, best: str | None) -> None:
    save_json(results | {"best_checkpoint": best}, out / "metrics.json")
    if not results:
        return
    print_metrics(results, title=test.dataset.name if test else "")
    print(f"outputs: {out}")
    before, after = results.get("untrained"), results.get("trained")
    if before and after and "nDCG@10" in after:
        delta = after["nDCG@10"] - before["nDCG@10"]
        verdict = "beats" if delta > 0 else "does NOT beat"
        print(
            f"The trained student {verdict} its untrained self on {test.dataset.name}: "
            f"nDCG@10 {before['nDCG@10']:.4f} -> {after['nDCG@10']:.4f} ({delta:+.4f})."
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
@task_wrapper
def main(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Hydra entry point; ``optimized_metric`` ``test/<measure>`` is the trained student's test metric,
    ``val/<measure>`` its dev metric (:func:`_dev_metrics`: the best checkpoint's score), which searches select on."""
    _check_optimized_metric(cfg)
    results = train(cfg)
    metric = str(cfg.get("optimized_metric") or "")
    if metric.startswith("val/") and metric.removeprefix("val/") not in results.get("val", {}):
        raise ConfigError(
            f"optimized_metric={metric}: no validation of this run logged it; validate at least once "
            f"(trainer.check_val_every_n_epoch, trainer.val_check_interval) with the measure in eval.metrics"
        )
    return results | {"test": results.get("trained", {})}


if __name__ == "__main__":
    main()
