#!/usr/bin/env bash
# Privacy demonstration on the shareable demo notes (docs/privacy.md): canaries -> a normal and a DP-SGD pretraining
# run of the tiny demo BERT -> exposure, membership inference (score-only and likelihood ratio against a reference
# model trained on disjoint notes), associations, and the MLM accuracy cost of DP.
#
#   scripts/privacy_demo.sh DIR   (environment: STEPS=600 SEQ=128 DP_SIGMA=1.0 DP_CLIP=1.0 CANDIDATES=500)
#   AUDIT_ONLY=1 scripts/privacy_demo.sh DIR   reruns steps 5-6 on the runs already in DIR
#
# Notes are split by file (20 notes per file) into A (the target's training text, canaries inserted), B (the
# reference model's training text) and C (held out: non-members and evaluation). Everything goes under DIR.
set -euo pipefail

DIR=${1:?usage: scripts/privacy_demo.sh OUTPUT_DIR}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-600}
SEQ=${SEQ:-128}
DP_SIGMA=${DP_SIGMA:-1.0}
DP_CLIP=${DP_CLIP:-1.0}
CANDIDATES=${CANDIDATES:-500}
AUDIT_ONLY=${AUDIT_ONLY:-0}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS="--xla_force_host_platform_device_count=1"
export TF_CPP_MIN_LOG_LEVEL=3 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$DIR"
step() { printf '\n== %s\n' "$*"; }

if [[ $AUDIT_ONLY != 1 ]]; then
step "1 format_mimic and split by file: A (target), B (reference), C (held out)"
rm -rf "$DIR/text" "$DIR/A" "$DIR/B" "$DIR/C"
for csv in data_prep/demo_corpus/NOTEEVENTS_*.csv; do
  "$PYTHON" -m data_prep.format_mimic --input="$csv" --output_dir="$DIR/text/$(basename "$csv" .csv)" \
    --shard_size_notes=20 --overwrite --verbosity=-1
done
mkdir -p "$DIR/A" "$DIR/B" "$DIR/C"
i=0
for f in $(ls "$DIR"/text/*/*.txt | sort); do
  case $((i % 4)) in 0|1) part=A ;; 2) part=B ;; 3) part=C ;; esac
  cp "$f" "$DIR/$part/$(basename "$(dirname "$f")")-$(basename "$f")"
  i=$((i + 1))
done
for part in A B C; do echo "$part: $(ls "$DIR/$part" | wc -l) files, $(grep -c . "$DIR/$part"/*.txt | \
  awk -F: '{s+=$2} END {print s}') sentences"; done

step "2 canaries into A (repetitions 0,1,4,16,64; 4 canaries each); the list stays outside the text"
"$PYTHON" -m data_prep.canaries --input_dir="$DIR/A" --output_dir="$DIR/A_canaries" \
  --canary_file="$DIR/canaries.jsonl" --repetitions=0,1,4,16,64 --canaries_per_count=4 --seed=13 --overwrite

step "3 vocabulary (A+B, 2000 WordPiece entries) and pretraining instances (unmasked: dynamic masking)"
"$PYTHON" -m data_prep.build_vocab --input="$DIR/A_canaries/*.txt,$DIR/B/*.txt" --output="$DIR/vocab.txt" \
  --vocab_size=2000 --cased --overwrite --verbosity=-1
for part in A_canaries B C; do
  "$PYTHON" -m data_prep.create_pretraining_data --input="$DIR/$part/*.txt" --vocab_file="$DIR/vocab.txt" \
    --output_dir="$DIR/data/$part" --max_seq_length="$SEQ" --dupe_factor=5 --masking=none --overwrite --progress=false \
    --verbosity=0 2>&1 | grep -o 'wrote .*' || true
done

train() {  # NAME DATA [extra flags]
  local name=$1 data=$2; shift 2
  rm -rf "$DIR/runs/$name"
  "$PYTHON" -m clinical_bert_jax.pretrain --flagfile=experiments/demo.cfg --input_file="$DIR/data/$data" \
    --eval_input_file="$DIR/data/C" --vocab_file="$DIR/vocab.txt" --output_dir="$DIR/runs/$name" --masking=dynamic \
    --max_seq_length="$SEQ" --num_train_steps="$STEPS" --save_checkpoints_steps="$STEPS" --eval_every_steps=0 \
    --log_every_steps=100 "$@" > "$DIR/$name.log" 2>&1
  echo "$name: $(grep "^eval at step $STEPS" "$DIR/$name.log")"
}
step "4 pretraining ($STEPS steps each, in parallel): target, target with DP-SGD (σ=$DP_SIGMA, C=$DP_CLIP), reference"
train target A_canaries &
train target_dp A_canaries --dp_noise_multiplier="$DP_SIGMA" --dp_l2_clip="$DP_CLIP" &
train reference B &
wait
fi

step "5 audits"
grep -h . "$DIR"/A_canaries/*.txt | grep -vxF -f <(grep -h '"text"' "$DIR/canaries.jsonl" | \
  "$PYTHON" -c 'import json,sys; [print(json.loads(l)["text"]) for l in sys.stdin]') > "$DIR/members.txt"
# Non-members: held-out sentences that never occur in A (boilerplate lines repeat across notes).
grep -h . "$DIR"/C/*.txt | grep -vxF -f "$DIR/members.txt" > "$DIR/non_members.txt" || true
for run in target target_dp; do
  "$PYTHON" -m clinical_bert_jax.audit exposure --model="$DIR/runs/$run" --canary_file="$DIR/canaries.jsonl" \
    --num_candidates="$CANDIDATES" --output_dir="$DIR/audit/$run/exposure" --overwrite
  "$PYTHON" -m clinical_bert_jax.audit membership --model="$DIR/runs/$run" --reference_model="$DIR/runs/reference" \
    --member_files="$DIR/members.txt" --non_member_files="$DIR/non_members.txt" --max_sentences=1000 \
    --output_dir="$DIR/audit/$run/membership" --overwrite
  "$PYTHON" -m clinical_bert_jax.audit associations --model="$DIR/runs/$run" --pairs_file="$DIR/canaries.jsonl" \
    --output_dir="$DIR/audit/$run/associations" --overwrite
done

step "6 summary ($DIR/summary.json)"
"$PYTHON" - "$DIR" <<'PYTHON'
import json, sys
from pathlib import Path

root = Path(sys.argv[1])
summary = {}
for run in ("target", "target_dp", "reference"):
  evals = [json.loads(line) for line in (root / "runs" / run / "metrics.jsonl").read_text().splitlines()]
  last = {k: v for record in evals for k, v in record.items()}
  entry = {"eval_mlm_accuracy": last.get("eval/mlm_accuracy"), "eval_mlm_loss": last.get("eval/mlm_loss"),
           "dp_epsilon": last.get("train/dp_epsilon")}
  if run != "reference":
    exposure = json.loads((root / "audit" / run / "exposure" / "audit.json").read_text())["result"]
    membership = json.loads((root / "audit" / run / "membership" / "audit.json").read_text())["result"]
    associations = json.loads((root / "audit" / run / "associations" / "audit.json").read_text())["result"]
    entry["exposure_by_repetitions"] = {r["repetitions"]: round(r["mean_exposure"], 2)
                                        for r in exposure["by_repetitions"]}
    entry["max_exposure"] = round(exposure["max_exposure"], 2)
    entry["membership"] = {name: {k: round(v, 3) for k, v in a.items()} for name, a in membership["attacks"].items()}
    entry["membership_n"] = [membership["members"], membership["non_members"]]
    entry["associations_auc"] = round(associations["auc_name_minus_base_rate"], 3)
    entry["associations_top1"] = [round(associations["top1_accuracy"], 3), round(associations["top1_chance"], 3)]
  summary[run] = entry
(root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PYTHON
