"""Results table (Markdown) and bar chart (PNG) of the SciFact KD study, from the recorded runs.

    python experiments/scifact_kd/table.py experiments/scifact_kd/results

Reads ``<results>/<row>.json`` (written by ``record.py``; students as ``<row>_s<seed>.json``), writes
``<results>/results.md`` and ``<results>/chart.png`` and prints the table. Rows without records are listed
as not run. Gap closed = (student − start) / (teacher − start), on nDCG@10; the start is L3 zero-shot, or the row's
own untrained student where it was measured (the asymmetric EmbedDistill student: L3 queries, L6 documents), or
the model it is initialised from (CollectiveKD's ColBERT student: its ColBERT teacher).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

METRICS = ("nDCG@10", "R@100", "RR@10")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # zero-shot | teacher | student
    teacher: str | None = None  # the row whose score is the teacher's (gap closed)
    start: str | None = None  # the row whose score is the student's start, when it is not L3 (its initialisation)
    baseline: str = "infonce"  # the hard-label row at the same lengths (Welch's t-test against it)


ROWS = (
    Row("l3_zero", "paraphrase-MiniLM-L3-v2 (student init), 128 tokens", "zero-shot"),
    Row("l6_zero", "all-MiniLM-L6-v2 (teacher init), 256 tokens", "zero-shot"),
    Row("l6_zero_128", "all-MiniLM-L6-v2, 128 tokens (EmbedDistill's DE teacher)", "zero-shot"),
    Row("teacher_ce", "cross-encoder from L6, re-ranks L6 top 50", "teacher"),
    Row("teacher_colbert", "ColBERT (v1: L2, zero-vector padding) from L6, exhaustive MaxSim", "teacher"),
    Row("teacher_tct", "TCT-ColBERT teacher from L6 (its token set, logits x 4B), exhaustive MaxSim", "teacher"),
    Row("teacher_collective", "collective teacher: ColBERT + PRF expansion, re-ranks its top 100", "teacher"),
    Row("infonce", "L3, InfoNCE hard labels (in-batch + mined), no KD", "student"),
    Row("margin_mse", "L3, Margin-MSE (CE teacher, cached scores)", "student", "teacher_ce"),
    Row("margin_mse_colbert", "L3, Margin-MSE (ColBERT teacher, cached scores)", "student", "teacher_colbert"),
    Row("tct_colbert", "L3, TCT-ColBERT in-batch KL (TCT teacher online)", "student", "teacher_tct"),
    Row("embeddistill_asym", "L3 query tower + frozen L6 doc tower, EmbedDistill", "student", "l6_zero_128"),
    Row("embeddistill_sym", "L3, EmbedDistill symmetric (L6 DE teacher)", "student", "l6_zero_128"),
    Row(
        "collective_kd",
        "ColBERT student (init: the teacher), CollectiveKD",
        "student",
        "teacher_collective",
        start="teacher_colbert",
    ),
    Row("l3_zero_len", "paraphrase-MiniLM-L3-v2, the length chosen on dev (256 tokens)", "zero-shot"),
    Row("infonce_len", "L3 at 256 tokens, InfoNCE hard labels (in-batch + mined), no KD", "student", baseline=""),
    Row(
        "kd_l6",
        "L3 at 256, in-batch KD from L6 (cached embeddings), real + generated queries",
        "student",
        "l6_zero",
        start="l3_zero_len",
        baseline="infonce_len",
    ),
    Row(
        "kd_l6_emb",
        "kd_l6 + embedding matching (queries, every batch document)",
        "student",
        "l6_zero",
        start="l3_zero_len",
        baseline="infonce_len",
    ),
    Row(
        "kd_l6_emb_nce",
        "kd_l6_emb + the InfoNCE hard-label term",
        "student",
        "l6_zero",
        start="l3_zero_len",
        baseline="infonce_len",
    ),
    Row(
        "kd_l6_emb_nce_tuned",
        "kd_l6_emb_nce with the dev search's best settings (lr, temperature, query matching, generated/batch)",
        "student",
        "l6_zero",
        start="l3_zero_len",
        baseline="infonce_len",
    ),
    Row(
        "kd_l6_nce",
        "kd_l6 (KL, teacher tau 0.05) + InfoNCE, no embedding matching: the ensemble row's control",
        "student",
        "l6_zero",
        start="l3_zero_len",
        baseline="infonce_len",
    ),
    Row(
        "kd_ens_nce",
        "as kd_l6_nce, teacher: z-scored mean of L6 and the ColBERT, online (gap: of L6)",
        "student",
        "l6_zero",
        start="l3_zero_len",
        baseline="infonce_len",
    ),
)
DEV_ROWS = ("l3_dev_128", "l3_dev_256", "l3_dev_512", "l6_dev")
TRANSFER = (
    "l3_zero_len",
    "l6_zero",
    "infonce_len",
    "kd_l6_emb",
    "kd_l6_emb_nce",
    "kd_l6_emb_nce_tuned",
)  # zero-shot on the DL19 subset


def welch(a: list[float], b: list[float]) -> str:
    """Welch's t-test of ``a`` against ``b`` (``t``, two-sided ``p``), or why there is none."""
    if len(a) < 2 or len(b) < 2:
        return f"n={len(a)} vs {len(b)}"
    from scipy.stats import ttest_ind

    t, p = ttest_ind(a, b, equal_var=False)
    return f"t={t:+.2f}, p={p:.3f}"


def load(results: Path, row: Row) -> list[dict]:
    if row.kind != "student":
        path = results / f"{row.key}.json"
        return [json.loads(path.read_text())] if path.exists() else []
    return [json.loads(p.read_text()) for p in sorted(results.glob(f"{row.key}_s*.json"))]


def _transfer(results: Path, key: str) -> list[dict]:
    """The DL19 records of row ``key``: ``dl19_<key>.json`` (zero-shot rows) or ``dl19_<key>_s<seed>.json``."""
    one = results / f"dl19_{key}.json"
    paths = [one] if one.exists() else sorted(results.glob(f"dl19_{key}_s*.json"))
    return [json.loads(p.read_text()) for p in paths]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f}" if len(values) == 1 else f"{m:.4f} ± {s:.4f}"


def best_val(record: dict) -> float | None:
    vals = [v["val/nDCG@10"] for v in record.get("val", []) if "val/nDCG@10" in v]
    return max(vals) if vals else None


def build(results: Path) -> tuple[str, list[tuple[str, float, float]]]:
    records = {row.key: load(results, row) for row in ROWS}
    base = records["l3_zero"][0]["metrics"]["nDCG@10"] if records["l3_zero"] else None
    head = (
        "| row | model | n | nDCG@10 | R@100 | RR@10 | gap closed | vs hard labels (Welch) | dev nDCG@10 | wall time |"
    )
    lines = [head, "|" + "---|" * 10]
    bars = []
    for row in ROWS:
        recs = records[row.key]
        if not recs:
            lines.append(f"| {row.key} | {row.label} | 0 | not run | | | | | | |")
            continue
        cols = [fmt([r["metrics"][m] for r in recs]) for m in METRICS]
        gap = ""
        teacher = records.get(row.teacher or "", [])
        starts = [r["untrained"]["nDCG@10"] for r in recs if r.get("untrained")]
        init = records.get(row.start or "", [])
        start = init[0]["metrics"]["nDCG@10"] if init else base  # the initialisation's score (else L3 zero-shot)
        start = mean_std(starts)[0] if len(starts) == len(recs) else start  # a row's own start when it measured one
        if start is not None and teacher:
            t = teacher[0]["metrics"]["nDCG@10"]
            own = f", from {start:.4f}" if start != base else ""
            if t > start:
                gaps = [(r["metrics"]["nDCG@10"] - start) / (t - start) for r in recs]
                gap = f"{mean_std(gaps)[0]:+.0%} (of {t:.4f}{own})"
            else:  # nothing to close: the teacher is not above the student's start
                gap = f"n/a (teacher {t:.4f} ≤ {'L3' if start == base else f'{start:.4f}'})"
        test = [r["metrics"]["nDCG@10"] for r in recs]
        base_recs = records.get(row.baseline, []) if row.kind == "student" and row.baseline else []
        versus = f"n={len(test)} vs 0" if row.kind == "student" and row.baseline and not base_recs else ""
        if base_recs:
            ref = [r["metrics"]["nDCG@10"] for r in base_recs]
            versus = f"{mean_std(test)[0] - mean_std(ref)[0]:+.4f} vs {row.baseline}, {welch(test, ref)}"
        vals = [v for v in (best_val(r) for r in recs) if v is not None]
        dev = fmt(vals) if vals else ""
        secs = min(r["seconds"] for r in recs)  # the least disturbed run
        lines.append(
            f"| {row.key} | {row.label} | {len(recs)} | " + " | ".join(cols) + f" | {gap} | {versus} | {dev} | "
            f"{secs / 60:.1f} min |"
        )
        bars.append((row.key, *mean_std([r["metrics"]["nDCG@10"] for r in recs])))
    dev_rows = [
        (k, json.loads((results / f"{k}.json").read_text())) for k in DEV_ROWS if (results / f"{k}.json").exists()
    ]
    if dev_rows:
        lines.append(
            "\nLength choice on dev (zero-shot nDCG@10 on the 100 dev queries; the test split is not read):\n"
        )
        lines += ["| row | dev nDCG@10 | wall time |", "|---|---|---|"]
        lines += [f"| {k} | {r['metrics']['nDCG@10']:.4f} | {r['seconds'] / 60:.1f} min |" for k, r in dev_rows]
    transfer = [(k, _transfer(results, k)) for k in TRANSFER]
    if any(recs for _, recs in transfer):
        lines.append(
            "\nTransfer: the same models zero-shot on the MS MARCO TREC DL19 subset (43 judged queries, 5,000 "
            "passages; never tuned on):\n"
        )
        lines += ["| row | n | nDCG@10 | RR(rel=2)@10 | R(rel=2)@100 |", "|---|---|---|---|---|"]
        for key, recs in transfer:
            if recs:
                cells = [fmt([r["metrics"][m] for r in recs]) for m in ("nDCG@10", "RR(rel=2)@10", "R(rel=2)@100")]
                lines.append(f"| {key} | {len(recs)} | " + " | ".join(cells) + " |")
    search = results / "search_kd.json"
    if search.exists():
        record = json.loads(search.read_text())
        lines.append(
            "\nDev-tuned search (`hparams_search=scifact_kd`, Optuna TPE; its first trials are random) around "
            "kd_l6_emb_nce, one epoch per trial, selected on dev nDCG@10; test reported, never selected on:\n"
        )
        lines += ["| trial | lr | score temperature | query matching weight | generated / batch | dev | test |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        keys = ("optim.optimizer.lr", "loss.terms.score.temperature", "loss.terms.emb_q.weight")
        for t in record["trials"]:
            p = t["params"]
            cells = [f"{float(p[k]):.3g}" for k in keys] + [p.get("data.generated_per_batch", "")]
            test = (t["test"] or {}).get("nDCG@10")
            best = "**" if t["dev_nDCG@10"] == record["best_dev_nDCG@10"] else ""
            lines.append(
                f"| {t['trial']} | "
                + " | ".join(map(str, cells))
                + f" | {best}{t['dev_nDCG@10']:.4f}{best} | "
                + (f"{test:.4f} |" if test is not None else " |")
            )
    hw = next((r[0]["hardware"] for r in records.values() if r), "")
    lines.append(
        f"\nHardware: {hw}. n = seeds (students) or runs. Student test metrics are the checkpoint with the "
        "best dev nDCG@10 (100 held-out train queries). Wall time: the fastest of the seeds."
    )
    return "\n".join(lines) + "\n", bars


def chart(bars: list[tuple[str, float, float]], base: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, means, stds = zip(*bars)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    colors = [
        "#9e9e9e" if n.endswith("zero") or "zero_" in n else "#f28e2b" if n.startswith("teacher") else "#4e79a7"
        for n in names
    ]
    ax.barh(names, means, xerr=stds, color=colors, capsize=3)
    for y, m in enumerate(means):
        ax.text(m + 0.005, y, f"{m:.3f}", va="center", fontsize=8)
    if base is not None:
        ax.axvline(base, color="black", lw=0.8, ls="--", label="L3 zero-shot")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SciFact test nDCG@10 (mean ± std over seeds)")
    ax.set_xlim(0.3, max(means) + 0.08)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/scifact_kd/results")
    table, bars = build(results)
    (results / "results.md").write_text(table)
    print(table)
    if bars:
        base = next((m for k, m, _ in bars if k == "l3_zero"), None)
        chart(bars, base, results / "chart.png")
        print(f"wrote {results / 'results.md'} and {results / 'chart.png'}")


if __name__ == "__main__":
    main()
