"""Checkpoints for olmoe.py and flexolmo.py: Hugging Face folders of safetensors files, read and written.

Reading: `load_checkpoint` resolves a folder (or a hub repo id), reads config.json, maps transformers' tensor names
to the model's (`hf_to_ours`: per-expert keys stacked into (E, out, in) tensors, gate and up fused) and reads every
tensor from the file straight into its tinygrad buffer, one decoder layer at a time, so that peak memory stays near
the size of the weights.

Writing (FlexOlmo's recipe, the demo trainer, the benchmark's checkpoints): `Raw` tensors (dtype name, shape, bytes),
`to_raw` for numpy arrays (fp32 rounded to bf16 by `bf16_bits`), and `write_safetensors`, which writes to a
temporary name and renames, so that a file under the final name is always whole.

Not handled: safetensors dtypes other than F32, BF16 and F16 (the model's weights come in those); pickled `.bin`
checkpoints; GGUF.
"""
from __future__ import annotations
import json, math, os, re, struct, tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple
import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import tqdm
from olmoe import OlmoeError
if TYPE_CHECKING:
  from olmoe import Olmoe, OlmoeConfig
  from olmoe_tokenizer import Tokenizer


# ============================================= reading =============================================

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}      # every dtype a safetensors file can hold
HEADER_MAX = 100 << 20                                                     # bytes of JSON; real headers are < 1 MB

def read_safetensors_header(path: Path) -> tuple[dict, int]:
  """The JSON header of a .safetensors file and the byte offset where the tensor data starts (the header's
  `data_offsets` count from there), checked before anything is read by it: the header length against the file's
  size; every entry's dtype, shape and byte range (shape x item size, inside the data section, none overlapping).
  A truncated download or a malformed file is an OlmoeError naming the file and the entry."""
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      if size < 8: raise OlmoeError(f"{path}: not a safetensors file ({size} bytes)")
      (n,) = struct.unpack("<Q", f.read(8))
      if n > min(size - 8, HEADER_MAX):
        raise OlmoeError(f"{path}: not a safetensors file (its first 8 bytes give a {n}-byte header; the file has {size})")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise OlmoeError(f"{path}: not a readable safetensors file ({e.__class__.__name__})") from None
  if not isinstance(header, dict): raise OlmoeError(f"{path}: the safetensors header is not a JSON object")
  data, ranges = size - 8 - n, []
  for key, v in header.items():
    if key == "__metadata__": continue
    bad = lambda why: OlmoeError(f"{path}: tensor {key!r}: {why}")
    if not isinstance(v, dict) or v.get("dtype") not in ITEMSIZE: raise bad(f"unknown dtype {v.get('dtype') if isinstance(v, dict) else v!r}")
    shape, offsets = v.get("shape"), v.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape): raise bad(f"bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]): raise bad(f"bad data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[v["dtype"]]:
      raise bad(f"{offsets[1] - offsets[0]} bytes for shape {shape} of {v['dtype']}")
    if offsets[1] > data:
      raise OlmoeError(f"{path}: truncated ({size} bytes, the header promises {8 + n + offsets[1]})")
    ranges.append((offsets[0], offsets[1], key))
  ranges.sort()
  for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
    if begin < end: raise OlmoeError(f"{path}: tensors {first!r} and {second!r} share bytes")
  return header, 8 + n

def checkpoint_files(folder: Path) -> list[Path]:
  """model.safetensors, or the shards named by model.safetensors.index.json."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    try: weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise OlmoeError(f"{index}: not a readable index ({e.__class__.__name__}: no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
                                                   for v in weight_map.values()):
      raise OlmoeError(f"{index}: weight_map must map tensor names to shard file names in the same folder")
    shards = sorted(set(weight_map.values()))
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
  path: Path | None = None                       # the file and byte offset of a tensor read from one (for take_rows)
  offset: int = 0

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
      offset = start + v["data_offsets"][0]
      state[key] = Stored(tuple(v["shape"]), SAFETENSORS_DTYPES[v["dtype"]], _file_reader(path, offset), path, offset)
  return state

def _stack(parts: list[Stored], axis: int = 0, new_axis: bool = True) -> Stored:
  """Stored tensors stacked (or concatenated along `axis`), each part read into its slice of the output."""
  if len({p.dtype for p in parts}) > 1: raise OlmoeError("checkpoint: experts stored in mixed dtypes")
  if len({p.shape[:axis] + p.shape[axis + (not new_axis):] for p in parts}) > 1:
    raise OlmoeError(f"checkpoint: experts stored with different shapes {sorted({p.shape for p in parts})}")
  sizes = [1 if new_axis else p.shape[axis] for p in parts]
  shape = (len(parts), *parts[0].shape) if new_axis else \
          tuple(sum(sizes) if d == axis else n for d, n in enumerate(parts[0].shape))
  def read_into(out: np.ndarray) -> None:
    for p, at in zip(parts, np.cumsum([0] + sizes)):
      p.read_into(out[(slice(None),) * axis + ((at,) if new_axis else (slice(at, at + p.shape[axis]),))])
  return Stored(shape, parts[0].dtype, read_into)

def take_rows(t: Stored, rows: list[int]) -> Stored:
  """Rows `rows` (along the first axis) of a tensor stored in a file, each read from its own bytes only: the rest of
  the tensor is never read (FlexOlmo loads only the experts it keeps, and their router rows)."""
  if t.path is None: raise ValueError("take_rows needs a tensor read from a file")
  n = math.prod(t.shape[1:]) * t.dtype.itemsize                            # bytes per row (C order)
  return _stack([Stored(t.shape[1:], t.dtype, _file_reader(t.path, t.offset + r * n), t.path, t.offset + r * n) for r in rows])

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

def device_array(shape: tuple[int, ...], dtype: DType, np_dtype) -> tuple[np.ndarray, Tensor] | None:
  """On the CPU, a new tinygrad buffer of `shape` and `dtype` and a numpy view of its memory (as `np_dtype`), so that
  a file or an array can be written straight into it, with no copy afterwards; None on other devices."""
  if not hasattr(Device[Device.DEFAULT].allocator, "_as_buffer"): return None
  out = Tensor.empty(*shape, dtype=dtype).realize()
  mem = out.uop.buffer.ensure_allocated().as_memoryview(force_zero_copy=True)
  return np.frombuffer(mem, np_dtype).reshape(shape), out

def to_tensor(t: Stored | Tensor, dtype: DType | None = None) -> Tensor:
  """A Stored record read into a new tinygrad buffer in its stored dtype. On the CPU the file's bytes are read
  into the buffer's own memory; other devices get a host array copied over. With dtype=float32, 16-bit floats are
  widened on the host, so that no bf16 kernel has to be compiled (for a compiler that cannot)."""
  if isinstance(t, Tensor): return t
  if dtype == dtypes.float32 and t.dtype != dtypes.float32:
    t.read_into(bits := np.empty(t.shape, np.uint16))
    return Tensor(widen(bits, t.dtype == dtypes.bfloat16))
  if (on_device := device_array(tuple(t.shape), t.dtype, _np_dtype(t.dtype))) is not None:
    t.read_into(on_device[0])
    return on_device[1]
  t.read_into(a := np.empty(t.shape, _np_dtype(t.dtype)))
  return Tensor(a) if t.dtype == dtypes.float32 else Tensor(a).bitcast(t.dtype)

def load_weights(model: Olmoe, state: dict[str, Stored | Tensor], dtype: DType | None = None, progress: bool = True,
                 quantize: str | None = None) -> None:
  """Assign every checkpoint tensor to the model, checking names and shapes; read one tensor at a time from disk, with a
  progress bar of the bytes read. With quantize="int8", the large weights are quantised as they are read (olmoe_int8.py)."""
  import olmoe_int8
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
  nbytes = lambda t: math.prod(t.shape) * t.dtype.itemsize
  with tqdm(total=sum(nbytes(t) for t in got.values()), unit="B", unit_scale=True, disable=not progress,
            desc="loading and quantising" if quantize else "loading") as bar:   # bytes read from the files
    for name, t in got.items():
      if quantize and olmoe_int8.is_quantised(name):                     # held as int8 + row scales
        _set(model, name, olmoe_int8.read_int8(t))
      else:
        w = to_tensor(t, dtype)
        _set(model, name, (w if w.dtype == dtype else w.cast(dtype)).contiguous().realize())
      bar.update(nbytes(t))
  if model.cfg.tie_word_embeddings: model.lm_head = model.embed_tokens

def _set(model: Olmoe, name: str, t: Tensor) -> None:
  """Assign t to the model attribute that `name` (as in `Olmoe.parameters()`) stands for."""
  *path, last = name.split(".")
  obj = model
  for p in path: obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
  setattr(obj, last, t)

def resolve_model_dir(name: str) -> Path:
  """A local folder (for a GGUF file, the folder holding it), or a Hugging Face hub repo id fetched with
  huggingface_hub (needs a network)."""
  p = Path(name).expanduser()
  if p.is_dir(): return p
  if p.is_file() and p.suffix == ".gguf": return p.parent
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
  """config.json as a dict (a JSON object), or an OlmoeError saying what is wrong with the file."""
  try: config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
  except FileNotFoundError: raise OlmoeError(f"{folder}: no config.json") from None
  except (OSError, UnicodeDecodeError) as e: raise OlmoeError(f"{folder}/config.json: unreadable ({e.__class__.__name__})") from None
  except ValueError as e: raise OlmoeError(f"{folder}/config.json: invalid JSON ({e})") from None
  if not isinstance(config, dict): raise OlmoeError(f"{folder}/config.json: not a JSON object")
  return config

def load_checkpoint(name: str, config_cls: type, model_cls: type, dtype: DType | str | None = None,
                    progress: bool = True, select: Callable[[OlmoeConfig, dict[str, Stored]],
                                                            tuple[OlmoeConfig, dict[str, Stored]]] | None = None,
                    quantize: str | None = None) -> tuple[Olmoe, Tokenizer | None]:
  """(model, tokenizer) from a folder holding config.json, safetensors (sharded or not) and tokenizer.json: the
  config read by `config_cls.from_dict`, the model built by `model_cls(cfg)`, its weights read from the files.

  Weights keep their stored dtype unless `dtype` is given ("float32" to compare with an fp32 reference).
  `select(cfg, state)`, given, returns the config and the not-yet-read tensors of a smaller model (FlexOlmo: only the
  kept experts), before the memory check and before anything is read. quantize="int8" holds the large weights in
  int8 (olmoe_int8.py); None keeps them as stored. A GGUF file (or a folder holding one) is read by olmoe_gguf.load."""
  from olmoe_tokenizer import Tokenizer
  from olmoe_int8 import check_quantize
  quantize = check_quantize(quantize)
  dtype = getattr(dtypes, dtype) if isinstance(dtype, str) else dtype
  import olmoe_gguf
  if (gguf := olmoe_gguf.gguf_path(name)) is not None:         # llama.cpp's format, quantised weights kept quantised
    from olmoe import Olmoe
    if model_cls is not Olmoe or select is not None: raise OlmoeError(f"{gguf}: GGUF files hold OLMoE models only (olmoe.py)")
    if quantize: raise OlmoeError(f"{gguf}: the file's weights are already quantised; --quantize is for safetensors checkpoints")
    return olmoe_gguf.load(gguf, dtype, progress)
  folder = resolve_model_dir(name)
  cfg = config_cls.from_dict(read_config(folder))
  tok = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else None
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise OlmoeError(f"{folder}: tokenizer.json has ids up to {tok.vocab_size - 1}, config.json's vocab_size is {cfg.vocab_size}")
  state = read_state_dict(folder)
  if select is not None: cfg, state = select(cfg, state)
  check_memory(state, dtype, folder, quantize)
  model = model_cls(cfg)
  load_weights(model, state, dtype, progress, quantize)
  model.quantize = quantize                       # part of the key of its captured steps (olmoe_speedups)
  return model, tok

def on_cpu() -> bool:
  """Whether tinygrad computes on this machine's CPU (where its memory is the machine's)."""
  try: return Device.DEFAULT == "CPU"
  except RuntimeError: return False                 # no device opens: tinygrad says why at the first kernel

def physical_memory() -> int | None:
  """Bytes of memory of this machine (None where the OS does not say)."""
  try: return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError): return None

def check_memory(state: dict[str, Stored], dtype: DType | None, folder: Path, quantize: str | None = None) -> None:
  """On the CPU, refuse before loading weights that cannot fit in this machine's memory, naming both sizes."""
  from olmoe_int8 import bytes_needed
  check_memory_bytes(sum(bytes_needed(k, t.shape, (dtype or t.dtype).itemsize, quantize) for k, t in state.items()), folder)

def check_memory_bytes(need: int, where: Path) -> None:
  """On the CPU, refuse before loading `need` bytes of weights that cannot fit in this machine's memory."""
  if not on_cpu() or (have := physical_memory()) is None: return
  if need > have:
    raise OlmoeError(f"{where}: the weights need {need / 2**30:.1f} GiB, this machine has {have / 2**30:.1f} GiB")


# ============================================= writing =============================================

class Raw(NamedTuple):
  """A tensor as a safetensors file stores it: dtype name ("F32", "BF16", "F16"), shape, and its bytes (or any
  C-contiguous array with those bytes, written without a copy)."""
  dtype: str
  shape: list[int]
  data: bytes | np.ndarray

  @property
  def nbytes(self) -> int: return len(self.data) if isinstance(self.data, bytes) else self.data.nbytes
  def as_bytes(self) -> bytes: return self.data if isinstance(self.data, bytes) else np.ascontiguousarray(self.data).tobytes()

def read_raw(folder: Path) -> dict[str, Raw]:
  """Every tensor of a checkpoint (sharded or not) as its stored bytes, keyed by transformers' names."""
  out: dict[str, Raw] = {}
  for path in checkpoint_files(folder):
    (header, start), blob = read_safetensors_header(path), path.read_bytes()
    data = blob[start:]
    for k, v in header.items():
      if k != "__metadata__": out[k] = Raw(v["dtype"], list(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
  return out

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16}

def bf16_bits(a: np.ndarray) -> np.ndarray:
  """fp32 -> bf16 bit patterns (uint16), rounded to the nearest even, as torch rounds (numpy has no bfloat16)."""
  u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
  return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

def widen(bits: np.ndarray, bf16: bool) -> np.ndarray:
  """16-bit float bit patterns (uint16) as float32, exactly: bf16 is the top half of an fp32, fp16 numpy converts."""
  return (bits.astype(np.uint32) << 16).view(np.float32) if bf16 else bits.view(np.float16).astype(np.float32)

def raw_to_numpy(t: Raw) -> np.ndarray:
  """The tensor as a float32 array (bf16 widened exactly)."""
  if t.dtype == "BF16": return widen(np.frombuffer(t.as_bytes(), np.uint16), True).reshape(t.shape)
  if t.dtype not in NUMPY_DTYPES: raise OlmoeError(f"unsupported tensor dtype {t.dtype}")
  return np.frombuffer(t.as_bytes(), NUMPY_DTYPES[t.dtype]).astype(np.float32).reshape(t.shape)

def to_raw(a: np.ndarray, dtype: str) -> Raw:
  """A float array stored as `dtype`: "F32", "F16", or "BF16" (rounded by `bf16_bits`; a uint16 array is taken as
  bf16 bit patterns already)."""
  if dtype == "BF16": bits = a if a.dtype == np.uint16 else bf16_bits(a)
  elif dtype in NUMPY_DTYPES: bits = a.astype(NUMPY_DTYPES[dtype])
  else: raise OlmoeError(f"unsupported tensor dtype {dtype}")
  return Raw(dtype, list(a.shape), np.ascontiguousarray(bits))

def write_safetensors(path: Path, tensors: dict[str, Raw], metadata: dict[str, str] | None = None) -> int:
  """Write the tensors, in this key order, as one safetensors file (with `metadata` if given); returns the bytes of
  tensor data. The file is written under a temporary name in the same folder and renamed: a file under `path` is
  always complete."""
  header: dict = {} if metadata is None else {"__metadata__": metadata}
  offset = 0
  for k, t in tensors.items():
    header[k] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)                                # the data section starts 8-byte aligned
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(head)) + head)
      for t in tensors.values(): f.write(t.data if isinstance(t.data, bytes) else memoryview(np.ascontiguousarray(t.data)).cast("B"))
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return offset
