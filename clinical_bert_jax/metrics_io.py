"""Training metrics: windows of additive statistics, throughput/MFU, and their outputs (TensorBoard, metrics.jsonl,
a progress line on stdout, a loss-curve PNG).

Outputs live in the training workdir (docs/ARCHITECTURE.md). Only the primary process writes them. A run that resumes
from the checkpoint at step r first drops every record after step r (metrics.jsonl is rewritten, TensorBoard purges
events from step r+1 on), so after a crash the files read exactly as if the run had never been interrupted.

Records in metrics.jsonl carry the step and flat `split/name` keys: `train/*` and `eval/*` are deterministic
functions of the run (bitwise reproducible on CPU); `perf/*` are wall-clock measurements and are not.

FLOP count (for MFU, bert-pretraining.md §9.1/§9.4): per token and layer the matmuls of Q, K, V, attention
output (4·H² MACs) and the feed-forward (2·H·I MACs), plus bidirectional attention counted in full (QKᵀ and PV:
2·S·H MACs); the masked-LM head only at the P prediction slots (transform H² + decoder H·V MACs each, Google's sparse
head); the pooler and NSP head once per sequence. 1 MAC = 2 FLOPs, training = 3 × forward (backward = 2 × forward).
Embedding look-ups, LayerNorm, softmax and GELU are not counted. MFU = achieved model FLOP/s / (devices × peak), with
the device's dense bf16 peak from `PEAK_BF16_FLOPS` whatever the compute dtype (so fp32 runs show their real distance
from what the chip could do); devices not in the table (CPU included) get no MFU.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from clinical_bert_jax import losses
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax import fileio
from clinical_bert_jax.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

# Dense (no sparsity) bf16 peak FLOP/s per JAX device, matched as a substring of `device.device_kind`, first match
# wins (so more specific names come first). Vendor datasheets; TPU v2/v3 expose each core as a device.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
  ("GH200", 989e12),
  ("H200", 989e12),
  ("H100 PCIe", 756e12),
  ("H100 NVL", 835e12),
  ("H100", 989e12),  # SXM
  ("B200", 2250e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L4", 121e12),
  ("TPU v2", 22.5e12),
  ("TPU v3", 61.5e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5", 459e12),  # v5p
  ("TPU v6 lite", 918e12),  # Trillium
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device kind, or None when it is not in `PEAK_BF16_FLOPS` (MFU is then omitted)."""
  for name, peak in PEAK_BF16_FLOPS:
    if name in device_kind:
      return peak
  return None


def train_flops_per_sequence(config: BertConfig, seq_length: int, num_predictions: int) -> float:
  """Model FLOPs of one training sequence (forward + backward), counted as described in the module docstring."""
  hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
  per_token_per_layer = 4 * hidden * hidden + 2 * hidden * inner + 2 * seq_length * hidden
  encoder = seq_length * config.num_hidden_layers * per_token_per_layer
  mlm_head = num_predictions * (hidden * hidden + hidden * vocab)
  pooler_and_nsp = hidden * hidden + hidden * 2
  forward_macs = encoder + mlm_head + pooler_and_nsp
  return 3 * 2 * float(forward_macs)


class MetricWindow:
  """Sums of the train step's additive statistics over the steps since the last log line.

  Kept as float64 Python floats and saved with the checkpoint (`state()`/`from_state()`), so a run resumed from a
  checkpoint taken between two log steps logs bitwise the same averages as an uninterrupted one.
  """

  def __init__(self, sums: Mapping[str, float] | None = None, steps: int = 0):
    self.sums = dict(sums or {})
    self.steps = steps

  def add(self, step_values: Mapping[str, Any]) -> None:
    for name, value in step_values.items():
      self.sums[name] = self.sums.get(name, 0.0) + float(value)
    self.steps += 1

  def summary(self) -> dict[str, float]:
    """Google's metrics over the window (token-weighted MLM, per-sequence NSP) plus step means of the rest."""
    sum_names = ("mlm_loss_sum", "mlm_correct_sum", "mlm_weight_sum", "nsp_loss_sum", "nsp_correct_sum", "nsp_count")
    ratios = losses.metrics_from_sums({name: np.float64(self.sums[name]) for name in sum_names})
    means = {name: value / self.steps for name, value in self.sums.items() if name not in sum_names}
    return {**{name: float(value) for name, value in ratios.items()}, **means}

  def state(self) -> dict[str, Any]:
    return {"sums": dict(self.sums), "steps": self.steps}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> "MetricWindow":
    return cls(state["sums"], int(state["steps"]))


class PerfMeter:
  """Throughput, MFU and ETA from wall-clock time between two log points (compilation excluded by `restart`)."""

  def __init__(
    self,
    sequences_per_step: int,
    tokens_per_sequence: int,
    flops_per_sequence: float,
    num_devices: int,
    peak_flops: float | None,
  ):
    self.sequences_per_step = sequences_per_step
    self.tokens_per_sequence = tokens_per_sequence
    self.flops_per_sequence = flops_per_sequence
    self.num_devices = num_devices
    self.peak_flops = peak_flops
    self._start_step = 0
    self._start_time = time.perf_counter()

  def restart(self, step: int) -> None:
    """Starts a new measuring window after `step` (call once the first step after compilation has finished)."""
    self._start_step = step
    self._start_time = time.perf_counter()

  def measure(self, step: int, total_steps: int) -> dict[str, float]:
    """`perf/*` values for the steps since the last call (or `restart`), then restarts the window."""
    steps = step - self._start_step
    elapsed = time.perf_counter() - self._start_time
    self.restart(step)
    if steps <= 0 or elapsed <= 0:
      return {}
    sequences_per_second = steps * self.sequences_per_step / elapsed
    flops_per_device = sequences_per_second * self.flops_per_sequence / self.num_devices
    perf = {
      "perf/step_time_s": elapsed / steps,
      "perf/seq_per_s": sequences_per_second,
      "perf/tokens_per_s": sequences_per_second * self.tokens_per_sequence,
      "perf/tflops_per_device": flops_per_device / 1e12,
      "perf/eta_s": (total_steps - step) * elapsed / steps,
    }
    if self.peak_flops:
      perf["perf/mfu"] = flops_per_device / self.peak_flops
    return perf


def format_progress(step: int, total_steps: int, values: Mapping[str, float]) -> str:
  """One human-readable line: step, losses, accuracies, learning rate, grad norm, throughput, MFU, ETA."""
  parts = [f"step {step}/{total_steps}"]
  formats = (
    ("train/loss", "loss {:.4f}"),
    ("train/mlm_accuracy", "mlm_acc {:.3f}"),
    ("train/nsp_accuracy", "nsp_acc {:.3f}"),
    ("train/learning_rate", "lr {:.3g}"),
    ("train/grad_norm", "gnorm {:.3g}"),
    ("perf/seq_per_s", "{:.1f} seq/s"),
    ("perf/tokens_per_s", "{:.0f} tok/s"),
  )
  parts += [template.format(values[name]) for name, template in formats if name in values]
  if "perf/mfu" in values:
    parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
  if "perf/eta_s" in values:
    parts.append(f"ETA {_format_duration(values['perf/eta_s'])}")
  return " | ".join(parts)


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsWriter:
  """metrics.jsonl + TensorBoard event files in the workdir; a no-op on non-primary processes.

  `resume_step` is the step of the checkpoint the run resumed from (None for a fresh start): what an earlier,
  interrupted attempt logged after it is dropped, because the run is about to log those steps again.

  In a `gs://` workdir (object storage cannot append) metrics.jsonl is kept in memory and rewritten whole (atomically)
  at most every `UPLOAD_SECONDS` and on flush/close; the event files are written to a local folder and uploaded the
  same way (TensorBoard's purge marker in the new file hides what an interrupted attempt logged after `resume_step`).
  """

  UPLOAD_SECONDS = 30.0

  def __init__(self, workdir: str | Path, resume_step: int | None, enabled: bool = True):
    self.workdir = fileio.as_path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = enabled
    self.remote = fileio.is_remote(self.workdir)
    self._tensorboard = None
    if not enabled:
      return
    first_new_step = 0 if resume_step is None else resume_step + 1
    _drop_records_from(self.path, first_new_step)
    SummaryWriter = _summary_writer_class()  # noqa: N806

    logdir = str(workdir)
    if self.remote:
      import tempfile

      self._lines = [json.dumps(record) + "\n" for record in read_metrics(self.path)]
      self._local_events = tempfile.TemporaryDirectory(prefix="clinical_bert_jax-events-")
      self._last_upload = time.monotonic()
      logdir = self._local_events.name
    self._tensorboard = SummaryWriter(logdir=logdir, purge_step=first_new_step, flush_secs=30)

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{name: float(value) for name, value in values.items()}}
    if self.remote:
      self._lines.append(json.dumps(record) + "\n")
    else:
      with open(self.path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    for name, value in values.items():
      if math.isfinite(value):
        self._tensorboard.add_scalar(name, value, global_step=step)
    if self.remote and time.monotonic() - self._last_upload > self.UPLOAD_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()
      if self.remote:
        self._upload()

  def _upload(self) -> None:
    with atomic_write(self.path) as handle:
      handle.writelines(self._lines)
    fileio.upload_tree(Path(self._local_events.name), self.workdir)
    self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      if self.remote:
        self._upload()
        self._local_events.cleanup()
      self._tensorboard = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (a torn last line from a killed run is ignored)."""
  records = []
  try:
    lines = fileio.as_path(path).read_text(encoding="utf-8").splitlines()
  except FileNotFoundError:
    return []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def _drop_records_from(path: Any, first_dropped_step: int) -> None:
  records = read_metrics(path)
  kept = [record for record in records if record.get("step", 0) < first_dropped_step]
  if not path.exists() or len(kept) == len(records) and path.read_bytes().endswith(b"\n"):
    return
  with atomic_write(path) as handle:
    handle.writelines(json.dumps(record) + "\n" for record in kept)


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch at import time whenever it is installed (only so that it can accept torch tensors),
  which costs a training process ~3 s of CPU and hundreds of MB; we log Python floats only. While tensorboardX is
  imported, `import torch` fails (a None entry in sys.modules), so it takes its own no-torch path; torch imports
  normally afterwards."""
  block = "torch" not in sys.modules and "tensorboardX" not in sys.modules
  if block:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if block:
      del sys.modules["torch"]
  return SummaryWriter


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> bool:
  """Writes loss and accuracy curves (train and eval) from metrics.jsonl; False when there is nothing to plot."""
  records = read_metrics(metrics_path)
  if not any("train/loss" in record for record in records):
    return False
  # A Figure of its own, drawn by the Agg renderer savefig picks for PNG: no pyplot (its import, global state and
  # backend selection cost every training process about a second of CPU), and fixed margins instead of tight_layout
  # (another half second of text measuring).
  from matplotlib.figure import Figure

  def series(name: str) -> tuple[list[int], list[float]]:
    points = [(record["step"], record[name]) for record in records if name in record]
    return [step for step, _ in points], [value for _, value in points]

  figure = Figure(figsize=(11, 4))
  loss_axes, accuracy_axes = figure.subplots(1, 2)
  for name, style in (
    ("train/loss", "-"),
    ("train/mlm_loss", "-"),
    ("train/nsp_loss", "-"),
    ("eval/loss", "o-"),
    ("eval/mlm_loss", "o-"),
  ):
    steps, values = series(name)
    if steps:
      loss_axes.plot(steps, values, style, label=name, markersize=3)
  for name, style in (
    ("train/mlm_accuracy", "-"),
    ("train/nsp_accuracy", "-"),
    ("eval/mlm_accuracy", "o-"),
    ("eval/nsp_accuracy", "o-"),
  ):
    steps, values = series(name)
    if steps:
      accuracy_axes.plot(steps, values, style, label=name, markersize=3)
  loss_axes.set(xlabel="step", ylabel="loss", title="loss")
  accuracy_axes.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
  for axes in (loss_axes, accuracy_axes):
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
  figure.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
  with atomic_write(png_path, mode="wb") as handle:
    figure.savefig(handle, format="png", dpi=100)
  return True
