"""The config groups: every option of every group composes in every command, the defaults are the quickstart's
own group options (no recipe leaks into other choices), the teacher model and its signal are separate nodes,
negatives are a group, and each dataset split is defined once and referenced.

Offline and CPU-only: composition plus instantiation of what builds from the tiny quickstart model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError, MissingMandatoryValue
from test_run import PAPER_RECIPES

import kdir  # noqa: F401  (registers the config resolvers)
from kdir.errors import KdirError

PRIMARY = [
    "run",
    "evaluate",
    "evaluate_teacher",
    "train_teacher",
    "score",
    "mine",
    "encode",
    "expand",
    "generate_queries",
]
REQUIRED = {"score": ["teacher=cross_encoder"]}  # primary configs with a mandatory group choice
NOT_GROUPS = {"hydra", "datasets"}  # hydra's own settings; datasets/ are configs loaded by the options that use them


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _choices(name: str, overrides: list[str]) -> dict[str, str | None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    return {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}


def _resolved(node: DictConfig | ListConfig) -> None:
    """Resolve every value: an interpolation to a key that does not exist, or a failing resolver, raises; mandatory
    ``???`` values (and strings built from them) are left to the user, and so are a model teacher's folder, expansion
    and store off the quickstart (the ``${quickstart_...}`` resolvers then ask for them)."""
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        try:
            value = node[key]
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            continue
        except InterpolationResolutionError as e:
            if not any(f"set {key}=" in str(e) for key in ("teacher.path", "teacher.expansion", "signal.store")):
                raise
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            _resolved(value)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, quickstart) -> Path:
    """The tiny quickstart BERT saved as a kdir dual-encoder folder (a local student / teacher)."""
    from kdir.models import DualEncoder

    path = tmp_path_factory.mktemp("tiny") / "tiny"
    DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32).save_pretrained(path)
    return path


# ---------------------------------------------------------------- every option composes


@pytest.mark.parametrize("name", PRIMARY)
def test_every_option_of_every_group_composes_and_resolves(name, tmp_path, quickstart):
    base = REQUIRED.get(name, [])
    groups = [g for g in _choices(name, base) if g not in NOT_GROUPS and "/" not in g]
    assert groups, name
    GlobalHydra.instance().clear()
    n = 0
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for group in groups:
            for option in options(group):
                overrides = [o for o in base if not o.startswith(f"{group}=")] + [f"{group}={option}"]
                cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
                assert cfg.hydra.runtime.choices[group] == option
                HydraConfig.instance().set_config(cfg)
                with open_dict(cfg):
                    cfg.paths.output_dir = str(tmp_path)
                    del cfg["hydra"]
                _resolved(cfg)  # every interpolation points somewhere
                n += 1
    assert n >= len(groups)


def test_experiment_options_are_the_recipes_and_none():
    assert set(options("experiment")) >= set(PAPER_RECIPES) | {"quickstart", "quickstart_infonce", "none"}
    assert set(options("signal")) >= {"cached", "online", "fill", "none"}
    assert set(options("negatives")) >= {"random", "run", "none", "quickstart"}


# ---------------------------------------------------------------- defaults: the quickstart's own group options


def test_no_overrides_is_the_quickstart(tmp_path):
    cfg = compose_cfg(tmp_path, [])
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.optim.optimizer.lr == pytest.approx(3e-3)
    assert cfg.trainer.max_epochs == 10 and cfg.teacher is None and cfg.signal.mode == "cached"
    choices = _choices("run", [])
    assert choices["experiment"] is None
    assert (choices["optim"], choices["trainer"], choices["negatives"]) == ("quickstart", "quickstart", "quickstart")
    # experiment=quickstart names the defaults; experiment=none (Hydra refuses experiment=null) and ~experiment
    # are the defaults themselves
    for same in (["experiment=quickstart"], ["experiment=none"], ["~experiment"]):
        assert OmegaConf.to_container(compose_cfg(tmp_path, same)) == OmegaConf.to_container(cfg), same


def test_a_group_choice_replaces_that_ingredient_only(tmp_path):
    cfg = compose_cfg(tmp_path, ["optim=tct"])
    assert cfg.optim.optimizer.lr == pytest.approx(7e-6) and cfg.optim.warmup == 10000
    assert compose_cfg(tmp_path, ["trainer=default"]).trainer.max_epochs == 6
    assert compose_cfg(tmp_path, ["optim=adamw"]).optim.optimizer.lr == pytest.approx(2e-5)
    cfg = compose_cfg(tmp_path, "student=bert_dot data=msmarco eval=dl19 teacher=t2_scores optim=tct".split())
    assert cfg.optim.optimizer.lr == pytest.approx(7e-6) and cfg.signal.import_format == "margin_scores"


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipes_never_pick_up_quickstart_settings(recipe, tmp_path):
    choices = _choices("run", [f"experiment={recipe}"])
    assert choices["optim"] != "quickstart" and choices["trainer"] == "default", choices
    assert _choices("run", [f"experiment={recipe}", "trainer=gpu"])["trainer"] == "gpu"  # the command line wins


# ---------------------------------------------------------------- teacher model and teacher signal


@pytest.mark.parametrize(
    "teacher,model,mode",
    [
        ("colbert", "ColBERT.from_pretrained", "online"),
        ("tct_colbert", "ColBERT.from_pretrained", "online"),
        ("collective", "CollectiveColBERT.from_pretrained", "online"),
        ("bi_encoder", "DualEncoder.from_pretrained", "online"),
        ("cross_encoder", "CrossEncoder.from_pretrained", "cached"),
        ("ensemble", "Ensemble", "cached"),
        ("quickstart", None, "cached"),
        ("scores", None, "cached"),
        ("t2_scores", None, "cached"),
        ("none", None, None),
    ],
)
def test_each_teacher_picks_its_usual_signal(teacher, model, mode, tmp_path):
    cfg = compose_cfg(tmp_path, [f"teacher={teacher}"])
    assert (cfg.teacher._target_.rpartition("models.")[2] if cfg.teacher else None) == model
    assert (cfg.signal.mode if cfg.signal else None) == mode
    assert cfg.signal is None or "model" not in cfg.signal  # the model is cfg.teacher, passed in by the command


def test_the_signal_is_swapped_on_the_command_line(tmp_path):
    cfg = compose_cfg(tmp_path, ["teacher=colbert", "signal=cached", "signal.store=/s"])
    assert cfg.signal.mode == "cached" and cfg.signal.store == "/s" and cfg.teacher.similarity == "cosine"
    cfg = compose_cfg(tmp_path, ["teacher=cross_encoder", "signal=online"])
    assert cfg.signal.mode == "online" and cfg.signal.store is None  # no stale store path for an online teacher
    cfg = compose_cfg(tmp_path, ["teacher=cross_encoder", "signal=fill", "data=scifact"])
    assert cfg.signal.store == str(tmp_path / ".." / "teacher_scores" / "cross_encoder.store")
    for teacher in ("quickstart", "cross_encoder", "colbert"):
        assert compose_cfg(tmp_path, [f"teacher={teacher}", "signal=none"]).signal is None
    cfg = compose_cfg(tmp_path, ["experiment=embeddistill_ce"])
    assert cfg.signal.mode == "online" and cfg.signal.store is None and cfg.teacher.dual_pooling is True
    cfg = compose_cfg(tmp_path, ["experiment=collective_kd", "data=scifact", "teacher.expansion=/e"])
    assert cfg.signal.force_positive_max is True and cfg.negatives.path == "/e/ranking.trec"


def test_score_reads_the_teachers_store(tmp_path):
    cfg = compose_cfg(tmp_path, ["teacher=cross_encoder", "data=scifact", "teacher.path=/t"], name="score")
    assert cfg.store == str(tmp_path / ".." / "teacher_scores" / "cross_encoder.store")
    assert compose_cfg(tmp_path, ["teacher=colbert", "signal=cached", "signal.store=/s"], name="score").store == "/s"


def test_signals_instantiate_and_bind_with_a_tiny_teacher(tmp_path, tiny_folder, quickstart):
    from kdir.data.dataset import IRDataset
    from kdir.training.signal import TeacherSignal

    dataset = IRDataset.from_beir(quickstart["data"], "dev", name="quickstart")
    store = tmp_path / "tiny.store"
    for option in ("online", "fill", "cached"):  # fill creates the store that cached then reads
        cfg = compose_cfg(tmp_path, ["teacher=bi_encoder", f"teacher.path={tiny_folder}", f"signal={option}"])
        model = instantiate(cfg.teacher)
        with open_dict(cfg):
            cfg.signal.store = None if option == "online" else str(store)
        signal = instantiate(cfg.signal, model=model)
        assert isinstance(signal, TeacherSignal) and signal.mode == option and signal.model is model
        signal.bind(dataset)
    assert (store / "meta.json").is_file()
    cfg = compose_cfg(tmp_path, ["teacher=scores", f"signal.store={store}"])
    assert instantiate(cfg.signal, model=None).bind(dataset).store is not None  # a score store, no model


def test_model_teachers_instantiate_on_the_tiny_model(tmp_path, quickstart):
    model = quickstart["model"]
    for teacher, extra in (
        ("colbert", ["teacher.dim=16"]),
        ("tct_colbert", ["teacher.dim=16"]),
        ("bi_encoder", []),
        ("cross_encoder", []),
        ("ensemble", [f"teacher.members.ce2.path={model}"]),
    ):
        key = "teacher.members.ce1.path" if teacher == "ensemble" else "teacher.path"
        cfg = compose_cfg(tmp_path, [f"teacher={teacher}", f"{key}={model}", *extra])
        assert instantiate(cfg.teacher) is not None, teacher


# ---------------------------------------------------------------- negatives


@pytest.mark.parametrize(
    "data,negatives",
    [
        ("quickstart", "RunNegatives"),
        ("scifact", "RandomNegatives"),
        ("ir_datasets", "RandomNegatives"),
        ("msmarco_hn", "RunNegatives"),
        ("msmarco", None),
    ],
)
def test_each_data_option_picks_its_negatives(data, negatives, tmp_path):
    cfg = compose_cfg(tmp_path, [f"data={data}"])
    got = cfg.data.examples.negatives
    assert (got._target_.rpartition(".")[2] if got else None) == negatives


def test_negatives_are_swapped_on_the_command_line(tmp_path, quickstart):
    cfg = compose_cfg(tmp_path, ["negatives=run", "negatives.path=/r.trec", "negatives.depth=20"])
    assert OmegaConf.to_container(cfg.data.examples.negatives, resolve=True)["depth"] == 20
    sampler = instantiate(cfg.data.examples).sampler
    assert (sampler.path, sampler.depth, sampler.exclude_positives) == ("/r.trec", 20, True)
    assert compose_cfg(tmp_path, ["data=scifact", "negatives=quickstart"]).negatives.depth == 30
    examples = instantiate(compose_cfg(tmp_path, ["negatives=none", "data.examples.n_negatives=0"]).data.examples)
    assert examples.sampler is None


def test_negatives_without_a_sampler_or_with_fixed_triples_are_clear_errors(tmp_path):
    with pytest.raises(Exception, match=r"negatives=.*data\.examples\.n_negatives=0"):
        instantiate(compose_cfg(tmp_path, ["negatives=none"]).data.examples)
    with pytest.raises(Exception, match="negatives=none"):
        instantiate(compose_cfg(tmp_path, ["data=msmarco", "negatives=random"]).data.examples)
    assert instantiate(compose_cfg(tmp_path, ["data=msmarco"]).data.examples).path.endswith("ids.tsv")
    from kdir.data.examples import QrelsExamples, RandomNegatives, TripleExamples

    with pytest.raises(KdirError, match="negatives=none"):
        TripleExamples("triples.tsv", negatives=RandomNegatives())
    with pytest.raises(KdirError, match="data.examples.n_negatives=0"):
        QrelsExamples(None, n_negatives=2)


# ---------------------------------------------------------------- datasets: defined once, referenced


def test_datasets_are_loaded_only_by_the_options_that_use_them(tmp_path, monkeypatch):
    import kdir.data.quickstart

    def no_quickstart_data(what: str = "data") -> str:
        if what == "data":
            raise AssertionError("the quickstart collection was built for a run that does not use it")
        return "/quickstart-model"

    monkeypatch.setattr(kdir.data.quickstart, "ensure", no_quickstart_data)
    for overrides, loaded in (
        (["data=scifact", "eval=dl19", "teacher=none", "loss=infonce"], {"scifact", "dl19"}),
        (["data=scifact", "eval=scifact", "teacher=scores", "signal.store=/s"], {"scifact"}),
        (["data=msmarco_hn", "eval=dl19_maxsim", "teacher=colbert", "negatives.path=/r"], {"msmarco", "dl19"}),
    ):
        cfg = compose_cfg(tmp_path, overrides)
        assert set(cfg.datasets) == loaded, overrides
        _resolved(cfg)  # resolving everything never calls ${quickstart:data}
    cfg = compose_cfg(tmp_path, ["eval=scifact", "student=minilm_l3"], name="evaluate")
    assert set(cfg.datasets) == {"scifact"}
    _resolved(cfg)


def test_splits_are_references_to_one_definition(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=scifact", "eval=scifact"])
    raw = OmegaConf.to_container(cfg)
    assert raw["data"]["train"] == "${datasets.scifact.train}"
    assert raw["eval"]["val"]["dataset"] == "${datasets.scifact.dev}"
    assert raw["eval"]["test"]["dataset"] == "${datasets.scifact.test}"
    scifact = OmegaConf.to_container(cfg.datasets.scifact, resolve=True)
    train, dev = scifact["train"], scifact["dev"]
    assert (train["part"], dev["part"]) == ("rest", "held")
    assert {k: v for k, v in train.items() if k != "part"} == {k: v for k, v in dev.items() if k != "part"}
    cfg = compose_cfg(tmp_path, ["data=scifact", "eval=scifact", "datasets.scifact.holdout.size=50"])
    assert cfg.data.train.size == cfg.eval.val.dataset.size == 50  # one setting moves both sides
    cfg = compose_cfg(tmp_path, ["data=scifact", "teacher_eval=maxsim_scifact"], name="train_teacher")
    assert OmegaConf.to_container(cfg)["teacher_eval"]["dataset"] == "${datasets.scifact.test}"


def test_scifact_dev_queries_never_reach_training(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=scifact", "eval=scifact"])
    if not (Path(cfg.paths.data_dir) / "scifact" / "corpus.jsonl").is_file():
        pytest.skip(f"no SciFact under {cfg.paths.data_dir}")
    train, dev = instantiate(cfg.data.train), instantiate(cfg.eval.val.dataset)
    test = instantiate(cfg.eval.test.dataset)
    assert len(dev.queries) == 100 and len(train.queries) > 600 and len(test.queries) == 300
    assert not set(train.queries.ids) & set(dev.queries.ids)
    assert not set(train.qrels) & set(dev.qrels)


def test_quickstart_data_and_evaluators_instantiate(tmp_path, quickstart):
    cfg = compose_cfg(tmp_path, [])
    datamodule = instantiate(cfg.data)
    assert datamodule.train.name.startswith("quickstart") and len(datamodule.train.queries) == 1200
    assert len(instantiate(cfg.eval.val).dataset.queries) == 150
    assert len(instantiate(cfg.eval.test).dataset.queries) == 200
    for option in ("quickstart_maxsim",):
        assert len(instantiate(compose_cfg(tmp_path, [f"eval={option}"]).eval.test).dataset.queries) == 200
    teacher_eval = compose_cfg(tmp_path, ["teacher_eval=maxsim_quickstart"], name="evaluate_teacher").teacher_eval
    assert len(instantiate(teacher_eval).dataset.queries) == 200


# ---------------------------------------------------------------- the other groups instantiate offline


def test_losses_optimisers_trainers_callbacks_loggers_instantiate(tmp_path, quickstart):
    from kdir.utils import instantiate_group

    for option in options("loss"):
        assert instantiate(compose_cfg(tmp_path, [f"loss={option}"]).loss).layout in ("pairwise", "inbatch")
    params = [torch.nn.Parameter(torch.zeros(2))]
    for option in options("optim"):
        cfg = compose_cfg(tmp_path, [f"optim={option}"])
        optimizer = instantiate(cfg.optim.optimizer)(params)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.optimizer.lr)
    for option in options("trainer"):
        cfg = compose_cfg(tmp_path, [f"trainer={option}"])
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            continue
        assert instantiate(cfg.trainer, logger=False, enable_checkpointing=False).max_epochs == cfg.trainer.max_epochs
    for option in options("callbacks"):
        assert instantiate_group(compose_cfg(tmp_path, [f"callbacks={option}"]).callbacks)
    for option in options("logger"):
        loggers = instantiate_group(compose_cfg(tmp_path, [f"logger={option}"]).logger)
        assert len(loggers) == {"none": 0, "many": 2}.get(option, 1)


def test_local_students_instantiate(tmp_path, tiny_folder, quickstart):
    cfg = compose_cfg(tmp_path, ["student=tiny"])
    assert instantiate(cfg.student) is not None
    cfg = compose_cfg(tmp_path, ["student=checkpoint", f"student.path={tiny_folder}"])
    assert instantiate(cfg.student).config["pooling"] == "mean"
    cfg = compose_cfg(tmp_path, ["student=colbert", f"student.path={quickstart['model']}"])
    assert instantiate(cfg.student, dim=16).multi_vector
    cfg = compose_cfg(tmp_path, ["student=minilm_l3"])
    if Path(cfg.student.model_name_or_path).is_dir():
        assert instantiate(cfg.student) is not None
