"""CollectiveKD's expansion stage (kdir.expand), the expansion store and the collective teacher.

Expected values are worked out by hand in the comments; the end-to-end run uses the quickstart data and a
tiny ColBERT built from the quickstart BERT.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import CONF, run_cli, run_command

from kdir.data.dataset import IRDataset
from kdir.errors import DataFormatError, KdirError
from kdir.models import ColBERT, CollectiveColBERT, maxsim
from kdir.models.collective import collective_maxsim
from kdir.retrieval.prf import (
    TokenPool,
    avg_step_position,
    cluster_feedback,
    collective_knowledge,
    document_frequencies,
    inverse_document_frequency,
    label_centroids,
    nearest_token_ids,
    ranked_feedback,
    relevance_feedback,
    select_expansions,
)
from kdir.retrieval.search import build_index
from kdir.stores import ExpansionStore, id_hashes


def unit(degrees: float, norm: float = 1.0) -> list[float]:
    rad = math.radians(degrees)
    return [norm * math.cos(rad), norm * math.sin(rad)]


# ---------------------------------------------------------------- k-means seeds


@pytest.mark.parametrize(
    "n_clusters, expected",
    [
        # 3 documents of 5, 4, 6 tokens start at rows 0, 5, 9 of the concatenation.
        (6, [0, 4, 5, 8, 9, 14]),  # 2 seeds each, at the first and last token
        (7, [0, 4, 5, 8, 9, 11, 14]),  # bounds floor(7i/3) = 0,2,4,7: 2,2,3 seeds; doc 3: floor(5j/2) = 0,2,5
        (8, [0, 4, 5, 6, 8, 9, 11, 14]),  # bounds 0,2,5,8: 2,3,3 seeds; doc 2: floor(3j/2) = 0,1,3
        # 24 requested, min(24, 15 tokens) = 15: 5 seeds each; doc 1: j*4/4 = 0..4; doc 2: floor(3j/4) = 0,0,1,2,3;
        # doc 3: floor(5j/4) = 0,1,2,3,5
        (15, [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12, 14]),
    ],
)
def test_avg_step_position_seeds(n_clusters, expected):
    assert avg_step_position([5, 4, 6], n_clusters).tolist() == expected


def test_avg_step_position_single_document_and_reference_formula():
    assert avg_step_position([10], 4).tolist() == [0, 3, 6, 9]  # floor(9j/3)
    assert avg_step_position([1, 3], 4).tolist() == [0, 0, 1, 3]  # a 1-token document repeats its token
    rng = np.random.default_rng(0)
    for _ in range(200):  # the released code's np.linspace formulation
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 5)))
        n = int(min(rng.integers(1, 30), lengths.sum()))
        bounds = np.linspace(0, n, len(lengths) + 1).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        ref = np.concatenate(
            [
                s + np.linspace(0, m - 1, e - b).astype(np.int64)
                for s, m, b, e in zip(starts, lengths, bounds[:-1], bounds[1:])
            ]
        )
        assert avg_step_position(lengths, n).tolist() == ref.tolist(), (lengths, n)
    with pytest.raises(KdirError, match="at least one token"):
        avg_step_position([3, 0], 2)


def test_cluster_feedback_caps_clusters_at_the_token_count():
    tokens = np.array([unit(a) for a in (0, 2, 4, 90, 92)], dtype=np.float32)
    centroids = cluster_feedback(tokens, [3, 2], n_clusters=24)
    assert centroids.shape == (5, 2)  # min(24, 5) clusters: each token its own centroid
    assert np.allclose(np.sort(centroids, axis=0), np.sort(tokens, axis=0), atol=1e-6)


# ---------------------------------------------------------------- idf


def test_document_frequencies_and_idf_by_hand():
    ids = np.array([[2, 5, 5, 6, 0], [2, 6, 7, 0, 0], [2, 5, 9, 0, 0], [2, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=bool)
    # token 2 in all 4 documents, 5 in docs 0 and 2 (twice in doc 0: counted once), 6 in 0 and 1, 7 in 1;
    # 9 only where masked (punctuation) and 0 only as padding: df 0
    expected = [0, 0, 4, 0, 0, 2, 2, 1, 0, 0]
    assert document_frequencies(ids, mask, 10).tolist() == expected
    assert document_frequencies(ids, mask, 10, chunk=1).tolist() == expected
    idf = inverse_document_frequency(expected, n_docs=4)
    hand = {0: math.log(5 / 1), 2: math.log(5 / 5), 5: math.log(5 / 3), 6: math.log(5 / 3), 7: math.log(5 / 2)}
    for t, v in hand.items():
        assert idf[t] == pytest.approx(v)
    with pytest.raises(KdirError, match="token ids"):
        document_frequencies(ids, mask, 8)


# ---------------------------------------------------------------- labels, weights, selection

# A 2-D token pool: (angle in degrees, token id); id 1 plays [CLS] (a special token).
POOL = [(0, 1), (2, 1), (4, 4), (40, 5), (45, 5), (50, 6), (90, 7), (92, 8), (94, 8)]
SKIP = np.zeros(10, dtype=bool)
SKIP[[0, 1]] = True
DF = np.array([0, 4, 0, 0, 1, 3, 2, 4, 2, 0])  # N = 4 documents
IDF = {4: math.log(5 / 2), 5: math.log(5 / 4), 6: math.log(5 / 3), 7: 0.0, 8: math.log(5 / 3)}


@pytest.fixture(scope="module")
def pool() -> TokenPool:
    emb = np.array([unit(a) for a, _ in POOL], dtype=np.float32)
    return TokenPool(emb, np.array([t for _, t in POOL]), np.array([0, 3, 6, 9]))  # 3 documents of 3 tokens


def test_centroid_labels_weights_and_selection_by_hand(pool):
    index = build_index(pool.embeddings, "Flat", use_gpu=False)
    # unnormalised centroids; their 3 nearest tokens (by angle):
    #   1°: 0°, 2° ([CLS], [CLS]) and 4° (id 4): [CLS] is the majority but skipped -> 4
    #   45°: 45°, 40°, 50° -> ids 5, 5, 6 -> 5
    #   93°: 92°, 94° (id 8), 90° (id 7) -> 8
    centroids = np.array([unit(1, 0.9), unit(45, 0.7), unit(93, 0.8)], dtype=np.float32)
    neighbours = nearest_token_ids(index, pool.token_ids, centroids, 3)
    assert [sorted(r) for r in neighbours.tolist()] == [[1, 1, 4], [5, 5, 6], [7, 8, 8]]
    labels = label_centroids(neighbours, SKIP)
    assert labels.tolist() == [4, 5, 8]
    assert label_centroids(neighbours, np.zeros(10, dtype=bool)).tolist() == [1, 5, 8]  # without skipping
    # beta = 0.5: weights 0.5 ln(5/2) = 0.458, 0.5 ln(5/4) = 0.112, 0.5 ln(5/3) = 0.255
    idf = inverse_document_frequency(DF, 4)
    slots, weights = select_expansions(labels[None], idf, beta=0.5, k=2)
    assert slots.tolist() == [[0, 2]]
    assert weights[0] == pytest.approx([0.5 * IDF[4], 0.5 * IDF[8]])
    slots, weights = select_expansions(labels[None], idf, beta=0.5, k=4)  # more slots than centroids: padded
    assert slots.tolist() == [[0, 2, 1, -1]]
    assert weights[0] == pytest.approx([0.5 * IDF[4], 0.5 * IDF[8], 0.5 * IDF[5], 0.0])


def test_label_ties_go_to_the_nearest_and_all_special_gives_none():
    neighbours = np.array([[7, 8, 8, 7], [1, 1, 0, 1], [-1, 5, 1, 6], [9, 4, 4, 9]])
    assert label_centroids(neighbours, SKIP).tolist() == [7, -1, 5, 9]
    # an unlabelled centroid (-1) is never selected; equal weights keep centroid order
    slots, weights = select_expansions(np.array([[-1, 8, 6, -1]]), inverse_document_frequency(DF, 4), 1.0, 3)
    assert slots.tolist() == [[1, 2, -1]] and weights[0, 2] == 0.0


def test_collective_knowledge_clusters_feedback_documents(pool):
    index = build_index(pool.embeddings, "Flat", use_gpu=False)
    idf = inverse_document_frequency(DF, 4)
    # query 0: feedback docs 1 (40°, 45°, 50°) and 2 (90°, 92°, 94°): 2 clusters seeded at each doc's first token
    # converge to the two documents' means; query 1 has no feedback and is left out
    exp = collective_knowledge(
        [np.array([1, 2]), np.array([], dtype=np.int64)],
        pool,
        index,
        idf,
        SKIP,
        fb_clusters=2,
        fb_k=3,
        beta=1.0,
        neighbours=3,
        progress=False,
    )
    assert exp.queries.tolist() == [0]
    mean_a = pool.embeddings[3:6].mean(0)  # labelled 5 (idf ln 1.25)
    mean_b = pool.embeddings[6:9].mean(0)  # labelled 8 (idf ln 5/3): heavier, first
    assert exp.token_ids.tolist() == [[8, 5, -1]]
    assert exp.weights[0] == pytest.approx([IDF[8], IDF[5], 0.0])
    assert np.allclose(exp.vectors[0], [mean_b, mean_a, [0, 0]], atol=1e-6)
    norms = np.linalg.norm(exp.vectors[0, :2], axis=1)  # not renormalised: |mean| = (1 + 2 cos(spread)) / 3
    assert norms == pytest.approx([(1 + 2 * math.cos(math.radians(2))) / 3, (1 + 2 * math.cos(math.radians(5))) / 3])


def test_feedback_from_a_run_and_from_qrels(beir_dir):
    ds = IRDataset.from_beir(beir_dir, "train")
    run = {"q1": {"d3": 1.0, "d1": 3.0, "d5": 2.0}}
    fb = ranked_feedback(run, ds.queries.ids, ds.corpus, 2, "run")
    assert [f.tolist() for f in fb] == [[0, 4], []]  # q1: d1, d5 (rows 0, 4); q2 absent from the run
    rf = relevance_feedback(ds, 1)
    assert [f.tolist() for f in rf] == [[0], [1]]  # q1 -> d1; q2 -> its first positive d2


# ---------------------------------------------------------------- collective scoring


def test_collective_maxsim_by_hand():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    q_mask = torch.ones(1, 2, dtype=torch.bool)
    e, w = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[2.0]])
    d = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [1.0, 0.0]]])
    d_mask = torch.tensor([[True, True], [True, False]])
    # doc 0: q1 -> 0; q2 -> max(-2, -0.4) = -0.4; e -> max(-0.5, -0.1) = -0.1, x2 = -0.2: total -0.6
    # doc 1 (only (0, 1)): q1 -> -2; q2 -> 0; e -> -0.5, x2 = -1: total -3
    scores = collective_maxsim(q, q_mask, e, w, d, d_mask, "l2")
    assert scores[0].tolist() == pytest.approx([-0.6, -3.0])
    plain = collective_maxsim(q, q_mask, e, torch.zeros(1, 1), d, d_mask, "l2")
    assert plain[0].tolist() == pytest.approx([-0.4, -2.0])
    assert torch.allclose(plain, maxsim(q, q_mask, d, d_mask, "l2"))


# ---------------------------------------------------------------- expansion store


def _store_arrays(qids: list[str], k: int = 2, dim: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(qids), k, dim)).astype(np.float32)
    weights = np.sort(rng.random((len(qids), k)).astype(np.float32), axis=1)[:, ::-1]
    tokens = [[f"{q}-t{j}" for j in range(k)] for q in qids]
    return id_hashes(qids), vectors, weights, tokens


def test_expansion_store_round_trip(tmp_path):
    qids = ["q3", "q1", "q2"]
    keys, vectors, weights, tokens = _store_arrays(qids)
    meta = {"teacher": {"name": "ColBERT", "weights": "abc"}, "fb_docs": 3, "beta": 1.0, "mode": "prf"}
    store = ExpansionStore.write(tmp_path / "s", keys, vectors, weights, tokens, meta)
    back = ExpansionStore.open(tmp_path / "s")
    assert len(back) == 3 and back.k == 2 and back.dim == 3
    assert back.meta["fb_docs"] == 3 and back.meta["n_queries"] == 3 and back.meta["mode"] == "prf"
    assert (np.diff(back.keys.astype(np.float64)) > 0).all()
    v, w = back.lookup(id_hashes(["q2", "missing", "q3"]))
    assert v.dtype == np.float32 and v.shape == (3, 2, 3) and w.shape == (3, 2)
    assert np.array_equal(v[0], vectors[2]) and np.array_equal(w[0], weights[2])
    assert np.array_equal(v[2], vectors[0]) and np.array_equal(w[2], weights[0])
    assert not v[1].any() and not w[1].any()  # not stored: zeros (plain self-KD)
    assert back.lookup_tokens(id_hashes(["q1", "nope"])) == [["q1-t0", "q1-t1"], []]
    clone = pickle.loads(pickle.dumps(store))  # dataloader workers reopen the memory maps
    assert np.array_equal(clone.lookup(keys)[0], store.lookup(keys)[0])
    with pytest.raises(TypeError, match="uint64"):
        back.lookup(np.array([1, 2]))


def test_expansion_store_refuses_bad_input(tmp_path):
    keys, vectors, weights, tokens = _store_arrays(["a", "b"])
    meta = {"mode": "prf"}
    ExpansionStore.write(tmp_path / "s", keys, vectors, weights, tokens, meta)
    with pytest.raises(FileExistsError, match="overwrite"):
        ExpansionStore.write(tmp_path / "s", keys, vectors, weights, tokens, meta)
    again = ExpansionStore.write(tmp_path / "s", keys, vectors * 2, weights, tokens, meta, overwrite=True)
    assert np.array_equal(again.lookup(keys[:1])[0][0], vectors[0] * 2)
    with pytest.raises(KdirError, match="unique"):
        ExpansionStore.write(tmp_path / "d", keys[[0, 0]], vectors, weights, tokens, meta)
    with pytest.raises(KdirError, match="weights"):
        ExpansionStore.write(tmp_path / "w", keys, vectors, weights[:, :1], tokens, meta)
    with pytest.raises(KdirError, match="tokens"):
        ExpansionStore.write(tmp_path / "t", keys, vectors, weights, [["x"], ["y"]], meta)
    with pytest.raises(ValueError, match="managed"):
        ExpansionStore.write(tmp_path / "m", keys, vectors, weights, tokens, {"k": 3})
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "empty").mkdir()
    assert len(ExpansionStore.write(tmp_path / "empty", keys, vectors, weights, tokens, meta)) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an expansion store"):
        ExpansionStore.write(tmp_path / "other", keys, vectors, weights, tokens, meta, overwrite=True)
    meta_file = tmp_path / "s" / "meta.json"
    meta_file.write_text(meta_file.read_text().replace("kdir-expansion-store/1", "other"))
    with pytest.raises(DataFormatError, match="format"):
        ExpansionStore.open(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="kdir.expand"):
        ExpansionStore.open(tmp_path / "none")


# ---------------------------------------------------------------- the collective teacher


@pytest.fixture(scope="module")
def colbert_dir(quickstart, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("colbert") / "cb"
    ColBERT(quickstart["model"], dim=16, query_max_length=8, doc_max_length=64).save_pretrained(path)
    return path


QUERIES = ["rori zozaru rupe mesuna", "kifofa lipora nugi"]
DOCS = ["rori vobire pevu rapise leza", "kidase volevo kifofa tubi levi", "mote mudi lufoke rupe"]
CANDIDATES = [[0, 1, 2], [2, 1, 1]]


def test_collective_teacher_adds_weighted_expansion_terms(colbert_dir, tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(1, 3, 16)).astype(np.float32)
    weights = np.array([[1.5, 0.5, 0.0]], dtype=np.float32)
    ExpansionStore.write(tmp_path / "s", id_hashes(["qa"]), vectors, weights, [["x", "y", ""]], {"mode": "prf"})
    teacher = CollectiveColBERT.from_pretrained(colbert_dir, expansion=tmp_path / "s").freeze()
    assert teacher.config["similarity"] == "l2" and teacher.uses_query_keys
    plain = ColBERT.from_pretrained(colbert_dir, similarity="l2").freeze()
    keys = id_hashes(["qa", "qb"])  # qb is not in the store
    inputs = teacher.prepare(QUERIES, DOCS, CANDIDATES, query_keys=keys)
    assert inputs["query_expansion"].shape == (2, 3, 16) and inputs["query_expansion_weights"].shape == (2, 3)
    with torch.no_grad():
        scores = teacher(inputs)
        d, d_mask = plain.encode(plain.tokenize(DOCS, "doc"), "doc")
        # Σ_k w_k max_j -‖e_k - d_j‖², per expansion vector as a one-token "query"
        extra = sum(
            float(weights[0, k])
            * maxsim(torch.from_numpy(vectors[:, k : k + 1]), torch.ones(1, 1), d, d_mask, "l2")[0]
            for k in range(3)
        )
    base = plain.score(QUERIES, DOCS, CANDIDATES)
    assert scores.dtype == torch.float32 and scores.shape == (2, 3)
    assert torch.allclose(scores[0], base[0] + extra[CANDIDATES[0]], atol=1e-4)
    assert torch.allclose(scores[1], base[1], atol=1e-5)  # no expansion: plain ColBERT (self-KD)
    assert torch.allclose(teacher.score(QUERIES, DOCS, CANDIDATES, query_keys=keys), scores, atol=1e-5)
    with pytest.raises(KdirError, match="query_keys"):
        teacher.prepare(QUERIES, DOCS, CANDIDATES)
    ExpansionStore.write(tmp_path / "d8", id_hashes(["qa"]), vectors[:, :, :8], weights, [["x", "y", ""]], {})
    with pytest.raises(KdirError, match="dim 8"):
        CollectiveColBERT.from_pretrained(colbert_dir, expansion=tmp_path / "d8")


def test_collective_teacher_config_passes_the_expansion_through(colbert_dir, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ExpansionStore.write(tmp_path / "s", id_hashes(["qa"]), np.zeros((1, 2, 16)), np.ones((1, 2)), [["x", "y"]], {})
    cfg = OmegaConf.load(CONF / "teacher" / "collective.yaml")
    assert {"/signal": "online"} in cfg.defaults  # the recipe (experiment=collective_kd) sets force_positive_max
    cfg.teacher.path, cfg.teacher.expansion, cfg.teacher.dim = colbert_dir, tmp_path / "s", 16
    cfg.teacher.query_max_length = 8
    teacher = instantiate(cfg.teacher)
    assert isinstance(teacher, CollectiveColBERT) and teacher.config["similarity"] == "l2"
    assert teacher.expansion.path == tmp_path / "s" and teacher.config["expansion"] == str(tmp_path / "s")


# ---------------------------------------------------------------- end to end

TINY = [
    "teacher.dim=16",
    "teacher.query_max_length=8",
    "teacher.doc_max_length=64",
    "datasets.quickstart.train.split=dev",
    "depth=10",
    "fb_clusters=8",
    "fb_k=4",
    "batch_size=128",
    "progress=false",
]


@pytest.fixture(scope="module")
def expanded(colbert_dir, tmp_path_factory, quickstart):
    out = tmp_path_factory.mktemp("expand")
    r = run_cli(
        "kdir.expand",
        f"teacher.path={colbert_dir}",
        f"out={out / 'store'}",
        *TINY,
        f"hydra.run.dir={out / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "store"


def test_expand_cli_writes_a_store_for_every_query(expanded, colbert_dir, quickstart):
    ds = IRDataset.from_beir(quickstart["data"], "dev")
    store = ExpansionStore.open(expanded)
    assert len(store) == len(ds.queries) == 150
    assert np.array_equal(store.keys, np.sort(id_hashes(ds.queries.ids)))
    assert store.vectors.shape == (150, 4, 16) and store.weights.shape == (150, 4)
    assert (store.weights >= 0).all() and (np.diff(store.weights, axis=1) <= 0).all()
    meta = store.meta
    assert meta["mode"] == "prf" and meta["fb_docs"] == 3 and meta["fb_clusters"] == 8 and meta["beta"] == 1.0
    assert meta["teacher"]["weights"] == ColBERT.from_pretrained(colbert_dir, dim=16).weights_hash()
    assert set(meta["seconds"]) >= {"encode", "search", "clustering"}
    lines = (expanded / "ranking.trec").read_text().splitlines()
    assert len(lines) == 150 * 10 and {line.split()[0] for line in lines} == set(ds.queries.ids)
    # weights are beta * idf of the labels: recount the df of one query's tokens over the tokenised corpus
    teacher = ColBERT.from_pretrained(colbert_dir, dim=16, doc_max_length=64)
    tokens = store.tokens[0]
    assert all(t and not t.startswith("[") for t in tokens)
    docs = teacher.tokenize(ds.corpus.texts, "doc")
    keep = docs["attention_mask"].bool() & ~torch.isin(docs["input_ids"], teacher.skip_ids)
    doc_sets = [set(row[m].tolist()) for row, m in zip(docs["input_ids"], keep)]
    for token, weight in zip(tokens, store.weights[0]):
        tid = teacher.tokenizer.convert_tokens_to_ids(token)
        df = sum(tid in s for s in doc_sets)
        assert weight == pytest.approx(math.log((1 + 2000) / (df + 1)), rel=1e-5)


def test_collective_teacher_on_the_expanded_store(expanded, colbert_dir, quickstart):
    ds = IRDataset.from_beir(quickstart["data"], "dev")
    teacher = CollectiveColBERT.from_pretrained(colbert_dir, expansion=expanded, dim=16, similarity="l2").freeze()
    plain = ColBERT.from_pretrained(colbert_dir, dim=16, similarity="l2").freeze()
    qids = ds.queries.ids[:3] + ["not-a-training-query"]
    queries = ds.queries.texts[:3] + ["rori zozaru"]
    docs = ds.corpus.texts[:5]
    cand = np.array([[0, 1, 2, 3, 4]] * 4)
    scores = teacher.score(queries, docs, cand, query_keys=id_hashes(qids))
    base = plain.score(queries, docs, cand)
    assert scores.shape == (4, 5) and torch.isfinite(scores).all()
    assert (scores[:3] != base[:3]).all()  # positive weights: expansion terms (negative) change every score
    assert torch.allclose(scores[3], base[3], atol=1e-5)


def test_expand_reads_an_existing_ranking(expanded, colbert_dir, tmp_path, quickstart):
    overrides = [
        f"teacher.path={colbert_dir}",
        f"out={tmp_path / 'again'}",
        f"ranking={expanded / 'ranking.trec'}",
        *TINY,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert run_command("kdir.expand", *overrides) == 0
    store = ExpansionStore.open(tmp_path / "again")
    first = ExpansionStore.open(expanded)
    assert len(store) == len(first) and store.meta["ranking"] == str(expanded / "ranking.trec")
    # the run file lists the same top-3: queries whose 3rd and 4th scores differ get the same expansions
    run = {}
    for line in (expanded / "ranking.trec").read_text().splitlines():
        qid, _, _, rank, score, _ = line.split()
        run.setdefault(qid, []).append(float(score))
    clear = [q for q, s in run.items() if len(set(s[:4])) == 4]
    assert len(clear) > 100
    keys = id_hashes(clear)
    assert np.allclose(store.lookup(keys)[0], first.lookup(keys)[0], atol=1e-5)


def test_collective_teacher_evaluated_on_expanded_test_queries(colbert_dir, quickstart, tmp_path):
    """kdir.expand on another split (dataset=...), then kdir.evaluate_teacher re-ranks its ranking with the
    collective teacher: each re-ranked score is the teacher's own score of that (query, document)."""
    data = quickstart["data"]
    split = f"dataset={{_target_: kdir.data.dataset.IRDataset.from_beir, root: '{data}', split: test}}"
    r = run_cli(
        "kdir.expand",
        f"teacher.path={colbert_dir}",
        f"out={tmp_path / 'store'}",
        split,
        *TINY,
        f"hydra.run.dir={tmp_path / 'x'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ds = IRDataset.from_beir(data, "test")
    assert len(ExpansionStore.open(tmp_path / "store")) == len(ds.queries) == 200
    r = run_cli(
        "kdir.evaluate_teacher",
        "teacher=collective",
        f"teacher.path={colbert_dir}",
        f"teacher.expansion={tmp_path / 'store'}",
        "teacher.dim=16",
        "teacher.query_max_length=8",
        "teacher.doc_max_length=64",
        "teacher_eval=rerank_quickstart",
        f"teacher_eval.run_file={tmp_path / 'store' / 'ranking.trec'}",
        "teacher_eval.depth=5",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"nDCG@10"} and 0 <= metrics["nDCG@10"] <= 1
    from kdir.data.formats import read_trec_run

    run = read_trec_run(tmp_path / "eval" / "run.trec")
    teacher = CollectiveColBERT.from_pretrained(
        colbert_dir, expansion=tmp_path / "store", dim=16, query_max_length=8, doc_max_length=64
    ).freeze()
    qid = ds.queries.ids[0]
    pids = list(run[qid])
    assert len(pids) == 5
    direct = teacher.score(
        [ds.queries.texts[0]],
        [ds.corpus.texts[ds.corpus.index[p]] for p in pids],
        np.arange(5)[None],
        query_keys=id_hashes([qid]),
    )[0]
    assert np.allclose([run[qid][p] for p in pids], direct.numpy(), atol=1e-4)
    plain = ColBERT.from_pretrained(
        colbert_dir, dim=16, similarity="l2", query_max_length=8, doc_max_length=64
    ).freeze()
    without = plain.score(
        [ds.queries.texts[0]], [ds.corpus.texts[ds.corpus.index[p]] for p in pids], np.arange(5)[None]
    )
    assert not np.allclose(without.numpy(), direct.numpy())  # the expansion took part


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_collective_teacher_takes_the_attention_kernel_and_scores_alike(colbert_dir, tmp_path, kernel):
    from transformers import PreTrainedModel

    vectors = np.random.default_rng(2).normal(size=(1, 2, 16)).astype(np.float32)
    ExpansionStore.write(tmp_path / "s", id_hashes(["qa"]), vectors, np.ones((1, 2), np.float32), [["x", "y"]], {})
    default = CollectiveColBERT.from_pretrained(colbert_dir, expansion=tmp_path / "s").freeze()
    teacher = CollectiveColBERT.from_pretrained(colbert_dir, expansion=tmp_path / "s", attn_implementation=kernel)
    teacher = teacher.freeze()
    kernels = {m.config._attn_implementation for m in teacher.modules() if isinstance(m, PreTrainedModel)}
    assert kernels == {kernel}
    keys = id_hashes(["qa", "qb"])
    with torch.no_grad():
        torch.testing.assert_close(
            teacher.score(QUERIES, DOCS, CANDIDATES, query_keys=keys),
            default.score(QUERIES, DOCS, CANDIDATES, query_keys=keys),
        )
    assert teacher.provenance() == default.provenance()  # the kernel is not part of what a store records
