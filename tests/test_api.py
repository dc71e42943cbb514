"""The Python API returns what transformers returns for the same checkpoint and text."""

import numpy as np
import pytest
import torch
import transformers

import clinical_bert_jax as cbj

pytestmark = pytest.mark.slow  # loads a real BERT and runs it


def test_encode_matches_transformers_and_fill_mask_ranks(tiny_hf_dir):
  bert = cbj.load(tiny_hf_dir)
  assert bert.loaded.do_lower_case is False  # no tokenizer_config.json: the cased vocab decides
  out = bert.encode(
    ["Patient admitted with chest pain .", "The patient was discharged home"],
    pairs=["Aspirin mg", "with aspirin"],
    output_hidden_states=True,
  )
  assert out["input_ids"][0, 1] == bert.tokenizer.vocab["Patient"]  # case kept
  reference = transformers.BertForPreTraining.from_pretrained(str(tiny_hf_dir)).eval()
  with torch.no_grad():
    theirs = reference(
      input_ids=torch.tensor(out["input_ids"]),
      attention_mask=torch.tensor(out["attention_mask"]),
      token_type_ids=torch.tensor(out["token_type_ids"]),
      output_hidden_states=True,
    )
  real = out["attention_mask"].astype(bool)
  assert len(out["hidden_states"]) == len(theirs.hidden_states) == 3
  for ours_layer, their_layer in zip(out["hidden_states"], theirs.hidden_states):
    np.testing.assert_allclose(ours_layer[real], their_layer.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(out["nsp_logits"], theirs.seq_relationship_logits.numpy(), atol=1e-4)
  assert set(np.unique(out["token_type_ids"][real])) == {0, 1}

  (predictions,) = bert.fill_mask("The Patient was [MASK] home")
  assert len(predictions) == 5
  probabilities = [p for _, p in predictions]
  assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
