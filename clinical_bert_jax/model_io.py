"""Loading and saving BERT weights from every place users keep them.

`load_model(spec)` accepts:
  * our model directory (`flax_params.safetensors` + `config.json`),
  * a Hugging Face directory (`model.safetensors`, or `pytorch_model.bin` read with `weights_only=True`),
  * a training workdir of `clinical_bert_jax.pretrain` (orbax checkpoints under `checkpoints/`),
  * `tf:PREFIX` — a Google/BioBERT TF checkpoint (`--bert_config_file` needed; TensorFlow must be installed),
  and `hf:DIR` as an explicit form of the second. Nothing is ever unpickled without `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from clinical_bert_jax import weight_names
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.model import init_params, param_shapes
from clinical_bert_jax.vocab import read_do_lower_case, read_vocab, vocab_file_in, vocab_is_cased

OUR_PARAMS_FILE = "flax_params.safetensors"


@dataclasses.dataclass
class LoadedModel:
  config: BertConfig
  params: dict[str, Any]
  vocab_file: Path | None
  do_lower_case: bool | None
  source: str
  report: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  step: int | None = None
  trained_seq_length: int | None = None
  base_model: str | None = None  # Hub id of the model this one continued from, when known (model cards)


# ------------------------------------------------------------------------------------------------ vocab helpers
def check_vocab_matches(vocab_file: Path, config: BertConfig, source: str) -> None:
  tokens = read_vocab(vocab_file)
  if len(tokens) != config.vocab_size:
    raise UserError(
      f"{source}: vocab {vocab_file} has {len(tokens)} entries but the embedding has "
      f"{config.vocab_size} rows; pass the vocab the model was trained with"
    )


# ---------------------------------------------------------------------------------------------- reading tensors
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError) as error:
    raise UserError(f"{path} is not a readable safetensors file ({error}); re-download or re-export it") from None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(
      f"{path} is a PyTorch file and torch is not installed; pip install 'clinical_bert_jax[torch]' "
      "or convert it to model.safetensors"
    ) from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
    reason = " ".join(str(error).split())[:200]
    raise UserError(
      f"{path} cannot be loaded safely with weights_only=True ({reason}); it may contain pickled "
      "code — convert it to model.safetensors in a trusted environment"
    ) from None
  if not isinstance(state, dict):
    raise UserError(f"{path} does not hold a state dict")
  return {key: value.detach().float().numpy() for key, value in state.items() if hasattr(value, "detach")}


def _read_tf_checkpoint(prefix: str) -> dict[str, np.ndarray]:
  try:
    import tensorflow as tf  # noqa: F401  (heavy; only this path needs it)
  except ImportError:
    raise UserError(
      "reading a TF checkpoint needs TensorFlow: pip install 'clinical_bert_jax[tf]' (or tensorflow-cpu)"
    ) from None
  index = Path(prefix + ".index")
  if not index.is_file():
    raise UserError(f"TF checkpoint {prefix}: {index} not found; pass the prefix, e.g. DIR/bert_model.ckpt")
  try:
    reader = tf.train.load_checkpoint(prefix)
    names = reader.get_variable_to_shape_map()
    return {name: np.asarray(reader.get_tensor(name)) for name in names if not weight_names._IGNORED_TF.search(name)}
  except Exception as error:  # TF raises DataLossError / NotFoundError / OpError for broken checkpoints
    reason = " ".join(str(error).split())[:200]
    raise UserError(f"TF checkpoint {prefix} cannot be read ({reason})") from None


def _fresh_reference(config: BertConfig, seed: int = 0) -> dict[str, Any]:
  return jax.tree.map(np.asarray, init_params(config, jax.random.key(seed)))


# ------------------------------------------------------------------------------------------------------ loaders
def load_hf_dir(directory: Path, seed: int = 0) -> LoadedModel:
  config = BertConfig.load(directory / "config.json")
  if (directory / "model.safetensors").is_file():
    arrays = _read_safetensors(directory / "model.safetensors")
  elif (directory / "pytorch_model.bin").is_file():
    arrays = _read_torch_bin(directory / "pytorch_model.bin")
  else:
    found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
    raise UserError(f"{directory} has no model.safetensors or pytorch_model.bin (found: {found})")
  params, report = weight_names.params_from_named_arrays(arrays, _fresh_reference(config, seed), "pt", str(directory))
  vocab = vocab_file_in(directory)
  if vocab is not None:
    check_vocab_matches(vocab, config, str(directory))
  return LoadedModel(config, params, vocab, read_do_lower_case(directory, vocab), f"hf:{directory}", report)


def load_tf_checkpoint(
  prefix: str,
  bert_config_file: str | os.PathLike,
  vocab_file: str | os.PathLike | None = None,
  do_lower_case: bool | None = None,
  seed: int = 0,
) -> LoadedModel:
  from clinical_bert_jax import fileio

  remote_prefix = prefix
  if fileio.is_remote(prefix):  # gs://: the checkpoint's files (PREFIX.index, PREFIX.data-*) are copied down
    prefix = str(fileio.local_copy_prefix(prefix, "--init_checkpoint"))
  bert_config_file = fileio.local_copy(bert_config_file, "--bert_config_file")
  vocab_file = fileio.local_copy(vocab_file, "--vocab_file") if vocab_file else None
  config = BertConfig.load(bert_config_file)
  arrays = _read_tf_checkpoint(prefix)
  params, report = weight_names.params_from_named_arrays(
    arrays, _fresh_reference(config, seed), "tf", f"TF checkpoint {prefix}"
  )
  vocab = Path(vocab_file) if vocab_file else None
  if vocab is not None:
    check_vocab_matches(vocab, config, f"TF checkpoint {prefix}")
    if do_lower_case is None:
      do_lower_case = not vocab_is_cased(read_vocab(vocab))
  return LoadedModel(config, params, vocab, do_lower_case, f"tf:{remote_prefix}", report)


def load_our_dir(directory: Path) -> LoadedModel:
  config = BertConfig.load(directory / "config.json")
  params = check_params_match(
    weight_names.unflatten_params(_read_safetensors(directory / OUR_PARAMS_FILE)), config, str(directory)
  )
  vocab = vocab_file_in(directory)
  meta = _read_json(directory / "training_info.json")
  return LoadedModel(
    config,
    params,
    vocab,
    read_do_lower_case(directory, vocab),
    f"ours:{directory}",
    step=meta.get("step"),
    trained_seq_length=meta.get("max_seq_length"),
    base_model=hub_id_from_path(meta.get("init_checkpoint")),
  )


def check_params_match(params: dict[str, Any], config: BertConfig, source: str) -> dict[str, Any]:
  """Checks a parameter tree has exactly the tensors and shapes `config` implies (one-line error otherwise)."""
  shapes = {"/".join(path): tuple(s.shape) for path, s in flatten_dict(param_shapes(config)).items()}
  found = weight_names.flatten_params(params)
  missing = sorted(shapes.keys() - found.keys())
  unknown = sorted(found.keys() - shapes.keys())
  if missing or unknown:
    raise UserError(
      f"{source}: parameters do not match the config (missing: {', '.join(missing[:3]) or 'none'}; "
      f"unknown: {', '.join(unknown[:3]) or 'none'})"
    )
  for name, shape in shapes.items():
    if tuple(found[name].shape) != shape:
      raise UserError(f"{source}: tensor {name} has shape {list(found[name].shape)} but the config needs {list(shape)}")
  return params


def hub_id_from_path(spec: str | None) -> str | None:
  """`org/name` of a checkpoint path inside a Hugging Face cache (`.../models--org--name/snapshots/...`), else None.

  The only base model we can name without guessing: a local path is never written into a model card.
  """
  if not spec:
    return None
  for part in reversed(Path(spec.split(":", 1)[-1] if spec[:3] in ("hf:", "tf:") else spec).parts):
    if part.startswith("models--") and part.count("--") >= 2:
      return part.removeprefix("models--").replace("--", "/", 1)
  return None


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"{path} is not valid JSON") from None


def load_training_dir(workdir: Path, step: int | None = None) -> LoadedModel:
  """Params of a pretraining workdir at `step` (default: the latest complete checkpoint); local or `gs://` (its
  small files are copied down, the checkpoint is read in place and verified)."""
  from clinical_bert_jax import fileio
  from clinical_bert_jax.checkpointing import read_params, restorable_steps

  local_dir = workdir  # config.json, vocab.txt, ...: copied down from a gs:// workdir
  if fileio.is_remote(workdir):
    local_dir = fileio.local_files(workdir, ("config.json", "vocab.txt", "tokenizer_config.json", "training_info.json"))
  config = BertConfig.load(local_dir / "config.json")
  steps = restorable_steps(workdir)  # orbax's all_steps() also lists unfinished step directories
  if not steps:
    raise UserError(f"{workdir}/checkpoints holds no complete checkpoint; train first or pass another directory")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"{workdir}: no checkpoint at step {step}; available steps: {', '.join(map(str, steps))}")
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _fresh_reference(config))
  params = read_params(workdir, step, target)  # verified against the checksums saved with it
  vocab = vocab_file_in(local_dir)
  info = _read_json(local_dir / "training_info.json")
  return LoadedModel(
    config,
    params,
    vocab,
    read_do_lower_case(local_dir, vocab),
    f"workdir:{workdir}@{step}",
    step=step,
    trained_seq_length=info.get("max_seq_length"),
    base_model=hub_id_from_path(info.get("init_checkpoint")),
  )


def load_model(
  spec: str | os.PathLike, step: int | None = None, bert_config_file: str | None = None, vocab_file: str | None = None
) -> LoadedModel:
  """Loads any supported checkpoint (see the module docstring)."""
  spec = str(spec)
  if spec.startswith("tf:"):
    if not bert_config_file:
      raise UserError(f"--init_checkpoint={spec} needs --bert_config_file (the checkpoint's bert_config.json)")
    return load_tf_checkpoint(spec[3:], bert_config_file, vocab_file)
  explicit_hf = spec.startswith("hf:")
  from clinical_bert_jax import fileio

  directory = fileio.as_path(spec[3:] if explicit_hf else spec)
  if fileio.is_remote(directory):  # gs://: a workdir's checkpoint is read in place, other directories copied down
    fileio.check_bucket(directory, "checkpoint")
    if (directory / "checkpoints").is_dir() and not explicit_hf:
      return load_training_dir(directory, step)
    if not directory.is_dir():
      raise UserError(f"checkpoint {directory} not found or not a directory")
    directory = fileio.local_copy(directory, "checkpoint")
  if not directory.is_dir():
    raise UserError(f"checkpoint {directory} not found or not a directory")
  if (directory / "checkpoints").is_dir() and not explicit_hf:
    return load_training_dir(directory, step)
  if (directory / OUR_PARAMS_FILE).is_file() and not explicit_hf:
    return load_our_dir(directory)
  if not (directory / "config.json").is_file():
    raise UserError(
      f"{directory} is not a BERT checkpoint: no config.json (expected an HF model dir, one of ours, "
      "or a pretraining workdir)"
    )
  return load_hf_dir(directory)


# ------------------------------------------------------------------------------------------------------ writers
def save_our_dir(loaded: LoadedModel, directory: Path) -> None:
  """Writes config.json, flax_params.safetensors, vocab.txt and tokenizer_config.json into `directory`."""
  import shutil

  from safetensors.numpy import save_file

  loaded.config.save_hf(directory / "config.json")
  save_file(
    {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weight_names.flatten_params(loaded.params).items()},
    str(directory / OUR_PARAMS_FILE),
    metadata={"format": "flax", "producer": "clinical_bert_jax"},
  )
  if loaded.vocab_file is not None:
    shutil.copyfile(loaded.vocab_file, directory / "vocab.txt")
  if loaded.do_lower_case is not None:
    (directory / "tokenizer_config.json").write_text(
      json.dumps({"do_lower_case": loaded.do_lower_case}) + "\n", encoding="utf-8"
    )
