"""clinical_bert_jax.audit: exposure rises with repetitions on a tiny model trained on canaried text; the attack
metrics equal hand computations; reports hold numbers, never sentence text; bad input is one line, exit 2."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from cli_util import assert_one_line_error, run_module
from clinical_bert_jax import audit, model_io, pretrain, train
from data_prep import canaries
from data_prep.create_pretraining_data import InstanceOptions, create_pretraining_data

FILLER = (
  "alpha",
  "bravo",
  "charlie",
  "delta",
  "echo",
  "foxtrot",
  "golf",
  "hotel",
  "india",
  "juliet",
  "kilo",
  "lima",
  "mike",
  "november",
  "oscar",
  "papa",
  "quebec",
  "romeo",
  "sierra",
  "tango",
  "uniform",
  "victor",
  "whiskey",
  "xray",
  "yankee",
  "zulu",
)
SEQ = 32


# --------------------------------------------------------------------------------------------------- metrics
def test_auc_and_tpr_match_hand_computation():
  rng = np.random.default_rng(0)
  positive, negative = np.round(rng.normal(0.7, 1, 60), 1), np.round(rng.normal(0, 1, 80), 1)  # with ties
  pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(positive, negative)]
  assert audit.roc_auc(positive, negative) == pytest.approx(np.mean(pairs), abs=1e-12)
  # Known answer: N(d, 1) against N(0, 1) has AUC Φ(d/√2).
  big_pos, big_neg = rng.normal(1.0, 1, 20000), rng.normal(0, 1, 20000)
  assert audit.roc_auc(big_pos, big_neg) == pytest.approx(norm.cdf(1 / math.sqrt(2)), abs=0.01)
  # TPR at FPR: 1000 negatives 0..999, 1% FPR allows 10 above the threshold, i.e. threshold 989.
  negatives = np.arange(1000.0)
  assert audit.tpr_at_fpr(np.array([989.0, 989.5, 995.0, 2000.0]), negatives, 0.01) == 0.75
  assert audit.tpr_at_fpr(np.array([997.5, 998.5]), negatives, 0.001) == 0.5  # one FP allowed: threshold 998
  assert audit.tpr_at_fpr(np.array([5.5, 9.5]), negatives[:10], 0.001) == 0.5  # below resolution: 0 FPs


class _FakeScorer:
  """Stands for a model: a fixed score per sentence (what pll_scores would return)."""

  def __init__(self, table: dict[str, float]):
    self.table = table

  def encode(self, text):
    return [1, 2, 3]


def test_likelihood_ratio_removes_sentence_difficulty(monkeypatch):
  rng = np.random.default_rng(1)
  members = [audit.Sentence(f"m:{i}", f"member {i}") for i in range(200)]
  non_members = [audit.Sentence(f"n:{i}", f"other {i}") for i in range(300)]
  difficulty = {s.text: rng.normal(0, 3) for s in members + non_members}  # shared by target and reference
  target = {text: value + (0.5 if text.startswith("member") else 0.0) for text, value in difficulty.items()}
  monkeypatch.setattr(
    audit, "pll_scores", lambda scorer, sentences, name: np.array([scorer.table[s.text] for s in sentences])
  )
  result, _ = audit.run_membership(_FakeScorer(target), _FakeScorer(difficulty), members, non_members, min_tokens=1)
  hand = np.mean(
    [(target[m.text] > target[n.text]) + 0.5 * (target[m.text] == target[n.text]) for m in members for n in non_members]
  )
  assert result["attacks"]["score_only"]["auc"] == pytest.approx(hand, abs=1e-12)
  assert 0.5 < hand < 0.7
  lr = result["attacks"]["likelihood_ratio"]
  assert lr["auc"] == 1.0 and lr["tpr_at_0.01_fpr"] == 1.0  # target − reference = 0.5 for members, 0 otherwise
  assert result["fpr_resolution"] == pytest.approx(1 / 300)


# ------------------------------------------------------------------------------------------ a trained model
def _vocab(path: Path) -> Path:
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")", ".", "MRN", "was", "diagnosed", "with"]
  tokens += list(FILLER) + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
  tokens += list(canaries.FIRST_NAMES) + list(canaries.LAST_NAMES) + list(canaries.CONDITIONS)
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return path


def _text(directory: Path, documents: int, seed: int) -> Path:
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True)
  blocks = [
    "\n".join(" ".join(rng.choice(FILLER, rng.integers(5, 9))) + " ." for _ in range(3)) + "\n"
    for _ in range(documents)
  ]
  (directory / "notes-00000.txt").write_text("\n".join(blocks), encoding="utf-8")
  return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("audit")
  vocab = _vocab(root / "vocab.txt")
  _text(root / "text", documents=100, seed=0)
  canaries.insert_canaries(
    root / "text",
    root / "train_text",
    root / "canaries.jsonl",
    repetitions=[0, 24],
    canaries_per_count=4,
    secret_digits=4,
    seed=3,
  )
  _text(root / "heldout", documents=40, seed=1)
  create_pretraining_data(
    str(root / "train_text" / "*.txt"),
    vocab,
    root / "data",
    options=InstanceOptions(
      max_seq_length=SEQ, max_predictions_per_seq=5, dupe_factor=2, masking="none", random_seed=1
    ),
  )
  (root / "bert_config.json").write_text(
    json.dumps(
      {
        "vocab_size": len(vocab.read_text().splitlines()),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": SEQ,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
      }
    ),
    encoding="utf-8",
  )
  cfg = train.TrainConfig(
    # 150 steps memorise as well as 300 did: mean exposure 5.51 (24 repetitions) vs 1.27 (none); 300 gave 5.91 vs 1.47.
    num_train_steps=150,
    num_warmup_steps=20,
    learning_rate=3e-3,
    train_batch_size=32,
    max_predictions_per_seq=5,
    optimizer="adamw",
    save_checkpoints_steps=150,
    log_every_steps=50,
    seed=1,
    async_checkpointing=False,
  )
  options = pretrain.PretrainOptions(
    input_file=str(root / "data"),
    output_dir=str(root / "run"),
    train=cfg,
    bert_config_file=str(root / "bert_config.json"),
    vocab_file=str(vocab),
    max_seq_length=SEQ,
    masking="dynamic",
  )
  pretrain.run(options, print_fn=lambda line: None)
  return root


@pytest.mark.slow  # uses the model the `trained` fixture trains
def test_exposure_rises_with_repetitions(trained, tmp_path):
  report = audit.audit(
    "exposure",
    str(trained / "run"),
    str(tmp_path / "out"),
    canary_file=str(trained / "canaries.jsonl"),
    num_candidates=100,
    seed=0,
  )
  table = {row["repetitions"]: row for row in report["result"]["by_repetitions"]}
  assert report["result"]["max_exposure"] == pytest.approx(math.log2(101))
  assert table[24]["mean_exposure"] > table[0]["mean_exposure"] + 2.0, table
  assert table[24]["mean_exposure"] > 4.0, table
  written = json.loads((tmp_path / "out" / "audit.json").read_text())
  assert written["result"]["by_repetitions"] == report["result"]["by_repetitions"]
  assert {p.name for p in (tmp_path / "out").iterdir()} == {"audit.json", "audit.md", "exposure.png"}
  _, rows = canaries.read_canary_file(trained / "canaries.jsonl")
  for name in ("audit.json", "audit.md"):
    text = (tmp_path / "out" / name).read_text()
    assert not any(row["secret"] in text or row["name"] in text for row in rows)


@pytest.mark.slow  # uses the model the `trained` fixture trains
def test_membership_and_associations_reports(trained, tmp_path):
  report = audit.audit(
    "membership",
    str(trained / "run"),
    str(tmp_path / "mia"),
    member_files=str(trained / "train_text" / "*.txt"),
    non_member_files=str(trained / "heldout" / "*.txt"),
    max_sentences=150,
  )
  attack = report["result"]["attacks"]["score_only"]
  assert 0.0 <= attack["auc"] <= 1.0 and report["result"]["members"] == 150
  assert (tmp_path / "mia" / "roc.png").stat().st_size > 1000
  for name in ("audit.json", "audit.md"):
    assert "alpha" not in (tmp_path / "mia" / name).read_text()  # the filler words never appear
  report = audit.audit(
    "associations",
    str(trained / "run"),
    str(tmp_path / "assoc"),
    pairs_file=str(trained / "canaries.jsonl"),
    probe_template="{name} (MRN 1234) was diagnosed with {condition} .",
  )
  assert 0.0 <= report["result"]["auc_name_minus_base_rate"] <= 1.0 and report["result"]["pairs"] == 8


@pytest.mark.slow  # the trained model and the audit CLI
def test_bad_input_is_one_line(trained, tmp_path):
  other = model_io.load_model(str(trained / "run"))
  vocab = (trained / "vocab.txt").read_text().splitlines()
  (tmp_path / "vocab.txt").write_text("\n".join(vocab[:-1] + ["measles"]) + "\n")
  (tmp_path / "other").mkdir()
  model_io.save_our_dir(dataclasses.replace(other, vocab_file=tmp_path / "vocab.txt"), tmp_path / "other")
  result = run_module(
    "clinical_bert_jax.audit",
    "membership",
    f"--model={trained / 'run'}",
    f"--member_files={trained / 'train_text' / '*.txt'}",
    f"--non_member_files={trained / 'heldout' / '*.txt'}",
    f"--reference_model={tmp_path / 'other'}",
    f"--output_dir={tmp_path / 'out'}",
  )
  assert result.returncode == 2
  assert_one_line_error(result, "--reference_model", "another vocabulary")
  (tmp_path / "mixed.txt").write_text(
    (trained / "heldout" / "notes-00000.txt").read_text().splitlines()[0]
    + "\n"
    + (trained / "text" / "notes-00000.txt").read_text().splitlines()[0]
    + "\n"
  )
  result = run_module(
    "clinical_bert_jax.audit",
    "membership",
    f"--model={trained / 'run'}",
    f"--member_files={trained / 'train_text' / '*.txt'}",
    f"--non_member_files={tmp_path}/mixed.txt",
    f"--output_dir={tmp_path / 'out'}",
  )
  line = assert_one_line_error(result, "1 non-member sentence(s) also occur among the members", "mixed.txt:2")
  assert "alpha" not in line and "bravo" not in line and result.returncode == 2
  assert not (tmp_path / "out").exists()
