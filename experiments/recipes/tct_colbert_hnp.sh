#!/usr/bin/env bash
# TCT-ColBERT HN+ (Lin, Yang & Lin 2021) as a pipeline of kdir commands; see experiments/recipes/README.md.
#   0. (no TEACHER given) train a ColBERT teacher          -> $OUT/teacher/teacher
#   1. distil the TCT student from the teacher             -> $OUT/student/student
#   2. mine the student's top-$DEPTH for the training queries -> $OUT/hn.trec (+ $OUT/mine/metrics.json)
#   3. HN+: fine-tune the teacher on the mined negatives    -> $OUT/teacher_hnp/teacher   (skipped with VARIANT=hn)
#   4. distil again on the mined negatives, from the stage-1 student -> $OUT/student_$VARIANT/student
# Stages 0-2 read $DATA (e.g. msmarco: the official BM25 triples), stages 3-4 $HN_DATA with the mined negatives
# (msmarco_hn for DATA=msmarco, else the same option). DRY_RUN=1 prints each stage's command instead of running it.
# Defaults run the offline quickstart (tiny models, a few minutes on CPU):
#   bash experiments/recipes/tct_colbert_hnp.sh
# SciFact on a GPU (see the README for the full command):
#   OUT=outputs/tct_hnp_scifact DATA=scifact EVAL=scifact TEACHER_EVAL=maxsim_scifact TEACHER=<ColBERT folder> \
#   STUDENT_ARGS="student.model_name_or_path=<encoder>" EXTRA="trainer=gpu ..." \
#   bash experiments/recipes/tct_colbert_hnp.sh
# MS MARCO, as the original (teacher from BERT-base, 160K steps of 96 = 8 x 12 each stage):
#   OUT=outputs/tct_hnp_msmarco DATA=msmarco EVAL=dl19 TEACHER_EVAL= TEACHER_INIT=bert-base-uncased \
#   STUDENT_ARGS= EXTRA="trainer=gpu" bash experiments/recipes/tct_colbert_hnp.sh
set -euo pipefail

OUT=${OUT:-outputs/tct_colbert_hnp}
VARIANT=${VARIANT:-hnp}                         # hnp: re-train the teacher (stage 3) | hn: keep the original teacher
STAGES=${STAGES:-0 1 2 3 4}                     # run a subset, e.g. STAGES="2 3 4" to resume after stage 1
DEPTH=${DEPTH:-200}                             # mined candidates kept per training query (TCT: 200)
DATA=${DATA:-quickstart}                        # training data of stages 0-2 (conf/data)
case $DATA in msmarco) HN_DEFAULT=msmarco_hn ;; *) HN_DEFAULT=$DATA ;; esac  # fixed triples have no sampler
HN_DATA=${HN_DATA:-$HN_DEFAULT}                 # training data of stages 3-4, its negatives from the mined run
EVAL=${EVAL:-quickstart}                        # student evaluation (conf/eval)
TEACHER_EVAL=${TEACHER_EVAL-maxsim_quickstart}  # teacher evaluation (conf/teacher_eval); empty: none
TEACHER=${TEACHER:-}                            # ColBERT teacher folder; empty: stage 0 trains $OUT/teacher/teacher
TEACHER_INIT=${TEACHER_INIT:-}                  # stage 0's starting encoder; empty: the quickstart's tiny BERT
# The teacher is trained as it is used (teacher=tct_colbert: TCT's token layout, 36/154 tokens, unnormalised query
# tokens, a bias) and as the original trains it (train/main.py --train_model=teacher): in-batch softmax CE with
# the logits x 4 x the per-core batch (x48), TCT's AdamW (optim=tct: 10K warm-up, linear decay, lr 7e-6),
# batch 96 = 8 accumulated micro-batches of 12, clip 1.0, 160K steps.
TCT_TEACHER="teacher=tct_colbert batch_logit_scale=4 optim=tct data.batch_size=12"
TCT_TEACHER+=" trainer.accumulate_grad_batches=8 trainer.gradient_clip_val=1.0 trainer.max_epochs=-1"
TCT_TEACHER+=" trainer.max_steps=160000"
TEACHER_ARGS=${TEACHER_ARGS-$TCT_TEACHER}
# Stage-1 student; empty: the experiment's tct_mean (bert-base-uncased). Its word pieces and [MASK]
# padding do not suit the quickstart's word-level toy vocabulary, hence student=tiny by default.
STUDENT_ARGS=${STUDENT_ARGS-student=tiny}
QUICK="optim.optimizer.lr=3e-3 optim.warmup=0.1 trainer.max_epochs=5 trainer.max_steps=-1"
QUICK+=" trainer.accumulate_grad_batches=1"     # the quickstart's 1,200 queries: one optimizer step per batch
EXTRA=${EXTRA-$QUICK}                           # overrides for every training stage (0, 1, 3, 4)
STUDENT_EXTRA=${STUDENT_EXTRA-}                 # kdir.run stages (1 and 4) only
TEACHER_EXTRA=${TEACHER_EXTRA-}                 # kdir.train_teacher stages (0 and 3) only
MINE_EXTRA=${MINE_EXTRA-}                       # kdir.mine (stage 2) only, e.g. index_factory=HNSW32
DRY_RUN=${DRY_RUN:-}                            # non-empty: print each stage's command (one line), run nothing
case $VARIANT in hn | hnp) ;; *) echo "VARIANT must be hn or hnp, got '$VARIANT'" >&2 && exit 2 ;; esac

if [[ -z $DRY_RUN ]]; then
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/hardware.txt" 2>/dev/null || uname -a > "$OUT/hardware.txt"
fi
has() { [[ " $STAGES " == *" $1 "* ]]; }
timed() {  # timed <stage name> <command...>: run it, append its wall time to $OUT/stage_seconds.tsv
  local name=$1 start=$SECONDS
  shift
  if [[ -n $DRY_RUN ]]; then
    printf '%s' "$name"; printf ' %q' "$@"; printf '\n'
    return
  fi
  echo "== $name: $*" >&2
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - start)) >> "$OUT/stage_seconds.tsv"
}
# TCT-ColBERT's HN triples: 1 negative per (query, positive), drawn uniformly from the student's top-$DEPTH,
# labelled positives NOT filtered out (hard_triplet_construct.py); drawn afresh every epoch.
HN="negatives=run negatives.path=$OUT/hn.trec negatives.depth=$DEPTH negatives.exclude_positives=false
    data.examples.n_negatives=1"
T_EVAL=${TEACHER_EVAL:+teacher_eval=$TEACHER_EVAL}

# shellcheck disable=SC2086  # the *_ARGS / *EXTRA / HN variables are word-split into Hydra overrides on purpose
{
  if [[ -z $TEACHER ]]; then
    TEACHER=$OUT/teacher/teacher
    if has 0; then
      TEACHER_INIT=${TEACHER_INIT:-$(python -c "from kdir.data.quickstart import ensure; print(ensure('model'))")}
      timed 0_teacher python -m kdir.train_teacher $TEACHER_ARGS teacher.path="$TEACHER_INIT" \
        data="$DATA" $T_EVAL hydra.run.dir="$OUT/teacher" $EXTRA $TEACHER_EXTRA
    fi
  fi
  if has 1; then
    timed 1_student python -m kdir.run experiment=tct_colbert teacher.path="$TEACHER" $STUDENT_ARGS \
      data="$DATA" eval="$EVAL" hydra.run.dir="$OUT/student" $EXTRA $STUDENT_EXTRA
  fi
  if has 2; then
    timed 2_mine python -m kdir.mine student=checkpoint student.path="$OUT/student/student" data="$DATA" \
      depth="$DEPTH" out="$OUT/hn.trec" hydra.run.dir="$OUT/mine" $MINE_EXTRA
  fi
  FINAL_TEACHER=$TEACHER
  if [[ $VARIANT == hnp ]]; then
    FINAL_TEACHER=$OUT/teacher_hnp/teacher
    if has 3; then
      timed 3_teacher_hnp python -m kdir.train_teacher $TEACHER_ARGS teacher.path="$TEACHER" \
        data="$HN_DATA" $HN $T_EVAL hydra.run.dir="$OUT/teacher_hnp" $EXTRA $TEACHER_EXTRA
    fi
  fi
  if has 4; then
    timed "4_student_$VARIANT" python -m kdir.run experiment=tct_colbert student=checkpoint \
      student.path="$OUT/student/student" teacher.path="$FINAL_TEACHER" data="$HN_DATA" eval="$EVAL" $HN \
      hydra.run.dir="$OUT/student_$VARIANT" $EXTRA $STUDENT_EXTRA
  fi
}

[[ -n $DRY_RUN ]] && exit 0
# Summary of whatever stages exist: test metrics of both students, the teachers, and the mined pool's recall.
python - "$OUT" "$VARIANT" <<'EOF'
import json, sys
from pathlib import Path

out, variant = Path(sys.argv[1]), sys.argv[2]
rows = [("teacher", "teacher/metrics.json", "metrics"), ("student (stage 1)", "student/metrics.json", "trained"),
        ("mined pool (train)", "mine/metrics.json", "metrics"), ("HN+ teacher", "teacher_hnp/metrics.json", "metrics"),
        (f"student {variant.upper()}", f"student_{variant}/metrics.json", "trained")]
for name, file, key in rows:
    if (out / file).is_file():
        metrics = json.loads((out / file).read_text()).get(key) or {}
        print(f"{name:22s}", "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
EOF
