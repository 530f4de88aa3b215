"""Pre-tokenised documents (``data.pretokenize``): a table's batches are the formatter's inputs, exactly, and a run
with the table trains as the run without it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_command

from kdir.data.tokens import TokenTable
from kdir.errors import ConfigError
from kdir.models.dual_encoder import DualPreparer, TextFormatter
from kdir.models.hf import fast_tokenizer

L3 = Path(os.environ.get("KDIR_SHARED", ROOT.parent / "shared")) / "models" / "paraphrase-MiniLM-L3-v2"
TEXTS = [
    "",
    "a",
    "Short text.",
    "Naïve café owners' résumés: 12.5% of them (1,024) hadn't — the quick brown fox jumps over the lazy dog " * 6,
    "Tokenisation of out-of-vocabulary words like pneumonoultramicroscopicsilicovolcanoconiosis and 中文字符",
    "  leading and trailing spaces  ",
]


def _tokenizers(quickstart) -> dict[str, object]:
    return {"minilm_l3": fast_tokenizer(L3), "quickstart": fast_tokenizer(quickstart["model"])}


@pytest.mark.parametrize("settings", [
    dict(max_length=16),
    dict(max_length=64, prefix="[D] "),
    dict(max_length=12, add_sep=False),
])  # fmt: skip
def test_a_table_batch_is_the_formatters_encoding(quickstart, settings):
    rng = np.random.default_rng(0)
    for name, tokenizer in _tokenizers(quickstart).items():
        formatter = TextFormatter(tokenizer, **settings)
        table = TokenTable.build(formatter, TEXTS, chunk=4)  # chunks of the corpus join in order
        assert len(table) == len(TEXTS) and table.ids.dtype == np.uint16
        for rows in ([3], [0, 1, 2, 3, 4, 5], rng.integers(0, len(TEXTS), 9), [5, 5, 0]):
            got, want = table.batch(np.asarray(rows)), formatter([TEXTS[r] for r in rows])
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (name, settings, key)
        assert (table.lengths() <= settings["max_length"]).all()


def test_the_dual_preparer_reads_the_table_only_given_rows(quickstart):
    tokenizer = fast_tokenizer(quickstart["model"])
    prepare = DualPreparer(TextFormatter(tokenizer, 8), TextFormatter(tokenizer, 20))
    tabled = prepare.with_doc_table(TokenTable.build(prepare.doc_formatter, TEXTS))
    rows, candidates = np.array([4, 2, 3]), np.array([[0, 1], [2, 0]])
    docs = [TEXTS[r] for r in rows]
    plain = prepare(["q one", "q two"], docs, candidates)
    for out in (
        tabled(["q one", "q two"], docs, candidates, doc_rows=rows),
        tabled(["q one", "q two"], docs, candidates),
    ):
        for side in ("query", "doc"):
            for key, value in plain[side].items():
                assert torch.equal(out[side][key], value)
    wrong = tabled(["q one", "q two"], docs, candidates, doc_rows=np.array([0, 1, 5]))  # the rows decide
    assert not torch.equal(wrong["doc"]["input_ids"], plain["doc"]["input_ids"])


def test_tables_refuse_what_they_cannot_reproduce(quickstart):
    tokenizer = fast_tokenizer(quickstart["model"])
    with pytest.raises(ConfigError, match="mask_padding"):
        TextFormatter(tokenizer, 8, mask_padding=True).token_ids(["x"])
    tokenizer.padding_side = "left"
    try:
        with pytest.raises(ConfigError, match="pads on the left"):
            TextFormatter(tokenizer, 8).token_ids(["x"])
    finally:
        tokenizer.padding_side = "right"


def _fit(tmp_path: Path, name: str, *extra: str) -> tuple[dict, str]:
    out = tmp_path / name
    overrides = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "eval_untrained=false",
                 "audit.enabled=false", "export_student=false", "trainer.deterministic=true", *extra,
                 f"hydra.run.dir={out}"]  # fmt: skip
    assert run_command("kdir.run", *overrides) == 0, (out / "run.log").read_text()[-3000:]
    return json.loads((out / "metrics.json").read_text()), (out / "run.log").read_text()


def test_a_pretokenized_run_trains_as_the_run_without_the_table(tmp_path, quickstart):
    """Same batches, same inputs: the same trained student (metrics to the last digit), also with a worker."""
    plain, _ = _fit(tmp_path, "plain")
    tabled, log = _fit(tmp_path, "tabled", "data.pretokenize=true", "data.num_workers=1")
    assert "pre-tokenised" in log
    assert tabled["trained"] == plain["trained"]


def test_pretokenize_names_the_setting_for_a_student_without_one_document_formatter(tmp_path, quickstart):
    out = tmp_path / "colbert"
    status = run_command("kdir.run", "student=colbert", f"student.path={quickstart['model']}", "student.dim=16",
                         "eval=quickstart_maxsim", "data.pretokenize=true", "eval_untrained=false",
                         "audit.enabled=false", f"hydra.run.dir={out}")  # fmt: skip
    assert status == 2
    assert "data.pretokenize=true needs a dual-encoder student" in (out / "run.log").read_text()
    assert run_command("kdir.run", "data.pretokenize=yes", f"hydra.run.dir={tmp_path / 'bad'}") == 2
    assert "data.pretokenize='yes': expected true or false" in (tmp_path / "bad" / "run.log").read_text()


def test_bucketing_with_a_table_sorts_by_tokens(tmp_path, quickstart):
    from conftest import compose_cfg
    from hydra.utils import instantiate

    import kdir  # noqa: F401  (config resolvers)

    cfg = compose_cfg(tmp_path, ["data.pretokenize=true", "data.bucket_batches=4"])
    student, datamodule = instantiate(cfg.student), instantiate(cfg.data)
    datamodule.attach(student.preparer(), "pairwise")
    loader = datamodule.train_dataloader()
    table = datamodule._doc_table
    positives = datamodule.examples.positives
    assert np.array_equal(datamodule._lengths(), table.lengths(positives))
    assert np.array_equal(table.lengths(), [len(ids) for ids in student.formatter("doc").token_ids(
        datamodule.train.corpus.texts)])  # fmt: skip
    batch = next(iter(loader))
    assert batch.inputs["doc"]["input_ids"].shape[1] <= table.lengths().max()


class _Counting:
    """A formatter that counts the texts it tokenises."""

    def __init__(self, formatter: TextFormatter):
        self.inner, self.calls = formatter, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def token_ids(self, texts):
        self.calls += len(texts)
        return self.inner.token_ids(texts)


def test_a_cached_table_is_read_back_and_rebuilt_when_its_inputs_differ(quickstart, tmp_path, caplog):
    tokenizer = fast_tokenizer(quickstart["model"])
    cache = tmp_path / "tokens"
    first = _Counting(TextFormatter(tokenizer, 16))
    built = TokenTable.cached(first, TEXTS, cache)
    assert first.calls == len(TEXTS) and {p.name for p in cache.iterdir()} == {"ids.npy", "offsets.npy", "meta.json"}
    again = _Counting(TextFormatter(tokenizer, 16))
    read = TokenTable.cached(again, TEXTS, cache)
    assert again.calls == 0 and isinstance(read.ids, np.memmap)  # memory-mapped, not tokenised again
    rows = np.array([3, 0, 4])
    for key, value in again.inner(list(np.asarray(TEXTS, dtype=object)[rows])).items():
        assert torch.equal(read.batch(rows)[key], value) and torch.equal(built.batch(rows)[key], value)
    for formatter, texts, differs in (
        (TextFormatter(tokenizer, 12), TEXTS, "max_length"),
        (TextFormatter(tokenizer, 16), [*TEXTS[:-1], "another text"], "texts_xxh64"),
        (TextFormatter(fast_tokenizer(L3), 16), TEXTS, "tokenizer_xxh64"),
    ):
        counting = _Counting(formatter)
        with caplog.at_level("WARNING"):
            table = TokenTable.cached(counting, texts, cache)
        assert counting.calls == len(texts) and differs in caplog.text
        assert torch.equal(table.batch(rows)["input_ids"], formatter([texts[r] for r in rows])["input_ids"])
    (cache / "meta.json").unlink()  # a write killed before its last file: the table is not taken as complete
    counting = _Counting(TextFormatter(tokenizer, 16))
    TokenTable.cached(counting, TEXTS, cache)
    assert counting.calls == len(TEXTS)


def test_a_cached_run_trains_as_the_run_without_it(tmp_path, quickstart):
    plain, _ = _fit(tmp_path, "plain")
    cache = tmp_path / "tokens"
    runs = [_fit(tmp_path, f"cached{i}", "data.pretokenize=true", f"data.pretokenize_cache={cache}") for i in (1, 2)]
    assert "pre-tokenised documents read from" in runs[1][1] and "pre-tokenised documents read" not in runs[0][1]
    assert runs[0][0]["trained"] == runs[1][0]["trained"] == plain["trained"]
    out = tmp_path / "bad"
    assert run_command("kdir.run", f"data.pretokenize_cache={cache}", f"hydra.run.dir={out}") == 2
    assert "data.pretokenize_cache needs data.pretokenize=true" in (out / "run.log").read_text()
