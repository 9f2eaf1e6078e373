"""olmoe_tokenizer.Tokenizer (tokenizer.json run by tiktoken) against the `tokenizers` library reading the same file, and
against tiktoken's own cl100k_base for OLMo 2's dolma2 layout."""
import json
import pytest
from tokenizers import Tokenizer as HFTokenizer
from conftest import shared_fixture
from tokenizer_fixtures import texts, make_trained_tokenizer_json, make_dolma2_tokenizer_json, cl100k, DOLMA2_SPECIALS
from olmoe import OlmoeError
from olmoe_tokenizer import Tokenizer


def assert_same_as_tokenizers(path, n=10_000, seed=0, specials=True):
  """Ids equal `tokenizers`' encode(add_special_tokens=False), text equal its decode(skip_special_tokens=False)."""
  ours, theirs = Tokenizer.from_file(path), HFTokenizer.from_file(str(path))
  batch = texts(n, seed, specials)
  for text, enc in zip(batch, theirs.encode_batch(batch, add_special_tokens=False)):
    got = ours.encode(text)
    assert got == enc.ids, (text, got, enc.ids)
    assert ours.decode(got) == theirs.decode(enc.ids, skip_special_tokens=False), text
  return ours, theirs


def edit(path, change) -> str:
  """Rewrite a tokenizer.json in place through `change(spec)`; returns the path as a string."""
  spec = json.loads(path.read_text())
  change(spec)
  path.write_text(json.dumps(spec))
  return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return make_trained_tokenizer_json(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_trained_bpe_matches_tokenizers(trained):
  ours, _ = assert_same_as_tokenizers(trained)
  assert ours.token_to_id("<|endoftext|>") == 0 and ours.encode("<|padding|>") == [1]
  assert ours.special_tokens == {"<|endoftext|>": 0, "<|padding|>": 1, "<|unk|>": ours.token_to_id("<|unk|>")}


def test_special_token_is_cut_out_before_nfc(trained):
  """A combining mark right after a special token: `tokenizers` cuts `<|endoftext|>` out of the raw text and NFC's
  the rest, so the mark is not composed with the '>' (NFC of the whole text would compose nothing here either, but
  it would turn 'e' + U+0301 after the token into 'é' inside the split, which must happen in the piece only)."""
  ours, theirs = Tokenizer.from_file(trained), HFTokenizer.from_file(str(trained))
  for text in ["<|endoftext|>\u0301e", "a<|unk|>\u0338=", "x<|endoftext|>e\u0301t\u00e9", "\u212b<|padding|>A\u030a"]:
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("flags", [dict(lstrip=True), dict(rstrip=True), dict(lstrip=True, rstrip=True),
                                   dict(single_word=True), dict(single_word=True, lstrip=True)])
def test_added_token_flags_match_tokenizers(tmp_path, flags):
  path = make_trained_tokenizer_json(tmp_path / "tokenizer.json", vocab_size=600,
                                     added=[dict(content="quick", normalized=False, special=False, **flags),
                                            dict(content="<|endoftext", normalized=True, special=False, **flags)])
  assert_same_as_tokenizers(path, n=2000, seed=4)


def test_add_prefix_space_matches_tokenizers(tmp_path):
  path = make_trained_tokenizer_json(tmp_path / "tokenizer.json", vocab_size=600)
  edit(path, lambda s: s["pre_tokenizer"].update(add_prefix_space=True))
  assert_same_as_tokenizers(path, n=2000, seed=5)


def test_split_that_leaves_gaps_matches_tokenizers(tmp_path):
  """An Isolated Split whose regex does not cover the text (letters only): `tokenizers` keeps each gap as a piece,
  tiktoken alone would drop it."""
  path = make_trained_tokenizer_json(tmp_path / "tokenizer.json", vocab_size=600)
  edit(path, lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}))
  assert_same_as_tokenizers(path, n=2000, seed=6)


def test_gpt_neox_tokenizer_matches_tokenizers():
  """OLMoE's released tokenizer (GPT-NeoX-20B's), from ../shared/fixtures."""
  ours, _ = assert_same_as_tokenizers(shared_fixture("gpt-neox-20b", "tokenizer.json"), seed=1)
  assert ours.encode("a" + " " * 5 + "b") == [66, 50273, 67]   # a run of spaces is one added token (5 spaces: 50273)


def test_dolma2_tokenizer_matches_tokenizers_and_tiktoken(tmp_path):
  """FlexOlmo's dolma2 layout: cl100k_base's ranks written as a byte-level BPE with the cl100k split regex."""
  path = make_dolma2_tokenizer_json(tmp_path / "tokenizer.json")
  ours, _ = assert_same_as_tokenizers(path, n=3000, seed=2)
  enc = cl100k()
  for text in texts(2000, 3, specials=False):
    assert ours.encode(text) == enc.encode_ordinary(text), text
  assert all(ours.encode(t) == [i] for t, i in DOLMA2_SPECIALS.items())


def test_unsupported_tokenizers_fail_clearly(trained, tmp_path):
  spec = json.loads(trained.read_text())
  bad = [({"model": {**spec["model"], "type": "Unigram"}}, "Unigram"),
         ({"normalizer": {"type": "Lowercase"}}, "Lowercase"),
         ({"model": {**spec["model"], "byte_fallback": True}}, "byte_fallback"),
         ({"decoder": {"type": "WordPiece"}}, "decoder")]
  for change, words in bad:
    (tmp_path / "bad.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(OlmoeError, match=words): Tokenizer.from_file(tmp_path / "bad.json")
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(OlmoeError, match="unreadable"): Tokenizer.from_file(tmp_path / "broken.json")
