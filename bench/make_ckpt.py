#!/usr/bin/env python3
"""Random OLMoE checkpoints in Hugging Face layout, for the benchmarks (bench/run.py).

  small   a small OLMoE shape (D 1024, 8 layers, 16 heads, 64 experts, top-8, I 512, V 50304): transformers'
          OlmoeForCausalLM(config) with its random init, written by save_pretrained in fp32 (small-fp32/) and the
          same weights rounded to bf16 (small-bf16/).
  real    the OLMoE-1B-7B-0924 shape in bf16 (~13.8 GB): too big to instantiate as a torch model next to our own
          copy, so it is written shard by shard (one decoder layer per shard, per-expert keys as on the hub) with
          numpy, N(0, 0.02) weights and unit norms, plus model.safetensors.index.json. Peak memory: one layer.

python bench/make_ckpt.py small|real [--out bench/out]
"""
import argparse, json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from olmoe_checkpoint import bf16_bits, to_raw, write_safetensors   # noqa: E402

SMALL = dict(vocab_size=50304, hidden_size=1024, intermediate_size=512, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
             eos_token_id=50279, pad_token_id=1, rope_theta=10000.0, rms_norm_eps=1e-5, clip_qkv=None)
REAL = dict(SMALL, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16)   # allenai/OLMoE-1B-7B-0924


def make_small(out: Path) -> None:
  import torch
  from transformers import OlmoeConfig, OlmoeForCausalLM
  torch.manual_seed(0)
  model = OlmoeForCausalLM(OlmoeConfig(**SMALL)).eval()
  with torch.no_grad():                         # norms away from 1, so that they matter
    for name, p in model.named_parameters():
      if "norm" in name: p.add_(torch.randn_like(p) * 0.2)
  model.save_pretrained(out / "small-fp32")
  model.to(torch.bfloat16).save_pretrained(out / "small-bf16")


def bf16_normal(rng: np.random.Generator, shape, std=0.02) -> np.ndarray:
  """N(0, std) as bf16 bit patterns (uint16): float32 samples rounded to nearest even."""
  return bf16_bits(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

ONE_BF16 = np.uint16(0x3F80)


def make_real(out: Path) -> None:
  c, folder = REAL, out / "real-bf16"
  folder.mkdir(parents=True, exist_ok=True)
  D, I, E, V, L = c["hidden_size"], c["intermediate_size"], c["num_experts"], c["vocab_size"], c["num_hidden_layers"]
  rng = np.random.default_rng(0)
  weight_map, total = {}, 0
  shards = [("model-embed.safetensors", lambda: {"model.embed_tokens.weight": bf16_normal(rng, (V, D))})]
  for l in range(L):
    def layer(l=l):
      p = f"model.layers.{l}."
      t = {p + f"self_attn.{n}.weight": bf16_normal(rng, (D, D)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
      t[p + "self_attn.q_norm.weight"] = np.full(D, ONE_BF16); t[p + "self_attn.k_norm.weight"] = np.full(D, ONE_BF16)
      t[p + "input_layernorm.weight"] = np.full(D, ONE_BF16); t[p + "post_attention_layernorm.weight"] = np.full(D, ONE_BF16)
      t[p + "mlp.gate.weight"] = bf16_normal(rng, (E, D))
      for e in range(E):
        t[p + f"mlp.experts.{e}.gate_proj.weight"] = bf16_normal(rng, (I, D))
        t[p + f"mlp.experts.{e}.up_proj.weight"] = bf16_normal(rng, (I, D))
        t[p + f"mlp.experts.{e}.down_proj.weight"] = bf16_normal(rng, (D, I))
      return t
    shards.append((f"model-layer{l:02d}.safetensors", layer))
  shards.append(("model-head.safetensors", lambda: {"model.norm.weight": np.full(D, ONE_BF16),
                                                    "lm_head.weight": bf16_normal(rng, (V, D))}))
  for name, make in shards:
    t0, tensors = time.time(), make()
    total += write_safetensors(folder / name, {k: to_raw(a, "BF16") for k, a in tensors.items()})
    weight_map.update({k: name for k in tensors})
    print(f"  {name}: {len(tensors)} tensors, {time.time() - t0:.1f} s", file=sys.stderr)
    del tensors
  (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
  cfg = dict(c, model_type="olmoe", architectures=["OlmoeForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16",
             hidden_act="silu", attention_bias=False, tie_word_embeddings=False, norm_topk_prob=False,
             output_router_logits=False, router_aux_loss_coef=0.01, initializer_range=0.02, bos_token_id=None,
             rope_scaling=None, use_cache=True)
  (folder / "config.json").write_text(json.dumps(cfg, indent=1))
  print(f"{folder}: {total / 1e9:.2f} GB of weights", file=sys.stderr)


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("which", choices=["small", "real"])
  ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
  a = ap.parse_args()
  (make_small if a.which == "small" else make_real)(Path(a.out))
