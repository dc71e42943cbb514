"""One name table between our Flax parameters, Hugging Face PyTorch state dicts and Google TF checkpoints.

Every rule of bert-pretraining.md §7 lives here once: kernels are [in, out] in Flax and TF but [out, in] in PyTorch;
LayerNorm is scale/bias (Flax), weight/bias (PyTorch), gamma/beta (TF); the MLM decoder is tied to the word embeddings
and stored nowhere but there; the NSP matrix is `output_weights` [2, H] in TF (PyTorch layout, no transpose).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from clinical_bert_jax.errors import UserError

# Tensors a checkpoint may carry that are not parameters of ours: buffers, the tied decoder duplicates, optimizer
# slots and step counters. They are skipped silently.
_IGNORED_PT = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.(weight|bias)$")
_IGNORED_TF = re.compile(r"(adam_m|adam_v|AdamWeightDecayOptimizer|global_step|beta1_power|beta2_power)")
# Task heads of fine-tuned checkpoints: not part of a pretraining model; skipped with a note.
_TASK_HEADS = re.compile(r"^(classifier|qa_outputs|output_weights|output_bias|squad|cls/squad|loss)")


def flax_to_pt(path: tuple[str, ...]) -> tuple[str, bool]:
  """HF PyTorch key of a Flax parameter path, and whether the array is transposed between the two."""
  *parents, leaf = path
  transpose = leaf == "kernel"
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join([*parents, leaf]), transpose


def flax_to_tf(path: tuple[str, ...]) -> tuple[str, bool]:
  """Google TF variable name of a Flax parameter path, and whether the array is transposed between the two."""
  if path == ("cls", "predictions", "bias"):
    return "cls/predictions/output_bias", False
  if path[:2] == ("cls", "seq_relationship"):
    if path[2] == "kernel":
      return "cls/seq_relationship/output_weights", True
    return "cls/seq_relationship/output_bias", False
  parts = list(path)
  if parts[-1] == "embedding":
    parts.pop()
  elif parts[-2] == "LayerNorm":
    parts[-1] = {"scale": "gamma", "bias": "beta"}[parts[-1]]
  name = "/".join(parts)
  return re.sub(r"/layer/(\d+)/", r"/layer_\1/", name), False


def _normalise_pt_key(key: str) -> str:
  """Adds the `bert.` prefix of BertModel-only checkpoints and maps old gamma/beta LayerNorm names."""
  if not key.startswith(("bert.", "cls.")) and not _TASK_HEADS.match(key):
    key = "bert." + key
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def params_from_named_arrays(
  arrays: Mapping[str, np.ndarray], reference: Mapping[str, Any], naming: str, source: str
) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Builds our parameter tree from a checkpoint's named arrays.

  `reference` is a full parameter tree (fresh initialisation) that supplies shapes and the values of heads the
  checkpoint lacks. Returns (params, report) where report lists `initialised` (fresh heads), `skipped` (task heads).
  Errors (one line, naming tensors and shapes): an encoder tensor missing, an unknown tensor, a shape mismatch.
  """
  if naming == "pt":
    name_of, ignored = flax_to_pt, _IGNORED_PT
    arrays = {_normalise_pt_key(key): value for key, value in arrays.items()}
  elif naming == "tf":
    name_of, ignored = flax_to_tf, _IGNORED_TF
  else:
    raise ValueError(naming)
  flat_reference = flatten_dict(reference)
  used, missing, initialised, params = set(), [], [], {}
  for path, ref in flat_reference.items():
    name, transpose = name_of(path)
    if name not in arrays:
      if path[0] == "cls":
        initialised.append(name)
        params[path] = np.asarray(ref)
        continue
      missing.append(name)
      continue
    value = np.asarray(arrays[name])
    value = value.T if transpose else value
    if value.shape != tuple(ref.shape):
      raise UserError(
        f"{source}: tensor {name} has shape {list(value.shape)} but the config needs "
        f"{list(ref.shape)}; check that the config matches the checkpoint"
      )
    params[path] = value.astype(np.float32)
    used.add(name)
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise UserError(f"{source}: missing tensors {shown}; is this a BERT checkpoint of the configured size?")
  leftover = [name for name in arrays if name not in used and not ignored.search(name)]
  skipped = [name for name in leftover if _TASK_HEADS.match(name)]
  unknown = [name for name in leftover if not _TASK_HEADS.match(name)]
  if unknown:
    shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    raise UserError(f"{source}: unknown tensors {shown}; only BERT pretraining checkpoints are supported")
  return unflatten_dict(params), {"initialised": initialised, "skipped": skipped}


def named_arrays_from_params(params: Mapping[str, Any], naming: str = "pt") -> dict[str, np.ndarray]:
  """Flattens our params into HF PyTorch (or TF) names, fp32, without the tied decoder duplicates."""
  name_of: Callable = flax_to_pt if naming == "pt" else flax_to_tf
  out = {}
  for path, value in flatten_dict(params).items():
    name, transpose = name_of(path)
    value = np.asarray(value, dtype=np.float32)
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """`a/b/c` keys for our own safetensors files."""
  return {"/".join(path): np.asarray(value) for path, value in flatten_dict(params).items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  return unflatten_dict({tuple(key.split("/")): value for key, value in flat.items()})
