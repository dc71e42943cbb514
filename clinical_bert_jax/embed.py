"""Contextual embeddings from a BERT, and the paper's nearest-neighbour comparison of two models.

    python -m clinical_bert_jax.embed --model_dir=DIR --input=FILE.txt --output=OUT.npy \
        [--pooling=cls|mean] [--layer=-1] [--words]
    python -m clinical_bert_jax.embed neighbors --model_dir=A --model_dir_b=B [--queries=glucose,...] [--k=5]

Embeddings: one float32 row per non-blank input line (`--pooling=cls`: the [CLS] vector; `mean`: the mean over the
line's word pieces, [CLS]/[SEP] excluded), or with `--words` one row per whitespace word (the mean over that word's
pieces, computed in the context of its whole line). `--layer` indexes transformers' `hidden_states`: 0 is the
embedding layer, 1..L the encoder layers, -1 the last. OUT.npy is written with a JSON index OUT.index.json that maps
rows to 1-based input line numbers (and word positions) — never the text itself, which may be clinical.

Neighbours (paper Table 3; the paper does not say how its embeddings were taken, clinicalbert-paper.md §9): a word's
vector is the layer-L embedding of the word fed alone (`[CLS] word [SEP]`), averaged over its pieces; candidates are
the vocabulary's whole-word entries (no `##` continuation, no `[...]` special, at least one letter), embedded the same
way; similarity is cosine. A candidate that tokenises exactly like the query is skipped.
"""

from __future__ import annotations

from clinical_bert_jax import host_memory

if __name__ == "__main__":  # first, before anything below allocates: this may re-execute the command
  host_memory.use_transparent_huge_pages()

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import logging

from clinical_bert_jax import fileio, settings
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.eval_tasks.hf_checkpoint import (
  HfCheckpoint,
  WordPieceEncoder,
  load_pretrained,
  open_checkpoint,
  resolve_device,
)
from clinical_bert_jax.fileio import as_path, atomic_write, local_copy
from clinical_bert_jax.settings import setting
from clinical_bert_jax.vocab import CONTINUATION_PREFIX, is_bracketed_special

DEFAULT_QUERIES = [
  "glucose",
  "seizure",
  "pneumonia",
  "Transfer",
  "Admitted",
  "Discharge",
  "beach",
  "newspaper",
  "table",
]


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
  """The settings of both commands; each field is also the flag of the same name (settings.setting)."""

  model_dir: str | None = setting(None, help="Hugging Face BERT directory (neighbors: the first model).")
  model_dir_b: str | None = setting(None, help="neighbors: the second model's directory.")
  input: str | None = setting(None, help="UTF-8 text, one sentence per line (blank lines are skipped).")
  output: str | None = setting(None, help="Output .npy file; OUT.index.json is written next to it.")
  pooling: str = setting(
    "cls", choices=("cls", "mean"), help="Sentence vector: the [CLS] row or the mean over word pieces."
  )
  layer: int = setting(-1, help="hidden_states index: 0 embeddings, 1..L encoder layers, -1 the last layer.")
  words: bool = setting(False, help="One embedding per whitespace word (mean over its pieces) instead of per line.")
  max_seq_length: int | None = setting(
    None,
    help="Longest line in word pieces incl. [CLS]/[SEP] (default: the "
    "model's max_position_embeddings); longer lines are an error, not silently "
    "truncated.",
  )
  batch_size: int = setting(64, help="Sequences per forward pass.")
  device: str = setting("auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available.")
  queries: tuple[str, ...] = setting(
    tuple(DEFAULT_QUERIES),
    flag_type=list,
    parse=tuple,
    help="neighbors: query words (the paper's Table 3 words by default).",
  )
  k: int = setting(5, help="neighbors: neighbours per query.")


class Embedder:
  """A BERT encoder on a device that returns one hidden layer for batches of word-piece sequences."""

  def __init__(
    self, checkpoint: HfCheckpoint, device_name: str, layer: int, max_seq_length: int | None, batch_size: int
  ):
    from transformers import BertModel

    num_layers = checkpoint.config.num_hidden_layers
    if not -(num_layers + 1) <= layer <= num_layers:
      raise UserError(
        f"--layer={layer} is out of range for a {num_layers}-layer model; use 0..{num_layers} or -1..-{num_layers + 1}"
      )
    positions = checkpoint.config.max_position_embeddings
    self.max_seq_length = max_seq_length or positions
    if not 3 <= self.max_seq_length <= positions:
      raise UserError(
        f"--max_seq_length={self.max_seq_length} must be between 3 and the model's "
        f"max_position_embeddings ({positions})"
      )
    if batch_size <= 0:
      raise UserError(f"--batch_size={batch_size} must be positive")
    self.checkpoint, self.layer, self.batch_size = checkpoint, layer, batch_size
    self.encoder = WordPieceEncoder.for_checkpoint(checkpoint)
    self.device = resolve_device(device_name)
    self.model = load_pretrained(checkpoint, BertModel, add_pooling_layer=False).to(self.device).eval()

  def piece_vectors(self, sequences: Sequence[list[int]], description: str) -> list[np.ndarray]:
    """Layer outputs for each sequence of word pieces (wrapped in [CLS]/[SEP] here), [CLS] and [SEP] rows included.

    Sequences are batched by length, so padding stays small; the output keeps the input order.
    """
    import torch
    import tqdm

    outputs: list[np.ndarray | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    with torch.no_grad():
      for start in tqdm.trange(
        0, len(order), self.batch_size, desc=description, unit="batch", disable=None, leave=False
      ):
        chunk = order[start : start + self.batch_size]
        rows = [[self.encoder.cls_id, *sequences[index], self.encoder.sep_id] for index in chunk]
        length = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [self.encoder.pad_id] * (length - len(row)) for row in rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
        hidden = self.model(
          input_ids=input_ids.to(self.device),
          attention_mask=attention_mask.to(self.device),
          token_type_ids=torch.zeros_like(input_ids).to(self.device),
          output_hidden_states=True,
        ).hidden_states[self.layer]
        hidden = hidden.float().cpu().numpy()
        for row, index in enumerate(chunk):
          outputs[index] = hidden[row, : len(rows[row])]
    return outputs

  def _check_lengths(self, sequences: Sequence[list[int]], line_numbers: Sequence[int]) -> None:
    limit = self.max_seq_length - 2
    for pieces, line_number in zip(sequences, line_numbers):
      if len(pieces) > limit:
        raise UserError(
          f"input line {line_number} has {len(pieces)} word pieces, more than --max_seq_length="
          f"{self.max_seq_length} allows ({limit} plus [CLS] and [SEP]); split the line"
        )

  def sentence_embeddings(self, lines: Sequence[str], line_numbers: Sequence[int], pooling: str) -> np.ndarray:
    sequences = self.encoder.encode_texts(lines)
    self._check_lengths(sequences, line_numbers)
    vectors = self.piece_vectors(sequences, "sentences")
    if pooling == "cls":
      rows = [vector[0] for vector in vectors]
    else:
      rows = []
      for vector, line_number in zip(vectors, line_numbers):
        if len(vector) == 2:
          raise UserError(
            f"input line {line_number} has no word pieces to average (only control characters); "
            "remove it or use --pooling=cls"
          )
        rows.append(vector[1:-1].mean(axis=0))
    return np.stack(rows).astype(np.float32)

  def word_embeddings(self, lines: Sequence[str], line_numbers: Sequence[int]) -> tuple[np.ndarray, list[list[int]]]:
    """One row per whitespace word: the mean of its pieces in the context of its line; also [line, word] per row."""
    words = [line.split() for line in lines]
    encoded = self.encoder.encode_words(words)
    self._check_lengths([pieces for pieces, _ in encoded], line_numbers)
    vectors = self.piece_vectors([pieces for pieces, _ in encoded], "lines")
    rows, index = [], []
    for (pieces, word_ids), vector, line_words, line_number in zip(encoded, vectors, words, line_numbers):
      word_ids = np.asarray(word_ids)
      for word in range(len(line_words)):
        positions = np.flatnonzero(word_ids == word) + 1  # +1 skips [CLS]
        if positions.size == 0:
          raise UserError(
            f"input line {line_number}, word {word + 1} has no word pieces (only control characters); remove it"
          )
        rows.append(vector[positions].mean(axis=0))
        index.append([line_number, word + 1])
    return np.stack(rows).astype(np.float32), index


def read_lines(path: str) -> tuple[list[str], list[int]]:
  """Non-blank lines and their 1-based numbers."""
  try:
    with open(path, encoding="utf-8") as handle:
      numbered = [(line.rstrip("\n"), number) for number, line in enumerate(handle, start=1) if line.strip()]
  except FileNotFoundError:
    raise UserError(f"--input={path} not found; pass a UTF-8 text file with one sentence per line") from None
  except OSError as error:
    raise UserError(f"--input={path} cannot be read ({error.strerror}); pass a UTF-8 text file") from None
  except UnicodeDecodeError as error:
    raise UserError(f"--input={path} is not UTF-8 text (byte {error.start}); convert it first") from None
  if not numbered:
    raise UserError(f"--input={path} has no non-blank lines")
  return [line for line, _ in numbered], [number for _, number in numbered]


def index_path_for(output: str) -> Path:
  """OUT.index.json next to OUT.npy; refuses other output names before any work is done."""
  path = as_path(output)
  if path.suffix != ".npy":
    raise UserError(f"--output={output} must end with .npy")
  return path.with_suffix(".index.json")


def write_embeddings(output: str, array: np.ndarray, index: dict) -> Path:
  """Writes OUT.npy, then OUT.index.json: the index appears only after the complete array (it marks completion)."""
  path, index_path = as_path(output), index_path_for(output)
  # The inner block is renamed first on exit: the array, then the index.
  with atomic_write(index_path) as index_handle, atomic_write(path, mode="wb") as array_handle:
    np.save(array_handle, array)
    json.dump(index, index_handle, indent=1)
    index_handle.write("\n")
  return index_path


def vocabulary_words(tokens: Sequence[str]) -> list[str]:
  """Whole-word vocabulary entries that can be neighbours: no `##` pieces, no `[...]` specials, some letter."""
  return [
    token
    for token in dict.fromkeys(tokens)
    if token
    and not token.startswith(CONTINUATION_PREFIX)
    and not is_bracketed_special(token)
    and any(char.isalpha() for char in token)
  ]


def type_embeddings(embedder: Embedder, words: Sequence[str], description: str) -> np.ndarray:
  """Each word fed alone, mean over its pieces, L2-normalised (so dot products are cosines)."""
  sequences = embedder.encoder.encode_texts(words)
  vectors = embedder.piece_vectors(sequences, description)
  empty = [word for word, vector in zip(words, vectors) if len(vector) == 2]
  if empty:
    raise UserError(f"{len(empty)} {description} have no word pieces (e.g. {empty[0]!r}); pass words with letters")
  means = np.stack([vector[1:-1].mean(axis=0) for vector in vectors])
  return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def nearest_neighbors(embedder: Embedder, queries: Sequence[str], k: int) -> dict[str, list[str]]:
  candidates = vocabulary_words(list(embedder.encoder.tokenizer.vocab))
  candidate_vectors = type_embeddings(embedder, candidates, "vocabulary")
  query_vectors = type_embeddings(embedder, queries, "queries")
  candidate_pieces = embedder.encoder.encode_texts(candidates)
  neighbors = {}
  for query, query_vector, query_pieces in zip(queries, query_vectors, embedder.encoder.encode_texts(queries)):
    similarity = candidate_vectors @ query_vector
    ranked = []
    for index in np.argsort(-similarity, kind="stable"):
      if candidate_pieces[index] != query_pieces:
        ranked.append(candidates[index])
      if len(ranked) == k:
        break
    neighbors[query] = ranked
  return neighbors


def neighbors_table(names: Sequence[str], results: Sequence[dict[str, list[str]]], queries: Sequence[str]) -> str:
  header = "| query | " + " | ".join(names) + " |"
  lines = [header, "|---|" + "---|" * len(names)]
  for query in queries:
    lines.append(f"| {query} | " + " | ".join(", ".join(result[query]) for result in results) + " |")
  return "\n".join(lines)


def _resolved(path: str) -> str:
  return path if fileio.is_remote(path) else str(Path(path).resolve())


def run_embed(options: EmbedOptions) -> None:
  if not options.model_dir or not options.input or not options.output:
    raise UserError("embed needs --model_dir, --input and --output; see docs/evaluation.md")
  index_path_for(options.output)
  checkpoint = open_checkpoint(options.model_dir)
  embedder = Embedder(checkpoint, options.device, options.layer, options.max_seq_length, options.batch_size)
  lines, line_numbers = read_lines(str(local_copy(options.input, "--input")))
  index = {
    "model_dir": _resolved(options.model_dir),
    "do_lower_case": checkpoint.do_lower_case,
    "layer": options.layer,
    "input": _resolved(options.input),
  }
  if options.words:
    array, rows = embedder.word_embeddings(lines, line_numbers)
    index.update(unit="word", pooling="mean over the word's pieces", rows_line_word=rows)
  else:
    array = embedder.sentence_embeddings(lines, line_numbers, options.pooling)
    index.update(unit="line", pooling=options.pooling, rows_line=line_numbers)
  index.update(shape=list(array.shape), dtype=str(array.dtype))
  index_path = write_embeddings(options.output, array, index)
  print(f"wrote {array.shape[0]} × {array.shape[1]} embeddings to {options.output} (index {index_path})")


def run_neighbors(options: EmbedOptions) -> None:
  if not options.model_dir or not options.model_dir_b:
    raise UserError("neighbors needs --model_dir and --model_dir_b (the two models to compare)")
  if options.k <= 0:
    raise UserError(f"--k={options.k} must be positive")
  queries = [query.strip() for query in options.queries if query.strip()]
  if not queries:
    raise UserError("--queries is empty; pass a comma list of words")
  checkpoints = [open_checkpoint(options.model_dir), open_checkpoint(options.model_dir_b, flag="--model_dir_b")]
  results = []
  for checkpoint in checkpoints:
    embedder = Embedder(checkpoint, options.device, options.layer, None, options.batch_size)
    results.append(nearest_neighbors(embedder, queries, options.k))
    logging.info("%s: neighbours computed", checkpoint.directory)
  names = [checkpoint.name for checkpoint in checkpoints]
  if names[0] == names[1]:
    names = [str(checkpoint.directory) for checkpoint in checkpoints]
  print(
    f"Nearest vocabulary words (cosine, layer {options.layer}, words embedded alone, mean over pieces), k={options.k}"
  )
  print()
  print(neighbors_table(names, results, queries))


def main(argv: Sequence[str]) -> None:
  options = settings.from_flags(EmbedOptions)
  if len(argv) == 1:
    run_embed(options)
  elif argv[1:] == ["neighbors"]:
    run_neighbors(options)
  else:
    raise UserError(
      f"unexpected arguments {' '.join(argv[1:])}; usage: embed --model_dir=... --input=... "
      "--output=... or embed neighbors --model_dir=A --model_dir_b=B"
    )


def define_flags() -> None:
  """Flags are defined only when run as a program, so that importing this module never clashes with other tools."""
  settings.define_flags(EmbedOptions, __name__)


if __name__ == "__main__":
  define_flags()
  run_absl(main, positional_args=True)
