"""GGUF files for olmoe.py (`olmoe.load("model.gguf")`, `--model model.gguf`): llama.cpp's single-file format, with
its quantised weights kept quantised in memory. A separate file, as olmoe_int8.py is, so that the model reads as the
papers' math.

A GGUF file holds a header (key-value metadata: the architecture, its sizes, the tokenizer) and the tensors, each
stored as blocks of a quantisation type. Of those, these stay quantised; each is dequantised inside the compiled
kernels that read it, from "struct of arrays" buffers that loading repacks the blocks into (one array of codes, one
of scales), so that every kernel indexes them with plain arithmetic:

    Q8_0  32 weights per block: w = d * q,                      q int8, d fp16 per block
    Q4_0  32 weights per block: w = d * (q - 8),                q 4-bit, d fp16 per block
    Q4_K  256 per super-block, 8 groups of 32: w = (d * sc) * q - (dmin * m),   q 4-bit, sc and m 6-bit per group,
          d and dmin fp16 per super-block
    Q6_K  256 per super-block, 16 groups of 16: w = (d * sc) * (q - 32),        q 6-bit, sc int8 per group, d fp16

in fp32, in the order of ggml's own dequantisation (tests/test_gguf.py checks the weights bit for bit against the
`gguf` package's, llama.cpp's reference). F32, F16 and BF16 tensors are kept as stored (the norms; sometimes the
embeddings). The codes take one byte (Q8_0, Q6_K) or half a byte (Q4_0, Q4_K) per weight, the scales about 1/16 of a
byte: a Q4_0 OLMoE-1B-7B holds about 3.9 GB of weights.

The header is read by this file, with every length and offset checked against the file's size before anything is
allocated (tinygrad.llm.gguf's reader copies the whole file into memory and trusts the lengths it reads). Only the
`olmoe` architecture is read (llama.cpp's key and tensor names for OLMoE: `blk.N.ffn_gate_exps`, ...).

The tokenizer is tokenizer.json beside the file when there is one (exact, with its normaliser); otherwise it is
built from the file's byte-level BPE vocabulary and merges (`tokenizer.ggml.*`) with GPT-2's split regex, which is
OLMoE's, but without NFC normalisation, which GGUF does not record. The chat template is the file's
`tokenizer.chat_template`.

Not handled: other quantisation types (Q4_1, Q5_0, Q5_1, Q5_K, Q2_K, Q3_K, the IQ types: one line naming the
types that are), other architectures (FlexOlmo has no GGUF architecture: its experts' owners and opt-out are not in
the format), split files (`-00001-of-N.gguf`), big-endian files, and writing GGUF.
"""
from __future__ import annotations
import math, mmap, struct
from pathlib import Path
from typing import NamedTuple
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from olmoe import OlmoeConfig, OlmoeError

# ggml types: name, weights per block, bytes per block
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18),
         12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210)}
BLOCKS = {name: (per_block, block_bytes) for name, per_block, block_bytes in TYPES.values()}   # the same, by name
KNOWN = {3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS",
         17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
         25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M"}


# ================================================ the header ================================================

class TensorInfo(NamedTuple):
  shape: tuple[int, ...]     # numpy order (GGUF lists the dimensions innermost first)
  kind: str                  # "Q4_0", "F32", ...
  offset: int                # in the file
  nbytes: int

class Gguf(NamedTuple):
  path: Path
  kv: dict
  tensors: dict[str, TensorInfo]

class _Reader:
  """Little-endian values from a byte buffer, each read checked against its end."""
  def __init__(self, buf, path: Path): self.buf, self.pos, self.path = buf, 0, path
  def take(self, n: int) -> memoryview:
    if n < 0 or self.pos + n > len(self.buf): raise OlmoeError(f"{self.path}: truncated GGUF header")
    self.pos += n
    return memoryview(self.buf)[self.pos - n:self.pos]
  def unpack(self, fmt: str):
    return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]
  def string(self) -> str:
    b = self.take(self.unpack("Q"))
    try: return bytes(b).decode("utf-8")
    except UnicodeDecodeError: raise OlmoeError(f"{self.path}: a GGUF header string is not UTF-8") from None

SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
           5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
           12: ("d", np.float64)}

def _value(r: _Reader, typ: int):
  if typ in SCALARS: return r.unpack(SCALARS[typ][0])
  if typ == 8: return r.string()
  if typ == 9:
    item, n = r.unpack("I"), r.unpack("Q")
    if n > len(r.buf) - r.pos: raise OlmoeError(f"{r.path}: truncated GGUF header (an array of {n} values)")
    if item in SCALARS:
      dt = np.dtype(SCALARS[item][1]).newbyteorder("<")
      return np.frombuffer(r.take(n * dt.itemsize), dt).tolist()
    if item == 8: return [r.string() for _ in range(n)]
    raise OlmoeError(f"{r.path}: GGUF array of value type {item} (not a number or a string)")
  raise OlmoeError(f"{r.path}: GGUF value of unknown type {typ}")

def read_header(path: str | Path) -> Gguf:
  """The metadata and the tensors' places in a GGUF file (version 2 or 3), nothing of the tensors read."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      size = f.seek(0, 2)
      if size < 24: raise OlmoeError(f"{path}: not a GGUF file ({size} bytes)")
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  except OSError as e: raise OlmoeError(f"{path}: unreadable ({e.__class__.__name__})") from None
  r = _Reader(buf, path)
  if bytes(r.take(4)) != b"GGUF": raise OlmoeError(f"{path}: not a GGUF file (no GGUF magic)")
  if (version := r.unpack("I")) not in (2, 3): raise OlmoeError(f"{path}: GGUF version {version} (2 and 3 are read)")
  n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
  if n_tensors > size or n_kv > size: raise OlmoeError(f"{path}: truncated GGUF header ({n_tensors} tensors, {n_kv} keys)")
  kv = {}
  for _ in range(n_kv):
    key = r.string()
    kv[key] = _value(r, r.unpack("I"))
  infos = []
  for _ in range(n_tensors):
    name, n_dims = r.string(), r.unpack("I")
    if not 1 <= n_dims <= 4: raise OlmoeError(f"{path}: tensor {name!r} has {n_dims} dimensions")
    dims = [r.unpack("Q") for _ in range(n_dims)]
    infos.append((name, dims, r.unpack("I"), r.unpack("Q")))
  align = kv.get("general.alignment", 32)
  if not (isinstance(align, int) and 0 < align <= 1 << 16): raise OlmoeError(f"{path}: general.alignment = {align!r}")
  start = -(-r.pos // align) * align
  tensors = {}
  for name, dims, typ, off in infos:
    if typ not in TYPES:
      kind = KNOWN.get(typ, f"type {typ}")
      raise OlmoeError(f"{path}: tensor {name!r} is {kind}; the types read are {', '.join(t[0] for t in TYPES.values())}")
    kind, per_block, block_bytes = TYPES[typ]
    if dims[0] % per_block or min(dims) < 1:
      raise OlmoeError(f"{path}: tensor {name!r} of shape {dims[::-1]} does not split into {kind} blocks of {per_block}")
    nbytes = math.prod(dims) // per_block * block_bytes
    if off % align or start + off + nbytes > size:
      raise OlmoeError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
    tensors[name] = TensorInfo(tuple(dims[::-1]), kind, start + off, nbytes)
  return Gguf(path, kv, tensors)


# ============================================ configuration ============================================

def config_from(g: Gguf) -> OlmoeConfig:
  """The OlmoeConfig that an `olmoe` GGUF file's metadata describes (llama.cpp's keys)."""
  kv, arch = g.kv, g.kv.get("general.architecture")
  if arch != "olmoe":
    raise OlmoeError(f"{g.path}: GGUF architecture {arch!r}; olmoe.py reads 'olmoe' files (flexolmo.py has no GGUF form)")
  def get(key, default=None):
    if (v := kv.get(f"olmoe.{key}", default)) is None: raise OlmoeError(f"{g.path}: GGUF key olmoe.{key} is missing")
    return v
  emb = g.tensors.get("token_embd.weight")
  if emb is None: raise OlmoeError(f"{g.path}: no token_embd.weight tensor")
  d = {"model_type": "olmoe", "vocab_size": emb.shape[0], "hidden_size": get("embedding_length"),
       "intermediate_size": kv.get("olmoe.expert_feed_forward_length") or get("feed_forward_length"),
       "num_hidden_layers": get("block_count"), "num_attention_heads": get("attention.head_count"),
       "num_key_value_heads": get("attention.head_count_kv", kv.get("olmoe.attention.head_count")),
       "max_position_embeddings": get("context_length"), "rope_theta": get("rope.freq_base", 10000.0),
       "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5), "num_experts": get("expert_count"),
       "num_experts_per_tok": get("expert_used_count"), "norm_topk_prob": bool(kv.get("olmoe.expert_weights_norm", False)),
       "tie_word_embeddings": "output.weight" not in g.tensors,
       "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"), "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
       "pad_token_id": kv.get("tokenizer.ggml.padding_token_id")}
  return OlmoeConfig.from_dict(d)

# llama.cpp's tensor names -> ours (`Olmoe.parameters()`); the experts' gate and up stacks become one gate_up
NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head", "attn_norm": "input_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate", "ffn_down_exps": "mlp.experts.down_proj"}

def our_name(name: str) -> str | None:
  """Ours for a llama.cpp tensor name ("blk.3.attn_q.weight" -> "layers.3.self_attn.q_proj"); None for the gate/up
  expert stacks (joined by `load_weights`) and for names this model has no place for."""
  parts = name.removesuffix(".weight").split(".")
  if len(parts) == 1: return NAMES.get(parts[0]) if parts[0] in ("token_embd", "output_norm", "output") else None
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in NAMES:
    return f"layers.{parts[1]}.{NAMES[parts[2]]}"
  return None


# ======================================= weights: repacked and dequantised =======================================

def _buffer(a: np.ndarray) -> Tensor:
  """A realized tinygrad buffer holding a copy of the host array a (on the CPU, written into the buffer's memory)."""
  from olmoe_checkpoint import device_array
  dt = {np.dtype(np.uint8): dtypes.uint8, np.dtype(np.int8): dtypes.int8, np.dtype(np.float16): dtypes.float16,
        np.dtype(np.float32): dtypes.float32, np.dtype(np.uint16): dtypes.uint16}[a.dtype]
  if (on_device := device_array(a.shape, dt, a.dtype)) is None: return Tensor(np.ascontiguousarray(a)).realize()
  on_device[0][...] = a
  return on_device[1]

def nibbles(q: Tensor) -> Tensor:
  """A row's 4-bit codes in order, from (rows, groups, n) bytes that hold a group's first n codes in their low halves
  and its next n in their high halves (ggml's layout: n = 16 in Q4_0's blocks, 32 in Q4_K's chunks)."""
  return Tensor.stack(q.bitwise_and(15), q.rshift(4), dim=-2).reshape(q.shape[0], -1)

def dequantize(kind: str, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
  """The weight of `shape` as the model reads it, an fp32 expression over the repacked buffers `parts` (see
  `repack`), in ggml's order of operations; left lazy, so that each kernel that reads it computes it."""
  f32 = lambda t: t.cast(dtypes.float32)
  rows = parts["q"].shape[0]
  if kind == "Q8_0": w = f32(parts["q"]) * f32(parts["d"]).unsqueeze(-1)                     # (rows, nb, 32)
  elif kind == "Q4_0": w = f32(parts["d"]).unsqueeze(-1) * (f32(nibbles(parts["q"]).reshape(rows, -1, 32)) - 8)
  elif kind == "Q4_K":
    q = f32(nibbles(parts["q"]).reshape(rows, -1, 8, 32))                                    # (rows, nb, 8, 32)
    d = (f32(parts["d"]).unsqueeze(-1) * f32(parts["sc"])).unsqueeze(-1)                      # d * sc per group
    m = (f32(parts["dmin"]).unsqueeze(-1) * f32(parts["m"])).unsqueeze(-1)                    # dmin * m per group
    w = d * q - m
  elif kind == "Q6_K":
    d = (f32(parts["d"]).unsqueeze(-1) * f32(parts["sc"])).unsqueeze(-1)                      # (rows, nb, 16, 1)
    w = d * f32(parts["q"]).reshape(rows, -1, 16, 16)
  else: raise OlmoeError(f"no dequantisation for {kind}")
  return w.reshape(shape)

def repack(kind: str, blocks: np.ndarray) -> dict[str, np.ndarray]:
  """The codes and scales of (rows, blocks per row, bytes per block) ggml blocks, one array each (see `dequantize`)."""
  rows, nb, _ = blocks.shape
  half = lambda b: np.ascontiguousarray(b).view(np.float16)[..., 0]                           # (rows, nb)
  if kind == "Q8_0": return {"d": half(blocks[..., 0:2]), "q": blocks[..., 2:].view(np.int8)}
  if kind == "Q4_0": return {"d": half(blocks[..., 0:2]), "q": blocks[..., 2:].reshape(rows, nb, 16)}
  if kind == "Q4_K":
    s = blocks[..., 4:16].reshape(rows, nb, 3, 4)         # 8 six-bit scales and 8 six-bit mins in 12 bytes
    a, b, c = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    return {"d": half(blocks[..., 0:2]), "dmin": half(blocks[..., 2:4]),
            "sc": np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], -1),
            "m": np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], -1),
            "q": blocks[..., 16:].reshape(rows, nb * 4, 32)}
  if kind == "Q6_K":                                      # per half super-block: 64 bytes of low nibbles, 32 of 2-bit highs
    ql, qh = blocks[..., :128].reshape(rows, nb, 2, 2, 32), blocks[..., 128:192].reshape(rows, nb, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], 3)                                               # (rows, nb, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3                         # (rows, nb, 2, 4, 32)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(rows, nb * 256)
    return {"d": half(blocks[..., 208:210]), "sc": blocks[..., 192:208].view(np.int8), "q": q}
  raise OlmoeError(f"no repacking for {kind}")

def read_tensor(g: Gguf, info: TensorInfo, f) -> Tensor:
  """One tensor of the file as the model holds it: quantised ones as the `dequantize` expression over new buffers
  of their codes and scales, the others as stored. Only this tensor's bytes are read, with `readinto`."""
  f.seek(info.offset)
  raw = np.empty(info.nbytes, np.uint8)
  if f.readinto(memoryview(raw)) != info.nbytes: raise OlmoeError(f"{g.path}: truncated while reading a tensor")
  if info.kind in ("F32", "F16", "BF16"):
    a = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[info.kind]).reshape(info.shape)
    t = _buffer(a)
    return t.bitcast(dtypes.bfloat16) if info.kind == "BF16" else t
  per_block, block_bytes = BLOCKS[info.kind]
  rows = math.prod(info.shape[:-1])
  parts = repack(info.kind, raw.reshape(rows, info.shape[-1] // per_block, block_bytes))
  return dequantize(info.kind, {k: _buffer(v) for k, v in parts.items()}, info.shape)

def loaded_bytes(info: TensorInfo) -> int:
  """Bytes a tensor takes once loaded (Q6_K's 6-bit codes are held one per byte)."""
  return math.prod(info.shape) + info.nbytes - info.nbytes * 192 // 210 if info.kind == "Q6_K" else info.nbytes

def tokenizer(g: Gguf):
  """tokenizer.json beside the file when there is one, else the file's own vocabulary (see the module docstring);
  the chat template of tokenizer_config.json beside it, else the file's. None when the file has no tokenizer."""
  from olmoe_tokenizer import Tokenizer
  kv = g.kv
  if (beside := g.path.parent / "tokenizer.json").exists(): tok = Tokenizer.from_file(beside)
  elif "tokenizer.ggml.tokens" not in kv: return None
  else:
    if (model := kv.get("tokenizer.ggml.model")) != "gpt2":
      raise OlmoeError(f"{g.path}: tokenizer model {model!r} (only byte-level BPE, 'gpt2', is read); put its tokenizer.json beside the file")
    if (pre := kv.get("tokenizer.ggml.pre", "default")) not in ("default", "gpt-2", "olmo"):
      raise OlmoeError(f"{g.path}: pre-tokenizer {pre!r} (GPT-2's split regex is read); put its tokenizer.json beside the file")
    tokens, types = kv["tokenizer.ggml.tokens"], kv.get("tokenizer.ggml.token_type") or []
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
      raise OlmoeError(f"{g.path}: tokenizer.ggml.tokens is not a list of strings")
    added = [{"id": i, "content": t, "special": types[i] == 3, "normalized": types[i] != 3}
             for i, t in enumerate(tokens) if i < len(types) and types[i] in (3, 4)]
    used = lambda i: i >= len(types) or types[i] not in (2, 5)           # not the unknown or unused (padding) entries
    spec = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens) if used(i)},
                      "merges": kv.get("tokenizer.ggml.merges") or []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "decoder": {"type": "ByteLevel"}, "added_tokens": added}
    try: tok = Tokenizer._from_spec(g.path, spec)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
      raise OlmoeError(f"{g.path}: malformed tokenizer ({e.__class__.__name__}: {str(e)[:100]})") from None
    ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}
    tok.template_tokens = {k: tokens[i] for k, key in ids.items()
                           if isinstance(i := kv.get(f"tokenizer.ggml.{key}"), int) and 0 <= i < len(tokens)}
  if tok.chat_template is None and isinstance(kv.get("tokenizer.chat_template"), str):
    tok.chat_template = kv["tokenizer.chat_template"]
  return tok

def gguf_path(name: str | Path) -> Path | None:
  """The GGUF file that `name` stands for: the file itself, or the one .gguf in a folder without safetensors."""
  p = Path(name).expanduser()
  if p.is_file() and p.suffix == ".gguf": return p
  if p.is_dir() and not any(p.glob("*.safetensors")):
    found = sorted(p.glob("*.gguf"))
    if len(found) > 1: raise OlmoeError(f"{p}: {len(found)} .gguf files; pass --model FILE.gguf")
    return found[0] if found else None
  return None

def load(path: str | Path, dtype: DType | None = None, progress: bool = True):
  """(model, tokenizer) from an `olmoe` GGUF file: the quantised weights held as they are stored and dequantised in
  the kernels, the rest as stored; the model computes in fp32 unless `dtype` is given."""
  from olmoe import Olmoe
  from olmoe_checkpoint import _set, check_memory_bytes
  from tinygrad.helpers import tqdm
  g = read_header(path)
  cfg = config_from(g)
  tok = tokenizer(g)
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise OlmoeError(f"{g.path}: the tokenizer has ids up to {tok.vocab_size - 1}, the embeddings {cfg.vocab_size} rows")
  dtype = dtype or dtypes.float32
  model = Olmoe(cfg)
  ours = model.parameters()
  want: dict[str, list[str]] = {}                          # our name -> the file's tensors it is made of
  for name in g.tensors:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in ("ffn_gate_exps", "ffn_up_exps"):
      want.setdefault(f"layers.{parts[1]}.mlp.experts.gate_up_proj", []).append(name)
    elif (ours_name := our_name(name)) is not None: want.setdefault(ours_name, []).append(name)
    else: raise OlmoeError(f"{g.path}: unexpected tensor {name!r} for an olmoe model")
  if cfg.tie_word_embeddings: ours.pop("lm_head")
  if (missing := sorted(set(ours) - set(want))): raise OlmoeError(f"{g.path}: missing tensor for {missing[0]!r} (and {len(missing) - 1} more)")
  for ours_name, names in want.items():
    if ours_name.endswith("gate_up_proj"):
      names.sort(key=lambda n: "up" in n.split(".")[2])   # gate first, then up
      if len(names) != 2: raise OlmoeError(f"{g.path}: {ours_name} needs both ffn_gate_exps and ffn_up_exps")
      shapes = [g.tensors[n].shape for n in names]
      shape = (shapes[0][0], shapes[0][1] + shapes[1][1], shapes[0][2]) if shapes[0] == shapes[1] else None
    else: shape = g.tensors[names[0]].shape
    if shape != tuple(ours[ours_name].shape):
      raise OlmoeError(f"{g.path}: {names[0]} has shape {g.tensors[names[0]].shape}, the metadata implies {tuple(ours[ours_name].shape)}")
  check_memory_bytes(sum(loaded_bytes(i) for i in g.tensors.values()), g.path)
  total = sum(i.nbytes for i in g.tensors.values())
  with open(g.path, "rb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
    for ours_name, names in want.items():
      ts = []
      for n in names:
        ts.append(read_tensor(g, g.tensors[n], f))
        bar.update(g.tensors[n].nbytes)
      w = ts[0].cat(ts[1], dim=1) if len(ts) == 2 else ts[0]
      _set(model, ours_name, w if w.dtype == dtype else w.cast(dtype))
  if cfg.tie_word_embeddings: model.lm_head = model.embed_tokens
  model.quantize = "gguf:" + ",".join(sorted({i.kind for i in g.tensors.values()}))   # keys its captured steps
  return model, tok
