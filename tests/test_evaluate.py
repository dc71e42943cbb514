"""Downstream evaluators: the original optimizer, features, grid selection, end-to-end runs with a tiny BERT, errors.

The end-to-end runs fine-tune a 2-layer, 32-wide BERT from scratch with a word-level vocabulary built from the data:
on NCBI-disease that learns real disease spans within a few hundred updates, which is what the F1 assertion checks.
"""

from __future__ import annotations

import collections
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.eval_tasks import bert_adam, grid, hf_checkpoint, mednli, ner
from data_prep.conll import Sentence
from tests.cli_util import assert_one_line_error, run_module

pytestmark = pytest.mark.slow  # fine-tunes with PyTorch, CLI runs

NCBI = Path(__file__).parent / "data" / "ner" / "ncbi-disease"
SNLI = Path(__file__).parent / "data" / "nli" / "snli-mednli-schema"
# The CI machine is shared by many test processes: torch's default thread pool spins under contention, one thread
# is several times faster there.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def word_vocab(texts: list[str], min_count: int = 2) -> list[str]:
  """Specials plus every word/punctuation token seen `min_count` times (a word-level 'WordPiece' vocabulary)."""
  counts = collections.Counter(token for text in texts for token in re.findall(r"\w+|[^\w\s]", text))
  return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(t for t, c in counts.items() if c >= min_count)


def save_tiny_bert(directory: Path, vocab: list[str], tokenizer_config: dict | None = None, seed: int = 0) -> Path:
  torch.manual_seed(seed)
  config = transformers.BertConfig(
    vocab_size=len(vocab),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=160,
  )
  transformers.BertForPreTraining(config).save_pretrained(directory)
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  if tokenizer_config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
  return directory


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
  texts = [line.split("\t")[0] for line in (NCBI / "train.tsv").read_text(encoding="utf-8").splitlines()]
  for line in (SNLI / "snli_mednli_schema_train.jsonl").read_text(encoding="utf-8").splitlines():
    record = json.loads(line)
    texts += [record["sentence1"], record["sentence2"]]
  return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny_bert", word_vocab(texts), {"do_lower_case": False})


def evaluate(*args: str):
  return run_module("clinical_bert_jax.evaluate", *args, "--device=cpu", env=ONE_THREAD)


# ----------------------------------------------------------------------------------------------- end to end
def test_ner_learns_ncbi_disease_spans(tiny_bert, tmp_path):
  result = evaluate(
    "ner",
    "--task=bio",
    f"--model_dir={tiny_bert}",
    f"--data_dir={NCBI}",
    f"--output_dir={tmp_path}",
    "--learning_rate=1e-3",
    "--train_batch_size=16",
    "--num_train_epochs=4",
    "--seeds=1",
    "--max_train_examples=2000",
    "--max_eval_examples=300",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  run_dir = tmp_path / "tiny_bert" / "bio-ncbi-disease"
  results = json.loads((run_dir / "results.json").read_text())
  assert results["task"] == "bio" and results["dataset"] == "ncbi-disease"
  assert results["labels"] == ["B-Disease", "I-Disease", "O"]
  assert results["data_sizes"] == {"train": 2000, "dev": 300, "test": 300}
  test_scores = results["grid"][0]["runs"][0]["test"]
  assert test_scores["num_gold"] > 100
  assert results["selected"]["test_mean"] == test_scores["f1"] > 0.2
  assert results["selected"]["dev_mean"] > 0.2

  blocks = (run_dir / "test_predictions.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
  gold_blocks = (NCBI / "test.tsv").read_text(encoding="utf-8").strip("\n").split("\n\n")[:300]
  assert len(blocks) == 300
  for predicted, gold in zip(blocks, gold_blocks):
    lines = predicted.split("\n")
    assert [line.split(" ")[:2] for line in lines] == [line.split("\t") for line in gold.split("\n")]
    assert all(line.split(" ")[2] in ("O", "B-Disease", "I-Disease") for line in lines)

  table = (tmp_path / "results.md").read_text(encoding="utf-8")
  header = next(line for line in table.splitlines() if line.startswith("| model |"))
  assert header == "| model | MedNLI | i2b2 2006 | i2b2 2010 | i2b2 2012 | i2b2 2014 | bio: ncbi-disease |"
  row = next(line for line in table.splitlines() if line.startswith("| tiny_bert |"))
  assert row == f"| tiny_bert | – | – | – | – | – | {100 * test_scores['f1']:.1f} |"


def test_mednli_grid_selection_and_one_table_for_several_models(tiny_bert, tmp_path):
  root = tmp_path / "table"
  result = evaluate(
    "mednli",
    f"--model_dir={tiny_bert}",
    f"--data_dir={SNLI}",
    f"--output_dir={root}",
    "--learning_rate=1e-3,5e-4",
    "--train_batch_size=16",
    "--num_train_epochs=1",
    "--seeds=1,2",
    "--max_train_examples=64",
    "--max_eval_examples=32",
  )
  assert result.returncode == 0, result.stderr[-3000:]

  results = json.loads((root / "tiny_bert" / "mednli" / "results.json").read_text())
  assert results["task"] == "mednli" and results["labels"] == ["contradiction", "entailment", "neutral"]
  assert [point["learning_rate"] for point in results["grid"]] == [1e-3, 5e-4]
  for point in results["grid"]:
    assert [run["seed"] for run in point["runs"]] == [1, 2]
    for run in point["runs"]:
      assert 0.0 <= run["dev"]["accuracy"] <= 1.0 and 0.0 <= run["test"]["accuracy"] <= 1.0
      assert run["train"]["steps"] == math.ceil(64 / 16)
    assert point["dev_mean"] == pytest.approx(sum(run["dev"]["accuracy"] for run in point["runs"]) / 2)
  dev_means = [point["dev_mean"] for point in results["grid"]]
  selected = results["selected"]
  assert selected["grid_index"] == dev_means.index(max(dev_means))
  assert selected["test_mean"] == results["grid"][selected["grid_index"]]["test_mean"]
  lines = (root / "tiny_bert" / "mednli" / "test_predictions.txt").read_text().splitlines()
  pair_ids = [
    json.loads(line)["pairID"] for line in (SNLI / "snli_mednli_schema_test.jsonl").read_text().splitlines()[:32]
  ]
  assert [line.split("\t")[0] for line in lines] == pair_ids
  assert all(field in mednli.LABELS for line in lines for field in line.split("\t")[1:])

  table = (root / "results.md").read_text(encoding="utf-8")
  tiny_row = f"| tiny_bert | {100 * selected['test_mean']:.1f} ± {100 * selected['test_std']:.1f} | – |"
  assert tiny_row in table  # two seeds: mean ± std
  assert "| Bio+Clinical BERT *[paper]* | 82.7 | 94.7 | 87.2 | 78.9 | 92.5 |" in table

  # A second model's run (here: a copy with one seed) joins the same table when the report is rebuilt.
  other = json.loads((root / "tiny_bert" / "mednli" / "results.json").read_text())
  other.update(model_name="other_bert", created="2100-01-01T00:00:00+00:00")
  other["selected"].update(seeds=[7], test_mean=0.5)
  (root / "other_bert" / "mednli").mkdir(parents=True)
  (root / "other_bert" / "mednli" / "results.json").write_text(json.dumps(other))
  result = run_module("clinical_bert_jax.evaluate", "report", f"--output_dir={root}")
  assert result.returncode == 0, result.stderr[-2000:]
  merged = (root / "results.md").read_text(encoding="utf-8")
  assert tiny_row in merged
  assert "| other_bert | 50.0 | – | – | – | – |" in merged  # one seed: the mean alone
  assert merged.index("| tiny_bert | mednli") < merged.index("| other_bert | mednli")  # runs listed oldest first


def test_existing_run_is_not_overwritten_silently(tiny_bert, tmp_path):
  (tmp_path / "tiny_bert" / "mednli").mkdir(parents=True)
  (tmp_path / "tiny_bert" / "mednli" / "results.json").write_text("{}")
  result = evaluate("mednli", f"--model_dir={tiny_bert}", f"--data_dir={SNLI}", f"--output_dir={tmp_path}")
  assert_one_line_error(result, "mednli is not empty", "--overwrite")
  assert (tmp_path / "tiny_bert" / "mednli" / "results.json").read_text() == "{}"


# ----------------------------------------------------------------------------------------------- optimizer
class _OriginalWarmupLinear:
  """pytorch-pretrained-bert 0.4.0's warmup_linear, as a schedule object for the 0.6.2 BertAdam oracle."""

  def __new__(cls, warmup: float, total: int):
    from pytorch_pretrained_bert import optimization

    class Schedule(optimization._LRSchedule):
      def get_lr_(self, progress):
        return progress / self.warmup if progress < self.warmup else 1.0 - progress

    return Schedule(warmup=warmup, t_total=total)


def test_bert_adam_matches_pytorch_pretrained_bert():
  from pytorch_pretrained_bert.optimization import BertAdam as OriginalBertAdam

  torch.manual_seed(0)
  ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
  theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
  total = 10
  optimizer = bert_adam.BertAdam(
    [{"params": [ours[0]], "weight_decay": 0.01}, {"params": [ours[1]], "weight_decay": 0.0}],
    lr=0.1,
    total_steps=total,
    warmup=0.2,
  )
  oracle = OriginalBertAdam(
    [{"params": [theirs[0]], "weight_decay": 0.01}, {"params": [theirs[1]], "weight_decay": 0.0}],
    lr=0.1,
    schedule=_OriginalWarmupLinear(0.2, total),
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the oracle uses torch's deprecated add_(scalar, tensor) overload
    for _ in range(total):
      gradients = [torch.randn(4, 3) * 5, torch.randn(3) * 0.1]  # the first is clipped (norm > 1), the second not
      for mine, original, gradient in zip(ours, theirs, gradients):
        mine.grad, original.grad = gradient.clone(), gradient.clone()
      optimizer.step()
      oracle.step()
      for mine, original in zip(ours, theirs):
        torch.testing.assert_close(mine, original, rtol=0, atol=1e-6)
  assert not torch.equal(ours[0], theirs[0].new_zeros(4, 3))


def test_warmup_linear_jumps_at_the_end_of_warmup():
  assert bert_adam.warmup_linear(0.0, 0.1) == 0.0
  assert bert_adam.warmup_linear(0.05, 0.1) == pytest.approx(0.5)
  assert bert_adam.warmup_linear(0.0999, 0.1) == pytest.approx(0.999)
  assert bert_adam.warmup_linear(0.1, 0.1) == pytest.approx(0.9)  # the jump from ~1 to 1 - warmup
  assert bert_adam.warmup_linear(0.75, 0.1) == pytest.approx(0.25)


def test_bias_and_layer_norm_are_not_decayed():
  model = transformers.BertForSequenceClassification(
    transformers.BertConfig(
      vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, num_labels=3
    )
  )
  decayed, not_decayed = bert_adam.parameter_groups(model, 0.01)
  names = {id(parameter): name for name, parameter in model.named_parameters()}
  assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
  assert {names[id(p)] for p in not_decayed["params"]} == {
    name for name in names.values() if name.endswith("bias") or "LayerNorm" in name
  }
  assert "bert.embeddings.word_embeddings.weight" in {names[id(p)] for p in decayed["params"]}
  assert len(decayed["params"]) + len(not_decayed["params"]) == len(names)


# ------------------------------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory) -> hf_checkpoint.WordPieceEncoder:
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "fever", "##ish", "the", "."]
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  return hf_checkpoint.WordPieceEncoder(path, do_lower_case=False)


def test_mednli_pair_layout_and_longest_first_truncation(small_encoder):
  assert mednli.truncate_pair([1, 2, 3, 4], [5, 6], 4) == ([1, 2], [5, 6])
  assert mednli.truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([1, 2], [4, 5])  # ties cut the hypothesis first
  pair = mednli.NliPair("p1", "a b c a", "feverish", 2)
  (example,) = mednli.featurize([pair], small_encoder, max_seq_length=7)
  a, b, c, fever, ish = 5, 6, 7, 8, 9
  assert example["input_ids"] == [2, a, b, 3, fever, ish, 3]
  assert example["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
  assert example["label"] == 2


def test_ner_labels_go_on_first_pieces_and_truncated_words_decode_as_outside(small_encoder):
  labels = ["B-x", "I-x", "O"]
  sentence = Sentence(("the", "feverish", "a", "b"), ("O", "B-x", "I-x", "O"))
  (example,) = ner.featurize([sentence], small_encoder, {label: i for i, label in enumerate(labels)}, 150)[0]
  assert example["input_ids"] == [2, 10, 8, 9, 5, 6, 3]
  assert example["label"] == [-100, 2, 0, -100, 1, 2, -100]
  assert example["word_ids"] == [None, 0, 1, 1, 2, 3, None]

  features, truncated = ner.featurize([sentence], small_encoder, {label: i for i, label in enumerate(labels)}, 5)
  assert truncated == 1 and features[0]["word_ids"] == [None, 0, 1, 1, None]
  # Predicted B-x everywhere (I-x on the continuation piece): words past the cut come out O.
  predictions = [torch.tensor([0, 0, 0, 1, 0]).numpy()]
  assert ner.decode(features, predictions, [sentence], labels) == [["B-x", "B-x", "O", "O"]]


def test_bio_label_set_comes_from_train_and_i2b2_sets_are_fixed():
  train = [Sentence(("a", "b"), ("B-Zeta", "O")), Sentence(("c",), ("I-Alpha",))]
  assert ner.entity_types("bio", train) == ("Alpha", "Zeta")
  assert set(ner.entity_types("i2b2_2010", train)) == {"problem", "test", "treatment"}
  assert len(ner.entity_types("i2b2_2014", train)) == 23


def test_grid_selects_the_best_mean_dev_point_and_reports_its_test_spread():
  points = grid.grid_points([1.0, 2.0], [8], [1], 0.1)
  dev = {(1.0, 1): 0.9, (1.0, 2): 0.1, (2.0, 1): 0.6, (2.0, 2): 0.5}  # lr 1 has the best single seed, lr 2 the mean

  def run_one(point, seed):
    score = dev[(point.learning_rate, seed)]
    return grid.RunOutcome({"m": score}, {"m": score / 2}, {}, f"predictions lr={point.learning_rate} seed={seed}")

  summary, predictions = grid.run_grid(points, [1, 2], "m", run_one)
  assert summary["selected"]["learning_rate"] == 2.0 and summary["selected"]["grid_index"] == 1
  assert summary["selected"]["test_mean"] == pytest.approx(0.275)
  assert summary["selected"]["test_std"] == pytest.approx(0.05 / 2**0.5)  # sample std of 0.3 and 0.25
  assert predictions == "predictions lr=2.0 seed=1"


# ------------------------------------------------------------------------------------------------ bad input
def test_casing_comes_from_tokenizer_config_else_case_is_kept(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Fever"]
  cased = save_tiny_bert(tmp_path / "no_tokenizer_config", vocab)
  assert hf_checkpoint.open_checkpoint(cased).do_lower_case is False
  uncased = save_tiny_bert(tmp_path / "uncased", vocab, {"do_lower_case": True})
  assert hf_checkpoint.open_checkpoint(uncased).do_lower_case is True


def test_model_dir_that_is_not_a_bert_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="not a BERT checkpoint: no config.json"):
    hf_checkpoint.open_checkpoint(tmp_path / "empty")
  gpt = tmp_path / "gpt"
  gpt.mkdir()
  (gpt / "config.json").write_text(
    json.dumps(
      {
        "model_type": "gpt2",
        "vocab_size": 5,
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "intermediate_size": 4,
      }
    )
  )
  with pytest.raises(UserError, match="only BERT"):
    hf_checkpoint.open_checkpoint(gpt)
  no_weights = save_tiny_bert(tmp_path / "no_weights", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
  (no_weights / "model.safetensors").unlink()
  with pytest.raises(UserError, match="neither model.safetensors nor pytorch_model.bin"):
    hf_checkpoint.open_checkpoint(no_weights)
  damaged = save_tiny_bert(tmp_path / "damaged", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
  (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match="damaged"):
    hf_checkpoint.load_pretrained(hf_checkpoint.open_checkpoint(damaged), transformers.BertModel)


def _copy_split_files(source: Path, target: Path) -> Path:
  """The first 60 lines of each data file of `source`."""
  target.mkdir()
  for path in source.glob("*.*"):
    if path.suffix in (".tsv", ".jsonl"):
      (target / path.name).write_text(
        "\n".join(path.read_text(encoding="utf-8").split("\n")[:60]) + "\n", encoding="utf-8"
      )
  return target


def test_mednli_bad_files_are_named_with_their_line(tmp_path):
  data = _copy_split_files(SNLI, tmp_path / "nli")
  test_file = data / "snli_mednli_schema_test.jsonl"
  lines = test_file.read_text().splitlines()
  record = json.loads(lines[2])
  del record["gold_label"]
  test_file.write_text("\n".join([*lines[:2], json.dumps(record), *lines[3:]]) + "\n")
  with pytest.raises(UserError, match=r"snli_mednli_schema_test.jsonl:3: missing key\(s\) gold_label"):
    mednli.load_splits(data)
  record["gold_label"] = "-"
  test_file.write_text("\n".join([*lines[:4], json.dumps(record)]) + "\n")
  with pytest.raises(UserError, match=r"snli_mednli_schema_test.jsonl:5: unknown gold_label '-'") as error:
    mednli.load_splits(data)
  assert record["sentence1"] not in str(error.value)
  test_file.write_text("{not json\n")
  with pytest.raises(UserError, match=r"snli_mednli_schema_test.jsonl:1: not valid JSON"):
    mednli.load_splits(data)
  test_file.unlink()
  with pytest.raises(UserError, match="no test split file"):
    mednli.load_splits(data)


def test_ner_bad_data_reaches_the_user_as_one_line(tmp_path, tiny_bert):
  data = _copy_split_files(NCBI, tmp_path / "bio")
  common = ["ner", f"--model_dir={tiny_bert}", f"--data_dir={data}", f"--output_dir={tmp_path / 'out'}"]
  # NCBI's labels are not i2b2 2010 labels: every unknown one is listed.
  result = run_module("clinical_bert_jax.evaluate", *common, "--task=i2b2_2010")
  assert_one_line_error(result, "'B-Disease'", "'I-Disease'", "allowed: B-problem")

  (data / "devel.tsv").unlink()
  result = run_module("clinical_bert_jax.evaluate", *common, "--task=bio")
  assert_one_line_error(result, "missing dev.tsv")

  _copy_split_files(NCBI, tmp_path / "bio_again")
  lines = (tmp_path / "bio_again" / "test.tsv").read_text().split("\n")
  lines[6] = "secretword\tB-Disease\textra"
  (tmp_path / "bio_again" / "test.tsv").write_text("\n".join(lines))
  with pytest.raises(UserError, match=r"test.tsv:7: expected 'word<TAB>label'") as error:
    ner.load_task_splits("bio", tmp_path / "bio_again")
  assert "secretword" not in str(error.value)
  assert not (tmp_path / "out").exists()


def test_cli_rejects_a_model_dir_without_a_checkpoint(tmp_path):
  result = run_module(
    "clinical_bert_jax.evaluate",
    "mednli",
    f"--model_dir={tmp_path}",
    f"--data_dir={SNLI}",
    f"--output_dir={tmp_path / 'out'}",
  )
  assert_one_line_error(result, "not a BERT checkpoint")
  result = run_module("clinical_bert_jax.evaluate", "report", f"--output_dir={tmp_path}")
  assert_one_line_error(result, "holds no results.json")
  assert not (tmp_path / "out").exists()
