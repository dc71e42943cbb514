"""Checkpoint conversion: Hugging Face ⇄ ours ⇄ Google TF.

  python -m clinical_bert_jax.convert from_hf --model_dir=DIR --output_dir=OUT
  python -m clinical_bert_jax.convert from_tf --tf_checkpoint=PREFIX --bert_config=FILE [--vocab_file=F] \
      --output_dir=OUT
  python -m clinical_bert_jax.convert to_hf --checkpoint_dir=DIR [--step=N] --output_dir=OUT

`to_hf` writes what `transformers` users expect (config.json, model.safetensors, vocab.txt, tokenizer.json,
tokenizer_config.json with the right `do_lower_case`, special_tokens_map.json, a model card with Hub metadata) and,
when transformers is installed, reloads the export in PyTorch and compares its logits with the Flax model before the
output directory appears. An export whose logits differ never lands — the failure mode of earlier Flax exports
(transformers #12506, #26813).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import flags, logging

from clinical_bert_jax import dp, hf_tokenizer_json, model_io, weight_names
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import as_path, atomic_output_dir, local_copy
from clinical_bert_jax.vocab import TOKENIZER_JSON, special_tokens_map

FLAGS = flags.FLAGS
PARITY_TOLERANCE = 1e-3  # max abs logit difference, fp32 on CPU (observed ~1e-5)
COMMANDS = ("from_hf", "from_tf", "to_hf")


# ------------------------------------------------------------------------------------------------ export to HF
def _tokenizer_files(do_lower_case: bool, model_max_length: int) -> dict[str, Any]:
  special = special_tokens_map()
  tokenizer_config = {
    "tokenizer_class": "BertTokenizer",
    "do_lower_case": do_lower_case,
    "strip_accents": None,
    "tokenize_chinese_chars": True,
    "model_max_length": model_max_length,
    "clean_up_tokenization_spaces": False,
    **special,
  }
  return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}


def _model_card(
  loaded: model_io.LoadedModel, do_lower_case: bool, model_max_length: int, base_model: str | None = None
) -> str:
  """README.md with Hub metadata; no local path (the card travels with the weights)."""
  config = loaded.config
  trained = loaded.trained_seq_length
  base_model = base_model or loaded.base_model
  source_kind = loaded.source.split(":", 1)[0]
  metadata = [
    "---",
    "language: en",
    "library_name: transformers",
    "pipeline_tag: fill-mask",
    "tags: [bert, clinical, fill-mask, clinical_bert_jax]",
  ]
  if base_model:
    metadata.append(f"base_model: {base_model}")
  metadata += [
    "# license: set the licence before publishing (that of the base model and of your training data's "
    "data use agreement)",
    "---",
  ]
  lines = metadata + [
    "",
    "# BERT exported by clinical_bert_jax",
    "",
    f"- Exported from: a clinical_bert_jax {'pretraining run' if source_kind == 'workdir' else 'checkpoint'}"
    + (f", training step {loaded.step}" if loaded.step is not None else "")
    + (f", continued from `{base_model}`" if base_model else ""),
    f"- Architecture: BERT, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
    f"{config.num_attention_heads} heads, vocab {config.vocab_size}, `hidden_act={config.hidden_act}` "
    f"({'exact erf GELU' if config.hidden_act == 'gelu' else config.hidden_act}; see docs/conversion.md)",
    f"- Tokenizer: WordPiece, {'uncased (lower-cased)' if do_lower_case else 'cased (case is kept)'}; "
    f"`model_max_length={model_max_length}`. " + hf_tokenizer_json.MODEL_CARD_TOKENIZER_NOTE,
  ]
  if trained:
    lines.append(
      f"- Sequence length during pretraining: {trained}. Positions beyond {trained} were not updated by "
      "this pretraining run; prefer inputs of at most that length."
    )
  lines += [
    "- Training data: see the `flags.txt` and data manifest of the pretraining run (the notes themselves are "
    "credentialed and not included).",
    "",
    *dp.model_card_lines(loaded.source, loaded.step),
    "## Load",
    "",
    "```python",
    "from transformers import AutoTokenizer, AutoModelForMaskedLM",
    'tokenizer = AutoTokenizer.from_pretrained("PATH")',
    'model = AutoModelForMaskedLM.from_pretrained("PATH")',
    "```",
    "",
    "Clinical text is protected health information: do not publish a model trained on credentialed notes unless "
    "your data use agreement allows it.",
    "",
  ]
  return "\n".join(lines)


def _verify_export(directory: Path, loaded: model_io.LoadedModel) -> float:
  """Reloads the export with transformers and compares logits with the Flax model; returns the max difference."""
  import jax.numpy as jnp
  import torch
  import transformers

  from clinical_bert_jax.model import BertForPreTraining

  torch_model, info = transformers.BertForPreTraining.from_pretrained(str(directory), output_loading_info=True)
  problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
  if problems:
    raise UserError(f"export check failed: transformers reports {problems}; the export was not written")
  config = loaded.config
  rng = np.random.default_rng(0)
  length = min(16, config.max_position_embeddings)
  ids = rng.integers(0, config.vocab_size, size=(2, length))
  mask = np.ones_like(ids)
  mask[1, length // 2 :] = 0
  segments = (np.arange(length)[None, :] >= length // 3).astype(np.int64) * mask
  with torch.no_grad():
    theirs = torch_model.eval()(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(segments)
    )
  ours = BertForPreTraining(config).apply(
    {"params": loaded.params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments)
  )
  real = mask.astype(bool)
  difference = max(
    float(np.max(np.abs(np.asarray(ours["mlm_logits"])[real] - theirs.prediction_logits.numpy()[real]))),
    float(np.max(np.abs(np.asarray(ours["nsp_logits"]) - theirs.seq_relationship_logits.numpy()))),
  )
  if not difference <= PARITY_TOLERANCE:
    raise UserError(
      f"export check failed: PyTorch logits differ from Flax by {difference:.3g} "
      f"(> {PARITY_TOLERANCE}); the export was not written"
    )
  return difference


def export_hf(
  loaded: model_io.LoadedModel,
  output_dir: str | Path,
  *,
  overwrite: bool = False,
  do_lower_case: bool | None = None,
  model_max_length: int | None = None,
  verify: bool = True,
  base_model: str | None = None,
) -> Path:
  """Writes `loaded` as a Hugging Face BertForPreTraining directory (atomically) and returns its path."""
  from safetensors.numpy import save_file

  if loaded.vocab_file is None:
    raise UserError(f"{loaded.source} has neither vocab.txt nor tokenizer.json; pass --vocab_file")
  model_io.check_vocab_matches(loaded.vocab_file, loaded.config, loaded.source)
  if do_lower_case is None:
    do_lower_case = loaded.do_lower_case
  if do_lower_case is None:
    do_lower_case = not model_io.vocab_is_cased(model_io.read_vocab(loaded.vocab_file))
  model_max_length = model_max_length or loaded.config.max_position_embeddings
  with atomic_output_dir(output_dir, overwrite) as staging:
    loaded.config.save_hf(staging / "config.json")
    tensors = weight_names.named_arrays_from_params(loaded.params, "pt")
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(loaded.vocab_file, staging / "vocab.txt")
    (staging / TOKENIZER_JSON).write_text(
      hf_tokenizer_json.tokenizer_json_for(model_io.read_vocab(loaded.vocab_file), do_lower_case), encoding="utf-8"
    )
    for name, content in _tokenizer_files(do_lower_case, model_max_length).items():
      (staging / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    card = _model_card(loaded, do_lower_case, model_max_length, base_model)
    (staging / "README.md").write_text(card, encoding="utf-8")
    if verify:
      try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
      except ImportError:
        logging.warning("transformers/torch not installed: export written without the PyTorch logits check")
      else:
        difference = _verify_export(staging, loaded)
        logging.info("export check: PyTorch and Flax logits agree (max abs difference %.2e)", difference)
  return as_path(output_dir)


# --------------------------------------------------------------------------------------------------- commands
def define_flags() -> None:
  """Defined only when run as a program, so importing `export_hf` adds no flags to another tool's command line."""
  flags.DEFINE_string("model_dir", None, "from_hf: Hugging Face BERT directory.")
  flags.DEFINE_string("tf_checkpoint", None, "from_tf: TF checkpoint prefix, e.g. DIR/bert_model.ckpt.")
  flags.DEFINE_string("bert_config", None, "from_tf: Google bert_config.json.")
  flags.DEFINE_string("vocab_file", None, "from_tf/to_hf: vocab.txt to ship with the output.")
  flags.DEFINE_string("checkpoint_dir", None, "to_hf: a pretraining workdir or one of our model directories.")
  flags.DEFINE_integer("step", None, "to_hf: checkpoint step (default: latest).")
  flags.DEFINE_string("output_dir", None, "Where to write the converted model.")
  flags.DEFINE_boolean("overwrite", False, "Replace a non-empty output directory.")
  flags.DEFINE_enum(
    "do_lower_case",
    "auto",
    ["auto", "true", "false"],
    "Tokenizer casing to record; auto = from tokenizer_config.json or the vocab.",
  )
  flags.DEFINE_integer(
    "model_max_length", None, "to_hf: tokenizer model_max_length (default: max_position_embeddings)."
  )
  flags.DEFINE_string(
    "base_model",
    None,
    "to_hf: Hub id of the model this one was continued from, for the model "
    "card (default: read from a Hugging Face cache path of the run's init checkpoint, else none).",
  )
  flags.DEFINE_boolean("verify", True, "to_hf: reload in transformers and compare logits with Flax.")


def _required(flag: str, command: str) -> str:
  value = getattr(FLAGS, flag)
  if not value:
    raise UserError(f"{command} needs --{flag}")
  return value


def _casing_flag() -> bool | None:
  return {"auto": None, "true": True, "false": False}[FLAGS.do_lower_case]


def _write_ours(loaded: model_io.LoadedModel, output_dir: str) -> None:
  casing = _casing_flag()
  if casing is not None:
    loaded.do_lower_case = casing
  with atomic_output_dir(output_dir, FLAGS.overwrite) as staging:
    model_io.save_our_dir(loaded, staging)
  if loaded.report.get("initialised"):
    print(
      f"note: the checkpoint has no pretraining heads; freshly initialised: {', '.join(loaded.report['initialised'])}"
    )
  if loaded.report.get("skipped"):
    print(f"note: skipped task-specific tensors: {', '.join(loaded.report['skipped'])}")
  print(
    f"wrote {output_dir} ({loaded.config.num_hidden_layers} layers, vocab {loaded.config.vocab_size}, "
    f"{'uncased' if loaded.do_lower_case else 'cased' if loaded.do_lower_case is not None else 'casing unknown'})"
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UserError(
      f"usage: python -m clinical_bert_jax.convert {{{','.join(COMMANDS)}}} --flags...; "
      f"got {' '.join(argv[1:]) or 'no command'}"
    )
  command = argv[1]
  output_dir = _required("output_dir", command)
  if command == "from_hf":
    directory = local_copy(_required("model_dir", command), "--model_dir")
    if not directory.is_dir():
      raise UserError(f"--model_dir={directory} not found or not a directory")
    if not (directory / "config.json").is_file():
      raise UserError(f"--model_dir={directory} has no config.json; it is not a Hugging Face BERT directory")
    _write_ours(model_io.load_hf_dir(directory), output_dir)
  elif command == "from_tf":
    loaded = model_io.load_tf_checkpoint(
      _required("tf_checkpoint", command), _required("bert_config", command), FLAGS.vocab_file
    )
    _write_ours(loaded, output_dir)
  else:
    loaded = model_io.load_model(_required("checkpoint_dir", command), step=FLAGS.step)
    if FLAGS.vocab_file:
      loaded.vocab_file = local_copy(FLAGS.vocab_file, "--vocab_file")
    export_hf(
      loaded,
      output_dir,
      overwrite=FLAGS.overwrite,
      do_lower_case=_casing_flag(),
      model_max_length=FLAGS.model_max_length,
      verify=FLAGS.verify,
      base_model=FLAGS.base_model,
    )
    print(
      f"wrote {output_dir}: config.json, model.safetensors, vocab.txt, tokenizer.json, tokenizer_config.json, README.md"
    )


if __name__ == "__main__":
  define_flags()
  run_absl(main, positional_args=True)
