"""Shared test helpers: tiny random checkpoints written by transformers itself (the oracle), and a tiny tokenizer."""
import json, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
import olmoe_compiler                            # noqa: E402
olmoe_compiler.use_cpu_target()                 # a CPU target clang can compile bf16 for, before tinygrad is imported

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "12 + 30 = 42; 7 * 6 = 42.", "Experts, routers and tokens: a mixture.", "  indented\tand   spaced  ",
         "Ünïcödé, 日本語, emoji 🙂 and more."] * 20


def train_byte_level_bpe(texts, vocab_size: int):
  """A byte-level BPE with an NFC normalizer, trained by the `tokenizers` library; ids 0 and 1 are the specials
  `<|endoftext|>` and `<|padding|>`."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, trainers
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def make_tokenizer_json(path: Path, vocab_size: int = 300) -> Path:
  """Train a small byte-level BPE on TEXTS and save it as tokenizer.json in `path`."""
  train_byte_level_bpe(TEXTS, vocab_size).save(str(path / "tokenizer.json"))
  return path / "tokenizer.json"


def save_hf_olmoe(path: Path, seed: int = 0, dtype=None, max_shard_size=None, with_tokenizer: bool = True,
                  model_type: str = "olmoe", **overrides):
  """A random OlmoeForCausalLM (or FlexOlmoForCausalLM) saved by transformers, with norm weights perturbed away
  from 1 and weights scaled up from the 0.02 init, so that norms matter and attention and routing are far from
  uniform."""
  import torch
  from transformers import OlmoeConfig, OlmoeForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM
  config_cls, model_cls = (OlmoeConfig, OlmoeForCausalLM) if model_type == "olmoe" else (FlexOlmoConfig, FlexOlmoForCausalLM)
  kw = dict(vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
            eos_token_id=0, pad_token_id=1)
  kw.update(overrides)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name: p.add_(torch.randn_like(p) * 0.2)
      else: p.mul_(3.0)
  if dtype is not None: model = model.to(dtype)
  path.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  if with_tokenizer: make_tokenizer_json(path)
  return path


def hf_reference(path: Path, dtype=None):
  """The oracle: transformers' model in float32 (or `dtype`) with the literal eager attention and experts."""
  import torch
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="eager",
                                              experts_implementation="eager").eval()


def shared_fixture(*parts: str) -> Path:
  p = SHARED.joinpath("fixtures", *parts)
  if not p.exists(): pytest.skip(f"{p} is absent (../shared/fixtures only exists beside a checkout)")
  return p
