"""The one vocabulary reader: every consumer sees the same tokens, and files readers disagree about are refused."""

import hashlib
import json
import re

import pytest

from clinical_bert_jax import records
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.masking import MaskingVocab
from clinical_bert_jax.tokenization import FullTokenizer, load_vocab
from clinical_bert_jax.vocab import SPECIAL_TOKENS, read_vocab, vocab_fingerprint
from data_prep.build_vocab import check_vocab, special_tokens

GOOD = special_tokens(2) + ["the", "##s", "Cased"]


def _write(path, content: bytes):
  path.write_bytes(content)
  return path


def test_every_reader_sees_the_same_tokens(tmp_path):
  # Windows line ends, surrounding blanks and no final newline read the same way everywhere.
  vocab_file = _write(tmp_path / "vocab.txt", "\r\n".join(f" {token}\t" for token in GOOD).encode("utf-8"))
  assert read_vocab(vocab_file) == GOOD == check_vocab(vocab_file)
  assert list(load_vocab(vocab_file)) == GOOD and FullTokenizer(vocab_file).vocab_size == len(GOOD)
  assert MaskingVocab.from_vocab_file(vocab_file).vocab_size == len(GOOD)
  sha256, size = vocab_fingerprint(vocab_file)
  assert (sha256, size) == (hashlib.sha256(vocab_file.read_bytes()).hexdigest(), len(GOOD))
  assert records.vocab_fingerprint(vocab_file) == (sha256, size)  # the name data tools and manifests know
  assert set(SPECIAL_TOKENS) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


@pytest.mark.parametrize(
  "content, fragment",
  [
    ("\n".join(GOOD + ["the"]) + "\n", "line 11 repeats the token of line 8"),
    ("\n".join(GOOD[:3]) + "\nst\ray\n" + "\n".join(GOOD[3:]), "line 4 has a stray carriage return"),
    ("", "is empty"),
  ],
)
def test_files_readers_disagree_about_are_one_line_errors_everywhere(tmp_path, content, fragment):
  vocab_file = _write(tmp_path / "vocab.txt", content.encode("utf-8"))
  readers = [read_vocab, load_vocab, check_vocab, vocab_fingerprint, FullTokenizer, MaskingVocab.from_vocab_file]
  for reader in readers:
    with pytest.raises(UserError, match=fragment) as caught:
      reader(vocab_file)
    assert "vocab.txt" in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_names_the_flag(tmp_path):
  with pytest.raises(UserError, match="cannot read vocabulary file .*missing.txt.*--vocab_file"):
    read_vocab(tmp_path / "missing.txt")


def _tokenizer_json_dir(directory, entries: list[str]):
  """A directory as transformers 5 saves a BERT tokenizer (tokenizer.json, no vocab.txt), vocabulary `entries` in id
  order; the vocab object is written by hand so that a repeated token stays a repeated JSON key."""
  directory.mkdir()
  vocab = ", ".join(f"{json.dumps(token)}: {index}" for index, token in enumerate(entries))
  (directory / "tokenizer.json").write_text(
    '{"model": {"type": "WordPiece", "continuing_subword_prefix": "##", "vocab": {' + vocab + "}}, "
    '"normalizer": {"type": "BertNormalizer", "lowercase": false}, "pre_tokenizer": {"type": "BertPreTokenizer"}}',
    encoding="utf-8",
  )
  return directory


@pytest.mark.parametrize(
  "entries, line_error, json_error",
  [
    (GOOD + ["the"], "line 11 repeats the token of line 8", "id 10 repeats the token of id 7"),
    (GOOD[:3] + ["st\ray"] + GOOD[3:], "line 4 has a stray carriage return", "id 3 has a stray carriage return"),
  ],
)
def test_tokenizer_json_vocabulary_follows_the_vocab_txt_rules(tmp_path, entries, line_error, json_error):
  from clinical_bert_jax import vocab
  from clinical_bert_jax.eval_tasks import hf_checkpoint

  vocab_file = _write(tmp_path / "vocab.txt", ("\n".join(entries) + "\n").encode("utf-8"))
  with pytest.raises(UserError, match=line_error) as from_vocab_txt:
    read_vocab(vocab_file)
  directory = _tokenizer_json_dir(tmp_path / "saved", entries)
  tokenizer_json = directory / "tokenizer.json"
  # the same rule, the same one-line message: only the file and the place (line N vs. id N-1) differ
  expected = str(from_vocab_txt.value).replace(str(vocab_file), str(tokenizer_json))
  expected = re.sub(r"\bline (\d+)", lambda match: f"id {int(match.group(1)) - 1}", expected)
  for reader in (vocab.read_tokenizer_json, lambda path: vocab.vocab_file_in(path.parent)):
    with pytest.raises(UserError, match=json_error) as from_tokenizer_json:
      reader(tokenizer_json)
    assert str(from_tokenizer_json.value) == expected and "\n" not in expected
  config = dict(model_type="bert", vocab_size=11, hidden_size=4, num_hidden_layers=1, num_attention_heads=1)
  (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 4}), encoding="utf-8")
  (directory / "model.safetensors").write_bytes(b"")
  with pytest.raises(UserError, match=json_error):  # what evaluate and embed open
    hf_checkpoint.open_checkpoint(directory)


def test_a_good_tokenizer_json_reads_as_its_vocab_txt(tmp_path):
  from clinical_bert_jax import vocab

  directory = _tokenizer_json_dir(tmp_path / "saved", GOOD)
  assert vocab.read_tokenizer_json(directory / "tokenizer.json") == (GOOD, False)
  assert read_vocab(vocab.vocab_file_in(directory)) == GOOD
