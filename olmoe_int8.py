"""Weight-only int8 for olmoe.py and flexolmo.py (`load(..., quantize="int8")`, `--quantize int8`), in the spirit of
llama2.c's runq.c: a separate file, so that the model reads as the papers' math.

Each large weight (attention's q/k/v/o projections, the experts' gate_up and down stacks, the LM head) is quantised
per output channel as it is read from the checkpoint: for every output row r of an (..., out, in) weight,

    scale_r = max_j |w_rj| / 127,   q_rj = round(w_rj / scale_r) in [-127, 127]   (symmetric, no zero point)

and the model holds q (int8) and scale (fp32, one per row) only. The model's weight attribute becomes the lazy
expression `q.cast(float32) * scale` (`dequantize`), never realized: tinygrad fuses it into every kernel that reads
the weight (the products of `linear`, the gathers of the chosen experts' rows), so each kernel reads one byte per
weight and no full-precision copy of a weight is ever made. The products run in fp32 as before; only the weights
change, by at most scale_r / 2 each.

The checkpoint is read one tensor at a time (`read_int8`): its stored bytes, then the int8 result in chunks of rows,
so that the bf16/fp32 copy of the model never sits in memory, only that of the tensor being read.

Kept as they are: the embeddings (a gather of one row per token reads little of them), the norms and the router
(small; the router decides which experts run, and its rounding would change routing). A tied LM head stays the
embedding matrix.

Not handled: activation quantisation (the inputs of the products stay in the model's dtype), int4 or group-wise
scales, zero points (asymmetric ranges), non-finite weights (a row holding inf or NaN is an OlmoeError), training or
saving a quantised model (its weights are expressions, not leaves), GGUF or pre-quantised checkpoints.
"""
from __future__ import annotations
import math, re
from typing import TYPE_CHECKING
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.uop.ops import Ops
from olmoe import OlmoeError
if TYPE_CHECKING:
  from olmoe_checkpoint import Stored

QUANTIZATIONS = ("int8",)
# the large weights, by our names (`Olmoe.parameters()`) and by transformers' (per-expert keys, `model.`, `.weight`)
LARGE = re.compile(r"(model\.)?(lm_head|layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.experts\.(gate_up_proj|down_proj|"
                   r"\d+\.(gate_proj|up_proj|down_proj))))(\.weight)?")
CHUNK = 1 << 22                  # weights quantised at once: bounds the fp32 working copy to 16 MiB

def check_quantize(quantize: str | None) -> str | None:
  """The quantisation asked for (None: none), or an OlmoeError naming the ones there are."""
  if quantize is None or quantize in QUANTIZATIONS: return quantize
  raise OlmoeError(f"unknown quantisation {quantize!r} (choices: {', '.join(QUANTIZATIONS)})")

def is_quantised(name: str) -> bool:
  """Whether the weight `name` (ours or transformers') is held in int8."""
  return LARGE.fullmatch(name) is not None

def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(q, scale) for a float weight w (..., out, in): q int8 of w's shape, scale fp32 (..., out), with
  scale = max |w| over each row / 127 and q = round(w / scale) (half to even), so that q * scale[..., None] is w
  to within scale / 2. A row of zeros has scale 0 and q 0. Computed in fp32; inf or NaN is an OlmoeError."""
  w = np.asarray(w, np.float32)
  scale = np.abs(w).max(-1) / np.float32(127)                                  # (..., out)
  if not np.isfinite(scale).all(): raise OlmoeError("int8: a weight row holds inf or NaN")
  safe = np.where(scale > 0, scale, np.float32(1))                            # a zero row divides by 1: q = 0
  return np.rint(w / safe[..., None]).clip(-127, 127).astype(np.int8), scale.astype(np.float32)

def dequantize(q: Tensor, scale: Tensor) -> Tensor:
  """The weight as the model reads it: q (..., out, in) int8 times its row scales (..., out), in fp32, left lazy so
  that every kernel reading it computes it from the int8 bytes."""
  return q.cast(dtypes.float32) * scale.unsqueeze(-1)

def read_int8(t: Stored | Tensor) -> Tensor:
  """A checkpoint weight read and quantised (see `quantize_int8`), as the `dequantize` expression over two new
  buffers. Only this tensor's stored bytes and one chunk of rows in fp32 are held besides the int8 result."""
  from olmoe_checkpoint import widen
  shape = tuple(t.shape)
  if isinstance(t, Tensor): stored = t.float().numpy()
  else:
    t.read_into(stored := np.empty(shape, np.float32 if t.dtype == dtypes.float32 else np.uint16))
  q, qt = _int8_buffer(shape)
  rows_q, rows_w = q.reshape(-1, shape[-1]), stored.reshape(-1, shape[-1])
  scale = np.empty(rows_q.shape[0], np.float32)
  step = max(1, CHUNK // max(1, shape[-1]))
  for a in range(0, rows_q.shape[0], step):
    w = rows_w[a:a + step]
    if w.dtype == np.uint16: w = widen(w, t.dtype == dtypes.bfloat16)
    rows_q[a:a + step], scale[a:a + step] = quantize_int8(w)
  return dequantize(Tensor(q).realize() if qt is None else qt, Tensor(scale.reshape(shape[:-1])).realize())

def _int8_buffer(shape: tuple[int, ...]) -> tuple[np.ndarray, Tensor | None]:
  """Where the int8 weights are written: on the CPU, the memory of a new tinygrad buffer, with its tensor (no copy
  afterwards); elsewhere a host array, copied to the device once full (no tensor yet)."""
  from olmoe_checkpoint import device_array
  return device_array(shape, dtypes.int8, np.int8) or (np.empty(shape, np.int8), None)

def held_bytes(model) -> dict[DType, int]:
  """Bytes of the model's weight buffers, by dtype (each buffer once): what the weights hold in memory."""
  out: dict[DType, int] = {}
  seen = set()
  for t in model.parameters().values():
    for u in t.uop.toposort():
      if u.op is Ops.BUFFER and u not in seen:
        seen.add(u)
        out[u.dtype] = out.get(u.dtype, 0) + u.src[0].arg * u.dtype.itemsize
  return out

def bytes_needed(name: str, shape: tuple[int, ...], itemsize: int, quantize: str | None) -> int:
  """Bytes a checkpoint tensor takes once loaded: int8 and one fp32 scale per row when quantised."""
  if quantize is None or not is_quantised(name): return math.prod(shape) * itemsize
  return math.prod(shape) + math.prod(shape[:-1]) * 4
