"""The tokenizer of olmoe.py and flexolmo.py: a Hugging Face byte-level BPE `tokenizer.json`, run by tiktoken.

OLMoE uses GPT-NeoX-20B's tokenizer (GPT-2 split regex, NFC normaliser); FlexOlmo and OLMo 2 use dolma2 (cl100k's
split regex). Both are byte-level BPE files, which is all this module reads: `Tokenizer.from_file` says in one line
what it cannot run. `apply_chat_template` renders a conversation with the checkpoint's chat template (Jinja, set up
as transformers sets it up). `TextStream` turns generated ids into text as they arrive.
"""
from __future__ import annotations
import codecs, functools, json, unicodedata
from pathlib import Path
import numpy as np
import regex
from olmoe import OlmoeError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE writes each byte as a printable character; this maps the characters back to bytes."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  shifted = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(shifted)}}

_TO_LATIN1 = {c: chr(alphabet.get(chr(c), 256)) for alphabet in [byte_level_alphabet()] for c in range(512)}   # 256:
# not in the alphabet; the alphabet is built once, not once per entry (that took a tenth of a second at every import)

def byte_level_bytes(token: str) -> bytes | None:
  """The bytes that a byte-level vocabulary entry stands for ("Ġthe" -> b" the"), None if it is not one."""
  try: return token.translate(_TO_LATIN1).encode("latin-1")              # str.translate: fast for 100k entries
  except UnicodeEncodeError: return None


class Tokenizer:
  """A Hugging Face byte-level BPE tokenizer.json, run by tiktoken. Ids equal `tokenizers`' encode(text,
  add_special_tokens=False) and text its decode(ids, skip_special_tokens=False) (tests/test_tokenizer.py).

  tiktoken merges the adjacent pair whose joined bytes have the lowest rank, so giving each token the rank of the merge
  that first makes it (single bytes first, then `model.merges` in order) replays the BPE; a numpy table maps tiktoken's
  ranks back to the file's ids. The split regex is GPT-2's for a `ByteLevel` pre-tokenizer, or that of an Isolated
  `Split` (the cl100k pattern in OLMo 2's dolma2 file). Added tokens are cut out first, as `tokenizers` does:
  `normalized: false` ones from the raw text, then the others (their text NFC'd too) from each NFC'd piece in between;
  leftmost, then longest match, honouring lstrip/rstrip/single_word.

  Not handled (OlmoeError on load): WordPiece/Unigram/WordLevel models, BPE dropout, byte fallback, subword
  prefixes/suffixes, normalizers other than NFC, pre-tokenizers other than ByteLevel and one Isolated Split, ByteLevel
  add_prefix_space inside a Sequence, decoders other than ByteLevel. Ignored: post-processor templates (no BOS/EOS is
  ever inserted), truncation, padding. Known differences from `tokenizers` (none occur in the tested files):
  - tiktoken takes a pre-token that is itself in the vocabulary as one token (`ignore_merges: true`); under
    `ignore_merges: false` that differs only for a token its own merges cannot build (trained files have none);
  - a token made by two different merges gets the rank of the first for both (`tokenizers` ranks pairs);
  - NFC uses Python's Unicode tables; `tokenizers`' are older and take ~100 combining marks added since Unicode ~10
    (U+07FD, U+0898-U+089F, U+1AC1-U+1ACE, U+1DF6-U+1DFA, ...) for starters, so a run of marks holding one of them
    can be reordered differently, and so tokenized differently."""

  def __init__(self, ranks: dict[bytes, int], rank_to_id: np.ndarray, pattern: str, added: list[dict], nfc: bool,
               prefix_space: bool = False, vocab: dict[str, int] | None = None):
    import tiktoken
    self.bpe = tiktoken.Encoding("hf-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    self.rank_to_id, self.nfc, self.prefix_space, self.vocab = rank_to_id, nfc, prefix_space, vocab or {}
    added = [t for t in added if t["content"]]                                  # `tokenizers` ignores empty ones
    self.added = {t["content"]: t["id"] for t in added}
    self.special = {t["content"]: t["id"] for t in added if t.get("special")}
    # `tokenizers` decodes an added token's text (NFC'd if `normalized`) with the ByteLevel decoder too: through the
    # byte alphabet if every character is in it ("Ġx" -> b" x", "é" -> b"\xe9"), else as the text's own UTF-8
    shown = lambda t: self.normalize(t["content"]) if t.get("normalized", True) else t["content"]
    as_bytes = lambda s: byte_level_bytes(s) or s.encode()
    self.id_to_bytes = {int(rank_to_id[r]): b for b, r in ranks.items()} | {t["id"]: as_bytes(shown(t)) for t in added}
    self.raw = self._matcher({t["content"]: t for t in added if not t.get("normalized", True)})
    self.norm = self._matcher({self.normalize(t["content"]): t for t in added if t.get("normalized", True)})

  @staticmethod
  def _matcher(tokens: dict[str, dict]):
    """Longest alternative first = aho-corasick's leftmost-longest, which `tokenizers` uses for added tokens."""
    if not tokens: return None
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True))), tokens

  chat_template: str | None = None         # tokenizer_config.json's (or chat_template.jinja's) Jinja template
  template_tokens: dict[str, str] = {}     # the special tokens' text the template sees: bos_token, eos_token, ...

  @classmethod
  def from_file(cls, path: str | Path) -> "Tokenizer":
    """tokenizer.json at `path`, with the chat template and special tokens of tokenizer_config.json (or
    chat_template.jinja) beside it when there is one."""
    try: spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise OlmoeError(f"{path}: unreadable tokenizer.json ({e.__class__.__name__})") from None
    try: tok = cls._from_spec(path, spec)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:   # a field of the wrong type or shape
      raise OlmoeError(f"{path}: malformed tokenizer.json ({e.__class__.__name__}: {str(e)[:100]})") from None
    tok.chat_template, tok.template_tokens = read_chat_config(Path(path).parent)
    return tok

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                          **template_vars) -> list[int] | str:
    """The conversation `messages` ([{"role": "user", "content": "..."}, ...]) as the model was trained to read it:
    the chat template rendered as transformers' apply_chat_template renders it, then encoded (the template writes
    any BOS itself). With add_generation_prompt, it ends where the assistant's reply begins."""
    if self.chat_template is None:
      raise OlmoeError("this model has no chat template (tokenizer_config.json has no chat_template): it is not a chat "
                       "model; continue text with --prompt instead")
    text = render_chat(self.chat_template, messages, add_generation_prompt, {**self.template_tokens, **template_vars})
    return self.encode(text) if tokenize else text

  def end_of_turn_ids(self) -> set[int]:
    """The token(s) the template writes right after an assistant message: where a reply ends (e.g. `<|im_end|>`,
    or the EOS token in Tulu's template). Empty when there is no template or it writes no token there."""
    if self.chat_template is None: return set()
    mark = "\x00reply\x00"
    try: text = render_chat(self.chat_template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                            False, self.template_tokens)
    except OlmoeError: return set()
    ids = self.encode(text.split(mark, 1)[1].lstrip()) if mark in text else []
    return {ids[0]} if ids and ids[0] in self.added.values() else set()

  @classmethod
  def _from_spec(cls, path: str | Path, spec: dict) -> "Tokenizer":
    def unsupported(what): raise OlmoeError(f"{path}: unsupported {what} (only byte-level BPE tokenizer.json files are)")
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    if model.get("type") != "BPE": unsupported(f"tokenizer model {model.get('type')!r}")
    for key in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
      if model.get(key): unsupported(f"BPE option {key}={model[key]!r}")
    norms = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    for n in norms:
      if n.get("type") != "NFC": unsupported(f"normalizer {n.get('type')!r}")
    pattern, byte_level, prefix_space = None, False, False
    pres = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    for p in pres:
      if p.get("type") == "ByteLevel" and not byte_level:
        byte_level, prefix_space = True, bool(p.get("add_prefix_space"))
        if prefix_space and len(pres) > 1: unsupported("add_prefix_space=true inside a pre-tokenizer Sequence")
        if p.get("use_regex", True):
          if pattern is not None: unsupported("Split followed by ByteLevel with use_regex=true (two split regexes)")
          pattern = GPT2_PATTERN
      elif p.get("type") == "Split" and pattern is None and p.get("behavior") == "Isolated" and not p.get("invert"):
        pat = p["pattern"].get("Regex") or regex.escape(p["pattern"].get("String", ""))
        # tiktoken drops text that the regex does not match, Split keeps each such gap as a piece: match it too
        pattern = f"{pat}|(?:(?!{pat})[\\s\\S])+"
      else: unsupported(f"pre-tokenizer {json.dumps(p)}")
    if not byte_level: unsupported("pre-tokenizer (no ByteLevel)")
    pattern = pattern or r"[\s\S]+"                           # ByteLevel without its regex: each piece is one word
    if (spec.get("decoder") or {}).get("type") != "ByteLevel": unsupported(f"decoder {json.dumps(spec.get('decoder'))}")
    alphabet, vocab = byte_level_alphabet(), model.get("vocab") or {}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    singles = sorted((t for t in alphabet if t in vocab), key=vocab.get)
    if set(range(256)) - {0xC0, 0xC1, *range(0xF5, 256)} - {alphabet[t] for t in singles}:   # those never occur in UTF-8
      unsupported("vocabulary (a byte that UTF-8 text can contain has no token)")
    ranks: dict[bytes, int] = {}
    for tok in singles + ["".join(m) for m in merges]:                       # single bytes first, then merges
      if (b := byte_level_bytes(tok)) is None: unsupported(f"merge result {tok!r} (not byte-level)")
      ranks.setdefault(b, len(ranks))
    rank_to_id = np.full(len(ranks), -1, dtype=np.int64)
    added = {t["content"] for t in spec.get("added_tokens", [])}
    for tok, i in vocab.items():
      if (r := ranks.get(byte_level_bytes(tok))) is not None: rank_to_id[r] = i
      elif tok not in added: raise OlmoeError(f"{path}: vocabulary entry {tok!r} is neither a byte nor made by a merge")
    if (rank_to_id < 0).any(): raise OlmoeError(f"{path}: a merge makes a token that is not in the vocabulary")
    return cls(ranks, rank_to_id, pattern, spec.get("added_tokens", []), bool(norms), prefix_space, vocab)

  def normalize(self, text: str) -> str: return unicodedata.normalize("NFC", text) if self.nfc else text

  @staticmethod
  def _split(text: str, matcher) -> list[tuple[str, int | None]]:
    """(piece, added-token id or None) covering `text`, as `tokenizers`' AddedVocabulary::find_matches cuts it."""
    if matcher is None: return [(text, None)] if text else []
    out, start = [], 0
    for m in matcher[0].finditer(text):
      (s, e), t = m.span(), matcher[1][m[0]]
      if t.get("single_word") and (regex.search(r"\w\Z", text[:s]) or regex.match(r"\w", text[e:])): continue
      if t.get("lstrip"): s = max(regex.search(r"\s*\Z", text[:s]).start(), start)   # eats whitespace before it
      if t.get("rstrip"): e += regex.match(r"\s*", text[e:]).end()                    # and after it
      if start < s: out.append((text[start:s], None))
      out.append((text[s:e], t["id"]))
      start = e
    return out + ([(text[start:], None)] if start < len(text) else [])

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; the text of an added or special token (e.g. `<|endoftext|>`) becomes that token."""
    out: list[int] = []
    for raw, i in self._split(text, self.raw):
      if i is not None: out.append(i); continue
      for piece, j in self._split(self.normalize(raw), self.norm):
        if j is not None: out.append(j); continue
        if self.prefix_space and not piece.startswith(" "): piece = " " + piece
        out.extend(self.rank_to_id[self.bpe.encode_ordinary(piece)].tolist())
    return out

  def decode_bytes(self, ids) -> bytes:
    """The tokens' bytes (for added tokens see __init__); unknown ids are skipped, as `tokenizers` does."""
    return b"".join(self.id_to_bytes.get(int(i), b"") for i in ids)
  def decode(self, ids) -> str: return self.decode_bytes(ids).decode("utf-8", errors="replace")
  def token_to_id(self, token: str) -> int | None:
    """Id of an added token's text or of a vocabulary entry as the file writes it (e.g. "Ġthe"), else None."""
    return self.added.get(token, self.vocab.get(token))
  @property
  def special_tokens(self) -> dict[str, int]: return dict(self.special)
  @property
  def vocab_size(self) -> int: return max(self.id_to_bytes) + 1


# ============================================== chat templates ==============================================

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

def read_chat_config(folder: Path) -> tuple[str | None, dict[str, str]]:
  """(chat template or None, special tokens' text) from tokenizer_config.json and chat_template.jinja in `folder`.
  A template may be a string or a list of named ones ("default" is used); the .jinja file wins, as in transformers."""
  config, where = {}, folder / "tokenizer_config.json"
  if where.exists():
    try: config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e: raise OlmoeError(f"{where}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(config, dict): raise OlmoeError(f"{where}: not a JSON object")
  tokens = {}
  for name in SPECIAL_NAMES:
    value = config.get(name)
    if isinstance(value, dict): value = value.get("content")           # an AddedToken written out
    if value is not None and not isinstance(value, str): raise OlmoeError(f"{where}: {name} is not text")
    if value is not None: tokens[name] = value
  template = config.get("chat_template")
  if isinstance(template, list):                                      # named templates
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str): raise OlmoeError(f"{where}: chat_template is not text")
  if (jinja := folder / "chat_template.jinja").exists():
    try: template = jinja.read_text(encoding="utf-8")
    except (OSError, ValueError) as e: raise OlmoeError(f"{jinja}: unreadable ({e.__class__.__name__})") from None
  return template, tokens

@functools.lru_cache(maxsize=8)
def compile_template(template: str):
  """The template compiled in a Jinja environment set up as transformers sets up its own (sandboxed, trim_blocks and
  lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now, `{% generation %}` blocks rendered as
  their content), so that the same template gives the same text."""
  import datetime, jinja2, jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):          # transformers marks the assistant's text with these blocks
    tags = {"generation"}
    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)
    def _body(self, caller): return caller()

  def raise_exception(message): raise jinja2.exceptions.TemplateError(message)
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try: return env.from_string(template)
  except jinja2.exceptions.TemplateError as e: raise OlmoeError(f"chat template: {e}") from None

def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
  """The template's text for `messages`; a message of the wrong form or a template error is one OlmoeError."""
  import jinja2
  if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
    raise OlmoeError("chat messages must be a list of {'role': ..., 'content': ...}")
  try: return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e: raise OlmoeError(f"chat template: {e}") from None


class TextStream:
  """Turn a stream of token ids into text, holding back bytes of a UTF-8 character until it is complete."""
  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer, self.utf8 = tokenizer, codecs.getincrementaldecoder("utf-8")(errors="replace")
  def push(self, token_id: int) -> str: return self.utf8.decode(self.tokenizer.decode_bytes([token_id]))
  def flush(self) -> str: return self.utf8.decode(b"", final=True)
