"""BertConfig reads and writes both the Hugging Face and the Google format without losing a field."""

import json

import pytest
import transformers

from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError


def test_round_trips_through_hf_and_google_files(tmp_path):
  config = BertConfig(vocab_size=28996, hidden_act="gelu_new", type_vocab_size=2, max_position_embeddings=256)
  config.save_hf(tmp_path / "config.json")
  config.save_google(tmp_path / "bert_config.json")
  assert BertConfig.load(tmp_path / "config.json") == config
  assert BertConfig.load(tmp_path / "bert_config.json") == config  # layer_norm_eps: TF's 1e-12 is the default
  assert "layer_norm_eps" not in json.loads((tmp_path / "bert_config.json").read_text())
  hf = transformers.BertConfig.from_pretrained(str(tmp_path))
  assert (hf.hidden_act, hf.vocab_size, hf.max_position_embeddings, hf.layer_norm_eps) == (
    "gelu_new",
    28996,
    256,
    1e-12,
  )


@pytest.mark.parametrize(
  "content, fragment",
  [
    ({"hidden_size": 32}, "missing vocab_size"),
    (
      {"vocab_size": 10, "hidden_size": 30, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 8},
      "not divisible",
    ),
    (
      {
        "vocab_size": 10,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 8,
        "hidden_act": "swish",
      },
      "hidden_act='swish'",
    ),
    (
      {
        "vocab_size": 10,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 8,
        "model_type": "roberta",
      },
      "model_type='roberta'",
    ),
  ],
)
def test_bad_configs_name_the_problem(tmp_path, content, fragment):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(content))
  with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
    BertConfig.load(path)
