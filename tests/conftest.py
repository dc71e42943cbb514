"""Test-wide settings: CPU only, 8 simulated devices for parallelism tests, no network, quiet TensorFlow."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment is set)

CASED_WORDS = [
  "Patient",
  "patient",
  "Admitted",
  "admitted",
  "with",
  "chest",
  "pain",
  "the",
  "The",
  "was",
  "is",
  "Discharge",
  "discharged",
  "home",
  "on",
  "aspirin",
  "Aspirin",
  "mg",
  ".",
  ",",
  "##s",
  "##ed",
  "and",
]


def write_cased_vocab(path, size: int) -> list[str]:
  """A small cased BERT vocab: specials, a few clinical words, then [unusedN] up to `size` entries."""
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CASED_WORDS
  tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
  path.write_text("\n".join(tokens) + "\n")
  return tokens


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
  """A random cased transformers BertForPreTraining saved with save_pretrained, heads with non-zero biases."""
  import torch
  import transformers

  directory = tmp_path_factory.mktemp("tiny_hf")
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
  )
  torch_model = transformers.BertForPreTraining(config)
  with torch.no_grad():
    torch_model.cls.predictions.bias.add_(torch.randn(40))
  torch_model.save_pretrained(directory)
  write_cased_vocab(directory / "vocab.txt", 40)
  return directory
