"""Test-wide settings: CPU only, 8 simulated devices for parallelism tests, no network, quiet TensorFlow."""

import contextlib
import os

from cli_util import XLA_TEST_FLAG

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests compile hundreds of small programs and run each only a few times: with LLVM at -O0, XLA compiles them 3-4x
# faster (the tiny test model's train step: 9 s instead of 33 s) and runs models this small about as fast. Children
# the tests start inherit it (tests/test_pretrain.py's subprocess_env keeps it too).
if XLA_TEST_FLAG not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += f" {XLA_TEST_FLAG}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the whole test run: this process, the other xdist worker and every
  child process the tests start (through the environment) compile each distinct program once. Most of the suite's
  time is XLA compiling small programs; a fresh clone starts with an empty cache, so only reuse within a run counts."""
  import jax

  path = _session_root(tmp_path_factory) / "jax_compile_cache"
  path.mkdir(exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)  # children inherit it
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # small programs too: they are most of them
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def _session_root(tmp_path_factory):
  """The session's temporary root: shared by the xdist workers (each has its own basetemp below it)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


# The uninterrupted 40-step pretraining run (tests/test_pretrain.py's tiny model and `cli_args`) that the
# kill-and-resume tests of test_faults.py and test_checkpointing.py compare their interrupted runs with, bit for bit:
# checkpoints every 10 steps, evaluates 48 of the 768 held-out sequences at steps 0, 20 and 40 (an evaluation long
# enough to send SIGTERM into), exports to Hugging Face format at the end.
REFERENCE_RUN = {
  "num_train_steps": 40,
  "save_checkpoints_steps": 10,
  "eval_every_steps": 20,
  "log_every_steps": 10,
  "keep_checkpoints": 5,
  "max_eval_steps": 48,
}


@contextlib.contextmanager
def _built_once(tmp_path_factory, name: str):
  """Yields the directory `name` in the session's shared temporary root, or None when it is already complete: the
  first xdist worker that asks builds it while it holds a file lock (`--dist loadfile` may put the files that use it
  on different workers), the other waits and reuses it. A build that failed is removed and retried."""
  import fcntl
  import shutil

  shared = _session_root(tmp_path_factory) / "shared"
  shared.mkdir(exist_ok=True)
  directory, done = shared / name, shared / f"{name}.done"
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if done.exists():
      yield None
      return
    shutil.rmtree(directory, ignore_errors=True)
    yield directory
    done.write_text("ok\n")  # only when the build did not raise


@pytest.fixture(scope="session")
def reference_corpus(tmp_path_factory):
  """The corpus of the reference run (tests/test_pretrain.py's make_corpus: 256 training and 768 held-out
  sequences), built once per test run. Read only."""
  from test_pretrain import Corpus, make_corpus

  with _built_once(tmp_path_factory, "reference_corpus") as building:
    if building is not None:
      make_corpus(building, train_count=256, eval_count=768)
  root = _session_root(tmp_path_factory) / "shared" / "reference_corpus"
  return Corpus(*(root / name for name in ("vocab.txt", "bert_config.json", "train", "eval")))


@pytest.fixture(scope="session")
def reference_run(reference_corpus, tmp_path_factory, compile_cache):
  """(corpus, root): `reference_corpus` and the uninterrupted REFERENCE_RUN of the pretrain CLI on it, workdir
  `root / "run"` and export `root / "hf"`; trained once per test run, not once per file (the runs are deterministic,
  so which worker trained it does not matter). Read only."""
  import subprocess

  from test_pretrain import cli_args, pretrain_command, subprocess_env

  with _built_once(tmp_path_factory, "reference_run") as building:
    if building is not None:
      result = subprocess.run(
        pretrain_command(
          *cli_args(reference_corpus, building / "run", **REFERENCE_RUN), f"--export_hf_dir={building / 'hf'}"
        ),
        env=subprocess_env(compile_cache),
        capture_output=True,
        text=True,
        timeout=600,
      )
      assert result.returncode == 0, result.stderr[-3000:]
  return reference_corpus, _session_root(tmp_path_factory) / "shared" / "reference_run"


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


# How long each test file took (seconds; the full run of 2026-11-26, 2 cores shared with other jobs; files not listed
# took under 15 s). `make test` hands whole files to the two xdist workers (`--dist loadfile`: a module fixture such as
# a trained model or a GCS emulator is built once, not once per worker) in this order, longest first
# (`--no-loadscope-reorder`), so that no long file starts last and keeps one worker busy alone at the end.
FILE_SECONDS = {
  "test_faults.py": 280,  # this and test_gcs, test_checkpointing: measured alone, load 5-7 (branch tta)
  "test_pretrain_oracles.py": 310,
  "test_convert.py": 240,
  "test_gcs.py": 200,
  "test_parallelism.py": 210,
  "test_checkpointing.py": 100,  # its uninterrupted run is the shared `reference_run` (built by test_faults)
  "test_pretrain.py": 190,
  "test_multiprocess.py": 150,
  "test_train_step.py": 180,
  "test_audit.py": 140,
  "test_gcs_pod.py": 140,
  "test_dp.py": 130,
  "test_leaks.py": 100,
  "test_evaluate.py": 90,
  "test_parity_oracles.py": 70,
  "test_model.py": 60,
  "test_notebooks.py": 60,
  "test_hf_tokenizer_json.py": 50,
  "test_create_pretraining_data.py": 50,
  "test_embed.py": 50,
  "test_optimizers.py": 30,
  "test_masking.py": 30,
  "test_untrusted_files.py": 30,
  "test_sharding.py": 20,
  "test_experiments.py": 20,
}


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's tests keep their order
