"""Learns a BERT-format `vocab.txt` from text in Google's format (one sentence per line, blank lines between documents).

    python -m data_prep.build_vocab --input='corpus/*.txt' --output=vocab.txt --vocab_size=30522 [--cased]
        [--method=wordpiece|sentencepiece] [--num_unused=99] [--min_frequency=2]

The file has BERT's layout so Google's and Hugging Face's tokenizers load it unchanged: `[PAD]`, `[unused0..k-1]`,
`[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, then single characters and learned pieces, word-internal pieces prefixed `##`.
With the default 99 unused slots the special ids are those of Google's vocabularies ([UNK]=100 ... [MASK]=103).

Text is split into words exactly the way BERT's BasicTokenizer will split it at training time (clean text, CJK
spacing, punctuation split, lower-casing and accent stripping unless --cased), so every learned piece is reachable by
WordPiece. `wordpiece` uses the `tokenizers` WordPiece trainer; `sentencepiece` trains a unigram or BPE model on the
same words and renames its pieces to WordPiece convention (word-initial "▁x" -> "x", others -> "##x").
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from absl import flags, logging

from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import as_path, atomic_write, local_inputs
from clinical_bert_jax.vocab import CONTINUATION_PREFIX, SPECIAL_TOKENS, missing_special_tokens, read_vocab

PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS  # short names (vocab.py holds the table)
REQUIRED_SPECIAL_TOKENS = SPECIAL_TOKENS
SENTENCEPIECE_WORD_START = "\u2581"  # "▁"
METHODS = ("wordpiece", "sentencepiece")
# sentencepiece holds its training sentences in memory; beyond this many it trains on a uniform sample.
_SENTENCEPIECE_MAX_SENTENCES = 10_000_000


def special_tokens(num_unused: int) -> list[str]:
  """BERT's leading block: [PAD], [unused0..num_unused-1], [UNK], [CLS], [SEP], [MASK]."""
  return [PAD] + [f"[unused{i}]" for i in range(num_unused)] + [UNK, CLS, SEP, MASK]


def check_vocab(vocab_file: str | os.PathLike) -> list[str]:
  """Tokens of a vocab.txt in id order (`vocab.read_vocab`); UserError if the file is unusable for BERT.

  Tools that take a --vocab_file call this first, so a vocabulary without the special tokens fails with a clear
  message instead of a KeyError deep inside tokenisation or masking.
  """
  tokens = read_vocab(vocab_file)
  missing = missing_special_tokens(tokens, REQUIRED_SPECIAL_TOKENS)
  if missing:
    raise UserError(
      f"vocabulary file {vocab_file} lacks the special tokens {' '.join(missing)}; pass a BERT "
      "vocab.txt or rebuild it with data_prep.build_vocab"
    )
  return tokens


def expand_inputs(patterns: str | Sequence[str]) -> list[Path]:
  """Files matched by comma-separated globs (sorted per glob); UserError naming a glob that matches nothing."""
  if isinstance(patterns, str):
    patterns = [pattern for pattern in patterns.split(",") if pattern.strip()]
  if not patterns:
    raise UserError("--input is empty; pass a glob of text files (one sentence per line)")
  paths = []
  for pattern in patterns:
    matches = [Path(name) for name in sorted(glob.glob(pattern.strip())) if not os.path.isdir(name)]
    if not matches:
      raise UserError(f"--input={pattern} matches no files; check the path or glob")
    paths.extend(matches)
  return paths


def iter_lines(paths: Iterable[Path]) -> Iterator[str]:
  """Non-blank lines of the corpus, decoded as Google does (UTF-8, undecodable bytes dropped)."""
  for path in paths:
    try:
      with open(path, encoding="utf-8", errors="ignore") as handle:
        for line in handle:
          if line.strip():
            yield line
    except OSError as error:
      raise UserError(f"cannot read --input file {path}: {error.strerror}") from None


def _bert_pre_tokenization(cased: bool):
  """(normalizer, pre-tokenizer) reproducing BERT's BasicTokenizer in `tokenizers`."""
  from tokenizers import normalizers, pre_tokenizers

  normalizer = normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=True, strip_accents=not cased, lowercase=not cased
  )
  return normalizer, pre_tokenizers.BertPreTokenizer()


def train_wordpiece(
  lines: Iterable[str], vocab_size: int, cased: bool, specials: Sequence[str], min_frequency: int, limit_alphabet: int
) -> list[str]:
  """Vocabulary from the `tokenizers` WordPiece trainer: specials, then characters, then merges in learned order."""
  from tokenizers import Tokenizer, models, trainers

  tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX))
  tokenizer.normalizer, tokenizer.pre_tokenizer = _bert_pre_tokenization(cased)
  trainer = trainers.WordPieceTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=list(specials),
    limit_alphabet=limit_alphabet,
    continuing_subword_prefix=CONTINUATION_PREFIX,
    show_progress=False,
  )
  tokenizer.train_from_iterator(lines, trainer)
  vocab = tokenizer.get_vocab()
  return sorted(vocab, key=vocab.__getitem__)


def train_sentencepiece(
  lines: Iterable[str], vocab_size: int, cased: bool, specials: Sequence[str], model_type: str
) -> list[str]:
  """Vocabulary from a sentencepiece model trained on BERT-pre-tokenised words, renamed to WordPiece convention.

  Every character gets both its word-initial and its `##` form, so WordPiece never has to emit [UNK] for a word
  made of known characters; learned multi-character pieces fill the rest in sentencepiece's order (by score for
  unigram, by merge for BPE) up to `vocab_size`.
  """
  import sentencepiece

  normalizer, pre_tokenizer = _bert_pre_tokenization(cased)

  def words_per_line() -> Iterator[str]:
    for line in lines:
      words = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))]
      if words:
        yield " ".join(words)

  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=words_per_line(),
      model_writer=model,
      vocab_size=max(vocab_size - len(specials), 8),
      model_type=model_type,
      character_coverage=1.0,
      normalization_rule_name="identity",
      add_dummy_prefix=True,
      remove_extra_whitespaces=True,
      split_by_whitespace=True,
      hard_vocab_limit=False,
      bos_id=-1,
      eos_id=-1,
      unk_id=0,
      max_sentence_length=1 << 16,
      input_sentence_size=_SENTENCEPIECE_MAX_SENTENCES,
      shuffle_input_sentence=True,
      minloglevel=2,
    )
  except RuntimeError as error:
    message = " ".join(str(error).split())[:200]
    raise UserError(f"sentencepiece training failed ({message}); check --vocab_size and the corpus") from None
  processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
  pieces = [
    processor.id_to_piece(i)
    for i in range(processor.get_piece_size())
    if not (processor.is_unknown(i) or processor.is_control(i))
  ]
  characters = sorted({char for piece in pieces for char in piece if char != SENTENCEPIECE_WORD_START})
  vocab = list(specials)
  vocab += [form for char in characters for form in (char, CONTINUATION_PREFIX + char)]
  for piece in pieces:
    word_initial = piece.startswith(SENTENCEPIECE_WORD_START)
    text = piece.lstrip(SENTENCEPIECE_WORD_START)
    if len(text) > 1:
      vocab.append(text if word_initial else CONTINUATION_PREFIX + text)
  vocab = list(dict.fromkeys(vocab))  # "▁ab" and "ab" both exist only as distinct tokens; drop exact repeats
  return vocab[: max(vocab_size, len(specials) + 2 * len(characters))]


def build_vocab(
  input_pattern: str | Sequence[str],
  output: str | os.PathLike,
  vocab_size: int,
  cased: bool = False,
  method: str = "wordpiece",
  num_unused: int = 99,
  min_frequency: int = 2,
  limit_alphabet: int = 1000,
  sentencepiece_model_type: str = "unigram",
  overwrite: bool = False,
) -> list[str]:
  """Learns the vocabulary, writes it atomically to `output` and returns it."""
  if method not in METHODS:
    raise UserError(f"--method={method} is unknown; use one of {', '.join(METHODS)}")
  if num_unused < 0:
    raise UserError(f"--num_unused={num_unused} must be >= 0")
  if min_frequency < 1:
    raise UserError(f"--min_frequency={min_frequency} must be >= 1")
  specials = special_tokens(num_unused)
  if vocab_size <= len(specials):
    raise UserError(
      f"--vocab_size={vocab_size} leaves no room after the {len(specials)} special tokens "
      f"([PAD], {num_unused} [unused], [UNK], [CLS], [SEP], [MASK]); raise it or lower --num_unused"
    )
  output = as_path(output)
  if output.is_dir():
    raise UserError(f"--output={output} is a directory; pass a file path such as {output / 'vocab.txt'}")
  if output.exists() and not overwrite:
    raise UserError(f"--output={output} exists; choose another path or pass --overwrite")
  paths = expand_inputs(local_inputs(input_pattern, "--input"))  # gs:// inputs: read from local copies
  if next(iter_lines(paths), None) is None:
    raise UserError(
      f"--input={input_pattern} holds no text (all {len(paths)} files are empty or blank); pass the "
      "corpus in Google's format, one sentence per line"
    )

  if method == "wordpiece":
    vocab = train_wordpiece(iter_lines(paths), vocab_size, cased, specials, min_frequency, limit_alphabet)
  else:
    vocab = train_sentencepiece(iter_lines(paths), vocab_size, cased, specials, sentencepiece_model_type)
  if len(vocab) > vocab_size:
    raise UserError(
      f"--vocab_size={vocab_size} cannot hold the special tokens plus the corpus's single characters "
      f"({len(vocab)} entries needed); raise --vocab_size or lower --limit_alphabet"
    )
  if len(vocab) < vocab_size:
    logging.warning(
      "the vocabulary has %d entries, fewer than --vocab_size=%d: the corpus is too small to learn "
      "more pieces (use more text%s)",
      len(vocab),
      vocab_size,
      " or lower --min_frequency" if method == "wordpiece" else "",
    )
  with atomic_write(output) as handle:
    handle.write("".join(token + "\n" for token in vocab))
  logging.info(
    "wrote %s: %d entries (%s, %s), [UNK] id %d",
    output,
    len(vocab),
    method,
    "cased" if cased else "uncased",
    vocab.index(UNK),
  )
  return vocab


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string(
    "input",
    None,
    "Comma-separated globs of text files: one sentence per line, blank line between documents (Google's format).",
  )
  flags.DEFINE_string("output", None, "The vocab.txt to write.")
  flags.DEFINE_integer("vocab_size", 30522, "Number of entries, special tokens included.")
  flags.DEFINE_bool(
    "cased",
    False,
    "Keep case and accents (ClinicalBERT's BERT-Base cased setting); the default "
    "lower-cases and strips accents, like do_lower_case=True.",
  )
  flags.DEFINE_enum("method", "wordpiece", list(METHODS), "Learning algorithm.")
  flags.DEFINE_integer(
    "num_unused",
    99,
    "[unusedN] slots between [PAD] and [UNK]; 99 gives Google's ids ([UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103).",
  )
  flags.DEFINE_integer("min_frequency", 2, "wordpiece: minimum count of a pair to be merged into a piece.")
  flags.DEFINE_integer(
    "limit_alphabet",
    1000,
    "wordpiece: keep at most this many distinct characters (the most frequent); rarer ones become [UNK].",
  )
  flags.DEFINE_enum("sentencepiece_model_type", "unigram", ["unigram", "bpe"], "sentencepiece: model type.")
  flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")
  flags.mark_flags_as_required(["input", "output"])


def main(argv: Sequence[str]) -> None:
  build_vocab(
    FLAGS.input,
    FLAGS.output,
    FLAGS.vocab_size,
    cased=FLAGS.cased,
    method=FLAGS.method,
    num_unused=FLAGS.num_unused,
    min_frequency=FLAGS.min_frequency,
    limit_alphabet=FLAGS.limit_alphabet,
    sentencepiece_model_type=FLAGS.sentencepiece_model_type,
    overwrite=FLAGS.overwrite,
  )


if __name__ == "__main__":
  define_flags()
  run_absl(main)
