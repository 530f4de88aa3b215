#!/usr/bin/env bash
# Fine-tune a cross-encoder and a ColBERT teacher from all-MiniLM-L6-v2 on SciFact train (100 train queries
# held out), then evaluate on SciFact test: the cross-encoder re-ranks all-MiniLM-L6-v2's top 100, ColBERT
# retrieves end to end (exhaustive MaxSim over the 5,183 documents).
#   L6=<all-MiniLM-L6-v2 folder> L6_TEST_RUN=<its SciFact test run, top 100> OUT=<dir> bash experiments/scifact_teachers/run.sh
set -euo pipefail
: "${L6:?}" "${L6_TEST_RUN:?}" "${OUT:?}"
WORK=${WORK:-/tmp/kdir_teachers}
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/hardware.txt" 2>/dev/null || uname -a > "$OUT/hardware.txt"
NEG="$WORK/l6_train_top100.trec"
python experiments/scifact_teachers/mine_negatives.py "$L6" "${KDIR_SHARED:-../shared}/data/scifact" "$NEG" 100
HN="negatives=run negatives.path=$NEG negatives.depth=100"
COMMON="data=scifact trainer=gpu logger=csv"
start=$SECONDS; python -m kdir.train_teacher teacher=cross_encoder teacher.path="$L6" \
  $COMMON $HN optim.optimizer.lr=5e-5 data.examples.n_negatives=7 data.batch_size=16 trainer.max_epochs=8 \
  teacher_eval=rerank_scifact teacher_eval.run_file="$L6_TEST_RUN" hydra.run.dir="$WORK/ce"
echo $((SECONDS - start)) > "$OUT/ce_seconds.txt"
start=$SECONDS; python -m kdir.train_teacher teacher=colbert teacher.path="$L6" \
  $COMMON $HN optim.optimizer.lr=2e-5 data.examples.n_negatives=1 data.batch_size=32 trainer.max_epochs=5 \
  teacher_eval=maxsim_scifact hydra.run.dir="$WORK/colbert"
echo $((SECONDS - start)) > "$OUT/colbert_seconds.txt"
cp "$WORK/ce/metrics.json" "$OUT/ce_metrics.json"; cp "$WORK/colbert/metrics.json" "$OUT/colbert_metrics.json"
cp "$WORK/ce/config.yaml" "$OUT/ce_config.yaml"; cp "$WORK/colbert/config.yaml" "$OUT/colbert_config.yaml"
