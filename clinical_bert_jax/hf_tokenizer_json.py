"""The `tokenizer.json` of our Hugging Face exports: a BERT WordPiece tokenizer that tokenises like Google's.

transformers 5 loads and saves a BERT tokenizer as `tokenizer.json`, so `convert to_hf` writes one next to vocab.txt.
Reading a `tokenizer.json` (its vocabulary and casing, for directories without vocab.txt) is the vocabulary module's:
`clinical_bert_jax.vocab.read_tokenizer_json` / `vocab_file_in`, under the same rules as vocab.txt.
"""

from __future__ import annotations

from typing import Sequence

from clinical_bert_jax.vocab import CLS_TOKEN, CONTINUATION_PREFIX, SEP_TOKEN, SPECIAL_TOKENS, UNK_TOKEN

# Google's WordpieceTokenizer turns a longer word into [UNK]; `tokenizers` (and transformers) default to 100.
GOOGLE_MAX_INPUT_CHARS_PER_WORD = 200


def tokenizer_json_for(tokens: Sequence[str], do_lower_case: bool) -> str:
  """A `tokenizer.json` that tokenises like Google's `FullTokenizer(vocab, do_lower_case)` on ordinary text.

  WordPiece keeps Google's 200-character word limit. Where the Rust `BertNormalizer` differs from Google's Python
  (it also drops private-use and unassigned characters, and uses its own Unicode tables; see
  `clinical_bert_jax.tokenization`), text with such characters can tokenise differently: `model_card_notes` says so.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import AddedToken

  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  tokenizer = Tokenizer(
    models.WordPiece(
      vocab=vocab,
      unk_token=UNK_TOKEN,
      continuing_subword_prefix=CONTINUATION_PREFIX,
      max_input_chars_per_word=GOOGLE_MAX_INPUT_CHARS_PER_WORD,
    )
  )
  tokenizer.normalizer = normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
  )
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  present = [token for token in SPECIAL_TOKENS if token in vocab]
  tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in present])
  if CLS_TOKEN in vocab and SEP_TOKEN in vocab:
    tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
      pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
      special_tokens=[(CLS_TOKEN, vocab[CLS_TOKEN]), (SEP_TOKEN, vocab[SEP_TOKEN])],
    )
  return tokenizer.to_str(pretty=True)


MODEL_CARD_TOKENIZER_NOTE = (
  "`tokenizer.json` reproduces Google's BERT tokenizer (the one that built the pretraining data), its 200-character "
  "word limit included. It differs only on rare input: the Rust normaliser drops private-use and unassigned "
  "characters that Google's keeps, lower-cases a word-final capital sigma to σ rather than ς, and keeps a literal "
  "`[MASK]`/`[CLS]` in the text as one special token. `vocab.txt` with `clinical_bert_jax.tokenization."
  "FullTokenizer` is exact."
)
