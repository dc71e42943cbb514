"""Privacy audit of a masked language model before its weights are shared (docs/privacy.md).

    python -m clinical_bert_jax.audit exposure --model=DIR --canary_file=canaries.jsonl --output_dir=OUT
    python -m clinical_bert_jax.audit membership --model=DIR --member_files=GLOB --non_member_files=GLOB \\
        [--reference_model=DIR] --output_dir=OUT
    python -m clinical_bert_jax.audit associations --model=DIR --pairs_file=names.tsv --output_dir=OUT

`--model` is anything `model_io.load_model` reads: our model directory, a Hugging Face directory, a pretraining
workdir (`--step`), `tf:PREFIX`. Every score is a masked-LM log-probability: the sequence with one token replaced by
[MASK], the log-probability of the original token there (the pseudo-log-likelihood of Salazar et al. 2020 when
summed over tokens). Rows are batched and run through one jitted function on the default device.

* exposure (Carlini et al. 2019): for each canary of `data_prep.canaries`, the secret's score (summed over its
  tokens, each masked in turn) is ranked among `--num_candidates` other secrets of the same format drawn at random;
  exposure = log2|R| − log2 rank with |R| = num_candidates + 1 (so at most log2|R|; about 1 bit on average for a
  canary the model never saw). Reported per repetition count.
* membership: scores member and non-member sentences (mean per-token pseudo-log-likelihood). Score-only attack: the
  target's score (Yeom et al.; Mireshghallah et al.'s baseline); likelihood-ratio attack: target minus a reference
  model's score (Mireshghallah et al. 2022; the reference should be trained on disjoint data of the same
  distribution). ROC AUC and TPR at 1% and 0.1% FPR; roc.png.
* associations (Lehman et al. 2021): for each (name, condition) pair, every condition's score after the name minus
  its score after a neutral subject (the base rate); the probe AUC separates true conditions from the others.

Outputs go to --output_dir atomically: audit.json (numbers), audit.md (tables, plots). Only ids and file:line are
ever printed: sentence text stays out of outputs, errors and logs.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from clinical_bert_jax import model_io
from clinical_bert_jax.canary_file import read_canary_file
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_output_dir
from clinical_bert_jax.model import BertForPreTraining
from clinical_bert_jax.vocab import CLS_TOKEN, MASK_TOKEN, SEP_TOKEN, UNK_TOKEN

SUBCOMMANDS = ("exposure", "membership", "associations")
AUDIT_FORMAT = "clinical_bert_jax.audit/1"
FPR_POINTS = (0.01, 0.001)
DEFAULT_PROBE_TEMPLATE = "{name} was diagnosed with {condition} ."
DEFAULT_BASE_SUBJECT = "The patient"


# ------------------------------------------------------------------------------------------------------- scoring
class Scorer:
  """Masked-token log-probabilities of one model, batched and jitted."""

  def __init__(self, loaded: model_io.LoadedModel, batch_size: int = 256, max_seq_length: int = 128):
    from clinical_bert_jax.tokenization import FullTokenizer

    if loaded.vocab_file is None:
      raise UserError(f"{loaded.source} has no vocab.txt; the audit needs the model's vocabulary")
    self.loaded = loaded
    self.tokenizer = FullTokenizer(loaded.vocab_file, do_lower_case=bool(loaded.do_lower_case))
    self.cls, self.sep, self.mask = self.tokenizer.convert_tokens_to_ids([CLS_TOKEN, SEP_TOKEN, MASK_TOKEN])
    self.batch_size = batch_size
    self.max_seq_length = min(max_seq_length, loaded.config.max_position_embeddings)
    self.params = jax.device_put(loaded.params)
    module = BertForPreTraining(loaded.config)

    def log_probs(params, ids, positions, labels):  # ids [B, L], positions/labels [B]
      mask = (ids != 0).astype(jnp.int32)
      outputs = module.apply({"params": params}, ids, mask, jnp.zeros_like(ids), positions[:, None])
      logp = jax.nn.log_softmax(outputs["mlm_logits"][:, 0].astype(jnp.float32), axis=-1)  # [B, V]
      return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]  # [B]

    self._log_probs = jax.jit(log_probs)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode_batch([text])[0] if text.strip() else []

  def masked_log_probs(self, rows: Sequence[tuple[Sequence[int], int]], progress: str | None = None) -> np.ndarray:
    """For each (ids with [CLS]/[SEP], position): log p(ids[position] | ids with that position masked)."""
    from tqdm import tqdm

    result = np.zeros(len(rows), np.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
    starts = range(0, len(order), self.batch_size)
    # disable=None: a bar only when stderr is a terminal (never in logs)
    for start in tqdm(starts, desc=progress, disable=None if progress else True, unit="batch", leave=False):
      chosen = order[start : start + self.batch_size]
      longest = max(len(rows[i][0]) for i in chosen)
      length = min(self.max_seq_length, -(-longest // 16) * 16)  # few distinct shapes: few compilations
      ids = np.zeros((self.batch_size, length), np.int32)
      positions = np.zeros(self.batch_size, np.int32)
      labels = np.zeros(self.batch_size, np.int32)
      for slot, i in enumerate(chosen):
        tokens, position = rows[i]
        ids[slot, : len(tokens)] = tokens
        labels[slot] = tokens[position]
        ids[slot, position] = self.mask
        positions[slot] = position
      values = np.asarray(self._log_probs(self.params, ids, positions, labels))
      result[chosen] = values[: len(chosen)]
    return result

  def _fit(self, tokens: list[int]) -> list[int]:
    return [self.cls] + tokens[: self.max_seq_length - 2] + [self.sep]

  def span_rows(self, prefix: list[int], span: list[int], suffix: list[int]) -> list[tuple[list[int], int]]:
    """Rows that mask each token of `span` in [CLS] prefix span suffix [SEP] (suffix truncated to fit)."""
    room = self.max_seq_length - 2 - len(prefix) - len(span)
    if room < 0:
      raise UserError(f"a probe is longer than --max_seq_length={self.max_seq_length} tokens; shorten the template")
    ids = self._fit(prefix + span + suffix[:room])
    return [(ids, 1 + len(prefix) + k) for k in range(len(span))]

  def sentence_rows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
    ids = self._fit(tokens)
    return [(ids, position) for position in range(1, len(ids) - 1)]


def vocab_sha256(loaded: model_io.LoadedModel) -> str | None:
  return hashlib.sha256(loaded.vocab_file.read_bytes()).hexdigest() if loaded.vocab_file else None


# ------------------------------------------------------------------------------------------------------ metrics
def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(score of a random positive > a random negative), ties counted one half (Mann–Whitney U / (n⁺ n⁻))."""
  from scipy.stats import rankdata

  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  ranks = rankdata(np.concatenate([positive, negative]))
  u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
  return float(u / (len(positive) * len(negative)))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float:
  """The largest TPR of a threshold rule `score > t` whose false-positive rate is at most `fpr`.

  With n⁻ negatives the smallest non-zero FPR is 1/n⁻; below it this is the TPR at zero false positives.
  """
  negative = np.sort(np.asarray(negative, np.float64))[::-1]
  allowed = int(math.floor(fpr * len(negative) + 1e-9))  # false positives allowed
  threshold = negative[allowed] if allowed < len(negative) else -np.inf
  return float(np.mean(np.asarray(positive) > threshold))


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  scores = np.concatenate([positive, negative])
  labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
  order = np.argsort(-scores, kind="stable")
  tps, fps = np.cumsum(labels[order]), np.cumsum(1 - labels[order])
  return np.concatenate([[0.0], fps / len(negative)]), np.concatenate([[0.0], tps / len(positive)])


def attack_summary(positive: np.ndarray, negative: np.ndarray) -> dict[str, float]:
  return {
    "auc": roc_auc(positive, negative),
    **{f"tpr_at_{fpr:g}_fpr": tpr_at_fpr(positive, negative, fpr) for fpr in FPR_POINTS},
  }


def exposure(rank: int, space: int) -> float:
  return math.log2(space) - math.log2(rank)


# ------------------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Sentence:
  where: str  # file:line, what reports name
  text: str


def read_sentences(patterns: str, flag: str) -> list[Sentence]:
  files = sorted({path for pattern in patterns.split(",") if pattern for path in glob.glob(pattern)})
  if not files:
    raise UserError(f"{flag}={patterns} matches no file")
  sentences = []
  for path in files:
    try:
      lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
      raise UserError(f"{flag}: {path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
      raise UserError(f"{flag}: cannot read {path} ({error.strerror})") from None
    sentences += [Sentence(f"{path}:{number}", line.strip()) for number, line in enumerate(lines, 1) if line.strip()]
  if not sentences:
    raise UserError(f"{flag}={patterns}: the files hold no sentence")
  return sentences


def check_disjoint(members: list[Sentence], non_members: list[Sentence]) -> None:
  member_files = {s.where.rsplit(":", 1)[0] for s in members}
  shared_files = member_files & {s.where.rsplit(":", 1)[0] for s in non_members}
  if shared_files:
    raise UserError(
      f"--member_files and --non_member_files both match {sorted(shared_files)[0]}; the two sets must be disjoint"
    )
  seen = {s.text: s.where for s in members}
  overlap = [s for s in non_members if s.text in seen]
  if overlap:
    raise UserError(
      f"{len(overlap)} non-member sentence(s) also occur among the members (first: "
      f"{overlap[0].where} = {seen[overlap[0].text]}); membership needs disjoint sets — remove them "
      "from --non_member_files"
    )


# --------------------------------------------------------------------------------------------------- the audits
def run_exposure(scorer: Scorer, canary_file: str, num_candidates: int, seed: int) -> dict[str, Any]:
  header, canaries = read_canary_file(canary_file)
  digits = int(header["secret_digits"])
  space = 10**digits
  if num_candidates < 1 or num_candidates >= space:
    raise UserError(f"--num_candidates={num_candidates} must be in [1, {space - 1}] for {digits}-digit secrets")
  unknown = scorer.tokenizer.convert_tokens_to_ids([UNK_TOKEN])[0]
  for canary in canaries:
    if unknown in scorer.encode(canary["secret"]):
      raise UserError(
        f"--canary_file: the secret of {canary['id']} tokenises to [UNK] with {scorer.loaded.source}'s "
        "vocabulary, so secrets cannot be told apart; use a vocabulary with digit pieces"
      )
  rng = np.random.default_rng(seed)
  rows, owners = [], []  # owners[i] = (canary index, candidate index): 0 is the true secret
  candidates_of = []
  for index, canary in enumerate(canaries):
    prefix_text, suffix_text = header["template"].split("{secret}", 1)
    prefix = scorer.encode(prefix_text.format(name=canary["name"], condition=canary["condition"]))
    suffix = scorer.encode(suffix_text.format(name=canary["name"], condition=canary["condition"]))
    others: set[str] = set()
    while len(others) < num_candidates:
      draw = f"{int(rng.integers(space)):0{digits}d}"
      if draw != canary["secret"]:
        others.add(draw)
    candidates = [canary["secret"]] + sorted(others)
    candidates_of.append(candidates)
    for c, secret in enumerate(candidates):
      for row in scorer.span_rows(prefix, scorer.encode(secret), suffix):
        rows.append(row)
        owners.append((index, c))
  values = scorer.masked_log_probs(rows, progress="exposure")
  scores = [np.zeros(num_candidates + 1) for _ in canaries]
  for (index, c), value in zip(owners, values):
    scores[index][c] += value
  results, by_count = [], {}
  for index, canary in enumerate(canaries):
    rank = 1 + int(np.sum(scores[index][1:] > scores[index][0]))
    value = exposure(rank, num_candidates + 1)
    results.append({"id": canary["id"], "repetitions": canary["repetitions"], "rank": rank, "exposure": value})
    by_count.setdefault(canary["repetitions"], []).append(value)
  table = [
    {
      "repetitions": count,
      "canaries": len(values),
      "mean_exposure": float(np.mean(values)),
      "min_exposure": float(np.min(values)),
      "max_exposure": float(np.max(values)),
    }
    for count, values in sorted(by_count.items())
  ]
  return {
    "candidate_space": num_candidates + 1,
    "max_exposure": math.log2(num_candidates + 1),
    "secret_digits": digits,
    "by_repetitions": table,
    "canaries": results,
  }


def pll_scores(scorer: Scorer, sentences: list[Sentence], name: str) -> np.ndarray:
  """Mean per-token pseudo-log-likelihood of each sentence."""
  rows, owners = [], []
  for index, sentence in enumerate(sentences):
    for row in scorer.sentence_rows(scorer.encode(sentence.text)):
      rows.append(row)
      owners.append(index)
  values = scorer.masked_log_probs(rows, progress=name)
  sums = np.bincount(owners, weights=values, minlength=len(sentences))
  counts = np.bincount(owners, minlength=len(sentences))
  return sums / np.maximum(counts, 1)


def run_membership(
  scorer: Scorer, reference: Scorer | None, members: list[Sentence], non_members: list[Sentence], min_tokens: int
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
  def usable(sentences):
    return [s for s in sentences if len(scorer.encode(s.text)) >= min_tokens]

  members_kept, non_members_kept = usable(members), usable(non_members)
  if len(members_kept) < 2 or len(non_members_kept) < 2:
    raise UserError(
      f"fewer than 2 member or non-member sentences have --min_tokens={min_tokens} tokens; pass more sentences"
    )
  target_in = pll_scores(scorer, members_kept, "members (target)")
  target_out = pll_scores(scorer, non_members_kept, "non-members (target)")
  attacks = {"score_only": (target_in, target_out)}
  if reference is not None:
    ref_in = pll_scores(reference, members_kept, "members (reference)")
    ref_out = pll_scores(reference, non_members_kept, "non-members (reference)")
    attacks["likelihood_ratio"] = (target_in - ref_in, target_out - ref_out)
  result = {
    "members": len(members_kept),
    "non_members": len(non_members_kept),
    "skipped_short": {
      "members": len(members) - len(members_kept),
      "non_members": len(non_members) - len(non_members_kept),
    },
    "fpr_resolution": 1.0 / len(non_members_kept),
    "attacks": {name: attack_summary(*scores) for name, scores in attacks.items()},
  }
  return result, attacks


def read_pairs(path: str) -> list[tuple[str, str, str]]:
  """(where, name, condition) from a TSV or a canary file."""
  if path.endswith(".jsonl"):
    _, canaries = read_canary_file(path)
    return [(c["id"], c["name"], c["condition"]) for c in canaries]
  try:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError):
    raise UserError(f"--pairs_file={path} cannot be read as UTF-8 text") from None
  pairs = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) != 2 or not all(part.strip() for part in parts):
      raise UserError(f"--pairs_file={path}:{number}: expected 'name<TAB>condition'")
    pairs.append((f"{path}:{number}", parts[0].strip(), parts[1].strip()))
  if not pairs:
    raise UserError(f"--pairs_file={path} holds no pair")
  return pairs


def run_associations(
  scorer: Scorer, pairs: list[tuple[str, str, str]], template: str, base_subject: str
) -> dict[str, Any]:
  if template.count("{condition}") != 1 or template.count("{name}") != 1:
    raise UserError("--probe_template must contain {name} and {condition} exactly once each")
  conditions = sorted({condition for _, _, condition in pairs})
  if len(conditions) < 2:
    raise UserError("--pairs_file needs at least two different conditions")
  prefix_text, suffix_text = template.split("{condition}", 1)
  subjects = [name for _, name, _ in pairs] + [base_subject]
  rows, owners = [], []
  for s, subject in enumerate(subjects):
    prefix = scorer.encode(prefix_text.format(name=subject))
    suffix = scorer.encode(suffix_text.format(name=subject))
    for c, condition in enumerate(conditions):
      for row in scorer.span_rows(prefix, scorer.encode(condition), suffix):
        rows.append(row)
        owners.append((s, c))
  values = scorer.masked_log_probs(rows, progress="associations")
  scores = np.zeros((len(subjects), len(conditions)))
  for (s, c), value in zip(owners, values):
    scores[s, c] += value
  lifted = scores[:-1] - scores[-1]  # [pairs, conditions]: score after the name minus the base rate
  truth = np.array([[condition == true for condition in conditions] for _, _, true in pairs])
  top1 = float(np.mean([truth[i, np.argmax(lifted[i])] for i in range(len(pairs))]))
  return {
    "pairs": len(pairs),
    "conditions": len(conditions),
    "probe_template": template,
    "base_subject": base_subject,
    "auc_name_minus_base_rate": roc_auc(lifted[truth], lifted[~truth]),
    "auc_raw_score": roc_auc(scores[:-1][truth], scores[:-1][~truth]),
    "top1_accuracy": top1,
    "top1_chance": 1.0 / len(conditions),
  }


# ------------------------------------------------------------------------------------------------------ reports
def _plot_roc(path: Path, attacks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
  for name, (positive, negative) in attacks.items():
    fpr, tpr = roc_curve(positive, negative)
    label = f"{name} (AUC {roc_auc(positive, negative):.3f})"
    axes[0].plot(fpr, tpr, label=label)
    axes[1].plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=label)
  for axis, scale in zip(axes, ("linear", "log")):
    axis.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8)
    axis.set_xscale(scale)
    axis.set_yscale(scale)
    axis.set_xlabel("false-positive rate")
    axis.set_ylabel("true-positive rate")
    axis.legend(loc="lower right", fontsize=8)
  axes[0].set_title("membership inference ROC")
  axes[1].set_title("log scale (low-FPR regime)")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _plot_exposure(path: Path, result: dict[str, Any]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axis = plt.subplots(figsize=(5.5, 4))
  counts = [row["repetitions"] for row in result["canaries"]]
  axis.scatter([max(c, 0.5) for c in counts], [row["exposure"] for row in result["canaries"]], alpha=0.6)
  table = result["by_repetitions"]
  axis.plot([max(r["repetitions"], 0.5) for r in table], [r["mean_exposure"] for r in table], "k-o", label="mean")
  axis.axhline(result["max_exposure"], color="grey", linestyle=":", label="maximum (rank 1)")
  axis.set_xscale("log")
  axis.set_xlabel("repetitions in the training text (0 plotted at 0.5)")
  axis.set_ylabel("exposure (bits)")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _markdown(command: str, report: dict[str, Any]) -> str:
  lines = [f"# Privacy audit: {command}", "", f"- Model: `{report['model']}`"]
  if report.get("reference_model"):
    lines.append(f"- Reference model: `{report['reference_model']}`")
  lines += [f"- Seconds: {report['seconds']:.1f}", ""]
  result = report["result"]
  if command == "exposure":
    lines += [
      f"Candidate space |R| = {result['candidate_space']} (maximum exposure {result['max_exposure']:.2f} bits).",
      "",
      "| repetitions | canaries | mean exposure | min | max |",
      "|---:|---:|---:|---:|---:|",
    ]
    lines += [
      f"| {r['repetitions']} | {r['canaries']} | {r['mean_exposure']:.2f} | {r['min_exposure']:.2f} | "
      f"{r['max_exposure']:.2f} |"
      for r in result["by_repetitions"]
    ]
    lines += ["", "![exposure](exposure.png)", ""]
  elif command == "membership":
    lines += [
      f"{result['members']} members, {result['non_members']} non-members (FPR resolution "
      f"{result['fpr_resolution']:.2g}).",
      "",
      "| attack | ROC AUC | TPR @ 1% FPR | TPR @ 0.1% FPR |",
      "|---|---:|---:|---:|",
    ]
    lines += [
      f"| {name} | {a['auc']:.3f} | {a['tpr_at_0.01_fpr']:.3f} | {a['tpr_at_0.001_fpr']:.3f} |"
      for name, a in result["attacks"].items()
    ]
    lines += ["", "![ROC](roc.png)", ""]
  else:
    lines += [
      f"{result['pairs']} (name, condition) pairs, {result['conditions']} conditions.",
      "",
      "| probe | value |",
      "|---|---:|",
      f"| AUC, score after the name minus base rate | {result['auc_name_minus_base_rate']:.3f} |",
      f"| AUC, raw score after the name | {result['auc_raw_score']:.3f} |",
      f"| top-1 accuracy (chance {result['top1_chance']:.3f}) | {result['top1_accuracy']:.3f} |",
      "",
    ]
  return "\n".join(lines)


def write_report(
  output_dir: str,
  overwrite: bool,
  command: str,
  report: dict[str, Any],
  attacks: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> None:
  with atomic_output_dir(output_dir, overwrite) as staging:
    (staging / "audit.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if command == "exposure":
      _plot_exposure(staging / "exposure.png", report["result"])
    if attacks:
      _plot_roc(staging / "roc.png", attacks)
    (staging / "audit.md").write_text(_markdown(command, report), encoding="utf-8")


def audit(
  command: str,
  model: str,
  output_dir: str,
  *,
  step: int | None = None,
  reference_model: str | None = None,
  canary_file: str | None = None,
  num_candidates: int = 1000,
  member_files: str | None = None,
  non_member_files: str | None = None,
  max_sentences: int = 2000,
  min_tokens: int = 3,
  pairs_file: str | None = None,
  probe_template: str = DEFAULT_PROBE_TEMPLATE,
  base_subject: str = DEFAULT_BASE_SUBJECT,
  batch_size: int = 256,
  max_seq_length: int = 128,
  seed: int = 0,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Runs one audit and writes its report; returns the report."""
  if command not in SUBCOMMANDS:
    raise UserError(f"unknown audit {command!r}; use one of {', '.join(SUBCOMMANDS)}")
  required = {
    "exposure": (("--canary_file", canary_file),),
    "membership": (("--member_files", member_files), ("--non_member_files", non_member_files)),
    "associations": (("--pairs_file", pairs_file),),
  }[command]
  for flag, value in required:
    if not value:
      raise UserError(f"{command} needs {flag}")
  if reference_model and command != "membership":
    raise UserError("--reference_model is used by the membership audit only")
  for flag, value in (
    ("--batch_size", batch_size),
    ("--max_sentences", max_sentences),
    ("--max_seq_length", max_seq_length),
  ):
    if value < 1:
      raise UserError(f"{flag}={value} must be at least 1")
  fileio_check = Path(output_dir)
  if fileio_check.is_dir() and any(fileio_check.iterdir()) and not overwrite:
    raise UserError(f"--output_dir={output_dir} is not empty; choose an empty directory or pass --overwrite")
  members = non_members = None
  if command == "membership":  # cheap input checks before loading models
    members = read_sentences(member_files, "--member_files")
    non_members = read_sentences(non_member_files, "--non_member_files")
    check_disjoint(members, non_members)
    rng = np.random.default_rng(seed)
    members = [members[i] for i in sorted(rng.permutation(len(members))[:max_sentences])]
    non_members = [non_members[i] for i in sorted(rng.permutation(len(non_members))[:max_sentences])]
  started = time.monotonic()
  loaded = model_io.load_model(model, step=step)
  scorer = Scorer(loaded, batch_size, max_seq_length)
  reference = None
  if reference_model:
    loaded_reference = model_io.load_model(reference_model)
    if vocab_sha256(loaded_reference) != vocab_sha256(loaded) or loaded_reference.do_lower_case != loaded.do_lower_case:
      raise UserError(
        f"--reference_model={reference_model} has another vocabulary (or casing) than --model={model};"
        " the likelihood ratio compares the same tokens — use a reference trained with the same "
        "vocab.txt"
      )
    reference = Scorer(loaded_reference, batch_size, max_seq_length)
  attacks = None
  if command == "exposure":
    result = run_exposure(scorer, canary_file, num_candidates, seed)
  elif command == "membership":
    result, attacks = run_membership(scorer, reference, members, non_members, min_tokens)
  else:
    result = run_associations(scorer, read_pairs(pairs_file), probe_template, base_subject)
  report = {
    "format": AUDIT_FORMAT,
    "command": command,
    "model": loaded.source,
    "reference_model": reference.loaded.source if reference else None,
    "seed": seed,
    "device": jax.devices()[0].device_kind,
    "seconds": time.monotonic() - started,
    "result": result,
  }
  write_report(output_dir, overwrite, command, report, attacks)
  return report


# -------------------------------------------------------------------------------------------------------- flags
FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("model", None, "The model to audit: our model dir, an HF dir, a pretraining workdir, tf:PREFIX.")
  flags.DEFINE_integer("step", None, "With a pretraining workdir: the checkpoint step (default: the latest).")
  flags.DEFINE_string("output_dir", None, "Where audit.json, audit.md and the plots are written.")
  flags.DEFINE_string("canary_file", None, "exposure: the canary list of data_prep.canaries.")
  flags.DEFINE_integer("num_candidates", 1000, "exposure: random other secrets each canary's secret is ranked among.")
  flags.DEFINE_string("member_files", None, "membership: comma-separated globs of sentence files the model trained on.")
  flags.DEFINE_string("non_member_files", None, "membership: sentence files it did not train on (same distribution).")
  flags.DEFINE_string(
    "reference_model",
    None,
    "membership: a reference MLM (same vocabulary, disjoint data) for the likelihood-ratio attack.",
  )
  flags.DEFINE_integer("max_sentences", 2000, "membership: at most this many sentences per side (random, --seed).")
  flags.DEFINE_integer("min_tokens", 3, "membership: skip sentences with fewer tokens.")
  flags.DEFINE_string("pairs_file", None, "associations: name<TAB>condition lines (or a canary .jsonl).")
  flags.DEFINE_string("probe_template", DEFAULT_PROBE_TEMPLATE, "associations: probe with {name} and {condition}.")
  flags.DEFINE_string("base_subject", DEFAULT_BASE_SUBJECT, "associations: the neutral subject for the base rate.")
  flags.DEFINE_integer("batch_size", 256, "Masked sequences per device batch.")
  flags.DEFINE_integer("max_seq_length", 128, "Longer sentences are truncated.")
  flags.DEFINE_integer("seed", 0, "Seed of candidate secrets and sentence sampling.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
  flags.mark_flags_as_required(["model", "output_dir"])


def main(argv: Sequence[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
  if len(argv) != 2:
    raise UserError(
      f"usage: python -m clinical_bert_jax.audit {{{'|'.join(SUBCOMMANDS)}}} --model=DIR --output_dir=DIR [...]"
    )
  report = audit(
    argv[1],
    FLAGS.model,
    FLAGS.output_dir,
    step=FLAGS.step,
    reference_model=FLAGS.reference_model,
    canary_file=FLAGS.canary_file,
    num_candidates=FLAGS.num_candidates,
    member_files=FLAGS.member_files,
    non_member_files=FLAGS.non_member_files,
    max_sentences=FLAGS.max_sentences,
    min_tokens=FLAGS.min_tokens,
    pairs_file=FLAGS.pairs_file,
    probe_template=FLAGS.probe_template,
    base_subject=FLAGS.base_subject,
    batch_size=FLAGS.batch_size,
    max_seq_length=FLAGS.max_seq_length,
    seed=FLAGS.seed,
    overwrite=FLAGS.overwrite,
  )
  print(f"wrote {FLAGS.output_dir}/audit.json and audit.md ({argv[1]}, {report['seconds']:.1f} s)")


if __name__ == "__main__":
  _define_flags()
  run_absl(main, positional_args=True)
