#!/usr/bin/env python3
"""OLMoE (allenai/OLMoE-1B-7B-0924 / -0125) in one file of tinygrad.

A pre-norm decoder whose every feed-forward layer is a mixture of experts: a softmax router sends each token
to k of E SwiGLU experts (dropless, no renormalisation by default) and adds their outputs weighted by the
router probabilities. Attention has QK-norm over the full projection width and rotary embeddings. The logits
equal Hugging Face transformers' `OlmoeForCausalLM` on the same weights (tests/test_olmoe.py).

Shape legend (used in the comments on every line that changes a shape):

    B  batch                      T  tokens in this call           S  cached + new positions (keys)
    D  hidden_size                I  intermediate_size per expert  V  vocab_size
    nh query heads                nkv key/value heads              hd head dim = D // nh
    E  num_experts                k  num_experts_per_tok           N  = B*T tokens, flattened
    L  num_hidden_layers          P  = N*k (token, slot) pairs, one per expert a token is sent to

Sections, in the order data flows: config, building blocks (linear, norm, rope, attention), the router, the
experts and the MoE block, the decoder, losses, then generation and loading. Two short sections hold what the
model needs from tinygrad for speed ("tinygrad helpers") and the command line. A `.contiguous()` tagged
`# materialised` computes a tensor into memory once, because tinygrad would otherwise recompute it inside every
kernel that reads it; it changes no value (bench/README.md says where it matters).

Elsewhere: the tokenizer (olmoe_tokenizer.py), reading and writing checkpoints (olmoe_checkpoint.py), the command
line's options (olmoe_cli.py), GGUF files (olmoe_gguf.py), and runtime accelerations of tinygrad's CPU backend that `generate` uses when they
apply (olmoe_speedups.py; nothing in this file needs them).

Not handled: expert parallelism and the other distributed-training features of the original codebase (training
runs on one device), rope types other than default/linear/dynamic, `attention_bias=True`, sliding windows, quantised
weights other than olmoe_int8.py's weight-only int8 (`load(..., quantize="int8")`) and the GGUF types olmoe_gguf.py
reads (Q8_0, Q4_0, Q4_K, Q6_K), and speculative decoding.
"""
from __future__ import annotations
import math, sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, NamedTuple
import numpy as np
from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.function import function
from tinygrad.helpers import TRAINING


class OlmoeError(Exception):
  """Bad input (a missing file, a malformed checkpoint, an impossible request): the CLI prints one line, exits 2."""


# ================================================ config ================================================

@dataclass(frozen=True)
class OlmoeConfig:
  vocab_size: int = 50304                     # V: rows of the embedding and of the LM head (>= the tokenizer's)
  hidden_size: int = 2048                     # D: width of the residual stream
  intermediate_size: int = 1024               # I: hidden width of one SwiGLU expert
  num_hidden_layers: int = 16                 # L: decoder blocks, every one of them MoE
  num_attention_heads: int = 16               # nh: query heads
  num_key_value_heads: int | None = None      # nkv: key/value heads (grouped-query attention when < nh); None = nh
  max_position_embeddings: int = 4096         # longest sequence the model was trained for (and our KV cache size)
  rope_theta: float = 10000.0                 # RoPE base wavelength
  rope_scaling: dict | None = None            # {"rope_type": "linear" | "dynamic", "factor": f} or None
  rms_norm_eps: float = 1e-5                  # eps inside the RMSNorm's rsqrt
  clip_qkv: float | None = None               # clamp q, k, v to [-c, c] after the q/k norms (None = off)
  num_experts: int = 64                       # E: experts per MoE layer
  num_experts_per_tok: int = 8                # k: experts each token is routed to
  norm_topk_prob: bool = False                # renormalise the k chosen probabilities to sum to 1 (OLMoE: no)
  router_aux_loss_coef: float = 0.01          # alpha: weight of the load-balancing loss in training
  router_z_loss_coef: float = 0.001           # beta: weight of the router z-loss (OLMoE paper; not in transformers)
  capacity_factor: float | None = None        # an expert takes at most ceil(c*N*k/E) pairs per call (None = dropless)
  router_bias_rate: float = 0.0               # gamma of auxiliary-loss-free balancing (0 = off; DeepSeek-V3)
  tie_word_embeddings: bool = False           # LM head shares the embedding matrix
  pad_token_id: int | None = 1                # id used to left-pad batches
  bos_token_id: int | None = None             # OLMoE prepends no BOS
  eos_token_id: int | list[int] | None = 50279  # generation stops at this id (or any of these ids)
  model_type: str = "olmoe"                   # what config.json must say

  @property
  def head_dim(self) -> int: return self.hidden_size // self.num_attention_heads
  @property
  def n_kv_heads(self) -> int: return self.num_key_value_heads or self.num_attention_heads
  @property
  def rope_kind(self) -> str | None:
    """The RoPE scaling type ("linear", "dynamic"; transformers 4.x calls the key `type`), None without scaling."""
    s = self.rope_scaling or {}
    return s.get("rope_type", s.get("type"))
  @property
  def context_length(self) -> int:
    """Positions the KV cache holds: dynamic NTK scaling stretches the trained length by its factor."""
    if self.rope_kind != "dynamic": return self.max_position_embeddings
    return int(self.max_position_embeddings * float(self.rope_scaling["factor"]))
  @property
  def eos_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else tuple(e) if isinstance(e, (list, tuple)) else (e,)

  @classmethod
  def from_dict(cls, d: dict) -> "OlmoeConfig":
    """Read a Hugging Face config.json dict (transformers 4.x keys or 5.x `rope_parameters`)."""
    if d.get("model_type") != cls.model_type:
      raise OlmoeError(f"config.json has model_type {d.get('model_type')!r}, this file runs {cls.model_type!r}")
    d = dict(d)
    rope = d.pop("rope_parameters", None) or {}
    if not isinstance(rope, dict): raise OlmoeError(f"config.json: rope_parameters = {rope!r} is not an object")
    if "rope_theta" in rope: d.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", rope.get("type", "default")) != "default": d["rope_scaling"] = rope
    if "num_local_experts" in d: d.setdefault("num_experts", d["num_local_experts"])
    if d.get("hidden_act", "silu") != "silu": raise OlmoeError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
    if d.get("attention_bias"): raise OlmoeError("unsupported: attention_bias=true")
    nullable = {"num_key_value_heads", "clip_qkv", "rope_scaling", "eos_token_id", "pad_token_id", "bos_token_id"}
    cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and (d[f.name] is not None or f.name in nullable)})
    for f in fields(cls):                                                    # types, then ranges, before any use
      if not has_type(v := getattr(cfg, f.name), f.type): raise OlmoeError(f"config.json: {f.name} = {v!r} is not {f.type}")
    sizes = [*SIZES, *(["num_key_value_heads"] if cfg.num_key_value_heads is not None else [])]
    if (bad := next((n for n in sizes if not 0 < getattr(cfg, n) <= 2 ** 31), None)) is not None:
      raise OlmoeError(f"config.json: {bad} = {getattr(cfg, bad)} must be in 1..2^31")
    if not (cfg.rope_theta > 0 and cfg.rms_norm_eps > 0): raise OlmoeError("config.json: rope_theta and rms_norm_eps must be > 0")
    if cfg.rope_scaling is not None and not has_type(cfg.rope_scaling.get("factor", 1.0), "float"):
      raise OlmoeError(f"config.json: rope scaling factor {cfg.rope_scaling.get('factor')!r} is not a number")
    if cfg.rope_scaling is not None and cfg.rope_kind not in ("linear", "dynamic"):
      raise OlmoeError(f"unsupported rope_scaling type {cfg.rope_kind!r} (supported: default, linear, dynamic)")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.n_kv_heads:
      raise OlmoeError("config: hidden_size must divide into heads, and heads into key/value heads")
    if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
      raise OlmoeError(f"config: num_experts_per_tok={cfg.num_experts_per_tok} must be in 1..num_experts={cfg.num_experts}")
    return cfg.checked()

  def checked(self) -> "OlmoeConfig":
    """Self, once the training options are in range (OlmoeError otherwise)."""
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_rate"):
      if not (has_type(v := getattr(self, name), "float") and v >= 0): raise OlmoeError(f"config: {name} = {v!r} must be a number >= 0")
    c = self.capacity_factor
    if c is not None and not (has_type(c, "float") and c > 0): raise OlmoeError(f"config: capacity_factor = {c!r} must be > 0 (or None)")
    return self


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings", "num_experts", "num_experts_per_tok")

def has_type(v, annotation: str) -> bool:
  """Whether a config.json value is of one of the types its field is annotated with (`int | None`, ...)."""
  ok = {"int": lambda: type(v) is int, "float": lambda: type(v) in (int, float) and math.isfinite(v),
        "bool": lambda: type(v) is bool, "str": lambda: type(v) is str, "dict": lambda: type(v) is dict,
        "None": lambda: v is None, "list[int]": lambda: type(v) is list and all(type(x) is int for x in v),
        "list[str]": lambda: type(v) is list and all(type(x) is str for x in v)}
  return any(ok[t.strip()]() for t in annotation.split("|"))


# ============================================ building blocks ============================================

def linear(x: Tensor, w: Tensor) -> Tensor:
  """x @ w.T for an (out, in) weight, summed in fp32 and rounded once to x's dtype, as torch does in bf16."""
  if TRAINING: return matmul(x.float(), w.float()).cast(x.dtype)            # a backward pass that runs fast, see matmul
  lanes = LANES if all(isinstance(n, int) and n == 1 for n in x.shape[:-1]) else 1   # see dot
  return dot(x.unsqueeze(-2), w, lanes).cast(x.dtype)                        # (..., 1, in) . (out, in) -> (..., out)

def mul_t(a: Tensor, b: Tensor) -> Tensor:
  """a @ b.T over the last two axes in fp32 (attention's products); b's batch axes broadcast against a's."""
  a, b = a.float(), b.float()
  if TRAINING: return matmul(a, b.expand(*a.shape[:-2], *b.shape[-2:]))    # a backward pass that runs fast
  return a @ b.transpose(-1, -2)

def softmax(x: Tensor) -> Tensor:
  """softmax over the last axis (attention's)."""
  if TRAINING: return _softmax(x.contiguous())                               # a backward pass that runs fast
  return x.softmax(-1)

def take(w: Tensor, i: Tensor) -> Tensor:
  """Rows w[i], gathered on the device. 16-bit floats move as their raw bits: exact, and tinygrad's CPU backend
  cannot gather bf16 directly."""
  if w.dtype.itemsize != 2: return embed(w, i) if TRAINING else w[i]           # embed: a backward pass that runs fast
  return w.bitcast(dtypes.uint16)[i].bitcast(w.dtype)

def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
  """OLMoE/Llama RMSNorm: normalise in fp32, cast back to x's dtype, then scale (in x's dtype)."""
  xf = x.float()
  return (w * (xf * (xf.square().mean(-1, keepdim=True) + eps).rsqrt()).cast(x.dtype)).contiguous()   # materialised

def rope_inv_freq(cfg: OlmoeConfig, seq_len: int | UOp | None = None) -> Tensor:
  """(hd/2,) inverse frequencies 1/theta^(2j/hd), with linear or dynamic-NTK scaling as transformers applies it."""
  hd, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {}
  j = Tensor.arange(0, hd, 2, dtype=dtypes.float32) / hd                      # (hd/2,)
  kind, factor = cfg.rope_kind, float(s.get("factor", 1.0))
  if kind == "dynamic" and seq_len is not None:
    # NTK: stretch the base once the sequence outgrows the trained length (recomputed for each call's length)
    m = cfg.max_position_embeddings
    ratio = (Tensor(seq_len).float().maximum(m) * factor / m - (factor - 1))
    return 1.0 / (theta * ratio.pow(hd / (hd - 2))).pow(j)
  inv = 1.0 / Tensor(theta, dtype=dtypes.float32).pow(j)
  return inv / factor if kind == "linear" else inv

def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
  """cos, sin of shape (B, 1, T, hd) for integer positions (B, T): the rotate-half layout repeats the angles."""
  ang = positions.float().unsqueeze(-1) * inv_freq                           # (B, T, hd/2)
  ang = ang.cat(ang, dim=-1).unsqueeze(1)                                    # (B, 1, T, hd)
  return ang.cos(), ang.sin()

def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """Rotate pairs (x_j, x_{j+hd/2}) by the position's angle: x*cos + rotate_half(x)*sin, rotate_half = (-x2, x1)."""
  x1, x2 = x.chunk(2, dim=-1)                                                # (B, h, T, hd/2) each
  return x * cos + (-x2).cat(x1, dim=-1) * sin                               # (B, h, T, hd)


class Attention:
  """Multi-head attention with QK-norm over the full q/k projection width, RoPE, optional clip_qkv, GQA, KV cache."""
  def __init__(self, cfg: OlmoeConfig):
    D, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.q_proj = Tensor.normal(nh * hd, D, std=0.02)                        # (nh*hd, D)
    self.k_proj = Tensor.normal(nkv * hd, D, std=0.02)                       # (nkv*hd, D)
    self.v_proj = Tensor.normal(nkv * hd, D, std=0.02)                       # (nkv*hd, D)
    self.o_proj = Tensor.normal(D, nh * hd, std=0.02)                        # (D, nh*hd)
    self.q_norm = Tensor.ones(nh * hd)                                       # (nh*hd,) one RMS over all heads
    self.k_norm = Tensor.ones(nkv * hd)                                      # (nkv*hd,)
    self.cache_kv: Tensor | None = None                                      # (2, B, nkv, S_max, hd) when generating

  def norm(self, x: Tensor, w: Tensor) -> Tensor: return rms_norm(x, w, self.cfg.rms_norm_eps)

  def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q and k in the model dtype: OLMoE casts cos and sin to it."""
    cos, sin = cos.cast(q.dtype), sin.cast(q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, start_pos: int | UOp = 0) -> Tensor:
    cfg, (B, T, _) = self.cfg, x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
    q = self.norm(linear(x, self.q_proj), self.q_norm)                      # (B, T, nh*hd)
    k = self.norm(linear(x, self.k_proj), self.k_norm)                      # (B, T, nkv*hd)
    v = linear(x, self.v_proj)                                              # (B, T, nkv*hd)
    if T > 1: v = v.contiguous()                                            # materialised (a prefill's, for speed)
    if cfg.clip_qkv is not None: q, k, v = (t.clip(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(B, T, nh, hd).transpose(1, 2)                             # (B, nh, T, hd)
    k = k.reshape(B, T, nkv, hd).transpose(1, 2)                            # (B, nkv, T, hd)
    v = v.reshape(B, T, nkv, hd).transpose(1, 2)                            # (B, nkv, T, hd)
    q, k = self.rope(q, k, cos, sin)
    q = q.contiguous()                                                      # materialised
    if self.cache_kv is not None:                                           # write this call's keys, read all so far
      self.cache_kv[:, :, :, start_pos:start_pos + T].assign(Tensor.stack(k, v)).realize()
      k, v = self.cache_kv[0, :, :, :start_pos + T], self.cache_kv[1, :, :, :start_pos + T]  # (B, nkv, S, hd)
    # grouped-query attention: nh/nkv query heads share one key/value head (transformers' repeat_kv order)
    q = q.reshape(B, nkv, nh // nkv, T, hd)                                 # (B, nkv, nh/nkv, T, hd)
    k, v = k.unsqueeze(2), v.unsqueeze(2)                                   # (B, nkv, 1, S, hd)
    scores = mul_t(q, k).cast(x.dtype) * hd ** -0.5                       # (B, nkv, nh/nkv, T, S)
    p = softmax(mask.unsqueeze(1).unsqueeze(1).where(scores.float(), -math.inf)).cast(x.dtype)  # (B, nkv, nh/nkv, T, S)
    if T > 1: p = p.contiguous()                                            # materialised (a prefill's, for speed)
    o = mul_t(p, v.transpose(-1, -2)).cast(x.dtype)                         # (B, nkv, nh/nkv, T, hd)
    o = o.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)      # (B, T, nh*hd)
    return linear(o, self.o_proj)                                           # (B, T, D)


# ================================================ router ================================================

def topk(p: Tensor, k: int) -> tuple[Tensor, Tensor]:
  """The k largest entries of the last axis, descending (ties go to the lower index): values, int32 indices."""
  E = p.shape[-1]
  ar = Tensor.arange(E)
  # rank[e] = how many entries beat entry e; the k entries of rank < k are the top-k, and rank is their slot
  beats = (p.unsqueeze(-2) > p.unsqueeze(-1)) | ((p.unsqueeze(-2) == p.unsqueeze(-1)) & (ar < ar.unsqueeze(-1)))
  rank = beats.sum(-1).contiguous()                                          # (..., E) materialised
  slot = rank.unsqueeze(-2) == Tensor.arange(k).unsqueeze(-1)                # (..., k, E): slot s holds expert e
  idx = (slot * ar).sum(-1).cast(dtypes.int32)                               # (..., k)
  return slot.where(p.unsqueeze(-2), 0).sum(-1), idx                         # (..., k), (..., k)

def route(h: Tensor, W_r: Tensor, k: int, renormalise: bool = False,
          expert_mask: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
  """The router: z = W_r h, p = softmax(z) over all E experts (fp32), keep the top k.

  h (N, D) hidden states, W_r (E, D) router weights, expert_mask (E,) bool (False = the expert is excluded: its
  logit becomes -inf before the softmax, so it takes no slot and the softmax renormalises over the rest).
  bias (E,) fp32, auxiliary-loss-free balancing (DeepSeek-V3): the k experts are those of largest p + bias, but
  their weights are the unbiased p, so the bias steers the choice and never the mixture.
  Returns z (N, E) logits in the model dtype, g (N, k) weights in the model dtype (summing to < 1 unless
  `renormalise`), and i (N, k) int32 expert ids, slot 0 the most probable.
  """
  z = linear(h, W_r).contiguous()                                            # (N, E) materialised
  zf = z.float() if expert_mask is None else expert_mask.where(z.float(), -math.inf)
  p = zf.softmax(-1).contiguous()                                            # (N, E) fp32, materialised
  if bias is None: g, i = topk(p, k)                                         # (N, k), (N, k)
  else: i = topk(p + bias, k)[1]; g = p.gather(-1, i)                        # chosen with the bias, weighted without
  if renormalise: g = g / g.sum(-1, keepdim=True)
  return z, g.cast(z.dtype), i

def capacity_keep(i: Tensor, num_experts: int, capacity: int) -> Tensor:
  """(N, k) bool: which (token, slot) pairs of i (N, k) fit when each expert takes at most `capacity` pairs.

  GShard/Switch order: every token's first choice is served before any second choice, and within a slot earlier
  tokens first. A pair that does not fit is dropped: its weight becomes 0 and the residual stream carries the token."""
  N, k = i.shape
  hits = i.transpose(0, 1).reshape(k * N, 1) == Tensor.arange(num_experts)  # (k*N, E) slot-major: first choices first
  place = (hits.cast(dtypes.int32).cumsum(0) * hits).sum(-1)                 # (k*N,) 1-based place in its expert's queue
  return (place <= capacity).reshape(k, N).transpose(0, 1)                   # (N, k)


# ======================================= experts and the MoE block =======================================

def expert_ffn(x: Tensor, e: Tensor, W_gate_up: Tensor, W_down: Tensor) -> Tensor:
  """The SwiGLU expert e applied to x, for each row: expert_e(x) = W_down[e] (silu(W_gate[e] x) * W_up[e] x).

  x (P, D) inputs, e (P,) their expert ids, W_gate_up (E, 2I, D) = [W_gate; W_up] of every expert, W_down (E, D, I).
  Each row is a matrix-vector product with its own expert's weights, gathered by id: no other expert is computed."""
  I = W_down.shape[-1]
  gu = dot(x.unsqueeze(1), take(W_gate_up, e)).cast(x.dtype)                # (P, 1, D) . (P, 2I, D) -> (P, 2I)
  a = (gu[:, :I].silu() * gu[:, I:]).contiguous()                            # (P, I) SwiGLU, materialised
  return dot(a.unsqueeze(1), take(W_down, e)).cast(x.dtype).contiguous()    # (P, 1, I) . (P, D, I) -> (P, D) materialised

class Experts:
  """E SwiGLU experts stored as stacked tensors (gpt-fast style); gate and up are fused per expert, as in
  transformers 5: gate_up_proj[e] = [W_gate[e]; W_up[e]], so one gathered matrix gives both."""
  def __init__(self, cfg: OlmoeConfig):
    E, D, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    self.gate_up_proj = Tensor.normal(E, 2 * I, D, std=0.02)                 # (E, 2I, D)
    self.down_proj = Tensor.normal(E, D, I, std=0.02)                        # (E, D, I)

  def __call__(self, h: Tensor, i: Tensor) -> Tensor:
    """Every token through its k chosen experts: h (N, D), i (N, k) -> (N, k, D)."""
    (N, D), k = h.shape, i.shape[1]
    if N == 1: x, e, back = h.expand(k, D), i.reshape(k), None             # (P, D), (P,): one token's k pairs
    else: x, e, back = pairs_in_expert_order(h, i, self.down_proj.shape[0])   # (P, D), (P,), (P,) see tinygrad helpers
    y = expert_ffn(x, in_bounds(e, self.down_proj.shape[0]), self.gate_up_proj, self.down_proj)   # (P, D)
    return (y if back is None else y[back]).reshape(N, k, D)               # (N, k, D) in pair order

  def weighted(self, h: Tensor, g: Tensor, i: Tensor) -> Tensor:
    """sum_s g_s * expert_{i_s}(h) for h (N, D), g and i (N, k) -> (N, D): the training path (see experts_in_blocks)."""
    return experts_in_blocks(h.float(), g.float(), i, self.gate_up_proj.float(), self.down_proj.float()).cast(h.dtype)


class SparseMoeBlock:
  """The MoE feed-forward layer: y = sum_{s<k} g_s * expert_{i_s}(x), with (g, i) from the router.

  Only the k chosen experts run for each token, and none is dropped (OLMoE is dropless) unless the config sets a
  capacity factor. While gradients are being taken (tinygrad's TRAINING context) the same sum is computed in
  expert-sorted blocks (`Experts.weighted`), whose backward pass is fast: same routing, same result up to fp32
  rounding."""
  def __init__(self, cfg: OlmoeConfig):
    self.cfg = cfg
    self.gate = Tensor.normal(cfg.num_experts, cfg.hidden_size, std=0.02)    # (E, D) router W_r
    self.experts = Experts(cfg)
    # (E,) selection bias of auxiliary-loss-free balancing, moved by `update_router_bias` (not a trained weight)
    self.expert_bias = Tensor.zeros(cfg.num_experts).contiguous() if cfg.router_bias_rate > 0 else None

  def __call__(self, x: Tensor, expert_mask: Tensor | None = None, k: int | None = None) -> tuple[Tensor, tuple]:
    B, T, D = x.shape
    h, k = x.reshape(B * T, D), k or self.cfg.num_experts_per_tok            # (N, D)
    z, g, i = route(h, self.gate, k, self.cfg.norm_topk_prob, expert_mask, self.expert_bias)  # (N, E), (N, k), (N, k)
    if self.cfg.capacity_factor is not None:                                 # over-capacity pairs weigh 0
      g = capacity_keep(i, self.cfg.num_experts, math.ceil(self.cfg.capacity_factor * B * T * k / self.cfg.num_experts)).where(g, 0)
    if TRAINING: return self.experts.weighted(h, g, i).reshape(B, T, D), (z, g, i)
    y = self.experts(h, i)                                                   # (N, k, D)
    out = (y * g.unsqueeze(-1)).float().sum(1).cast(x.dtype)                 # (N, D) weighted sum over the k slots
    return out.reshape(B, T, D), (z, g, i)


# ================================================ decoder ================================================

class DecoderLayer:
  """Pre-norm block: h += attn(norm(h)); h += moe(norm(h))."""
  def __init__(self, cfg: OlmoeConfig):
    self.cfg = cfg
    self.input_layernorm = Tensor.ones(cfg.hidden_size)                      # (D,)
    self.self_attn = Attention(cfg)
    self.post_attention_layernorm = Tensor.ones(cfg.hidden_size)             # (D,) the norm *before* the MoE
    self.mlp = SparseMoeBlock(cfg)

  def __call__(self, h, cos, sin, mask, start_pos=0, expert_mask=None, k=None):
    eps = self.cfg.rms_norm_eps
    h = (h + self.self_attn(rms_norm(h, self.input_layernorm, eps), cos, sin, mask, start_pos)).contiguous()  # (B,T,D) materialised
    m, routing = self.mlp(rms_norm(h, self.post_attention_layernorm, eps), expert_mask, k)
    return (h + m).contiguous(), routing                                                               # (B, T, D) materialised


class Routing(NamedTuple):
  """Per layer (a list of L entries): router logits z (N, E), weights g (N, k), expert ids i (N, k)."""
  logits: list[Tensor]
  weights: list[Tensor]
  experts: list[Tensor]


class Olmoe:
  """The causal LM: embed, L decoder layers, final norm, LM head. `model(ids)` -> logits (B, T, V)."""
  Layer = DecoderLayer

  def __init__(self, cfg: OlmoeConfig):
    self.cfg = cfg
    self.embed_tokens = Tensor.normal(cfg.vocab_size, cfg.hidden_size, std=0.02)   # (V, D)
    self.layers = [self.Layer(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = Tensor.ones(cfg.hidden_size)                                       # (D,)
    self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else Tensor.normal(cfg.vocab_size, cfg.hidden_size, std=0.02)
    self.expert_mask: Tensor | None = None          # (E,) bool: experts allowed to take a slot (None = all)
    self.top_k = cfg.num_experts_per_tok            # k used by the router (FlexOlmo caps it at the enabled experts)
    self._prefills: dict = {}                       # TinyJit'd prefills, per (batch size, padded length, masked?, k)
    self._decoders: dict = {}                       # TinyJit'd decode steps, one per (batch size, masked?, k)
    self._caches: dict[int, list[Tensor]] = {}      # KV caches, one set per batch size
    self._extenders: dict = {}                      # TinyJit'd prompt extensions, per (batch size, length, masked?, k)
    self._held: tuple | None = None                 # what the batch-1 cache holds: (routing, left pad, token ids)
    self.quantize: str | None = None                # "int8": large weights held as int8 + row scales (olmoe_int8.py)

  @property
  def dtype(self) -> DType: return self.embed_tokens.dtype

  def enable_experts(self, on: list[int]) -> None:
    """Let only the experts `on` take slots: the others' router logits become -inf before the softmax (`route`),
    which renormalises over the rest, and k is capped at len(on)."""
    E = self.cfg.num_experts
    self.expert_mask = None if len(on) == E else Tensor([e in on for e in range(E)])
    self.top_k = min(self.cfg.num_experts_per_tok, len(on))

  def final_norm(self, h: Tensor) -> Tensor: return rms_norm(h, self.norm, self.cfg.rms_norm_eps)

  def forward(self, ids: Tensor, positions: Tensor, mask: Tensor, start_pos: int | UOp = 0, last_only: bool = False,
              expert_mask: Tensor | None = None, hidden: bool = False) -> tuple[Tensor, Routing]:
    """ids (B, T) int, positions (B, T) int, mask (B, T, S) bool (True = query may attend to key); expert_mask
    defaults to the model's. Returns logits (B, T, V), or with hidden=True the final normed states (B, T, D)."""
    if expert_mask is None: expert_mask = self.expert_mask
    h = take(self.embed_tokens, ids).contiguous()                                  # (B, T, D) materialised
    cos, sin = rope_tables(positions, rope_inv_freq(self.cfg, start_pos + ids.shape[1]))   # (B, 1, T, hd) each
    cos, sin, mask = cos.contiguous(), sin.contiguous(), mask.contiguous()         # materialised: once, not per layer
    routing = Routing([], [], [])
    for layer in self.layers:
      h, (z, g, i) = layer(h, cos, sin, mask, start_pos, expert_mask, self.top_k)  # (B, T, D)
      routing.logits.append(z); routing.weights.append(g); routing.experts.append(i)
    if last_only: h = h[:, -1:]                                                    # (B, 1, D) generation needs one row
    h = self.final_norm(h)                                                         # (B, T, D)
    return (h if hidden else linear(h, self.lm_head)), routing                     # (B, T, V)

  def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
               return_routing: bool = False):
    """Logits (B, T, V) for input_ids (B, T); attention_mask (B, T) of 1/0 marks (left) padding, as in transformers.

    As in transformers, positions default to 0..T-1 whatever the padding (pass position_ids to change that).
    With return_routing=True also returns a `Routing` (router logits per layer, for the losses and analyses)."""
    B, T = input_ids.shape
    # positions from memory, not from arange: tinygrad would fold arange's tables into every kernel that reads them,
    # recomputing RoPE's sines and cosines inside the attention backward
    if position_ids is None: position_ids = Tensor(np.arange(T, dtype=np.int32)).reshape(1, T).expand(B, T)
    mask = attention_mask_3d(T, T, 0, None if attention_mask is None else attention_mask.cast(dtypes.bool))
    logits, routing = self.forward(input_ids, position_ids, mask)
    return (logits, routing) if return_routing else logits

  def parameters(self) -> dict[str, Tensor]:
    """Every weight, named as in transformers 5 (fused experts), without the `model.` prefix and `.weight`."""
    out = {"embed_tokens": self.embed_tokens, "norm": self.norm}
    if not self.cfg.tie_word_embeddings: out["lm_head"] = self.lm_head
    for l, layer in enumerate(self.layers):
      for name, t in _weights(layer): out[f"layers.{l}.{name}"] = t
    return out

def _weights(obj, prefix="") -> Iterator[tuple[str, Tensor]]:
  """(dotted name, tensor) of every weight of a layer: its tensors and those of its parts, not the KV cache."""
  for name, v in vars(obj).items():
    if isinstance(v, Tensor) and name not in ("cache_kv", "expert_bias"): yield prefix + name, v
    elif isinstance(v, (Attention, SparseMoeBlock, Experts)): yield from _weights(v, f"{prefix}{name}.")

def attention_mask_3d(T: int, S: int, start_pos: int | UOp, key_ok: Tensor | None) -> Tensor:
  """(B|1, T, S) bool: query t (absolute position start_pos+t) sees key s if s <= it and the key is not padding.

  key_ok (B, S) bool marks real (non-padding) keys. A query always sees itself, so a padding row is never empty
  (its output is meaningless but finite; real tokens never attend to it)."""
  q = (Tensor.arange(T) + start_pos).reshape(T, 1)                                # (T, 1) absolute query positions
  s = Tensor.arange(S).reshape(1, S)                                              # (1, S)
  causal = (s <= q).unsqueeze(0)                                                  # (1, T, S)
  if key_ok is None: return causal
  return causal & (key_ok.unsqueeze(1) | (s == q).unsqueeze(0))                   # (B, T, S)


# ================================================ losses ================================================

LB_CONVENTIONS = ("olmoe", "transformers")

def load_balancing_loss(router_logits: list[Tensor], num_experts: int, k: int, attention_mask: Tensor | None = None,
                        convention: str = "olmoe") -> Tensor:
  """The Switch-style auxiliary loss E * sum_e f_e * P_e, in one of two conventions (padding, mask 0, is ignored).

  P_e = mean router probability of expert e; f_e = share of the (token, slot) assignments that went to e.
  - "olmoe": what OLMoE was trained with (MegaBlocks' `batched_load_balancing_loss`): per layer, f normalised to
    sum to 1, then the L layers' values averaged. Perfectly uniform routing gives 1 in every layer.
  - "transformers": `OlmoeForCausalLM`'s aux_loss: f (summing to k) and P pooled over the tokens of all layers
    before the product. Uniform routing gives k; a model whose layers each use a different subset of the experts
    can also score as balanced, because an expert's load in one layer meets its probability in another."""
  if convention not in LB_CONVENTIONS: raise OlmoeError(f"load-balancing convention {convention!r}: use one of {LB_CONVENTIONS}")
  L = len(router_logits)
  p = Tensor.stack(*[z.softmax(-1) for z in router_logits]).float()              # (L, N, E), softmax in z's dtype
  _, i = topk(p, k)                                                               # (L, N, k)
  hits = (i.unsqueeze(-1) == Tensor.arange(num_experts)).float().sum(-2)          # (L, N, E) 0/1 per expert
  m = Tensor.ones(1, p.shape[1], 1) if attention_mask is None else attention_mask.reshape(1, -1, 1).float()  # (1, N, 1)
  if convention == "transformers":
    f, P = (hits * m).sum((0, 1)) / (L * m.sum()), (p * m).sum((0, 1)) / (L * m.sum())   # (E,), (E,) pooled
    return (f * P).sum() * num_experts
  f, P = (hits * m).sum(1) / (k * m.sum()), (p * m).sum(1) / m.sum()             # (L, E), (L, E) per layer
  return (f * P).sum(-1).mean() * num_experts

def router_z_loss(router_logits: list[Tensor]) -> Tensor:
  """Mean over tokens of logsumexp(z)^2, averaged over layers: keeps router logits small (ST-MoE; the OLMoE
  paper's beta term; MegaBlocks' `batched_router_zloss` gives the per-layer means)."""
  return Tensor.stack(*[z.float().logsumexp(-1).square().mean() for z in router_logits]).mean()

def lm_loss(model: Olmoe, ids: Tensor, attention_mask: Tensor | None = None, alpha: float | None = None,
            beta: float | None = None, convention: str = "olmoe") -> tuple[Tensor, dict[str, Tensor]]:
  """Training objective CE + alpha * LB + beta * Z for a batch ids (B, T); returns (total, parts): the three terms
  "ce", "lb", "z" and "load", each layer's expert load (L, E) as `expert_load` gives it (for logging; no loss).

  By default OLMoE's recipe: the load-balancing loss in MegaBlocks' per-layer form (balanced value 1), alpha and
  beta from the config (0.01 and 0.001 in OLMoE's). convention="transformers" gives the pooled form that
  `OlmoeForCausalLM` adds (balanced value k: the same alpha weighs it k times more). 0 turns a term off."""
  alpha = model.cfg.router_aux_loss_coef if alpha is None else alpha
  beta = model.cfg.router_z_loss_coef if beta is None else beta
  for name, v in (("alpha", alpha), ("beta", beta)):
    if not (has_type(v, "float") and v >= 0): raise OlmoeError(f"{name} = {v!r} must be a number >= 0")
  logits, routing = model(ids, attention_mask, return_routing=True)               # (B, T, V)
  nxt = ids[:, 1:] if attention_mask is None else attention_mask[:, 1:].cast(dtypes.bool).where(ids[:, 1:], -100)
  labels = nxt.pad(((0, 0), (0, 1)), value=-100)                                  # (B, T) the last position has none
  ce = cross_entropy(logits, labels)
  lb = load_balancing_loss(routing.logits, model.cfg.num_experts, model.top_k, attention_mask, convention)
  z = router_z_loss(routing.logits)
  return ce + alpha * lb + beta * z, {"ce": ce, "lb": lb, "z": z, "load": expert_load(routing, model.cfg.num_experts)}

def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
  """Mean over the labelled positions of -log softmax(logits)[label] = logsumexp(logits) - logits[label]; a label of
  -100 is not counted. The fp32 logits are materialised once, so that the forward's reductions and the backward's
  softmax read one buffer instead of each recomputing the LM head's product; the gradient is `_cross_entropy_grads`."""
  V = logits.shape[-1]
  x = logits.float().reshape(-1, V).contiguous()                                  # (M, V)
  lse = x.logsumexp(-1).detach().contiguous()                                     # (M,) its gradient is in the custom one
  return _cross_entropy(x, labels.reshape(-1).contiguous(), lse)

def _cross_entropy_grads(dout, call):
  """d CE / d logits = (softmax(logits) - onehot(label)) / labelled count on labelled rows, 0 elsewhere, in one
  elementwise pass over the logits (tinygrad's own backward also scatters the picked logit through a one-hot)."""
  x, labels, lse = Tensor(call.src[1]), Tensor(call.src[2]), Tensor(call.src[3])
  keep = labels != -100                                                           # (M,)
  w = keep.float() * (Tensor(dout) / keep.sum().maximum(1))                       # (M,) each row's weight
  p = (x - lse.unsqueeze(1)).exp() - (labels.unsqueeze(1) == Tensor.arange(x.shape[1])).float()   # (M, V)
  return (p * w.unsqueeze(1)).uop, None, None

@function(grad_fxn=_cross_entropy_grads)
def _cross_entropy(x: Tensor, labels: Tensor, lse: Tensor) -> Tensor:
  M, V = x.shape
  keep = labels != -100                                                           # (M,)
  picked = x.reshape(M * V)[Tensor.arange(M) * V + labels.maximum(0)]             # (M,) logits[label], gathered
  return ((lse - picked) * keep).sum() / keep.sum().maximum(1)

def expert_load(routing: Routing, num_experts: int) -> Tensor:
  """(L, E) fp32: the share of each layer's (token, slot) assignments that went to each expert (rows sum to 1)."""
  i = Tensor.stack(*routing.experts)                                              # (L, N, k)
  return (i.unsqueeze(-1) == Tensor.arange(num_experts)).float().sum(-2).mean(1) / i.shape[-1]

def update_router_bias(model: Olmoe, routing: Routing, rate: float | None = None) -> None:
  """Auxiliary-loss-free balancing (DeepSeek-V3), after a training step: each layer's expert bias moves by `rate`
  (gamma, default the config's) toward the experts that took less than the mean load: b_e += gamma * sign(mean - load_e)."""
  rate = model.cfg.router_bias_rate if rate is None else rate
  load = expert_load(routing, model.cfg.num_experts)                              # (L, E)
  for l, layer in enumerate(model.layers):
    if (b := layer.mlp.expert_bias) is None: raise OlmoeError("the model has no router bias: set router_bias_rate > 0 in its config")
    b.assign(b + rate * (load[l].mean() - load[l]).sign())


# =========================================== tinygrad helpers ===========================================
# How the model's products are written for tinygrad's compiler. Each changes the order of work, never a result
# beyond the order of fp32 additions.

LANES = 8           # partial sums of a one-row dot product
PRODUCT_LANES = 4   # partial sums per output of the training path's products (a measured choice: bench/README.md)

def dot(x: Tensor, w: Tensor, lanes: int = LANES) -> Tensor:
  """sum_j x_j w_j over the last axis (x and w broadcast against each other), in fp32, kept in `lanes` interleaved
  partial sums (j mod lanes) added at the end.

  With one running sum every addition waits for the previous one, and a matrix-vector product runs at the adder's
  latency instead of at memory speed. A product of several rows already has independent sums (a register tile of
  rows x outputs), so `linear` asks for lanes only when x has one row; the training path's products (`product`) ask
  for PRODUCT_LANES, which tinygrad's CPU kernels then add as one vector instead of one number at a time."""
  K = x.shape[-1]
  c = lanes if K % lanes == 0 else 1
  xs, ws = x.float().reshape(*x.shape[:-1], K // c, c), w.float().reshape(*w.shape[:-1], K // c, c)
  return (xs * ws).sum(-2).sum(-1)

def product(a: Tensor, b: Tensor) -> Tensor:
  """a @ b.T for a (..., M, K) and b (N, K) or a batch (..., N, K): every output a `dot` along the axis that both
  operands hold contiguously, in PRODUCT_LANES partial sums."""
  return dot(a.unsqueeze(-2), b if b.ndim == 2 else b.unsqueeze(-3), PRODUCT_LANES)

def transposed(a: Tensor, c: int = 16) -> Tensor:
  """a with its last two axes swapped, materialised. A large one goes through panels of c columns: (m, n) ->
  (n/c, m, c) -> (n/c, c, m), two passes that each read whole cache lines, where one pass reading down the columns
  would fetch a cache line for every number."""
  *lead, m, n = a.shape
  if n % c or m * n < 1 << 16: return a.transpose(-1, -2).contiguous()
  panels = a.reshape(*lead, m, n // c, c).transpose(-3, -2).contiguous()   # (..., n/c, m, c)
  return panels.transpose(-1, -2).contiguous().reshape(*lead, n, m)

def _matmul_grads(dy, call):
  """(dx, dw) of y = x @ w.T: dx = dy @ w, dw = dy.T @ x, each computed from row-major copies that it reduces
  along their contiguous axis, the layout of the forward product.

  tinygrad's own backward would fuse dy's expression into both products (recomputing it for every output) and
  reduce along strided axes; materialising dy once and transposing the operands in memory costs copies of
  O(M*(in+out)) numbers against the O(M*in*out) products they speed up."""
  x, w, dy = Tensor(call.src[1]), Tensor(call.src[2]), Tensor(dy).contiguous()
  if w.ndim == 2: x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])   # (M, in), (M, out)
  dx = product(dy, transposed(w))                                            # (.., M, out) . (.., in, out) -> (.., M, in)
  dw = product(transposed(dy), transposed(x))                                # (.., out, M) . (.., in, M) -> (.., out, in)
  return dx.reshape(call.src[1].shape).contiguous().uop, dw.contiguous().uop

@function(grad_fxn=_matmul_grads)
def _matmul(x: Tensor, w: Tensor) -> Tensor: return product(x, w)

def matmul(x: Tensor, w: Tensor) -> Tensor:
  """x @ w.T for x (..., M, in) and w (out, in), or a batch of weights w (..., out, in), with the backward pass of
  `_matmul_grads` (the training path's products). x is materialised first, so the backward reads it, and so is the
  result, so that its kernel keeps the product's own layout (a reshape or transpose after it, fused into the kernel,
  would merge or reorder its axes and defeat tinygrad's register tiling)."""
  return _matmul(x.contiguous(), w).contiguous()

def _softmax_grads(dp, call):
  """Backward of `_softmax` from its output p: dx = p * (dp - sum(dp * p)), no exponential recomputed."""
  p, dp = Tensor(call.gettuple(0)), Tensor(dp)
  return (p * (dp - (dp * p).sum(-1, keepdim=True))).uop,

@function(grad_fxn=_softmax_grads)
def _softmax(x: Tensor) -> Tensor:
  e = (x - x.max(-1, keepdim=True)).exp().contiguous()                       # one exponential per entry
  return e / e.sum(-1, keepdim=True)

def _swiglu_grads(da, call):
  """Backward of `swiglu` from the saved sigmoid s = sigmoid(g): silu(g) = g*s and silu'(g) = s + g*s*(1 - s), so no
  exponential is recomputed (tinygrad's own backward of silu evaluates it again for each use)."""
  gu, s, w, da = Tensor(call.src[1]), Tensor(call.src[2]), Tensor(call.src[3]), Tensor(da)
  I = s.shape[-1]
  g, u = gu[..., :I], gu[..., I:]
  gs = g * s                                                                 # silu(g)
  dg = da * u * w * (s + gs * (1 - s))
  du = da * gs * w
  return dg.cat(du, dim=-1).uop, None, (da * gs * u).sum(-1, keepdim=True).uop

@function(grad_fxn=_swiglu_grads)
def _swiglu(gu: Tensor, s: Tensor, w: Tensor) -> Tensor:
  I = s.shape[-1]
  return gu[..., :I] * s * gu[..., I:] * w

def swiglu(gu: Tensor, w: Tensor) -> Tensor:
  """silu(g) * u * w for gu = [g, u] (..., 2I) and row weights w (..., 1) -> (..., I), the experts' weighted SwiGLU
  in the training path, with sigmoid(g) computed once for the forward and the backward pass."""
  I = gu.shape[-1] // 2
  gu = gu.contiguous()
  return _swiglu(gu, gu[..., :I].sigmoid().detach().contiguous(), w.contiguous())

def _rows_grads(dout, call):
  """Backward of `rows`: source row j was read by the output rows back[j] (M, m), so dsrc[j] = sum_t dout[back[j, t]],
  a gather (tinygrad's own backward of a gather is a scatter through an (R, M) one-hot)."""
  back, d = Tensor(call.src[4]), Tensor(dout).contiguous()
  M, m = back.shape
  return d[back.reshape(M * m)].reshape(M, m, -1).sum(1).uop, None, None, None

@function(grad_fxn=_rows_grads)
def _rows(src: Tensor, idx: Tensor, keep: Tensor, back: Tensor) -> Tensor: return keep.unsqueeze(-1).where(src[idx], 0)

def rows(src: Tensor, idx: Tensor, keep: Tensor, back: Tensor) -> Tensor:
  """out[r] = src[idx[r]] where keep[r], else 0: src (M, C), idx and keep (R,) -> (R, C). back (M, m) lists, for
  every source row, the m output rows that read it (an output row that is not kept must read a row whose gradient
  is 0, or be listed nowhere)."""
  return _rows(src.contiguous(), idx.contiguous(), keep.contiguous(), back.contiguous())

def _per_block_grads(dout, call):
  """Backward of `per_block`: dW[e] = sum of the gradients of the blocks whose expert is e. The block experts are
  sorted, so these are sums of runs (`run_sums`); an (E, nb) one-hot product would repeat the work E times."""
  W, e, d = Tensor(call.src[1]), Tensor(call.src[2]), Tensor(dout)
  return run_sums(d, e, W.shape[0]).uop, None

@function(grad_fxn=_per_block_grads)
def _per_block(W: Tensor, e: Tensor) -> Tensor: return W[e]

def per_block(W: Tensor, e: Tensor) -> Tensor:
  """W[e] for expert weights W (E, ...) and sorted block experts e (nb,) -> (nb, ...), whose gradient is summed per
  expert."""
  return _per_block(W, e.contiguous())

def run_sums(y: Tensor, key: Tensor, K: int) -> Tensor:
  """(K, ...) sums of the rows of y (n, ...) whose sorted keys key (n,) are equal: out[v] = sum of y[j] with key[j] = v,
  0 for a key that does not occur. A segmented scan, log2 n passes of y[j] += y[j - s] within a run, then the last
  row of each run gathered: O(n log n) additions where a (K, n) one-hot product would take K*n per element."""
  n = key.shape[0]
  y = y.contiguous()
  step = 1
  while step < n:   # after the pass with step 2^j, y[j] sums the last min(2^(j+1), place in its run + 1) rows of its run
    same = (key[step:] == key[:-step]).reshape(n - step, *[1] * (y.ndim - 1))
    y = (y + same.where(y[:-step], 0).pad(((step, 0),) + ((0, 0),) * (y.ndim - 1))).contiguous()
    step *= 2
  v = Tensor.arange(K)                                                       # (K,)
  last = ((key.unsqueeze(0) <= v.unsqueeze(1)).sum(1) - 1).clip(0, n - 1)   # (K,) each key's last row
  present = (key[last] == v).reshape(K, *[1] * (y.ndim - 1))                 # (K, 1, ...) keys that occur
  return present.where(y[last], 0)

def _embed_grads(dout, call):
  """Backward of `embed`: dW[v] = sum of the gradients of the positions whose id is v: the positions sorted by id
  (`expert_order`), the runs of equal ids summed (`run_sums`). tinygrad's own backward of a gather is a scatter
  through a (V, N) one-hot, V*N*D multiply-adds."""
  W, i = Tensor(call.src[1]), Tensor(call.src[2])
  (V, D), N = W.shape, i.numel()
  i = i.reshape(N)
  perm, _ = expert_order(i, V)                                               # (N,) positions in id order
  s, y = i[perm].contiguous(), Tensor(dout).reshape(N, D)[perm]              # (N,), (N, D) sorted by id
  return run_sums(y, s, V).cast(W.dtype).uop, None

@function(grad_fxn=_embed_grads)
def _embed(W: Tensor, i: Tensor) -> Tensor: return W[i]

def embed(W: Tensor, i: Tensor) -> Tensor:
  """W[i] for an embedding W (V, D) and ids i (...) -> (..., D), whose gradient sums runs of sorted ids instead
  of scattering through a one-hot (training)."""
  return _embed(W, i.contiguous())

BLOCK = 64   # rows per block of experts_in_blocks (a measured choice: bench/README.md)

def experts_in_blocks(h: Tensor, g: Tensor, i: Tensor, W_gate_up: Tensor, W_down: Tensor, b: int = BLOCK) -> Tensor:
  """sum_s g_s * expert_{i_s}(h_n) for h (N, D), g and i (N, k) -> (N, D), the training path's MoE sum (as in
  MegaBlocks): the (token, slot) pairs sorted by expert, each expert's run padded to whole blocks of b rows, every
  block one expert's batched matrix product.

  Why it backpropagates well: each product's weight gradient is a per-block product summed over the blocks of
  its expert (no scatter over pairs), and the gathers of rows move gradients back by gathering through the inverse
  map; only the chosen experts compute, plus at most E*(b-1) padding rows."""
  (N, D), k, E = h.shape, i.shape[1], W_gate_up.shape[0]
  P, ar = N * k, Tensor.arange(E)
  perm, rank = expert_order(i, E)                                                # (P,), (P,) sorted position <-> pair
  hits = i.reshape(P).unsqueeze(1) == ar                                         # (P, E) each pair's expert
  count = hits.cast(dtypes.int32).sum(0)                                         # (E,) pairs per expert
  padded = (count + b - 1) // b * b                                              # (E,) rounded up to whole blocks
  first, row0 = count.cumsum(0) - count, padded.cumsum(0) - padded               # (E,) expert's first sorted position, first row
  nb = (P + E * (b - 1) + b - 1) // b                                            # blocks enough for any routing
  start = (Tensor.arange(nb) * b).unsqueeze(1)                                   # (nb, 1) each block's first row
  mine = (row0 <= start) & (start < row0 + padded)                               # (nb, E) the expert whose run holds the block
  e_blk = mine.any(1).where((mine * ar).sum(1), E - 1)                          # (nb,) block expert, sorted (spare blocks
  # at the end take the last expert: their rows are 0, so are their products and gradients)
  of_row = mine.unsqueeze(1).expand(nb, b, E).reshape(nb * b, E)                 # (R, E) with R = nb*b rows
  q = Tensor.arange(nb * b) - (of_row * row0).sum(1)                             # (R,) place in its expert's run
  keep = of_row.any(1) & (q < (of_row * count).sum(1))                           # (R,) rows that hold a pair
  pair = in_bounds(perm[((of_row * first).sum(1) + q).clip(0, P - 1)], P)       # (R,) the pair each row holds
  row = in_bounds((hits * row0).sum(1) + rank - (hits * first).sum(1), nb * b)  # (P,) the row each pair lands in
  x = rows(h, pair // k, keep, row.reshape(N, k))                                # (R, D) inputs in blocks
  w = rows(g.reshape(P, 1), pair, keep, row.reshape(P, 1))                       # (R, 1) their router weights
  gu = matmul(x.reshape(nb, b, D), per_block(W_gate_up, e_blk))                  # (nb, b, 2I)
  a = swiglu(gu, w.reshape(nb, b, 1))                                            # (nb, b, I) SwiGLU, weighted
  y = matmul(a, per_block(W_down, e_blk)).reshape(nb * b, D)                     # (R, D)
  # back to pairs; a padding row is listed as reading the pair in `pair`, harmless: its x and w are 0, so is its gradient
  return rows(y, row, Tensor.ones(P, dtype=dtypes.bool), pair.reshape(nb * b, 1)).reshape(N, k, D).sum(1)   # (N, D)

def in_bounds(i: Tensor, n: int) -> Tensor:
  """Ids i, already in [0, n), materialised and clipped to [0, n): a no-op that tells the compiler every load
  gathered by them is in bounds, so it emits plain vector loads without checks."""
  return i.contiguous().clip(0, n - 1)

def expert_order(i: Tensor, K: int) -> tuple[Tensor, Tensor]:
  """The entries of the ids i (values in [0, K)), flattened to P pairs, in id order (ties in pair order): perm (P,),
  the pair at each position of that order, and rank (P,), the position of each pair (the inverse permutation).

  Counting, in chunks of C ~ sqrt(P) pairs: a pair's rank is the number of pairs of smaller id, plus those of its id
  in earlier chunks (from per-chunk histograms), plus those in its own chunk before it; perm finds, for each position,
  its id, the chunk that holds that occurrence and the place in the chunk. About P*(K + 2C + P/C) comparisons, where
  comparing every pair with every other would take P*P."""
  P = i.numel()
  C = 1 << (P.bit_length() // 2)                                             # chunk length, about sqrt(P)
  nc = -(-P // C)                                                            # chunks
  e = i.reshape(P).cast(dtypes.int32).pad(((0, nc * C - P),), value=K)       # (nc*C,) padding takes id K: it sorts last
  ids, c_ar = Tensor.arange(K + 1), Tensor.arange(C)                         # (K+1,), (C,)
  H = (e.unsqueeze(1) == ids).reshape(nc, C, K + 1).cast(dtypes.int32).sum(1)   # (nc, K+1) histogram of each chunk
  # (nc, K+1) ... of the chunks up to each: a product with a lower-triangular matrix of ones, exact in fp32 while
  # counts stay below 2^24, where tinygrad's cumsum over a short axis reads every column once per row
  tri = (Tensor.ones(nc, nc).tril() @ H.float()).cast(dtypes.int32) if P < 1 << 24 else H.cumsum(0)
  H_upto = tri.contiguous()
  H_before = (H_upto - H).contiguous()                                       # (nc, K+1) ... of the chunks before each
  count = H_upto[-1]                                                         # (K+1,) pairs of each id
  first = (count.cumsum(0) - count).contiguous()                             # (K+1,) first position of each id
  ec = e.reshape(nc, C)
  same_before = (ec.unsqueeze(2) == ec.unsqueeze(1)) & (c_ar.reshape(C, 1) > c_ar)   # [c, t, u]: u < t, same id
  within = same_before.cast(dtypes.int32).sum(2).contiguous()                # (nc, C) same id earlier in the chunk
  p = Tensor.arange(P)
  e, chunk = e[:P], p // C
  rank = (first[e] + H_before.reshape(-1)[chunk * (K + 1) + e] + within.reshape(-1)[:P]).contiguous()   # (P,)
  # perm: position r holds the j-th pair of id key, in the chunk where the running count of key passes j
  key = ((first + count).unsqueeze(0) <= p.unsqueeze(1)).cast(dtypes.int32).sum(1)            # (P,)
  j = p - first[key]                                                         # (P,) occurrence of key at position r
  c = (H_upto.transpose(0, 1)[key] <= j.unsqueeze(1)).cast(dtypes.int32).sum(1).clip(0, nc - 1)   # (P,) its chunk
  jj = j - H_before.reshape(-1)[c * (K + 1) + key]                           # (P,) occurrence within that chunk
  t = ((ec[c] == key.unsqueeze(1)) & (within[c] == jj.unsqueeze(1))).where(c_ar, 0).sum(1)   # (P,) place in the chunk
  return (c * C + t).contiguous(), rank

def pairs_in_expert_order(h: Tensor, i: Tensor, E: int) -> tuple[Tensor, Tensor, Tensor]:
  """The (token, slot) pairs of i (N, k) (experts in [0, E)), p = n*k + s, sorted by expert: each pair's input row
  x (P, D) and expert e (P,) in that order, and the index (P,) that puts outputs back in pair order.

  Side by side, the pairs of one expert find its weights, gathered for each of them, in the cache rather than in
  memory; no pair's arithmetic changes. (One token's k pairs have distinct experts: `Experts` skips the sort.)"""
  (N, _), k = h.shape, i.shape[1]
  perm, rank = expert_order(i, E)                                            # (P,), (P,)
  return h[(perm // k).clip(0, N - 1)], i.reshape(N * k)[perm], rank.clip(0, N * k - 1)   # clips: see in_bounds


# ============================================== generation ==============================================

def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
  """Next ids (B,) from last-position logits (B, V): greedy at temperature 0, else softmax(logits/T) restricted to
  the top_k most likely ids (0 = all) and to the smallest set whose probability reaches top_p."""
  if temperature <= 0: return logits.argmax(-1)
  out = []
  for row in logits.astype(np.float64) / temperature:
    # candidate ids, most likely first (ties: lower id first); with top_k, only the k largest are sorted
    cand = np.argpartition(-row, top_k - 1)[:top_k] if 0 < top_k < len(row) else np.arange(len(row))
    order = cand[np.lexsort((cand, -row[cand]))]
    probs = np.exp(row[order] - row[order[0]]); probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1.0 else len(probs)   # nucleus: >= top_p
    probs = probs[:keep] / probs[:keep].sum()
    out.append(order[rng.choice(keep, p=probs)])
  return np.array(out)


PREFILL_MULTIPLE = 16   # prompts are left-padded to a multiple of this many positions (one compiled prefill each)
PROMPT_STEPS = 16       # a single prompt this short runs through the decode step, one id at a time (`generate`)

class Step(NamedTuple):
  """One generated position for every row of the batch; routing arrays are (L, B, k) when asked for."""
  tokens: list[int]
  weights: np.ndarray | None = None
  experts: np.ndarray | None = None

def generate(model: Olmoe, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: tuple[int, ...] | None = None,
             with_routing: bool = False, reuse_cache: bool = False) -> Iterator[Step]:
  """Yield one `Step` per new position for a batch of prompts (token-id lists, left-padded here).

  The whole prompt goes through the model in one prefill call, `TinyJit`-compiled once per padded prompt length;
  each later token is one compiled decode step at a symbolic position. A single prompt of at most PROMPT_STEPS ids
  goes through that decode step instead, one id at a time: for a few ids that costs less than compiling a prefill,
  which is most of a fresh process's wait for its first token. Routing stays on the device; only the
  last-position logits come back to sample. A row that produced a stop id (default: the config's EOS) keeps
  yielding the pad id until every row stopped.

  With reuse_cache=True (one prompt), the ids that the previous reuse_cache call left in the KV cache (its prompt and
  the tokens it fed back) are not run again where the new prompt starts with them: a chat's earlier turns. Only the
  caller knows that the weights did not change in between."""
  cfg = model.cfg
  if not prompts or any(len(p) == 0 for p in prompts): raise OlmoeError("empty prompt")
  if max_new_tokens <= 0: raise OlmoeError(f"max_new_tokens must be positive, got {max_new_tokens}")
  Tp, B, S_max = max(map(len, prompts)), len(prompts), cfg.context_length          # prompt positions, batch, cache
  if Tp > S_max - 1: raise OlmoeError(f"prompt of {Tp} tokens is longer than the model's context ({S_max} positions)")
  routing_key = (model.top_k, None if model.expert_mask is None else model.expert_mask.numpy().tobytes()) \
                if reuse_cache else None                     # what the held keys and values were computed with
  reuse, npad = held_prefix(model, prompts, routing_key) if reuse_cache else 0, None
  by_steps = not reuse and B == 1 and Tp <= PROMPT_STEPS
  if reuse:                              # the cache holds the prompt's first `reuse` ids, after the same left pad
    npad = [model._held[1]]
    Tp = npad[0] + len(prompts[0])
  elif by_steps:                         # one masked pad at position 0 (the decode step's positions start at 1)
    npad, Tp = [1], Tp + 1
  else:
    # left-pad to a multiple of PREFILL_MULTIPLE, so that one compiled prefill serves a range of prompt lengths (not
    # where that would shorten the generation, nor with dynamic RoPE, whose frequencies depend on the length)
    padded = -(-Tp // PREFILL_MULTIPLE) * PREFILL_MULTIPLE
    if cfg.rope_kind != "dynamic" and padded + min(max_new_tokens, S_max - Tp) <= S_max: Tp = padded
    npad = [Tp - len(p) for p in prompts]
  stop = set(cfg.eos_ids if stop_ids is None else stop_ids)
  rng = np.random.default_rng(seed)
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  key_ok = Tensor([[0] * n + [1] * (S_max - n) for n in npad], dtype=dtypes.bool)           # (B, S_max)
  offset = Tensor(npad, dtype=dtypes.int32).reshape(B, 1)                                   # (B, 1) position shift
  run = step_runner()
  # one KV cache per batch size, made on first use and kept for the model's life: the compiled decode step replays
  # into these buffers
  if B not in model._caches:
    check_cache_size(model, B)
    model._caches[B] = run(_kv_caches, model, B)
  for layer, cache in zip(model.layers, model._caches[B]): layer.self_attn.cache_kv = cache
  v_pos = UOp.variable("start_pos", 1, S_max - 1)
  fed: list[int] = []                                          # the ids whose keys and values the cache now holds
  model._held = None
  try:
    if reuse:                          # only the new ids, at the positions after the held ones
      new, start = prompts[0][reuse:], npad[0] + reuse
      T = -(-len(new) // PREFILL_MULTIPLE) * PREFILL_MULTIPLE  # right-padded: see _extend
      if cfg.rope_kind == "dynamic" or start + T > S_max: T = len(new)
      if (extend := model._extenders.get(k := (B, T, model.expert_mask is None, model.top_k))) is None:
        extend = model._extenders[k] = run.step(model, "extend", k, _extend)
      chunk = Tensor([new + [pad] * (T - len(new))], dtype=dtypes.int32)                    # (1, T)
      v_start = UOp.variable("start_pos", 1, S_max - T)       # every value keeps start_pos + T inside the cache
      logits, routing = run(extend, model, chunk, v_start.bind(start), key_ok, offset, model.expert_mask)
      at = len(new) - 1                                        # the last new id's row of the (B, T, V) logits
    elif by_steps:
      decode = decoder(model, run, B)
      for j, t in enumerate(prompts[0]):
        logits, routing = run(decode, model, Tensor([[t]], dtype=dtypes.int32), v_pos.bind(1 + j), key_ok, offset,
                              model.expert_mask)
      at = -1
    else:
      ids = Tensor([[pad] * n + p for n, p in zip(npad, prompts)], dtype=dtypes.int32)        # (B, Tp)
      if (prefill := model._prefills.get(k := (B, Tp, model.expert_mask is None, model.top_k))) is None:
        prefill = model._prefills[k] = run.step(model, "prefill", k, _prefill)
      logits, routing = run(prefill, model, ids, key_ok, offset, model.expert_mask)
      at = -1
    fed, decode = list(prompts[0]), decoder(model, run, B)
    done = [False] * B
    for n in range(min(max_new_tokens, S_max - Tp)):
      out = run(_to_host, logits, routing, with_routing, at)
      nxt = sample(out[0], rng, temperature, top_k, top_p)
      toks = [pad if d else int(t) for d, t in zip(done, nxt)]
      yield Step(toks, *out[1:])
      done = [d or t in stop for d, t in zip(done, toks)]
      if all(done) or n + 1 == max_new_tokens: break
      tok = Tensor(toks, dtype=dtypes.int32).reshape(B, 1)                                  # (B, 1)
      logits, routing = run(decode, model, tok, v_pos.bind(Tp + n), key_ok, offset, model.expert_mask)
      fed.append(toks[0]); at = -1
  finally:
    for layer in model.layers: layer.self_attn.cache_kv = None
    model._held = (routing_key, npad[0], fed) if reuse_cache and B == 1 and cfg.rope_kind != "dynamic" else None
    run.finish()

def decoder(model: Olmoe, run, B: int):
  """The model's compiled decode step for batch size B (made on first use)."""
  if (decode := model._decoders.get(k := (B, model.expert_mask is None, model.top_k))) is None:
    decode = model._decoders[k] = run.step(model, "decode", k, _decode_step)
  return decode

def held_prefix(model: Olmoe, prompts: list[list[int]], routing_key: tuple) -> int:
  """How many of a single prompt's first ids the batch-1 KV cache already holds from the previous call (a chat's
  earlier turns), computed with the same routing; 0 when none can be reused. At least one id is always run, for the
  logits of the next."""
  held = model._held
  if len(prompts) != 1 or held is None or held[0] != routing_key: return 0
  n = 0
  for a, b in zip(held[2], prompts[0][:-1]):
    if a != b: break
    n += 1
  return n if held[1] + len(prompts[0]) <= model.cfg.context_length - 1 else 0

def check_cache_size(model: Olmoe, B: int) -> None:
  """On the CPU, refuse a KV cache (context_length positions of every layer) that cannot fit in memory."""
  from olmoe_checkpoint import on_cpu, physical_memory
  cfg = model.cfg
  need = 2 * B * cfg.n_kv_heads * cfg.context_length * cfg.head_dim * model.dtype.itemsize * cfg.num_hidden_layers
  if on_cpu() and (have := physical_memory()) is not None and need > have:
    raise OlmoeError(f"the KV cache of {cfg.context_length} positions needs {need / 2**30:.1f} GiB for a batch of {B}, "
                     f"this machine has {have / 2**30:.1f} GiB")

def _kv_caches(model: Olmoe, B: int) -> list[Tensor]:
  """Zeroed k and v caches of every layer for batch size B: (2, B, nkv, S_max, hd) each."""
  shape = (2, B, model.cfg.n_kv_heads, model.cfg.context_length, model.cfg.head_dim)
  return [Tensor.zeros(*shape, dtype=model.dtype).contiguous().realize() for _ in model.layers]

def _prefill(model: Olmoe, ids: Tensor, key_ok: Tensor, offset: Tensor, expert_mask: Tensor | None):
  """All Tp prompt positions of ids (B, Tp) in one call (stale cache entries past them are never attended to)."""
  Tp = ids.shape[1]
  positions = Tensor.arange(Tp).reshape(1, Tp) - offset                                    # (B, Tp)
  mask = attention_mask_3d(Tp, Tp, 0, key_ok[:, :Tp])                                      # (B, Tp, Tp)
  return _realized(*model.forward(ids, positions, mask, 0, last_only=True, expert_mask=expert_mask))

def _decode_step(model: Olmoe, tok: Tensor, start_pos: UOp, key_ok: Tensor, offset: Tensor, expert_mask: Tensor | None):
  """One new token per row at position start_pos (symbolic, so one compiled graph serves every position): `_extend`
  with T = 1 and only the last logits. Tensors that change between calls (the expert mask too) are arguments, so the
  compiled graph reads their new values."""
  return _extend(model, tok, start_pos, key_ok, offset, expert_mask, every=False)

def _extend(model: Olmoe, ids: Tensor, start_pos: UOp, key_ok: Tensor, offset: Tensor, expert_mask: Tensor | None,
            every: bool = True):
  """T more positions ids (B, T) after the start_pos ones the cache holds (a chat's new turn), with the logits of
  every position (or, every=False, of the last). The ids may end in padding, so that one compiled graph serves a
  range of lengths: its keys and values land in cache slots that each later token overwrites before any query can
  see them."""
  T = ids.shape[1]
  positions = (Tensor.arange(T) + start_pos).reshape(1, T) - offset                        # (B, T)
  mask = attention_mask_3d(T, start_pos + T, start_pos, key_ok[:, :start_pos + T])          # (B, T, S)
  logits, routing = model.forward(ids, positions, mask, start_pos, last_only=not every, expert_mask=expert_mask)
  return _realized(logits, routing, every)

def _realized(logits: Tensor, r: Routing, every: bool = False) -> tuple[Tensor, Routing]:
  """The (B, V) fp32 last-position logits (every position's, (B, T, V), if asked) and the routing, realized inside
  the compiled call."""
  weights, experts = [w.realize() for w in r.weights], [i.realize() for i in r.experts]
  return (logits if every else logits[:, -1]).float().realize(), Routing([], weights, experts)

def _to_host(logits: Tensor, routing: Routing, with_routing: bool, at: int = -1):
  """Position `at`'s (B, V) logits as numpy (and, if asked, its routing, (L, B, k) each); (B, V) logits are the
  last position's already."""
  lg = logits.numpy()
  if lg.ndim == 3: lg = lg[:, at]                                                            # (B, V)
  if not with_routing: return lg, None, None
  B = lg.shape[0]
  pick = lambda ts: np.stack([t.reshape(B, -1, t.shape[-1])[:, at].float().numpy() for t in ts])   # (L, B, k)
  return lg, pick(routing.weights), pick(routing.experts).astype(np.int64)

def step_runner():
  """How `generate` makes and runs its compiled steps: `run.step(model, kind, shape, fn)` makes one (a TinyJit of fn,
  taken from olmoe_speedups' cache of captured steps where that applies), `run(step, *args)` calls it, with the
  accelerations of tinygrad's CPU runtime where they apply (OLMOE_SPEEDUPS=0 turns them off), else as a plain call;
  `run.finish()` at the end."""
  import olmoe_speedups
  r = olmoe_speedups.runner(Device.DEFAULT)
  run = lambda fn, *args: r.run(fn, *args)
  run.finish = r.finish
  run.step = lambda model, kind, shape, fn: r.step(model, kind, shape, fn, Device.DEFAULT)   # a TinyJit of fn
  return run


# ================================================ loading ================================================

def load(name: str, dtype: DType | str | None = None, progress: bool = True,
         quantize: str | None = None) -> tuple[Olmoe, "Tokenizer | None"]:
  """(model, tokenizer) from a folder holding config.json, safetensors (sharded or not) and tokenizer.json, or a hub
  repo id, or a GGUF file (or a folder holding one: olmoe_gguf.py, its quantised weights kept quantised). Weights
  keep their stored dtype unless `dtype` is given ("float32" to compare with an fp32 reference); quantize="int8"
  holds the large ones in int8 (olmoe_int8.py). The files are read by olmoe_checkpoint.py, the tokenizer by
  olmoe_tokenizer.py."""
  from olmoe_checkpoint import load_checkpoint
  return load_checkpoint(name, OlmoeConfig, Olmoe, dtype, progress, quantize=quantize)


# ============================================== command line ==============================================

DEMO_MODEL = Path(__file__).resolve().parent / "models" / "olmoe-demo"   # the tiny model that ships with the repo
REAL_MODEL = "allenai/OLMoE-1B-7B-0924"

def main(argv=None) -> int:
  """`python olmoe.py --prompt TEXT [--model DIR] ...`: generate a continuation (the options: olmoe_cli.py)."""
  import olmoe_cli
  if "--serve" in (sys.argv[1:] if argv is None else argv):             # the HTTP server: olmoe_server.py
    import olmoe_server
    load_model = lambda name, dtype, quantize: load(name, dtype, progress=sys.stderr.isatty(), quantize=quantize)
    return olmoe_server.main("olmoe.py", argv, load_model, DEMO_MODEL, REAL_MODEL)
  args = olmoe_cli.build_parser("olmoe.py").parse_args(argv)
  def run():
    if args.model is None: args.model = olmoe_cli.default_model(DEMO_MODEL, REAL_MODEL)
    olmoe_cli.check_request(args)
    dtype = olmoe_cli.prepare_compiler(args.dtype)                         # before the first kernel is compiled
    model, tok = load(args.model, dtype, progress=sys.stderr.isatty(), quantize=args.quantize)
    olmoe_cli.run_cli(args, model, tok)
  return olmoe_cli.exit_code(run)

if __name__ == "__main__":
  import olmoe, olmoe_cli   # run as the module `olmoe` that the other files import: one OlmoeError class
  olmoe_cli.exit_now(olmoe.main())
