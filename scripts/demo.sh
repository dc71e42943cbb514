#!/usr/bin/env bash
# End-to-end demo on the shareable demo notes (data_prep/demo_corpus): notes -> sentences -> vocabulary ->
# pretraining instances -> a tiny BERT pretrained from scratch -> Hugging Face export -> fill-mask with transformers.
#
#   scripts/demo.sh DIR        (or: make demo DEMO_DIR=DIR)
#
# Everything goes under DIR; a rerun rebuilds the data and trains again from scratch (DIR/run and DIR/hf are replaced).
# Takes a few minutes on two CPU cores. The model is tiny and trained briefly: it shows the pipeline and a falling
# loss, not clinical knowledge. Training runs on ONE CPU device (DEMO_DEVICES=N simulates N devices).
set -euo pipefail

DIR=${1:?usage: scripts/demo.sh OUTPUT_DIR}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEMO_DEVICES:-1}"
export TF_CPP_MIN_LOG_LEVEL=3 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$DIR"

step() { printf '\n== %s\n' "$*"; }

step "1/6 format_mimic: demo notes (NOTEEVENTS layout) -> one sentence per line, one file per 40 notes"
for csv in data_prep/demo_corpus/NOTEEVENTS_*.csv; do
  name=$(basename "$csv" .csv)
  "$PYTHON" -m data_prep.format_mimic --input="$csv" --output_dir="$DIR/text/$name" --shard_size_notes=40 \
    --overwrite --verbosity=-1
  echo "$csv -> $DIR/text/$name ($(ls "$DIR/text/$name"/*.txt | wc -l) files)"
done

step "2/6 hold out notes: the last two ACI-BENCH files are the evaluation split, everything else trains"
held_out=$(ls "$DIR"/text/NOTEEVENTS_aci_bench/*.txt | tail -n 2 | paste -sd, -)
train=$(ls "$DIR"/text/*/*.txt | grep -v -F -x -f <(tr , '\n' <<<"$held_out") | paste -sd, -)
echo "held out: $held_out"
echo "training: $(tr , '\n' <<<"$train" | wc -l) files"

step "3/6 build_vocab: cased WordPiece vocabulary of 2000 entries from the training notes"
"$PYTHON" -m data_prep.build_vocab --input="$train" --output="$DIR/vocab.txt" --vocab_size=2000 --cased \
  --overwrite --verbosity=-1
echo "$DIR/vocab.txt: $(wc -l < "$DIR/vocab.txt") entries"

step "4/6 create_pretraining_data: masked-LM + next-sentence instances (seq 128, 20 predictions, static masks)"
"$PYTHON" -m data_prep.create_pretraining_data --input="$train" --vocab_file="$DIR/vocab.txt" \
  --output_dir="$DIR/data/train" --max_seq_length=128 --max_predictions_per_seq=20 --dupe_factor=5 --overwrite \
  --progress=false --verbosity=0 2>&1 | grep -o 'wrote .*'
"$PYTHON" -m data_prep.create_pretraining_data --input="$held_out" --vocab_file="$DIR/vocab.txt" \
  --output_dir="$DIR/data/heldout" --max_seq_length=128 --max_predictions_per_seq=20 --dupe_factor=1 --overwrite \
  --progress=false --verbosity=0 2>&1 | grep -o 'wrote .*'

step "5/6 pretrain: tiny BERT from scratch with experiments/demo.cfg, export to $DIR/hf"
rm -rf "$DIR/run" "$DIR/hf"  # a previous demo's run belongs to the data just replaced
"$PYTHON" -m clinical_bert_jax.pretrain --flagfile=experiments/demo.cfg --input_file="$DIR/data/train" \
  --eval_input_file="$DIR/data/heldout" --vocab_file="$DIR/vocab.txt" --output_dir="$DIR/run" \
  --export_hf_dir="$DIR/hf"
echo "metrics: $DIR/run/metrics.jsonl, loss curve: $DIR/run/loss_curve.png, TensorBoard: tensorboard --logdir $DIR/run"

step "6/6 fill-mask with transformers on the exported model"
"$PYTHON" - "$DIR/hf" <<'PYTHON'
import sys

from transformers import pipeline
from transformers.utils import logging

logging.set_verbosity_error()
logging.disable_progress_bar()
fill_mask = pipeline("fill-mask", model=sys.argv[1], device=-1)
sentence = "The patient was admitted with chest [MASK] and shortness of breath."
print(sentence)
for guess in fill_mask(sentence, top_k=5):
  print(f"  {guess['token_str']:>12}  {guess['score']:.3f}")
PYTHON
