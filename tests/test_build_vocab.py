"""build_vocab: BERT-layout vocabularies that our and Hugging Face's tokenizers load and that cover unseen notes."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.tokenization import FullTokenizer
from data_prep.build_vocab import build_vocab, check_vocab, special_tokens
from tests.cli_util import assert_one_line_error, run_module

pytestmark = pytest.mark.slow  # trains vocabularies, CLI runs, transformers loads

NOTES_CSV = str(Path(__file__).resolve().parents[1] / "data_prep" / "demo_corpus" / "NOTEEVENTS_aci_bench.csv")
TRAIN_NOTES = 150  # of 207; the rest is held out
VOCAB_SIZE = 2000
NUM_UNUSED = 9


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """ACI-BENCH note text in Google's format (lines as in the notes, blank line between notes): train and held-out."""
  with open(NOTES_CSV, newline="", encoding="utf-8") as handle:
    texts = [row["TEXT"] for row in csv.DictReader(handle)]
  directory = tmp_path_factory.mktemp("corpus")
  (directory / "train-a.txt").write_text("\n\n".join(texts[: TRAIN_NOTES // 2]), encoding="utf-8")
  (directory / "train-b.txt").write_text("\n\n".join(texts[TRAIN_NOTES // 2 : TRAIN_NOTES]), encoding="utf-8")
  held_out = [line for text in texts[TRAIN_NOTES:] for line in text.splitlines() if line.strip()]
  return directory, held_out


def _unk_rate(tokenizer: FullTokenizer, lines: list[str]) -> float:
  tokens = [token for line_tokens in tokenizer.tokenize_batch(lines) for token in line_tokens]
  return sum(token == "[UNK]" for token in tokens) / len(tokens)


@pytest.mark.parametrize("method", ["wordpiece", "sentencepiece"])
def test_uncased_vocab_has_bert_layout_and_covers_held_out_notes(corpus, tmp_path, method):
  directory, held_out = corpus
  output = tmp_path / "vocab.txt"
  vocab = build_vocab(str(directory / "train-*.txt"), output, VOCAB_SIZE, method=method, num_unused=NUM_UNUSED)
  tokens = check_vocab(output)
  assert tokens == vocab and len(tokens) == VOCAB_SIZE == len(set(tokens))
  assert tokens[: NUM_UNUSED + 5] == special_tokens(NUM_UNUSED)
  assert tokens[0] == "[PAD]" and tokens[NUM_UNUSED + 1 : NUM_UNUSED + 5] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert not any(token != token.lower() for token in tokens[NUM_UNUSED + 5 :])
  assert any(token.startswith("##") and len(token) > 3 for token in tokens)
  if method == "sentencepiece":  # every character in both forms, so no word of known characters becomes [UNK]
    characters = [token for token in tokens[NUM_UNUSED + 5 :] if len(token) == 1]
    assert len(characters) > 26 and all("##" + char in tokens for char in characters)
  assert _unk_rate(FullTokenizer(output, do_lower_case=True), held_out) < 0.002


def test_cased_vocab_keeps_capitals_and_loads_in_hugging_face(corpus, tmp_path):
  from transformers import BertTokenizerFast

  directory, held_out = corpus
  output = tmp_path / "vocab.txt"
  build_vocab(f"{directory}/train-a.txt,{directory}/train-b.txt", output, VOCAB_SIZE, cased=True, num_unused=NUM_UNUSED)
  tokens = check_vocab(output)
  assert len(tokens) == VOCAB_SIZE and any(token[0].isupper() for token in tokens if token[0].isalpha())
  # transformers 5 takes the vocabulary as `vocab=`; `vocab_file=` is silently ignored (5-token default vocab).
  hf_tokenizer = BertTokenizerFast(vocab=str(output), do_lower_case=False)
  assert len(hf_tokenizer) == VOCAB_SIZE
  assert hf_tokenizer.convert_tokens_to_ids(["[CLS]", "[MASK]"]) == [NUM_UNUSED + 2, NUM_UNUSED + 4]
  ours = FullTokenizer(output, do_lower_case=False)
  assert _unk_rate(ours, held_out) < 0.002
  sample = held_out[:50]
  assert [hf_tokenizer.tokenize(line) for line in sample] == ours.tokenize_batch(sample)
  assert any(token[0].isupper() for line in ours.tokenize_batch(sample) for token in line)


def test_small_corpus_gives_a_smaller_vocab_with_a_warning(tmp_path, caplog):
  corpus = tmp_path / "tiny.txt"
  corpus.write_text("The patient denies chest pain.\nThe patient reports chest pain.\n\nNo fever.\n", encoding="utf-8")
  with caplog.at_level(logging.WARNING):
    vocab = build_vocab(str(corpus), tmp_path / "vocab.txt", 5000, num_unused=0)
  assert len(vocab) < 5000 and "fewer than --vocab_size=5000" in caplog.text
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and {"patient", "chest", "t"} <= set(vocab)


def test_bad_inputs_fail_with_one_line(tmp_path):
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n\n", encoding="utf-8")
  with pytest.raises(UserError, match="holds no text"):
    build_vocab(str(blank), tmp_path / "v.txt", 100, num_unused=0)
  with pytest.raises(UserError, match="leaves no room after the 104 special tokens"):
    build_vocab(str(blank), tmp_path / "v.txt", 104)
  text = tmp_path / "text.txt"
  text.write_text("abcdefghij klmnopqrst uvwxyz\n", encoding="utf-8")
  with pytest.raises(UserError, match="cannot hold the special tokens plus the corpus's single characters"):
    build_vocab(str(text), tmp_path / "v.txt", 20, num_unused=0)
  assert not (tmp_path / "v.txt").exists()

  broken_vocab = tmp_path / "broken.txt"
  broken_vocab.write_text("[PAD]\n[UNK]\nthe\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"broken\.txt lacks the special tokens \[CLS\] \[SEP\] \[MASK\]"):
    check_vocab(broken_vocab)

  result = run_module("data_prep.build_vocab", f"--input={tmp_path}/missing-*.txt", f"--output={tmp_path}/v.txt")
  assert result.returncode == 2
  assert_one_line_error(result, "missing-*.txt", "matches no files")


def test_command_line_writes_the_vocab_and_refuses_to_overwrite(corpus, tmp_path):
  directory, _ = corpus
  arguments = [
    f"--input={directory}/train-a.txt",
    f"--output={tmp_path}/vocab.txt",
    "--vocab_size=500",
    "--num_unused=2",
    "--cased",
  ]
  result = run_module("data_prep.build_vocab", *arguments)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(check_vocab(tmp_path / "vocab.txt")) == 500
  assert_one_line_error(run_module("data_prep.build_vocab", *arguments), "exists", "--overwrite")
