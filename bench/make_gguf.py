#!/usr/bin/env python3
"""An OLMoE checkpoint folder (config.json, safetensors, tokenizer.json) written as a GGUF file the way llama.cpp's
converter lays one out (architecture `olmoe`, its key and tensor names, experts stacked as (E, out, in)), with llama.cpp's
`gguf` package as the writer. For the benchmarks and the tests of olmoe_gguf.py.

The large weights (attention projections, experts, embeddings and LM head) get the chosen type; norms and the router stay F32,
as llama.cpp keeps them. Q8_0 and Q4_0 are quantised by the `gguf` package (llama.cpp's reference code). That package
has no K-quant encoder, so Q4_K and Q6_K are encoded here by plain rounding to nearest (the scales from each group's
range, no search): valid files that read exactly as llama.cpp reads them, with somewhat larger errors than
llama.cpp's own quantiser would make.

python bench/make_gguf.py CHECKPOINT_DIR OUT.gguf --type Q4_0|Q8_0|Q4_K|Q6_K|F32
"""
import argparse, json, sys
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LARGE = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def encode_q4_k(w: np.ndarray) -> np.ndarray:
  """(rows, n) fp32 -> (rows, n / 256 * 144) bytes of Q4_K blocks: w ~ (d * sc) * q - (dmin * m) per group of 32."""
  rows, n = w.shape
  g = w.reshape(rows, n // 256, 8, 32)
  lo, hi = np.minimum(g.min(-1), 0), g.max(-1)                        # a group's range, its min kept <= 0
  scale, mins = (hi - lo) / 15, -lo                                   # (rows, nb, 8)
  d, dmin = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)   # (rows, nb)
  safe = lambda x: np.where(x > 0, x, 1)
  sc = np.clip(np.rint(scale / safe(d.astype(np.float32))[..., None]), 0, 63).astype(np.uint8)
  m = np.clip(np.rint(mins / safe(dmin.astype(np.float32))[..., None]), 0, 63).astype(np.uint8)
  step, off = (d.astype(np.float32)[..., None] * sc)[..., None], (dmin.astype(np.float32)[..., None] * m)[..., None]
  q = np.clip(np.rint((g + off) / safe(step)), 0, 15).astype(np.uint8)          # (rows, nb, 8, 32)
  packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(rows, n // 256, 128)  # chunk k: group 2k low, 2k+1 high
  scales = np.concatenate([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6), (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                           (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], -1)   # 12 bytes
  return np.concatenate([d.view(np.uint8).reshape(rows, -1, 2), dmin.view(np.uint8).reshape(rows, -1, 2), scales, packed],
                        -1).reshape(rows, -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
  """(rows, n) fp32 -> (rows, n / 256 * 210) bytes of Q6_K blocks: w ~ (d * sc) * (q - 32) per group of 16."""
  rows, n = w.shape
  g = w.reshape(rows, n // 256, 16, 16)
  scale = np.abs(g).max(-1) / 31                                       # (rows, nb, 16)
  d = (scale.max(-1) / 127).astype(np.float16)
  safe = lambda x: np.where(x > 0, x, 1)
  sc = np.clip(np.rint(scale / safe(d.astype(np.float32))[..., None]), -128, 127).astype(np.int8)
  step = (d.astype(np.float32)[..., None] * sc)[..., None]
  q = (np.clip(np.rint(g / safe(step)), -32, 31) + 32).astype(np.uint8).reshape(rows, -1, 2, 4, 32)   # per half: 4 x 32
  lo4 = q & 15
  ql = np.concatenate([lo4[:, :, :, 0] | (lo4[:, :, :, 2] << 4), lo4[:, :, :, 1] | (lo4[:, :, :, 3] << 4)], -1).reshape(rows, -1, 128)
  hi = q >> 4                                                          # (rows, nb, 2, 4, 32) two bits each
  qh = (hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)).reshape(rows, -1, 64)
  return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(rows, -1, 2)], -1).reshape(rows, -1)


def encode(w: np.ndarray, kind: str):
  """(bytes array, ggml type) of an fp32 weight (..., n) in `kind`."""
  import gguf
  from gguf import GGMLQuantizationType as T
  t = getattr(T, kind)
  if kind == "F32": return np.ascontiguousarray(w, np.float32), None
  rows = w.reshape(-1, w.shape[-1]).astype(np.float32)
  if kind in ("Q8_0", "Q4_0"): data = gguf.quants.quantize(rows, t)
  elif kind == "Q4_K": data = encode_q4_k(rows)
  elif kind == "Q6_K": data = encode_q6_k(rows)
  else: raise SystemExit(f"make_gguf.py: no encoder for {kind}")
  return data.reshape(*w.shape[:-1], -1), t


def tokenizer_kv(writer, folder: Path, vocab_size: int) -> None:
  """tokenizer.json's byte-level BPE as llama.cpp stores it: tokens by id (padded with unused entries), types, merges."""
  import gguf
  spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
  added = {t["id"]: t for t in spec.get("added_tokens", [])}
  by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
  tokens, types = [], []
  for i in range(vocab_size):
    if i in added: tokens.append(added[i]["content"]); types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    elif i in by_id: tokens.append(by_id[i]); types.append(gguf.TokenType.NORMAL)
    else: tokens.append(f"[PAD{i}]"); types.append(gguf.TokenType.UNUSED)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("olmo")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])


def convert(folder: Path, out: Path, kind: str, chat_template: str | None = None) -> None:
  import gguf
  from olmoe_checkpoint import read_state_dict, read_config, hf_to_ours, widen
  from olmoe import OlmoeConfig
  from olmoe_gguf import NAMES, BLOCKS
  from tinygrad import Tensor, dtypes
  cfg = OlmoeConfig.from_dict(read_config(folder))
  w = gguf.GGUFWriter(str(out), "olmoe")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_expert_count(cfg.num_experts)
  w.add_expert_used_count(cfg.num_experts_per_tok)
  if cfg.norm_topk_prob: w.add_expert_weights_norm(True)
  if (folder / "tokenizer.json").exists(): tokenizer_kv(w, folder, cfg.vocab_size)
  for key, v in (("bos", cfg.bos_token_id), ("eos", cfg.eos_ids[0] if cfg.eos_ids else None), ("pad", cfg.pad_token_id)):
    if v is not None: getattr(w, f"add_{key}_token_id")(v)
  if chat_template: w.add_chat_template(chat_template)
  state = read_state_dict(folder)
  ours = dict(hf_to_ours(state, cfg))
  if cfg.tie_word_embeddings: ours.pop("lm_head", None)
  back = {v: k for k, v in NAMES.items()}
  def fp32(t):
    if isinstance(t, Tensor): return t.float().numpy()
    t.read_into(a := np.empty(t.shape, np.float32 if t.dtype == dtypes.float32 else np.uint16))
    return a if a.dtype == np.float32 else widen(a, t.dtype == dtypes.bfloat16)
  plan = []                                      # (gguf name, our name, which half of gate_up or None)
  for name in ours:
    if name.endswith("gate_up_proj"):
      l = name.split(".")[1]
      plan += [(f"blk.{l}.ffn_gate_exps.weight", name, 0), (f"blk.{l}.ffn_up_exps.weight", name, 1)]
    else:
      parts = name.split(".")
      short = parts[0] if len(parts) == 1 else ".".join(parts[2:])
      plan.append((f"{back[short]}.weight" if len(parts) == 1 else f"blk.{parts[1]}.{back[short]}.weight", name, None))
  kind_of = lambda gname: kind if gname.split(".")[-2] in LARGE else "F32"
  def tensor(gname, name, half):
    a = fp32(ours[name])
    return encode(np.split(a, 2, axis=1)[half] if half is not None else a, kind_of(gname))
  for gname, name, half in plan:                 # the infos first (sizes), then the data, one tensor at a time
    shape = list(ours[name].shape)
    if half is not None: shape[1] //= 2
    k = kind_of(gname)
    if k == "F32": w.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
    else:
      per, nbytes = BLOCKS[k]
      byte_shape = [*shape[:-1], shape[-1] // per * nbytes]
      w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), getattr(gguf.GGMLQuantizationType, k))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_ti_data_to_file()
  for gname, name, half in plan:
    w.write_tensor_data(tensor(gname, name, half)[0])
  w.close()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("checkpoint", type=Path)
  ap.add_argument("out", type=Path)
  ap.add_argument("--type", default="Q4_0", choices=["F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K"])
  a = ap.parse_args()
  tmp = a.out.with_name(a.out.name + ".partial")
  convert(a.checkpoint, tmp, a.type)
  tmp.rename(a.out)
  print(f"{a.out}: {a.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
