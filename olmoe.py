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
    L  num_hidden_layers

Sections, in the order data flows: config, building blocks (norm, rope, attention), the router, the
experts and the MoE block, the decoder, losses, generation, tokenizer, checkpoint loading, command line.

Not handled: training-time features of the original codebase beyond its losses (no expert parallelism, no
capacity factor: routing is dropless), rope types other than default/linear/dynamic, `attention_bias=True`,
sliding windows, quantised weights, and speculative decoding.
"""
from __future__ import annotations
import argparse, atexit, codecs, ctypes, importlib.metadata, json, math, os, pickle, re, struct, sys, tempfile, time
import unicodedata
import regex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, NamedTuple
import numpy as np
from tinygrad import Device, Tensor, TinyJit, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.engine.jit import CapturedJit
from tinygrad.engine.realize import get_call_arg_uops, get_runtime
from tinygrad.helpers import CACHEDB, CACHELEVEL, DEBUG, NUM_CPU_THREADS, tqdm
from tinygrad.runtime.ops_cpu import CPUProgram
from tinygrad.uop.ops import Ops
import tinygrad.codegen


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
    if "rope_theta" in rope: d.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", rope.get("type", "default")) != "default": d["rope_scaling"] = rope
    if "num_local_experts" in d: d.setdefault("num_experts", d["num_local_experts"])
    if d.get("hidden_act", "silu") != "silu": raise OlmoeError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
    if d.get("attention_bias"): raise OlmoeError("unsupported: attention_bias=true")
    nullable = {"num_key_value_heads", "clip_qkv", "rope_scaling", "eos_token_id", "pad_token_id", "bos_token_id"}
    cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and (d[f.name] is not None or f.name in nullable)})
    if cfg.rope_scaling is not None and cfg.rope_kind not in ("linear", "dynamic"):
      raise OlmoeError(f"unsupported rope_scaling type {cfg.rope_kind!r} (supported: default, linear, dynamic)")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.n_kv_heads:
      raise OlmoeError("config: hidden_size must divide into heads, and heads into key/value heads")
    if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
      raise OlmoeError(f"config: num_experts_per_tok={cfg.num_experts_per_tok} must be in 1..num_experts={cfg.num_experts}")
    return cfg


# ============================================ building blocks ============================================

LANES = 8   # partial sums per dot product (see dot)

def dot(x: Tensor, w: Tensor, lanes: int = LANES) -> Tensor:
  """sum_j x_j w_j over the last axis (x and w broadcast against each other), in fp32.

  The sum is kept in `lanes` interleaved partial sums (j mod lanes) that are added at the end. With a single running
  sum each addition waits for the previous one, and a CPU matrix-vector product runs at the adder's latency
  instead of at memory speed; independent partial sums let the compiler keep one accumulator per lane
  (bench/README.md: the 50304 x 1024 LM head 24 -> 16 ms). Same products, another order of the additions."""
  K = x.shape[-1]
  c = lanes if K % lanes == 0 else 1
  xs, ws = x.float().reshape(*x.shape[:-1], K // c, c), w.float().reshape(*w.shape[:-1], K // c, c)
  return (xs * ws).sum(-2).sum(-1)

def linear(x: Tensor, w: Tensor) -> Tensor:
  """x @ w.T for an (out, in) weight, accumulated in fp32 and rounded once to x's dtype (as torch does in bf16).
  With several rows of x the compiler already keeps a tile of independent sums (rows x outputs), and lanes on top
  of it only spill registers (a 32-token bf16 projection 6.2 -> 2.0 ms): lanes are for the one-row product."""
  lanes = LANES if all(isinstance(n, int) and n == 1 for n in x.shape[:-1]) else 1
  return dot(x.unsqueeze(-2), w, lanes).cast(x.dtype)                        # (..., 1, in) . (out, in) -> (..., out)

def take(w: Tensor, i: Tensor) -> Tensor:
  """Rows w[i] gathered on the device. 16-bit floats move as raw bits (exact, and tinygrad's CPU backend has no
  bf16 reduction to gather with)."""
  if w.dtype.itemsize != 2: return w[i]
  return w.bitcast(dtypes.uint16)[i].bitcast(w.dtype)

def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
  """OLMoE/Llama RMSNorm: normalise in fp32, cast back to x's dtype, then scale (in x's dtype). The result is
  materialised: left fused, the compiler recomputes the normalisation inside every matmul that reads it."""
  xf = x.float()
  return (w * (xf * (xf.square().mean(-1, keepdim=True) + eps).rsqrt()).cast(x.dtype)).contiguous()

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
  rope_in_fp32 = False         # OLMoE casts cos/sin to the model dtype (FlexOlmo rotates in fp32)

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

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, start_pos: int | UOp = 0) -> Tensor:
    cfg, (B, T, _) = self.cfg, x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
    q = self.norm(linear(x, self.q_proj), self.q_norm)                      # (B, T, nh*hd)
    k = self.norm(linear(x, self.k_proj), self.k_norm)                      # (B, T, nkv*hd)
    v = linear(x, self.v_proj)                                              # (B, T, nkv*hd)
    if T > 1: v = v.contiguous()    # a plain matmul: fused into the cache write, a prefill's v took 5x longer
    if cfg.clip_qkv is not None: q, k, v = (t.clip(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(B, T, nh, hd).transpose(1, 2)                             # (B, nh, T, hd)
    k = k.reshape(B, T, nkv, hd).transpose(1, 2)                            # (B, nkv, T, hd)
    v = v.reshape(B, T, nkv, hd).transpose(1, 2)                            # (B, nkv, T, hd)
    if self.rope_in_fp32: q, k = apply_rope(q.float(), cos, sin).cast(x.dtype), apply_rope(k.float(), cos, sin).cast(x.dtype)
    else: q, k = apply_rope(q, cos.cast(x.dtype), sin.cast(x.dtype)), apply_rope(k, cos.cast(x.dtype), sin.cast(x.dtype))
    # q after RoPE is materialised, and so are the softmax weights in a prefill, so that the attention matmuls are
    # plain products. Fused, they take about twice as long to lower (a fully unrolled reduction recomputing RoPE or
    # softmax per term), and tinygrad's hash of the fused decode kernel, whose symbolic cost estimate grows with the
    # RoPE terms, took 5.5 s on the demo's first decode step. The decode step keeps the softmax fused.
    q = q.contiguous()
    if self.cache_kv is not None:                                           # write this call's keys, read all so far
      self.cache_kv[:, :, :, start_pos:start_pos + T].assign(Tensor.stack(k, v)).realize()
      k, v = self.cache_kv[0, :, :, :start_pos + T], self.cache_kv[1, :, :, :start_pos + T]  # (B, nkv, S, hd)
    # grouped-query attention: nh/nkv query heads share one key/value head (transformers' repeat_kv order)
    q = q.reshape(B, nkv, nh // nkv, T, hd)                                 # (B, nkv, nh/nkv, T, hd)
    k, v = k.unsqueeze(2), v.unsqueeze(2)                                   # (B, nkv, 1, S, hd)
    scores = q.float().matmul(k.float().transpose(-1, -2)).cast(x.dtype) * hd ** -0.5   # (B, nkv, nh/nkv, T, S)
    p = mask.unsqueeze(1).unsqueeze(1).where(scores.float(), -math.inf).softmax(-1).cast(x.dtype)  # (B, nkv, nh/nkv, T, S)
    if T > 1: p = p.contiguous()
    o = p.float().matmul(v.float()).cast(x.dtype)                           # (B, nkv, nh/nkv, T, hd)
    o = o.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)      # (B, T, nh*hd)
    return linear(o, self.o_proj)                                           # (B, T, D)


# ================================================ router ================================================

def topk(p: Tensor, k: int) -> tuple[Tensor, Tensor]:
  """The k largest entries of the last axis, descending (ties go to the lower index): values, int32 indices."""
  E = p.shape[-1]
  ar = Tensor.arange(E)
  # rank[e] = how many entries beat entry e; the k entries of rank < k are the top-k, and rank is their slot
  beats = (p.unsqueeze(-2) > p.unsqueeze(-1)) | ((p.unsqueeze(-2) == p.unsqueeze(-1)) & (ar < ar.unsqueeze(-1)))
  rank = beats.sum(-1).contiguous()                                          # (..., E) read by both outputs
  slot = rank.unsqueeze(-2) == Tensor.arange(k).unsqueeze(-1)                # (..., k, E): slot s holds expert e
  idx = (slot * ar).sum(-1).cast(dtypes.int32)                               # (..., k)
  return slot.where(p.unsqueeze(-2), 0).sum(-1), idx                         # (..., k), (..., k)

def route(h: Tensor, W_r: Tensor, k: int, renormalise: bool = False,
          expert_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
  """The router: z = W_r h, p = softmax(z) over all E experts (fp32), keep the top k.

  h (N, D) hidden states, W_r (E, D) router weights, expert_mask (E,) bool (False = the expert is excluded: its
  logit becomes -inf before the softmax, so it takes no slot and the softmax renormalises over the rest).
  Returns z (N, E) logits in the model dtype, g (N, k) weights in the model dtype (summing to < 1 unless
  `renormalise`), and i (N, k) int32 expert ids, slot 0 the most probable.
  """
  # z and p are materialised: the logits, the weights and the ids each read them, and left lazy every one of those
  # kernels recomputed the router's product and softmax
  z = linear(h, W_r).contiguous()                                            # (N, E)
  zf = z.float() if expert_mask is None else expert_mask.where(z.float(), -math.inf)
  p = zf.softmax(-1).contiguous()                                            # (N, E) fp32
  g, i = topk(p, k)                                                          # (N, k), (N, k)
  if renormalise: g = g / g.sum(-1, keepdim=True)
  return z, g.cast(z.dtype), i


# ======================================= experts and the MoE block =======================================

class SparseMoeBlock:
  """E SwiGLU experts stored as stacked tensors (gpt-fast style), indexed on the device by the routed expert ids.

  expert_e(x) = W_down[e] (silu(W_gate[e] x) * W_up[e] x); gate and up are stored fused as gate_up_proj[e] =
  [W_gate[e]; W_up[e]] (transformers 5's layout), so one gathered matrix gives both.
  y = sum_{s<k} g_s * expert_{i_s}(x): only the k chosen experts run for each token (no dense all-experts compute).
  """
  def __init__(self, cfg: OlmoeConfig):
    E, D, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    self.cfg = cfg
    self.gate = Tensor.normal(E, D, std=0.02)                                # (E, D) router W_r
    self.experts_gate_up_proj = Tensor.normal(E, 2 * I, D, std=0.02)         # (E, 2I, D)
    self.experts_down_proj = Tensor.normal(E, D, I, std=0.02)                # (E, D, I)

  def __call__(self, x: Tensor, expert_mask: Tensor | None = None, k: int | None = None) -> tuple[Tensor, tuple]:
    B, T, D = x.shape
    k, I = k or self.cfg.num_experts_per_tok, self.cfg.intermediate_size
    h = x.reshape(B * T, D)                                                  # (N, D)
    z, g, i = route(h, self.gate, k, self.cfg.norm_topk_prob, expert_mask)   # (N, E), (N, k), (N, k)
    y = expert_ffn(h, i, self.experts_gate_up_proj, self.experts_down_proj, I)  # (N, k, D)
    out = (y * g.unsqueeze(-1)).float().sum(1).cast(x.dtype)                 # (N, D) weighted sum over the k slots
    return out.reshape(B, T, D), (z, g, i)

def expert_order(i: Tensor) -> tuple[Tensor, Tensor]:
  """The (token, slot) pairs of i (N, k), flattened to p = n*k + s, in expert order (ties in pair order).

  Returns perm (P,), the pair at each position of that order, and rank (P,), the position of each pair (the inverse
  permutation). P*P comparisons: about 0.1 ms at P = 256 (32 tokens, k = 8), and at 2048 tokens about 1% of the
  expert products' arithmetic (2P^2 operations against 6DI per pair)."""
  P = i.numel()
  e, p = i.reshape(P), Tensor.arange(P)                                      # (P,) expert of each pair, pair ids
  key = e * P + p                                                            # (P,) ordered by expert, then pair
  rank = (key.unsqueeze(0) < key.unsqueeze(1)).sum(1).contiguous()          # (P,) how many pairs come before
  perm = ((rank.unsqueeze(0) == p.unsqueeze(1)) * p).sum(1).contiguous()    # (P,) the pair whose rank is each position
  return perm, rank

def expert_ffn(h: Tensor, i: Tensor, gate_up: Tensor, down: Tensor, I: int) -> Tensor:
  """Run each token through its k chosen experts: h (N, D), i (N, k) -> (N, k, D), weights gathered by id.

  Each (token, slot) pair is one matrix-vector product with its expert's gathered weights. With several tokens (a
  prefill) the pairs are first put in expert order (`expert_order`), so that the pairs of an expert sit side by side
  and its weights, gathered for each of them, come from the cache rather than from memory; the outputs are put back
  in pair order at the end. The order changes no pair's arithmetic (bench/README.md: prefill 1.3-1.7x faster).

  Details that keep the gathered products memory-bound (bench/README.md): the ids are clipped to [0, E), which
  they already are, so that tinygrad's compiler knows every gathered load is in bounds and emits plain vector
  loads (they are materialised first, so that the clip lands in the gathering kernel and not in the router's);
  gate/up is one matrix-vector product over the 2I gathered rows; the SwiGLU activation is materialised once, so
  that the down projection reads it instead of recomputing silu for each of its D output rows; and so is the
  output, so that the weighted sum over the k slots does not become the down projection's reduction loop."""
  (N, D), k, E = h.shape, i.shape[1], gate_up.shape[0]
  P = N * k                                                                  # (token, slot) pairs
  if N == 1: x, e = h.expand(k, D), i.reshape(k)                             # (k, D), (k,) one token: order is moot
  else:
    perm, rank = expert_order(i)                                             # (P,), (P,)
    x, e = h[(perm // k).clip(0, N - 1)], i.reshape(P)[perm]                 # (P, D), (P,) in expert order
  e = e.contiguous().clip(0, E - 1)                                          # (P,) a no-op that drops bounds checks
  gu = dot(x.reshape(P, 1, D), take(gate_up, e)).cast(h.dtype)              # (P, 1, D) . (P, 2I, D) -> (P, 2I)
  a = (gu[:, :I].silu() * gu[:, I:]).contiguous()                            # (P, I) SwiGLU
  y = dot(a.reshape(P, 1, I), take(down, e)).cast(h.dtype).contiguous()     # (P, 1, I) . (P, D, I) -> (P, D)
  if N > 1: y = y[rank.clip(0, P - 1)]                                       # (P, D) back in pair order
  return y.reshape(N, k, D)                                                  # (N, k, D)


# ================================================ decoder ================================================

class DecoderLayer:
  """Pre-norm block: h += attn(norm(h)); h += moe(norm(h)). The residual stream is materialised after each add:
  left lazy, every later layer would recompute it from all earlier layers' outputs."""
  def __init__(self, cfg: OlmoeConfig):
    self.cfg = cfg
    self.input_layernorm = Tensor.ones(cfg.hidden_size)                      # (D,)
    self.self_attn = Attention(cfg)
    self.post_attention_layernorm = Tensor.ones(cfg.hidden_size)             # (D,) the norm *before* the MoE
    self.mlp = SparseMoeBlock(cfg)

  def __call__(self, h, cos, sin, mask, start_pos=0, expert_mask=None, k=None):
    eps = self.cfg.rms_norm_eps
    h = (h + self.self_attn(rms_norm(h, self.input_layernorm, eps), cos, sin, mask, start_pos)).contiguous()  # (B,T,D)
    m, routing = self.mlp(rms_norm(h, self.post_attention_layernorm, eps), expert_mask, k)
    return (h + m).contiguous(), routing                                                               # (B, T, D)


class Routing(NamedTuple):
  """Per layer (a list of L entries): router logits z (N, E), weights g (N, k), expert ids i (N, k)."""
  logits: list[Tensor]
  weights: list[Tensor]
  experts: list[Tensor]


class Olmoe:
  """The causal LM: embed, L decoder layers, final norm, LM head. `model(ids)` -> logits (B, T, V)."""
  Layer = DecoderLayer
  norm_fn = staticmethod(rms_norm)

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

  @property
  def dtype(self) -> DType: return self.embed_tokens.dtype

  def forward(self, ids: Tensor, positions: Tensor, mask: Tensor, start_pos: int | UOp = 0, last_only: bool = False,
              expert_mask: Tensor | None = None, hidden: bool = False) -> tuple[Tensor, Routing]:
    """ids (B, T) int, positions (B, T) int, mask (B, T, S) bool (True = query may attend to key); expert_mask
    defaults to the model's. Returns logits (B, T, V), or with hidden=True the final normed states (B, T, D)."""
    if expert_mask is None: expert_mask = self.expert_mask
    h = take(self.embed_tokens, ids).contiguous()                                  # (B, T, D) read by two kernels
    cos, sin = rope_tables(positions, rope_inv_freq(self.cfg, start_pos + ids.shape[1]))   # (B, 1, T, hd) each
    # computed once here, not again inside every layer's kernels that read them
    cos, sin, mask = cos.contiguous(), sin.contiguous(), mask.contiguous()
    routing = Routing([], [], [])
    for layer in self.layers:
      h, (z, g, i) = layer(h, cos, sin, mask, start_pos, expert_mask, self.top_k)  # (B, T, D)
      routing.logits.append(z); routing.weights.append(g); routing.experts.append(i)
    if last_only: h = h[:, -1:]                                                    # (B, 1, D) generation needs one row
    h = self.norm_fn(h, self.norm, self.cfg.rms_norm_eps)                          # (B, T, D)
    return (h if hidden else linear(h, self.lm_head)), routing                     # (B, T, V)

  def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
               return_routing: bool = False):
    """Logits (B, T, V) for input_ids (B, T); attention_mask (B, T) of 1/0 marks (left) padding, as in transformers.

    As in transformers, positions default to 0..T-1 whatever the padding (pass position_ids to change that).
    With return_routing=True also returns a `Routing` (router logits per layer, for the losses and analyses)."""
    B, T = input_ids.shape
    if position_ids is None: position_ids = Tensor.arange(T).reshape(1, T).expand(B, T)
    mask = attention_mask_3d(T, T, 0, None if attention_mask is None else attention_mask.cast(dtypes.bool))
    logits, routing = self.forward(input_ids, position_ids, mask)
    return (logits, routing) if return_routing else logits

  def parameters(self) -> dict[str, Tensor]:
    """Every weight, named as in transformers 5 (fused experts), without the `model.` prefix and `.weight`."""
    out = {"embed_tokens": self.embed_tokens, "norm": self.norm}
    if not self.cfg.tie_word_embeddings: out["lm_head"] = self.lm_head
    for l, layer in enumerate(self.layers):
      for name, t in _attrs(layer): out[f"layers.{l}.{name}"] = t
    return out

def _attrs(obj, prefix="") -> Iterator[tuple[str, Tensor]]:
  for name, v in vars(obj).items():
    if isinstance(v, Tensor) and name != "cache_kv": yield prefix + name.replace("experts_", "experts."), v
    elif isinstance(v, (Attention, SparseMoeBlock)): yield from _attrs(v, f"{prefix}{name}.")

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

def load_balancing_loss(router_logits: list[Tensor], num_experts: int, k: int,
                        attention_mask: Tensor | None = None) -> Tensor:
  """transformers' Switch-style auxiliary loss over all layers: E * sum_e f_e * P_e.

  f_e = share of (token, slot) assignments that went to expert e (sums to k over e), P_e = mean router probability
  of e. Perfectly uniform routing gives k (not 1: transformers does not divide by k). Padding (mask 0) is ignored."""
  p = Tensor.cat(*[z.softmax(-1) for z in router_logits], dim=0).float()         # (L*N, E), softmax in z's dtype
  _, i = topk(p, k)                                                               # (L*N, k)
  hits = (i.unsqueeze(-1) == Tensor.arange(num_experts)).float().sum(1)           # (L*N, E) 0/1 per expert
  m = Tensor.ones(p.shape[0], 1) if attention_mask is None else \
      attention_mask.reshape(1, -1).expand(len(router_logits), -1).reshape(-1, 1).float()   # (L*N, 1)
  f, P = (hits * m).sum(0) / m.sum(), (p * m).sum(0) / m.sum()                     # (E,), (E,)
  return (f * P).sum() * num_experts

def router_z_loss(router_logits: list[Tensor]) -> Tensor:
  """Mean over tokens and layers of logsumexp(z)^2: keeps router logits small (OLMoE paper, ST-MoE)."""
  return Tensor.cat(*[z.float().logsumexp(-1) for z in router_logits]).square().mean()

def lm_loss(model: Olmoe, ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
  """Training objective CE + alpha * LB + beta * Z for a batch ids (B, T); returns (total, parts)."""
  logits, routing = model(ids, attention_mask, return_routing=True)               # (B, T, V)
  labels = ids[:, 1:] if attention_mask is None else attention_mask[:, 1:].cast(dtypes.bool).where(ids[:, 1:], -100)
  ce = logits[:, :-1].float().sparse_categorical_crossentropy(labels, ignore_index=-100)
  lb = load_balancing_loss(routing.logits, model.cfg.num_experts, model.cfg.num_experts_per_tok, attention_mask)
  z = router_z_loss(routing.logits)
  total = ce + model.cfg.router_aux_loss_coef * lb + model.cfg.router_z_loss_coef * z
  return total, {"ce": ce, "lb": lb, "z": z}


# ============================================== generation ==============================================

def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
  """Next ids (B,) from last-position logits (B, V): greedy at temperature 0, else softmax(logits/T) restricted to
  the top_k most likely ids (0 = all) and to the smallest set whose probability reaches top_p."""
  if temperature <= 0: return logits.argmax(-1)
  out = []
  for row in logits.astype(np.float64) / temperature:
    order = np.argsort(-row, kind="stable")[:top_k or None]                      # candidate ids, most likely first
    p = np.exp(row[order] - row[order[0]]); p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p) + 1) if top_p < 1.0 else len(p)   # nucleus: smallest set >= top_p
    p = p[:keep] / p[:keep].sum()
    out.append(order[rng.choice(keep, p=p)])
  return np.array(out)


PREFILL_MULTIPLE = 16   # prompts are left-padded to a multiple of this many positions (one compiled prefill each)

class Step(NamedTuple):
  """One generated position for every row of the batch; routing arrays are (L, B, k) when asked for."""
  tokens: list[int]
  weights: np.ndarray | None = None
  experts: np.ndarray | None = None


# ------------------------------------------ lowered-kernel cache ------------------------------------------
# tinygrad keeps each compiled binary on disk, but it redoes the lowering of every distinct kernel graph to C in each
# new process (in Python, about 0.1-2 s a kernel), and that is most of a fresh process's time to first token. Its
# in-memory table of lowered programs (keyed by the kernel graph, renderer and codegen settings; each entry holds the
# program and its binary) is therefore kept in a file beside tinygrad's cache database, read before the first
# generation and written back at exit if it grew. CACHELEVEL=0, tinygrad's switch for its disk caches, turns it off.
PROGRAM_CACHE = Path(CACHEDB).with_suffix(".olmoe-programs.pkl")
PROGRAM_CACHE_MAX = 2_000      # entries (about 20 KB each); a larger file reads as empty and is replaced
_TINYGRAD = importlib.metadata.version("tinygrad")   # a file written by another tinygrad version is ignored
_programs_on_disk = -1         # table size when last read or written (-1: not read yet in this process)

def load_program_cache(path: Path = PROGRAM_CACHE) -> int:
  """Add the lowered programs stored at path to tinygrad's table; returns how many were read. A missing, stale,
  oversized or unreadable file reads as empty: a cache must never stop generation. The first read of the default
  file also arranges for the table to be written back at exit."""
  global _programs_on_disk
  if _programs_on_disk < 0 and path == PROGRAM_CACHE: atexit.register(save_program_cache)
  table, stored = tinygrad.codegen.to_program_cache, {}
  if CACHELEVEL.value > 0 and path.exists():
    try: version, stored = pickle.loads(path.read_bytes())
    except Exception: version = None       # noqa: BLE001 -- any failure to unpickle means "no cache"
    if version != _TINYGRAD or not isinstance(stored, dict) or len(stored) > PROGRAM_CACHE_MAX: stored = {}
    table.update({k: v for k, v in stored.items() if k not in table})
  _programs_on_disk = len(table)
  return len(stored)

def save_program_cache(path: Path = PROGRAM_CACHE) -> None:
  """Write tinygrad's table of lowered programs (with what is already stored) to path, if it grew since the last
  read or write: to a temporary file in the same folder, then renamed over the old one."""
  global _programs_on_disk
  table = tinygrad.codegen.to_program_cache
  if CACHELEVEL.value == 0 or len(table) <= _programs_on_disk: return
  load_program_cache(path)                                          # merge with what other processes wrote
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f: pickle.dump((_TINYGRAD, dict(table)), f)
      os.replace(tmp, path)
    finally: Path(tmp).unlink(missing_ok=True)
  except OSError: pass                     # a read-only cache folder: nothing is kept, generation goes on
  _programs_on_disk = len(table)


# ---------------------------------------------- all CPU cores ----------------------------------------------
# tinygrad's CPU compiler splits each large kernel into one slice per core (its THREAD optimisation: the slice number
# `core_id` is a kernel argument, and each slice writes its own part of the output), but the CPU runtime of tinygrad
# 0.14 then calls the slices one after another, so every kernel runs on one core. The slices are independent, and
# ctypes releases the GIL for the length of a call, so here slices 1, 2, ... go to a pool of threads while the calling
# thread runs slice 0. The kernels, and so every result, are the same bit for bit; prefill and decode run 1.3-2x
# faster on 2 cores (bench/README.md). THREADS=0, tinygrad's switch for the slicing, leaves one slice per kernel.
_run_slices_in_turn = CPUProgram.__call__     # tinygrad's own launcher
_slice_pool: ThreadPoolExecutor | None = None

def run_slices_at_once(on: bool = True) -> None:
  """Launch the per-core slices of tinygrad's CPU kernels at once (on, the default since import) or in turn (off)."""
  CPUProgram.__call__ = _launch_slices_at_once if on else _run_slices_in_turn

def _launch_slices_at_once(prg: CPUProgram, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False,
                           timeout=None) -> float | None:
  global _slice_pool
  slot = prg.runtimevars.get("core_id")                  # position of the slice number among the kernel's arguments
  if prg.lvp or slot is None or global_size[0] == 1:
    return _run_slices_in_turn(prg, *bufs, global_size=global_size, local_size=local_size, vals=vals, wait=wait,
                               timeout=timeout)
  start, args = time.perf_counter(), [b.va_addr for b in bufs] + list(vals)
  def run(core: int):
    prg.fxn(*[ctypes.c_uint64(core if j == slot else a) for j, a in enumerate(args)])
  if _slice_pool is None:
    _slice_pool = ThreadPoolExecutor(max(1, NUM_CPU_THREADS.value - 1), thread_name_prefix="slice")
  others = [_slice_pool.submit(run, core) for core in range(1, global_size[0])]
  run(0)
  for f in others: f.result()
  return time.perf_counter() - start if wait else None

run_slices_at_once()

# ---------------------------------------------- replaying a step ----------------------------------------------
# To replay a compiled (TinyJit) step, tinygrad resolves again, for every kernel and on every call, its buffers, its
# launch size and its statistics in Python: 20-30 us a kernel, and a decode step is about 250 kernels (a quarter of the
# small shape's bf16 step, most of the demo's). `plan_replay` resolves once what does not change between calls: each
# kernel's program, and for each buffer argument the buffer itself or the call input that fills it. Replaying the
# plan launches the same programs on the same buffers in the same order, so every result is the same bit for bit
# (tests/test_olmoe.py). A step that the plan cannot express (a copy, several devices, a view of an input, an input
# the step writes) keeps tinygrad's replay, and so does DEBUG >= 2, whose per-kernel timings come from it.
_replay_captured = CapturedJit.__call__       # tinygrad's own replay

def plan_replay(captured: CapturedJit) -> tuple[str, list] | None:
  """(device, [(program, buffer arguments, kernel info)]) for a captured step, a buffer argument being the device
  buffer or the index of the call input that fills it; None unless the step is kernels on one device."""
  plan, devices = [], {call.src[1].device for call in captured.linear.src}
  if len(devices) != 1 or not isinstance(device := devices.pop(), str): return None
  for call in captured.linear.src:
    ast, args = call.src[0], get_call_arg_uops(call)
    if ast.op is not Ops.PROGRAM: return None
    if any(args[j].op is Ops.PARAM for j in ast.arg.outs): return None          # writes an input: copied per call
    bufs = []
    for j in ast.arg.globals:
      if args[j].op is Ops.PARAM: bufs.append(args[j].arg.slot)
      elif Ops.PARAM in {u.op for u in args[j].toposort()}: return None        # a view of an input
      else: bufs.append(args[j].buffer.ensure_allocated().get_buf(device))
    plan.append((get_runtime(device, ast), bufs, ast.arg))
  return device, plan

def _replay_planned(captured: CapturedJit, input_uops: list, var_vals: dict[str, int]):
  if (planned := getattr(captured, "replay_plan", None)) is None or DEBUG >= 2:
    return _replay_captured(captured, input_uops, var_vals)
  device, plan = planned
  inputs = [u.buffer.get_buf(device) for u in input_uops]
  for prg, bufs, info in plan:
    global_size, local_size = info.launch_dims(var_vals)
    prg(*[inputs[b] if isinstance(b, int) else b for b in bufs], global_size=global_size, local_size=local_size,
        vals=info.vals(var_vals))
  return captured.ret

CapturedJit.__call__ = _replay_planned

def _plan(step: TinyJit) -> None:
  """Plan the replays of a compiled step once it has been captured (TinyJit captures on its second call); the plan
  is kept on the captured step (None: replayed by tinygrad)."""
  if step.captured is not None and not hasattr(step.captured, "replay_plan"):
    step.captured.replay_plan = plan_replay(step.captured)

def generate(model: Olmoe, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: tuple[int, ...] | None = None,
             with_routing: bool = False) -> Iterator[Step]:
  """Yield one `Step` per new position for a batch of prompts (token-id lists, left-padded here).

  The whole prompt goes through the model in one prefill call, `TinyJit`-compiled once per padded prompt length;
  each later token is one compiled decode step at a symbolic position. Routing stays on the device; only the
  last-position logits come back to sample. A row that produced a stop id (default: the config's EOS) keeps
  yielding the pad id until every row stopped."""
  cfg = model.cfg
  if not prompts or any(len(p) == 0 for p in prompts): raise OlmoeError("empty prompt")
  if max_new_tokens <= 0: raise OlmoeError(f"max_new_tokens must be positive, got {max_new_tokens}")
  P, B, S_max = max(map(len, prompts)), len(prompts), cfg.context_length
  if P > S_max - 1: raise OlmoeError(f"prompt of {P} tokens is longer than the model's context ({S_max} positions)")
  # left-pad to a multiple of PREFILL_MULTIPLE, so that one compiled prefill serves a range of prompt lengths (not
  # where that would shorten the generation, nor with dynamic RoPE, whose frequencies depend on the length)
  Pp = -(-P // PREFILL_MULTIPLE) * PREFILL_MULTIPLE
  if cfg.rope_kind != "dynamic" and Pp + min(max_new_tokens, S_max - P) <= S_max: P = Pp
  stop = set(cfg.eos_ids if stop_ids is None else stop_ids)
  rng = np.random.default_rng(seed)
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  npad = [P - len(p) for p in prompts]
  ids = Tensor([[pad] * n + p for n, p in zip(npad, prompts)], dtype=dtypes.int32)          # (B, P)
  key_ok = Tensor([[0] * n + [1] * (S_max - n) for n in npad], dtype=dtypes.bool)           # (B, S_max)
  offset = Tensor(npad, dtype=dtypes.int32).reshape(B, 1)                                   # (B, 1) position shift
  # one KV cache per batch size, made on first use and kept for the model's life: the compiled decode step replays
  # into these buffers
  if B not in model._caches:
    shape = (2, B, cfg.n_kv_heads, S_max, cfg.head_dim)                                     # k and v, per layer
    model._caches[B] = [Tensor.zeros(*shape, dtype=model.dtype).contiguous().realize() for _ in model.layers]
  for layer, cache in zip(model.layers, model._caches[B]): layer.self_attn.cache_kv = cache
  if _programs_on_disk < 0: load_program_cache()
  try:
    prefill = model._prefills.setdefault((B, P, model.expert_mask is None, model.top_k), TinyJit(_prefill))
    logits, routing = prefill(model, ids, key_ok, offset, model.expert_mask)
    _plan(prefill)
    decode = model._decoders.setdefault((B, model.expert_mask is None, model.top_k), TinyJit(_decode_step))
    v_pos = UOp.variable("start_pos", 1, S_max - 1)
    done = [False] * B
    for n in range(min(max_new_tokens, S_max - P)):
      out = _last(logits, routing, with_routing)
      nxt = sample(out[0], rng, temperature, top_k, top_p)
      toks = [pad if d else int(t) for d, t in zip(done, nxt)]
      yield Step(toks, *out[1:])
      done = [d or t in stop for d, t in zip(done, toks)]
      if all(done) or n + 1 == max_new_tokens: break
      tok = Tensor(toks, dtype=dtypes.int32).reshape(B, 1)                                  # (B, 1)
      logits, routing = decode(model, tok, v_pos.bind(P + n), key_ok, offset, model.expert_mask)
      _plan(decode)
  finally:
    for layer in model.layers: layer.self_attn.cache_kv = None

def _prefill(model: Olmoe, ids: Tensor, key_ok: Tensor, offset: Tensor, expert_mask: Tensor | None):
  """All P prompt positions of ids (B, P) in one call (stale cache entries past them are never attended to)."""
  P = ids.shape[1]
  positions = Tensor.arange(P).reshape(1, P) - offset                                      # (B, P)
  mask = attention_mask_3d(P, P, 0, key_ok[:, :P])                                         # (B, P, P)
  return _realized(*model.forward(ids, positions, mask, 0, last_only=True, expert_mask=expert_mask))

def _decode_step(model: Olmoe, tok: Tensor, start_pos: UOp, key_ok: Tensor, offset: Tensor, expert_mask: Tensor | None):
  """One new token per row at position start_pos (symbolic, so one compiled graph serves every position). Tensors
  that change between calls (the expert mask too) are arguments, so the compiled graph reads their new values."""
  positions = (Tensor.arange(1) + start_pos).reshape(1, 1) - offset                        # (B, 1)
  mask = attention_mask_3d(1, start_pos + 1, start_pos, key_ok[:, :start_pos + 1])          # (B, 1, S)
  return _realized(*model.forward(tok, positions, mask, start_pos, last_only=True, expert_mask=expert_mask))

def _realized(logits: Tensor, r: Routing) -> tuple[Tensor, Routing]:
  """The (B, V) fp32 last-position logits and the routing, realized inside the compiled call."""
  weights, experts = [w.realize() for w in r.weights], [i.realize() for i in r.experts]
  return logits[:, -1].float().realize(), Routing([], weights, experts)

def _last(logits: Tensor, routing: Routing, with_routing: bool):
  """Bring the (B, V) last-position logits (and, if asked, the last position's routing) to the host."""
  lg = logits.numpy()                                                                        # (B, V)
  if not with_routing: return lg, None, None
  B = lg.shape[0]
  last = lambda ts: np.stack([t.reshape(B, -1, t.shape[-1])[:, -1].float().numpy() for t in ts])   # (L, B, k)
  return lg, last(routing.weights), last(routing.experts).astype(np.int64)


class TextStream:
  """Turn a stream of token ids into text, holding back bytes of a UTF-8 character until it is complete."""
  def __init__(self, tokenizer: "Tokenizer"):
    self.tokenizer, self.utf8 = tokenizer, codecs.getincrementaldecoder("utf-8")(errors="replace")
  def push(self, token_id: int) -> str: return self.utf8.decode(self.tokenizer.decode_bytes([token_id]))
  def flush(self) -> str: return self.utf8.decode(b"", final=True)


# =============================================== tokenizer ===============================================

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE writes each byte as a printable character; this maps the characters back to bytes."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  shifted = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(shifted)}}

_TO_LATIN1 = {c: chr(byte_level_alphabet().get(chr(c), 256)) for c in range(512)}   # 256 = not in the alphabet

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

  @classmethod
  def from_file(cls, path: str | Path) -> "Tokenizer":
    try: spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise OlmoeError(f"{path}: unreadable tokenizer.json ({e.__class__.__name__})") from None
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


# =========================================== checkpoint loading ===========================================

def read_safetensors_header(path: Path) -> tuple[dict, int]:
  """The JSON header of a .safetensors file, checked against the file's size (catches truncated downloads), and the
  byte offset where the tensor data starts (the header's `data_offsets` count from there)."""
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
  except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
    raise OlmoeError(f"{path}: not a readable safetensors file ({e.__class__.__name__})") from None
  end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
  if 8 + n + end > path.stat().st_size:
    raise OlmoeError(f"{path}: truncated ({path.stat().st_size} bytes, the header promises {8 + n + end})")
  return header, 8 + n

def checkpoint_files(folder: Path) -> list[Path]:
  """model.safetensors, or the shards named by model.safetensors.index.json."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (folder / s).exists()]
    if missing: raise OlmoeError(f"{folder}: shard {missing[0]} named in model.safetensors.index.json is missing")
    return [folder / s for s in shards]
  if (folder / "model.safetensors").exists(): return [folder / "model.safetensors"]
  raise OlmoeError(f"{folder}: no model.safetensors or model.safetensors.index.json")

SAFETENSORS_DTYPES = {"F32": dtypes.float32, "BF16": dtypes.bfloat16, "F16": dtypes.float16}

class Stored(NamedTuple):
  """A checkpoint tensor not read yet: its shape, its dtype, and `read_into(out)`, which fills a numpy array of that
  shape (16-bit floats as their raw uint16 bits: numpy has no bfloat16). Loading reads each tensor from the file
  straight into its tinygrad buffer, one decoder layer at a time: no mapped copy of the files, no copy in transit."""
  shape: tuple[int, ...]
  dtype: DType
  read_into: Callable[[np.ndarray], None]

def _np_dtype(dtype: DType) -> type: return np.float32 if dtype == dtypes.float32 else np.uint16

def _file_reader(path: Path, offset: int) -> Callable[[np.ndarray], None]:
  def read_into(out: np.ndarray) -> None:
    buf = out if out.flags.c_contiguous else np.empty_like(out)
    with open(path, "rb") as f:
      f.seek(offset)
      if f.readinto(memoryview(buf).cast("B")) != buf.nbytes: raise OlmoeError(f"{path}: file ends inside a tensor")
    if buf is not out: out[...] = buf
  return read_into

def read_state_dict(folder: Path) -> dict[str, Stored]:
  """Every tensor of the checkpoint (single file or shards) as a `Stored` record: headers read, no values."""
  state: dict[str, Stored] = {}
  for path in checkpoint_files(folder):
    header, start = read_safetensors_header(path)
    for key, v in header.items():
      if key == "__metadata__": continue
      if key.endswith("rotary_emb.inv_freq"): continue                    # a buffer some old files carry
      if v["dtype"] not in SAFETENSORS_DTYPES: raise OlmoeError(f"{path}: tensor {key} has unsupported dtype {v['dtype']}")
      read_into = _file_reader(path, start + v["data_offsets"][0])
      state[key] = Stored(tuple(v["shape"]), SAFETENSORS_DTYPES[v["dtype"]], read_into)
  return state

def _stack(parts: list[Stored], axis: int = 0, new_axis: bool = True) -> Stored:
  """Stored tensors stacked (or concatenated along `axis`), each part read into its slice of the output."""
  if len({p.dtype for p in parts}) > 1: raise OlmoeError("checkpoint: experts stored in mixed dtypes")
  sizes = [1 if new_axis else p.shape[axis] for p in parts]
  shape = (len(parts), *parts[0].shape) if new_axis else \
          tuple(sum(sizes) if d == axis else n for d, n in enumerate(parts[0].shape))
  def read_into(out: np.ndarray) -> None:
    for p, at in zip(parts, np.cumsum([0] + sizes)):
      p.read_into(out[(slice(None),) * axis + ((at,) if new_axis else (slice(at, at + p.shape[axis]),))])
  return Stored(shape, parts[0].dtype, read_into)

EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")

def hf_to_ours(state: dict[str, Stored | Tensor], cfg: OlmoeConfig) -> Iterator[tuple[str, Stored | Tensor]]:
  """Map transformers' key names to ours: drop `model.`/`.weight`; stack per-expert weights (gate and up fused)."""
  per_expert: dict[tuple[int, str], dict[int, Stored | Tensor]] = {}
  for key, t in state.items():
    if (m := EXPERT_KEY.fullmatch(key)):
      per_expert.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
    else:
      yield key.removeprefix("model.").removesuffix(".weight"), t
  for l in sorted({l for l, _ in per_expert}):
    parts = {}
    for part in ("gate_proj", "up_proj", "down_proj"):
      got = per_expert.get((l, part), {})
      if sorted(got) != list(range(cfg.num_experts)):
        raise OlmoeError(f"checkpoint: layer {l} has {part} for {len(got)} experts, config says {cfg.num_experts}")
      ws = [got[e] for e in range(cfg.num_experts)]
      parts[part] = Tensor.stack(*ws) if isinstance(ws[0], Tensor) else _stack(ws)              # (E, out, in)
    gu = [parts["gate_proj"], parts["up_proj"]]
    yield (f"layers.{l}.mlp.experts.gate_up_proj",                                              # (E, 2I, D)
           gu[0].cat(gu[1], dim=1) if isinstance(gu[0], Tensor) else _stack(gu, axis=1, new_axis=False))
    yield f"layers.{l}.mlp.experts.down_proj", parts["down_proj"]                               # (E, D, I)

def to_tensor(t: Stored | Tensor) -> Tensor:
  """A Stored record read into a new tinygrad buffer in its stored dtype. On the CPU the file's bytes are read
  into the buffer's own memory; other devices get a host array copied over."""
  if isinstance(t, Tensor): return t
  if hasattr(Device[Device.DEFAULT].allocator, "_as_buffer"):
    out = Tensor.empty(*t.shape, dtype=t.dtype).realize()
    mem = out.uop.buffer.ensure_allocated().as_memoryview(force_zero_copy=True)
    t.read_into(np.frombuffer(mem, _np_dtype(t.dtype)).reshape(t.shape))
    return out
  t.read_into(a := np.empty(t.shape, _np_dtype(t.dtype)))
  return Tensor(a) if t.dtype == dtypes.float32 else Tensor(a).bitcast(t.dtype)

def load_weights(model: Olmoe, state: dict[str, Stored | Tensor], dtype: DType | None = None, progress: bool = True) -> None:
  """Assign every checkpoint tensor to the model, checking names and shapes; read layer by layer from disk."""
  ours = model.parameters()
  got = dict(hf_to_ours(state, model.cfg))
  if model.cfg.tie_word_embeddings: got.pop("lm_head", None)
  unknown, missing = sorted(set(got) - set(ours)), sorted(set(ours) - set(got))
  if unknown: raise OlmoeError(f"checkpoint: unexpected tensor {unknown[0]!r} (and {len(unknown) - 1} more)")
  if missing: raise OlmoeError(f"checkpoint: missing tensor {missing[0]!r} (and {len(missing) - 1} more)")
  for name, t in got.items():
    if tuple(t.shape) != tuple(ours[name].shape):
      raise OlmoeError(f"checkpoint: {name} has shape {tuple(t.shape)}, config implies {tuple(ours[name].shape)}")
  dtype = dtype or got["embed_tokens"].dtype
  if dtype not in (dtypes.float32, dtypes.bfloat16, dtypes.float16):
    raise OlmoeError(f"unsupported weight dtype {dtype}")
  groups: dict[str, list[str]] = {}                                        # read one decoder layer at a time
  for name in got: groups.setdefault(".".join(name.split(".")[:2]) if name.startswith("layers.") else name, []).append(name)
  for g in tqdm(list(groups), desc="loading", disable=not progress):
    for name in groups[g]:
      t = to_tensor(got[name])
      _set(model, name, (t if t.dtype == dtype else t.cast(dtype)).contiguous().realize())
  if model.cfg.tie_word_embeddings: model.lm_head = model.embed_tokens

def _set(model: Olmoe, name: str, t: Tensor) -> None:
  parts = name.replace("experts.", "experts_").split(".")
  obj = model
  for p in parts[:-1]: obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
  setattr(obj, parts[-1], t)

def resolve_model_dir(name: str) -> Path:
  """A local folder, or a Hugging Face hub repo id fetched with huggingface_hub (needs a network)."""
  p = Path(name).expanduser()
  if p.is_dir(): return p
  if p.exists(): raise OlmoeError(f"{name}: not a folder (expected config.json + safetensors + tokenizer.json)")
  if name.count("/") != 1 or name.startswith((".", "/")): raise OlmoeError(f"{name}: no such folder")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise OlmoeError(f"{name} is not a local folder; to download it, pip install huggingface_hub") from None
  try:
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
  except Exception as e:  # the hub client raises many kinds (offline, 404, auth)
    raise OlmoeError(f"could not download {name} from the Hugging Face hub ({e.__class__.__name__}); "
                     f"download it elsewhere and pass --model DIR") from None

def read_config(folder: Path) -> dict:
  try: return json.loads((folder / "config.json").read_text())
  except FileNotFoundError: raise OlmoeError(f"{folder}: no config.json") from None
  except ValueError as e: raise OlmoeError(f"{folder}/config.json: invalid JSON ({e})") from None

def load(name: str, dtype: DType | str | None = None, progress: bool = True,
         config_cls=OlmoeConfig, model_cls=Olmoe) -> tuple[Olmoe, "Tokenizer | None"]:
  """(model, tokenizer) from a folder holding config.json, safetensors (sharded or not) and tokenizer.json.

  Weights keep their stored dtype unless `dtype` is given ("float32" to compare with an fp32 reference)."""
  folder = resolve_model_dir(name)
  cfg = config_cls.from_dict(read_config(folder))
  model = model_cls(cfg)
  load_weights(model, read_state_dict(folder), getattr(dtypes, dtype) if isinstance(dtype, str) else dtype, progress)
  tok = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
  return model, tok


# ============================================== command line ==============================================

def show_routing(step: Step, names: list[str] | None = None, row: int = 0) -> str:
  """One line per layer: the token's k experts (ids, or names) with their weights, e.g. `L3   12 .31 | 40 .12 | ...`."""
  name = (lambda e: names[e]) if names else str
  return "\n".join(f"  L{l:<3}" + " | ".join(f"{name(int(e))} {w:.2f}".replace(" 0.", " .") for e, w in
                                             zip(step.experts[l, row], step.weights[l, row])) for l in range(step.experts.shape[0]))

def build_parser(prog: str, default_model: str | None) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog=prog, description="Generate text with a mixture-of-experts language model.")
  ap.add_argument("--prompt", required=True, action="append", help="text to continue (repeat for a batch)")
  ap.add_argument("--model", default=default_model, help="folder with config.json + safetensors + tokenizer.json, or a hub repo id")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
  ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
  ap.add_argument("--seed", type=int, default=None)
  ap.add_argument("--show-routing", action="store_true", help="print each generated token's experts per layer")
  return ap

def check_request(args) -> None:
  """Reject impossible requests before spending time on loading a model."""
  if args.max_new_tokens <= 0: raise OlmoeError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
  if any(not p for p in args.prompt): raise OlmoeError("empty prompt")
  if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
    raise OlmoeError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")

def run_cli(args, model, tok, expert_names: list[str] | None = None) -> None:
  """Encode the prompts and stream the first one's continuation; other prompts of a batch print at the end."""
  check_request(args)
  if tok is None: raise OlmoeError("the model folder has no tokenizer.json")
  prompts = [tok.encode(p) for p in args.prompt]
  streams, texts, done = [TextStream(tok) for _ in prompts], ["" for _ in prompts], [False for _ in prompts]
  print(args.prompt[0], end="", flush=True)
  for step in generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       with_routing=args.show_routing):
    for b, t in enumerate(step.tokens):
      if done[b] or t in model.cfg.eos_ids:
        done[b] = True
        continue
      piece = streams[b].push(t)
      texts[b] += piece
      if b == 0: print(piece, end="", flush=True)
    if args.show_routing and not done[0]: print("\n" + show_routing(step, expert_names), flush=True)
  print(streams[0].flush(), flush=True)
  for p, t, s in list(zip(args.prompt, texts, streams))[1:]: print(f"--- {p}{t}{s.flush()}")

DEMO_MODEL = Path(__file__).resolve().parent / "models" / "olmoe-demo"   # the tiny model that ships with the repo
REAL_MODEL = "allenai/OLMoE-1B-7B-0924"

def default_model(demo: Path, real: str) -> str:
  """The bundled demo model when no --model is given (saying so), or a clear error saying how to get one."""
  if not (demo / "config.json").exists():
    raise OlmoeError(f"no model: pass --model DIR (config.json + safetensors + tokenizer.json) or --model {real}")
  print(f"[running the bundled demo model {demo.parent.name}/{demo.name}; for the real one: --model {real}]",
        file=sys.stderr)
  return str(demo)

def main(argv=None) -> int:
  args = build_parser("olmoe.py", None).parse_args(argv)
  try:
    if args.model is None: args.model = default_model(DEMO_MODEL, REAL_MODEL)
    check_request(args)
    model, tok = load(args.model, progress=sys.stderr.isatty())
    run_cli(args, model, tok)
  except OlmoeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0

if __name__ == "__main__":
  sys.exit(main())
