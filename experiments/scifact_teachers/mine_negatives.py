"""Top-k run of an encoder over SciFact *train* queries (the teachers' hard-negative pool).

Exact inner-product search with torch on the encoder's device (the GPU node has no faiss wheel).
Usage: python experiments/scifact_teachers/mine_negatives.py <encoder dir> <data dir> <out.trec> [k]
"""

from __future__ import annotations

import sys

import torch

from kdir.data.dataset import IRDataset
from kdir.models import DualEncoder
from kdir.retrieval.encode import encode_texts
from kdir.retrieval.metrics import write_trec_run

model_dir, data_dir, out = sys.argv[1:4]
k = int(sys.argv[4]) if len(sys.argv) > 4 else 100
device = "cuda" if torch.cuda.is_available() else "cpu"
ds = IRDataset.from_beir(data_dir, "train")
enc = DualEncoder(model_dir, pooling="mean", similarity="cosine", query_max_length=256, doc_max_length=256).to(device)
(q,), (d,) = (
    encode_texts(enc, ds.queries.texts, "query", device=device),
    encode_texts(enc, ds.corpus.texts, "doc", device=device),
)
scores, rows = (q.to(device) @ d.to(device).T).topk(k, dim=1)
run = {
    qid: {ds.corpus.ids[r]: s for r, s in zip(rr, ss)}
    for qid, rr, ss in zip(ds.queries.ids, rows.tolist(), scores.tolist())
}
write_trec_run(run, out, tag="minilm_l6")
print(f"wrote {out}: {len(run)} queries x {k}")
