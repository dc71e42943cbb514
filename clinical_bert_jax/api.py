"""The small Python API: load any supported checkpoint, run it on text, get hidden states and logits.

    import clinical_bert_jax as cbj
    bert = cbj.load("hf/discharge_bert")          # HF dir, one of ours, a pretraining workdir, or "tf:PREFIX"
    out = bert.encode(["Patient admitted with chest pain."], output_hidden_states=True)
    out["sequence_output"], out["pooled_output"], out["mlm_logits"], out["nsp_logits"], out["hidden_states"]
    bert.fill_mask("The patient was [MASK] to the ICU.")   # [(token, probability), ...]

Tokenisation is Google's FullTokenizer (clinical_bert_jax.tokenization) with the casing recorded with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.model import BertForPreTraining
from clinical_bert_jax.model_io import LoadedModel, load_model
from clinical_bert_jax.vocab import CLS_TOKEN, MASK_TOKEN, SEP_TOKEN


@dataclasses.dataclass
class Bert:
  loaded: LoadedModel

  @property
  def config(self):
    return self.loaded.config

  @cached_property
  def tokenizer(self):
    from clinical_bert_jax.tokenization import FullTokenizer

    if self.loaded.vocab_file is None:
      raise UserError(f"{self.loaded.source} has neither vocab.txt nor tokenizer.json; cannot tokenise text")
    return FullTokenizer(self.loaded.vocab_file, do_lower_case=bool(self.loaded.do_lower_case))

  @cached_property
  def _apply(self):
    module = BertForPreTraining(self.config)
    return jax.jit(
      lambda params, ids, mask, types, hidden: module.apply(
        {"params": params}, ids, mask, types, output_hidden_states=hidden
      ),
      static_argnums=4,
    )

  def _special_id(self, token: str) -> int:
    ids = self.tokenizer.convert_tokens_to_ids([token])
    return ids[0]

  def _pieces(self, text: str) -> list[int]:
    """Token ids of `text`; a literal [MASK] stays one token (Google's tokenizer would split it into [, MASK, ])."""
    parts = text.split(MASK_TOKEN)
    ids: list[int] = []
    for index, part in enumerate(parts):
      if index:
        ids.append(self._special_id(MASK_TOKEN))
      ids.extend(self.tokenizer.encode_batch([part])[0] if part.strip() else [])
    return ids

  def batch(
    self, texts: Sequence[str], pairs: Sequence[str] | None = None, max_length: int = 128
  ) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] (B [SEP])`, segment ids, padding mask; sequences longer than max_length are truncated."""
    cls_id, sep_id = self._special_id(CLS_TOKEN), self._special_id(SEP_TOKEN)
    rows = []
    for index, text in enumerate(texts):
      first = self._pieces(text)
      second = self._pieces(pairs[index]) if pairs is not None else []
      budget = max_length - (3 if pairs is not None else 2)
      while len(first) + len(second) > budget:  # longest-first, like BERT's fine-tuning code
        (first if len(first) >= len(second) else second).pop()
      ids = [cls_id, *first, sep_id] + ([*second, sep_id] if pairs is not None else [])
      types = [0] * (len(first) + 2) + [1] * (len(ids) - len(first) - 2)
      rows.append((ids, types))
    length = max(len(ids) for ids, _ in rows)
    input_ids = np.zeros((len(rows), length), np.int32)
    token_types = np.zeros_like(input_ids)
    mask = np.zeros_like(input_ids)
    for row, (ids, types) in enumerate(rows):
      input_ids[row, : len(ids)], token_types[row, : len(ids)], mask[row, : len(ids)] = ids, types, 1
    return {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask}

  def encode(
    self,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int = 128,
    output_hidden_states: bool = False,
  ) -> dict[str, Any]:
    """Runs the model (eval mode). Returns numpy arrays plus the inputs used."""
    inputs = self.batch(texts, pairs, max_length)
    outputs = self._apply(
      self.loaded.params,
      jnp.asarray(inputs["input_ids"]),
      jnp.asarray(inputs["attention_mask"]),
      jnp.asarray(inputs["token_type_ids"]),
      output_hidden_states,
    )
    return {**inputs, **jax.tree.map(np.asarray, outputs)}

  def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, the top_k tokens and their probabilities."""
    outputs = self.encode([text])
    positions = np.flatnonzero(outputs["input_ids"][0] == self._special_id(MASK_TOKEN))
    if positions.size == 0:
      raise UserError("fill_mask needs at least one [MASK] in the text")
    results = []
    for position in positions:
      probabilities = np.asarray(jax.nn.softmax(outputs["mlm_logits"][0, position]))
      best = np.argsort(-probabilities)[:top_k]
      tokens = self.tokenizer.convert_ids_to_tokens(best.tolist())
      results.append([(token, float(probabilities[i])) for token, i in zip(tokens, best)])
    return results


def load(
  path: str | os.PathLike, step: int | None = None, bert_config_file: str | None = None, vocab_file: str | None = None
) -> Bert:
  """Loads an HF directory, one of ours, a pretraining workdir (latest or `step`) or `tf:PREFIX`."""
  loaded = load_model(path, step=step, bert_config_file=bert_config_file, vocab_file=vocab_file)
  return Bert(loaded)
