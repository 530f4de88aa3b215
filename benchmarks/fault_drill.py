"""Fault drill: run each failure path of kdir for real and print what happens, beside what the previous version did.

Every drill drives the real commands (subprocesses, the offline quickstart or hand-made files) and checks the
guarantee it stands for; the "before" column is what the same drill gave on the version before these guarantees
(commit fa32e56), recorded once. Usage::

    python benchmarks/fault_drill.py                 # every drill (about 3 minutes on 2 CPU cores)
    python benchmarks/fault_drill.py --quick         # skip the slow drills (kill -9 + resume of training runs)
    python benchmarks/fault_drill.py --only resume   # drills whose name contains "resume"

Kills are real ``SIGKILL``s: a subprocess is killed at a chosen point (``KillAt`` below, a callback that sends
SIGKILL to its own process at a given training step or validation batch; or, for imports and scoring, a kill
from outside once the first segment is on disk), then the same command is rerun and its result compared with
an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]


class KillAt(pl.Callback):
    """SIGKILL this process at training step ``step`` (before it runs) or at the first validation batch of epoch
    ``val_epoch`` — no cleanup, no checkpoint on the way out, as a crash or a pre-empted node."""

    def __init__(self, step: int | None = None, val_epoch: int | None = None):
        self.step, self.val_epoch = step, val_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.val_epoch is not None and trainer.current_epoch == self.val_epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- helpers


def cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` with this folder importable (for ``KillAt``)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    env |= {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_line(r: subprocess.CompletedProcess) -> str:
    """The command's one-line error (``kdir.<cmd>: error: ...``), else its last stderr line."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ": error: " in ln]
    return (errs or lines or ["(no output)"])[-1][:300]


def expect_user_error(r: subprocess.CompletedProcess, *words: str) -> str:
    line = error_line(r)
    assert r.returncode == 2, f"exit {r.returncode}: {line}"
    assert all(w in line for w in words), line
    return f"exit 2: {line}"


def quickstart() -> Path:
    from kdir.data.quickstart import ensure

    return Path(ensure("data"))


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["trained"]


QUICK_RUN = ("eval_untrained=false", "export_student=false", "logger=csv", "trainer.max_epochs=2")


# ---------------------------------------------------------------------------------------------- drills


@dataclass
class Drill:
    name: str
    before: str
    run: Callable[[Path], str]
    slow: bool = False


def non_finite_scores(tmp: Path) -> str:
    rows = (quickstart() / "teacher" / "scores.tsv").read_text().splitlines()
    rows[6] = "\t".join(rows[6].split("\t")[:2] + ["inf"])
    (tmp / "poison.tsv").write_text("\n".join(rows) + "\n")
    out = tmp / "run"
    r = cli(
        "kdir.run",
        f"signal.store={tmp / 'poison.store'}",
        f"signal.import_file={tmp / 'poison.tsv'}",
        f"hydra.run.dir={out}",
        *QUICK_RUN,
    )
    assert not (out / "metrics.json").exists(), "results were written"
    return expect_user_error(r, "poison.tsv:7", "finite")


def diverging_loss(tmp: Path) -> str:
    out = tmp / "run"
    r = cli("kdir.run", "optim.optimizer.lr=1e30", f"hydra.run.dir={out}", *QUICK_RUN)
    assert not (out / "metrics.json").exists(), "results were written"
    return expect_user_error(r, "not finite")


def negatives_beyond_depth(tmp: Path) -> str:
    r = cli(
        "kdir.run",
        "loss=infonce",
        "teacher=none",
        "debug=fast",
        "data.examples.n_negatives=40",
        f"hydra.run.dir={tmp / 'run'}",
    )
    assert r.returncode == 0, error_line(r)
    return "exit 0: 40 negatives per example (the run's top 30 + random top-up)"


def negative_count(tmp: Path) -> str:
    r = cli("kdir.run", "data.examples.n_negatives=-1", f"hydra.run.dir={tmp / 'run'}")
    return expect_user_error(r, "n_negatives")


def _corpus_copy(tmp: Path, edit: Callable[[bytes], bytes]) -> Path:
    root = tmp / "qs"
    shutil.copytree(quickstart(), root, ignore=shutil.ignore_patterns("*.store"))
    corpus = root / "corpus.jsonl"
    corpus.write_bytes(edit(corpus.read_bytes()))
    return root


def _evaluate(root: Path, tmp: Path) -> subprocess.CompletedProcess:
    return cli("kdir.evaluate", f"datasets.quickstart.root={root}", f"hydra.run.dir={tmp / 'eval'}")


def null_text(tmp: Path) -> str:
    def edit(b: bytes) -> bytes:
        lines = b.split(b"\n")
        row = json.loads(lines[41])
        lines[41] = json.dumps(row | {"text": None}).encode()
        return b"\n".join(lines)

    return expect_user_error(_evaluate(_corpus_copy(tmp, edit), tmp), "corpus.jsonl:42")


def byte_order_mark(tmp: Path) -> str:
    r = _evaluate(_corpus_copy(tmp, lambda b: b"\xef\xbb\xbf" + b), tmp)
    assert r.returncode == 0, error_line(r)
    return "exit 0: read as without the BOM"


def not_utf8(tmp: Path) -> str:
    def edit(b: bytes) -> bytes:
        lines = b.split(b"\n")
        lines[1500] = lines[1500].replace(b"a", b"\xe9", 1)
        return b"\n".join(lines)

    return expect_user_error(_evaluate(_corpus_copy(tmp, edit), tmp), "corpus.jsonl:1501", "UTF-8")


def _py(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _store_contents(path: Path) -> tuple:
    """All (key, value) pairs of a store, sorted by key (to compare two stores)."""
    import numpy as np

    from kdir.stores import ScoreStore

    store = ScoreStore.open(path)
    keys = np.unique(np.concatenate([seg.keys for seg in store._segments]))
    return keys.tobytes(), store.lookup(keys).tobytes()


def _kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``ready()``; returns its exit status (-9 when killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    return proc.wait()


def killed_import(tmp: Path) -> str:
    """kill -9 during a 1M-line import (after its first 200K-row segment), then the same import again."""
    with (tmp / "big.tsv").open("w") as f:
        for i in range(1_000_000):
            f.write(f"q{i % 5000}\td{i}\t{(i % 997) / 97:.4f}\n")
    code = (
        "import sys; from kdir.stores import ScoreStore; "
        "ScoreStore.import_new(sys.argv[1], sys.argv[2], chunk_size=200_000)"
    )
    store = tmp / "s.store"
    rc = _kill_when(
        [sys.executable, "-c", code, str(store), str(tmp / "big.tsv")],
        lambda: any(tmp.glob("**/seg-*.values.npy")),
    )
    assert rc == -9, f"the import was not killed (exit {rc})"
    assert not store.exists(), "a half-imported store was published"
    for target in (store, tmp / "ref.store"):
        r = subprocess.run(
            [sys.executable, "-c", code, str(target), str(tmp / "big.tsv")], cwd=ROOT, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-500:]
    assert _store_contents(store) == _store_contents(tmp / "ref.store"), "the re-import differs"
    return (
        "killed after the first segment: no store published; the rerun imported all 1,000,000 pairs, "
        "equal to an uninterrupted import"
    )


def _teacher(tmp: Path) -> Path:
    folder = tmp / "teacher"
    code = (
        "import sys; from kdir.data.quickstart import ensure; from kdir.models import DualEncoder; "
        "DualEncoder(ensure('model'), pooling='cls', query_max_length=16, doc_max_length=32)"
        ".save_pretrained(sys.argv[1])"
    )
    r = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    return folder


def _score(teacher: Path, store: Path, *extra: str) -> list[str]:
    run = quickstart() / "runs" / "train.trec"
    return [
        "kdir.score",
        "teacher=bi_encoder",
        f"teacher.path={teacher}",
        f"store={store}",
        f"run_file={run}",
        "depth=5",
        "chunk_size=700",
        "accelerator=cpu",
        f"hydra.run.dir={store}.run",
        *extra,
    ]


def killed_scoring(tmp: Path) -> str:
    teacher = _teacher(tmp)
    store = tmp / "s.store"
    env_cmd = [sys.executable, "-m", *_score(teacher, store)]
    rc = _kill_when(env_cmd, lambda: len(list(store.glob("segments/*chunk-*.keys.npy"))) >= 3)
    assert rc == -9, f"scoring was not killed (exit {rc})"
    for target in (store, tmp / "ref.store"):
        r = cli(*_score(teacher, target))
        assert r.returncode == 0, error_line(r)
    assert _store_contents(store) == _store_contents(tmp / "ref.store"), "the resumed store differs"
    return "killed after 3 chunks; the rerun finished it, bit-identical to an uninterrupted run"


def rescoring_more_pairs(tmp: Path) -> str:
    teacher, store = _teacher(tmp), tmp / "s.store"
    for depth in (5, 10):
        r = cli(*_score(teacher, store, f"depth={depth}"))
        assert r.returncode == 0, error_line(r)
    line = next(ln for ln in (r.stdout + r.stderr).splitlines()[::-1] if "requested pairs present" in ln)
    return "exit 0: " + line.split("] ")[-1]


def other_scoring_settings(tmp: Path) -> str:
    teacher, store = _teacher(tmp), tmp / "s.store"
    assert cli(*_score(teacher, store)).returncode == 0
    r = cli(*_score(teacher, store, "teacher.pooling=mean", "teacher.similarity=cosine"))
    return expect_user_error(r, "pooling")


def damaged_segment(tmp: Path, how: str) -> str:
    teacher, store = _teacher(tmp), tmp / "s.store"
    assert cli(*_score(teacher, store)).returncode == 0
    values = sorted(store.glob("segments/*.values.npy"))[0]
    data = bytearray(values.read_bytes())
    if how == "flip":
        data[-8] ^= 0xFF
        values.write_bytes(bytes(data))
    else:
        values.write_bytes(bytes(data[:-100]))
    return expect_user_error(cli(*_score(teacher, store)), values.name)


def foreign_ensemble_member(tmp: Path) -> str:
    (tmp / "ens" / "m").mkdir(parents=True)
    (tmp / "ens" / "kdir_model.json").write_text(json.dumps({"members": {"m": "os.system"}, "normalize": "none"}))
    r = _py(f"from kdir.models import Ensemble; Ensemble.from_pretrained({str(tmp / 'ens')!r})")
    assert r.returncode != 0 and "not one of kdir's models" in r.stderr, r.stderr[-300:]
    return "refused: " + [ln for ln in r.stderr.splitlines() if "not one of" in ln][-1].split(": ", 1)[-1][:200]


RESUME_RUN = (*QUICK_RUN, "callbacks.step_checkpoint.every_n_train_steps=10")  # 2 epochs of 38 steps


def _reference(tmp: Path) -> dict:
    out = tmp / "reference"
    r = cli("kdir.run", *RESUME_RUN, f"hydra.run.dir={out}")
    assert r.returncode == 0, error_line(r)
    return metrics(out)


def killed_training(tmp: Path, **kill: int) -> str:
    """kill -9 a training run at a chosen point, resume it with ``resume=true``, compare with an uninterrupted run."""
    out = tmp / "killed"
    where = " ".join(f"+callbacks.kill.{k}={v}" for k, v in kill.items()).split()
    r = cli("kdir.run", *RESUME_RUN, f"hydra.run.dir={out}", "+callbacks.kill._target_=fault_drill.KillAt", *where)
    assert r.returncode == -9, f"the run was not killed (exit {r.returncode}): {error_line(r)}"
    assert not (out / "metrics.json").exists()
    r = cli("kdir.run", *RESUME_RUN, f"hydra.run.dir={out}", "resume=true")
    assert r.returncode == 0, error_line(r)
    resumed, reference = metrics(out), _reference(tmp)
    assert resumed == reference, f"resumed {resumed} != uninterrupted {reference}"
    return f"killed, resumed with resume=true: test nDCG@10 {resumed['nDCG@10']:.4f}, equal to the uninterrupted run"


def nothing_to_resume(tmp: Path) -> str:
    return expect_user_error(cli("kdir.run", "ckpt_path=/no/such.ckpt", f"hydra.run.dir={tmp / 'run'}"), "ckpt_path")


def concurrent_runs(tmp: Path) -> str:
    """Two runs with the default run folder, started in the same second (seeds 1 and 2)."""
    args = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval_untrained=false", "export_student=false")
    env = os.environ | {"PYTHONPATH": str(ROOT / "benchmarks"), "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "kdir.run",
        *args,
    ]  # no hydra.run.dir: the default outputs/run/<date>/<time>-<uid>_...
    procs = [
        subprocess.Popen(
            [*cmd, f"seed={s}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for s in (1, 2)
    ]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "a run failed"
    dirs = [Path(next(ln for ln in o.splitlines() if ln.startswith("outputs: ")).split(": ", 1)[1]) for o in outs]
    assert dirs[0] != dirs[1], f"both runs wrote into {dirs[0]}"
    for d, seed in zip(dirs, (1, 2)):
        assert f"seed: {seed}" in (d / "config.yaml").read_text(), d
    names = [d.name for d in dirs]
    for d in dirs:
        shutil.rmtree(d)
    return f"two folders ({names[0]}, {names[1]}), each with its own config and metrics"


def rerun_into_a_run_folder(tmp: Path) -> str:
    out = tmp / "run"
    assert cli("kdir.run", "debug=fast", f"hydra.run.dir={out}").returncode == 0
    before = sorted(p.name for p in out.rglob("*"))
    r = cli("kdir.run", "debug=fast", f"hydra.run.dir={out}")
    assert sorted(p.name for p in out.rglob("*")) == before, "the folder changed"
    return expect_user_error(r, "holds a run already")


DRILLS: list[Drill] = [
    Drill(
        "non-finite teacher scores (inf in a score file)",
        "exit 0; train/loss nan, every test metric 0.0000, metrics.json and a best checkpoint written",
        non_finite_scores,
    ),
    Drill(
        "training loss turns non-finite (lr 1e30)",
        "exit 0; train/loss nan, test nDCG@10 0.0000, metrics.json and best/last checkpoints written",
        diverging_loss,
    ),
    Drill(
        "n_negatives larger than the run depth",
        "exit 1: IndexError: boolean index did not match indexed array along axis 1",
        negatives_beyond_depth,
    ),
    Drill("n_negatives=-1", "exit 0: '-1 negatives each', trained on 29 per example", negative_count),
    Drill(
        '"text": null in corpus.jsonl',
        "exit 1: TypeError: object of type 'NoneType' has no len() (no file, no line)",
        null_text,
    ),
    Drill(
        "UTF-8 byte-order mark in corpus.jsonl",
        "exit 2: corpus.jsonl:1: expected a JSON object ..., got '\\ufeff{...'",
        byte_order_mark,
    ),
    Drill("a non-UTF-8 byte in corpus.jsonl", "exit 1: an 8 KB UnicodeDecodeError, no file name", not_utf8),
    Drill(
        "kill -9 during a score-file import, then rerun",
        "meta.json existed: every rerun skipped the import and failed '128 of 128 candidate pairs ... not in store'",
        killed_import,
    ),
    Drill("kill -9 during kdir.score, then rerun", "resumed by chunk index (bit-identical)", killed_scoring),
    Drill(
        "kdir.score depth=10 into a depth=5 store",
        "exit 0 with 3,186 of 12,510 pairs missing (chunks tracked by index)",
        rescoring_more_pairs,
    ),
    Drill(
        "kdir.score with other pooling / similarity, same weights",
        "exit 0: 0 new pairs scored; the store was reused silently",
        other_scoring_settings,
    ),
    Drill(
        "flipped bytes in a store segment",
        "258 silently wrong scores",
        lambda tmp: damaged_segment(tmp, "flip"),
    ),
    Drill(
        "truncated store segment",
        "ValueError: mmap length is greater than file size (no file named)",
        lambda tmp: damaged_segment(tmp, "truncate"),
    ),
    Drill(
        "ensemble folder naming os.system as a member class",
        "imported any module named in the folder's JSON and called its class's from_pretrained",
        foreign_ensemble_member,
    ),
    Drill(
        "kill -9 early in training (step 12), resume",
        "no resume: +ckpt_path was accepted and ignored; a forced Lightning resume ended at nDCG@10 0.1962 vs 0.2273",
        lambda tmp: killed_training(tmp, step=12),
        slow=True,
    ),
    Drill(
        "kill -9 mid-epoch (epoch 1, step 55), resume",
        "as above: no RNG state, no stream position in the checkpoint",
        lambda tmp: killed_training(tmp, step=55),
        slow=True,
    ),
    Drill(
        "kill -9 during validation (epoch 0), resume",
        "as above",
        lambda tmp: killed_training(tmp, val_epoch=0),
        slow=True,
    ),
    Drill("ckpt_path=<missing file>", "exit 0: +ckpt_path=... accepted and silently ignored", nothing_to_resume),
    Drill(
        "two runs with the default folder in the same second",
        "one folder: config.yaml said seed 1, metrics.json held seed 2, metrics.csv interleaved both",
        concurrent_runs,
    ),
    Drill(
        "rerun into a folder that holds a run",
        "mixed records; a killed run's last.ckpt stayed next to the new last-v1.ckpt",
        rerun_into_a_run_folder,
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the slow drills")
    ap.add_argument("--only", default="", help="run the drills whose name contains this text")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    rows, failed = [], 0
    for drill in DRILLS:
        if (args.quick and drill.slow) or args.only not in drill.name:
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kdir-drill-") as tmp:
            try:
                now, ok = drill.run(Path(tmp)), "yes"
            except AssertionError as e:
                now, ok = f"GUARANTEE BROKEN: {e}", "NO"
                failed += 1
        rows.append((drill.name, drill.before, now, ok, time.perf_counter() - start))
        print(f"[{ok}] {drill.name} ({rows[-1][4]:.0f} s): {now}", flush=True)
    table = ["| drill | before | now | holds | s |", "|---|---|---|---|---|"]
    table += [f"| {n} | {b} | {w.replace('|', '/')} | {o} | {s:.0f} |" for n, b, w, o, s in rows]
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
