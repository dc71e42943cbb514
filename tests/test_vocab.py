"""The one vocabulary reader: every consumer sees the same tokens, and files readers disagree about are refused."""

import hashlib

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
