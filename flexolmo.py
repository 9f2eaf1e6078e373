#!/usr/bin/env python3
"""FlexOlmo (allenai/FlexOlmo-7x7B-1T) in tinygrad: only what differs from OLMoE; the rest comes from olmoe.py.

FlexOlmo is a mixture of experts built by data owners who never share data: each owner trains one expert (and its
router row) against a frozen copy of a public model, and the experts are merged afterwards; any expert can be left
out at inference. How it differs from olmoe.py:
  1. Post-norm blocks (OLMo 2): h += N_attn(attn(h)); h += N_ff(moe(h)). There is no input norm; the layer's two
     norms (`post_attention_layernorm`, `post_feedforward_layernorm`) act on the sublayer *outputs*.
  2. RMSNorm multiplies by its weight in fp32 and casts last (OLMoE casts, then multiplies).
  3. RoPE rotates q and k in fp32 and casts back (OLMoE casts cos/sin to the model dtype). No clip_qkv.
  4. Defaults: rope_theta 500000, rms_norm_eps 1e-6, dolma2 tokenizer ids (eos 100257, pad 100277).
  5. Experts have names (config `expert_names`); excluding one sets its router logit to -inf before the softmax,
     which is exactly deleting its router row and its FFN, and k is capped at the number of enabled experts;
     `load` does delete them: it reads only the kept experts. `attribution`: each expert's share of a generation.
  6. The recipe: `train-expert` (coordinated training of one owner's expert), `merge` (assemble the owners') and
     `train-router` (the optional router training on proxy data after the merge, "RT").
Same as OLMoE: the router `olmoe.route`, the stacked SwiGLU experts, the final norm, the LM head, losses, KV cache,
generation, tokenizer and checkpoint loading. Shape comments use olmoe.py's legend (B, T, D, I, E, k, L, ...).

Not handled: the learned negative expert bias of the original training code (the released checkpoints have no place
for it), the paper's classifiers that pick proxy documents for RT (train-router takes the text it is given), and its
external embedder for router initialisation (the public model's own router input, averaged, stands in for it).
"""
from __future__ import annotations
import argparse, json, os, re, shutil, sys
from dataclasses import dataclass, replace
from typing import Iterable
from pathlib import Path
import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.helpers import Context, tqdm
from tinygrad.nn.optim import AdamW
import olmoe
from olmoe import OlmoeError, Attention, SparseMoeBlock, Olmoe, OlmoeConfig, Step, apply_rope
from olmoe_checkpoint import (EXPERT_KEY, Raw, Stored, load_checkpoint, load_weights, raw_to_numpy, read_config, read_raw,
                              take_rows, to_raw, write_safetensors)
from olmoe_tokenizer import Tokenizer
import olmoe_cli, olmoe_compiler

RELEASED_NAMES = ["public", "math", "news", "academic", "code", "creative", "reddit"]   # FlexOlmo-7x7B-1T's order


@dataclass(frozen=True)
class FlexOlmoConfig(OlmoeConfig):
  """OlmoeConfig's fields (same meanings) with transformers' FlexOlmoConfig defaults: the 7x7B sizes."""
  vocab_size: int = 100352                    # dolma2 (cl100k + specials), padded
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  rope_theta: float = 500000.0                # OLMo 2's
  rms_norm_eps: float = 1e-6                  # OLMo 2's
  num_experts: int = 7                        # the public expert + 6 data owners
  num_experts_per_tok: int = 5                # the class default; the released 7x7B uses all 7
  pad_token_id: int | None = 100277
  eos_token_id: int | list[int] | None = 100257
  expert_names: list[str] | None = None       # who owns which expert, in router-row order (optional in config.json)
  model_type: str = "flex_olmo"

  @classmethod
  def from_dict(cls, d: dict) -> "FlexOlmoConfig":
    """As OLMoE's, minus clip_qkv (FlexOlmo's attention never clips, whatever config.json says), and checking that
    `expert_names`, if given, names each expert once."""
    cfg = super().from_dict({k: v for k, v in d.items() if k != "clip_qkv"})
    names = cfg.expert_names
    if names is not None and (len(names) != cfg.num_experts or len(set(names)) != len(names) or not all(names)):
      raise OlmoeError(f"config: expert_names {names} must be {cfg.num_experts} distinct non-empty names")
    return cfg

  def names(self) -> list[str]:
    """Expert names: the config's, else the released order for the released 7x7B shape, else indices."""
    if self.expert_names: return list(self.expert_names)
    if (self.num_experts, self.hidden_size, self.num_hidden_layers) == (7, 4096, 32): return list(RELEASED_NAMES)
    return [str(e) for e in range(self.num_experts)]


# ============================================ the FlexOlmo block ============================================

def rms_norm_olmo2(x: Tensor, w: Tensor, eps: float) -> Tensor:
  """OLMo 2 RMSNorm: normalise and scale in fp32, cast back last."""
  xf = x.float()
  return (w.float() * (xf * (xf.square().mean(-1, keepdim=True) + eps).rsqrt())).cast(x.dtype)


class FlexAttention(Attention):
  """OLMoE's attention with OLMo 2's q/k norm and fp32 rotation."""
  def norm(self, x: Tensor, w: Tensor) -> Tensor: return rms_norm_olmo2(x, w, self.cfg.rms_norm_eps)

  def rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q and k in fp32, cast back to the model dtype."""
    return apply_rope(q.float(), cos, sin).cast(q.dtype), apply_rope(k.float(), cos, sin).cast(k.dtype)


class FlexDecoderLayer:
  """Post-norm block: the norms act on what attention and the MoE add to the residual stream."""
  def __init__(self, cfg: FlexOlmoConfig):
    self.cfg = cfg
    self.self_attn = FlexAttention(cfg)
    self.post_attention_layernorm = Tensor.ones(cfg.hidden_size)             # (D,) norm of the attention output
    self.mlp = SparseMoeBlock(cfg)
    self.post_feedforward_layernorm = Tensor.ones(cfg.hidden_size)           # (D,) norm of the MoE output

  def __call__(self, h, cos, sin, mask, start_pos=0, expert_mask=None, k=None):
    eps = self.cfg.rms_norm_eps
    a = rms_norm_olmo2(self.self_attn(h, cos, sin, mask, start_pos), self.post_attention_layernorm, eps)    # (B, T, D)
    h = (h + a).contiguous()                                                # (B, T, D) materialised
    m, routing = self.mlp(h, expert_mask, k)                                                               # (B, T, D)
    return (h + rms_norm_olmo2(m, self.post_feedforward_layernorm, eps)).contiguous(), routing  # (B, T, D) materialised


class FlexOlmo(Olmoe):
  """The FlexOlmo causal LM: OLMoE's model with post-norm blocks and OLMo 2's norms; experts can be switched off."""
  Layer = FlexDecoderLayer

  def final_norm(self, h: Tensor) -> Tensor: return rms_norm_olmo2(h, self.norm, self.cfg.rms_norm_eps)

  def select_experts(self, experts: ExpertChoice = None, opt_out: ExpertChoice = None) -> list[str]:
    """Enable only `experts` (names or indices), or all but `opt_out`; returns the enabled names.

    An excluded expert's router logit is -inf before the softmax: it can take no slot, and the softmax
    renormalises over the others, exactly as if its router row and FFN were deleted. k is capped accordingly.
    The weights of every expert stay in memory (to switch experts without reloading); `load` keeps only the chosen."""
    names = self.cfg.names()
    on = expert_indices(names, experts, opt_out)
    self.enable_experts(on)
    return [names[e] for e in on]


ExpertChoice = "list[str | int] | str | int | None"     # expert names or router-row indices (ints, or digit strings)

def expert_indices(names: list[str], experts: ExpertChoice = None, opt_out: ExpertChoice = None) -> list[int]:
  """The enabled experts' router rows, ascending: `experts` (default: all) minus `opt_out`, each a name or an index.
  Unknown ones are an OlmoeError naming every one of them."""
  as_list = lambda x: [] if x is None else [x] if isinstance(x, (str, int)) else list(x)
  def index(n) -> int | None:
    if isinstance(n, int) and not isinstance(n, bool): return n if 0 <= n < len(names) else None
    if n in names: return names.index(n)
    return int(n) if isinstance(n, str) and n.isdigit() and int(n) < len(names) else None
  asked = as_list(experts) + as_list(opt_out)
  if unknown := [n for n in asked if index(n) is None]:
    raise OlmoeError(f"unknown expert{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                     f"(this model has: {', '.join(names)})")
  on = set(range(len(names))) if experts is None else {index(n) for n in as_list(experts)}
  on -= {index(n) for n in as_list(opt_out)}
  if not on: raise OlmoeError("every expert is excluded: keep at least one")
  return sorted(on)

ROUTER_ROWS = re.compile(r"model\.layers\.\d+\.mlp\.(gate|experts\.gate_up_proj|experts\.down_proj)(\.weight)?")

def keep_experts(cfg: FlexOlmoConfig, state: dict[str, Stored], keep: list[int]) -> tuple[FlexOlmoConfig, dict[str, Stored]]:
  """The config and not-yet-read tensors of the model with only experts `keep` (ascending): their FFNs renumbered
  0..E'-1 in the same order, the router W_r cut to their rows (E', D), k capped at E', and `expert_names` the kept
  experts' original names. Softmax over the kept rows is the masked softmax of `select_experts` (an excluded logit
  of -inf adds e^-inf = 0 to the denominator), and the top-k breaks ties towards the lower row in both, so this is
  the same function with (E - E') / E of the expert weights never read."""
  E = cfg.num_experts
  if keep == list(range(E)): return cfg, state
  out: dict[str, Stored] = {}
  for key, t in state.items():
    if (m := EXPERT_KEY.fullmatch(key)) and int(m[2]) < E:             # per-expert keys: kept ones renumbered
      if int(m[2]) in keep: out[expert_key(int(m[1]), keep.index(int(m[2])), m[3])] = t
    elif ROUTER_ROWS.fullmatch(key):                                   # the router and fused experts: one row per expert
      if t.shape[:1] != (E,): raise OlmoeError(f"checkpoint: {key} has shape {t.shape}, config implies {E} experts")
      out[key] = take_rows(t, keep)
    else: out[key] = t
  names = cfg.names()
  return replace(cfg, num_experts=len(keep), num_experts_per_tok=min(cfg.num_experts_per_tok, len(keep)),
                 expert_names=[names[e] for e in keep]), out


def load(name: str, experts: ExpertChoice = None, opt_out: ExpertChoice = None, dtype=None,
         progress: bool = True, quantize: str | None = None) -> tuple[FlexOlmo, "olmoe_tokenizer.Tokenizer | None"]:
  """(model, tokenizer) from a FlexOlmo checkpoint folder (or hub repo id) with only the chosen experts: `experts`
  (names or indices, default all) minus `opt_out`. Only those experts' weights and router rows are read: the model
  has E' experts, named by their original names (`cfg.names()`), and computes what the full model computes with the
  others masked (`keep_experts`); memory is in proportion to the experts kept. quantize="int8" holds the large
  weights in int8 (olmoe_int8.py)."""
  select = lambda cfg, state: keep_experts(cfg, state, expert_indices(cfg.names(), experts, opt_out))
  return load_checkpoint(name, FlexOlmoConfig, FlexOlmo, dtype, progress, select, quantize)


# ======================================= checkpoints as raw tensors =======================================
# train-expert and merge move tensors they do not change as raw bytes, so frozen and shared weights stay bit-identical.

def check_out(out: Path, inputs: list[Path]) -> Path:
  """The output folder must be new (so no input is ever written over)."""
  out = out.resolve()
  if out.exists(): raise OlmoeError(f"{out} exists: choose a new --out folder (inputs are never overwritten)")
  if any(p.resolve() in out.parents for p in inputs): raise OlmoeError(f"--out {out} is inside an input folder")
  return out

def write_checkpoint(out: Path, config: dict, tensors: dict[str, Raw], tokenizer: Path | None,
                     inputs: list[Path]) -> None:
  """Write config.json + model.safetensors (+ tokenizer.json) into a temporary folder, then rename it to `out`."""
  out = check_out(out, inputs)
  if tokenizer is not None and tokenizer.exists(): Tokenizer.from_file(tokenizer)   # a malformed one is not passed on
  for stale in out.parent.glob(f".{out.name}.partial-*"):      # left by a run that was killed: its process is gone
    pid = stale.name.rsplit("-", 1)[-1]
    if pid.isdigit() and not Path(f"/proc/{pid}").exists(): shutil.rmtree(stale, ignore_errors=True)
  tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
  tmp.mkdir(parents=True)
  try:
    write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None and tokenizer.exists(): shutil.copy(tokenizer, tmp / "tokenizer.json")
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

def expert_key(l: int, e: int, part: str) -> str: return f"model.layers.{l}.mlp.experts.{e}.{part}.weight"
def gate_key(l: int) -> str: return f"model.layers.{l}.mlp.gate.weight"
PARTS = ("gate_proj", "up_proj", "down_proj")

def public_expert(raw: dict[str, Raw], config: dict, l: int, part: str) -> Raw:
  """The public FFN of layer l: a dense OLMo 2 model's MLP, or expert 0 of a FlexOlmo checkpoint."""
  key = f"model.layers.{l}.mlp.{part}.weight" if config["model_type"] == "olmo2" else expert_key(l, 0, part)
  if key not in raw: raise OlmoeError(f"public model: missing tensor {key}")
  return raw[key]

def checked_config(config: dict, folder: Path) -> dict:
  """config.json of a recipe input, its values checked as FlexOlmo's loader checks them (types and ranges)."""
  try: FlexOlmoConfig.from_dict({**config, "model_type": "flex_olmo", "expert_names": None})
  except OlmoeError as e: raise OlmoeError(f"{folder}/{e}") from None
  return config

def read_public(folder: Path) -> tuple[dict, dict[str, Raw]]:
  """The public model's config.json and raw tensors."""
  if not folder.is_dir(): raise OlmoeError(f"{folder}: not a model folder (config.json + safetensors + tokenizer.json)")
  config = read_config(folder)
  if config.get("model_type") not in ("olmo2", "flex_olmo"):
    raise OlmoeError(f"{folder}: the public model must be olmo2 (dense) or flex_olmo, not {config.get('model_type')!r}")
  checked_config(config, folder)
  raw = read_raw(folder)
  if len(kinds := sorted({t.dtype for t in raw.values()})) > 1: raise OlmoeError(f"{folder}: mixed tensor dtypes {kinds}")
  for l in range(config.get("num_hidden_layers", 0)):     # the public FFN and (FlexOlmo) router of every layer
    for part in PARTS: public_expert(raw, config, l, part)
    if config["model_type"] == "flex_olmo" and gate_key(l) not in raw: raise OlmoeError(f"public model: missing tensor {gate_key(l)}")
  return config, raw


# ========================================= coordinated expert training =========================================

def read_windows(files: list[Path], tok, seq_len: int, eos: int) -> np.ndarray:
  """Tokenise the text files (each one a document, followed by the EOS id) and cut them into (n, seq_len + 1) windows."""
  ids: list[int] = []
  for f in files:
    try: text = Path(f).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e: raise OlmoeError(f"{f}: unreadable text file ({e.__class__.__name__})") from None
    ids += tok.encode(text) + [eos]
  n = len(ids) // (seq_len + 1)
  if n == 0: raise OlmoeError(f"need at least {seq_len + 1} tokens of data, got {len(ids)}")
  return np.array(ids[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)

def tokenizer_and_eos(folder: Path, config: dict) -> tuple[Tokenizer, int]:
  """The folder's tokenizer and the id that ends each document of training text."""
  if not (folder / "tokenizer.json").exists(): raise OlmoeError(f"{folder}: no tokenizer.json")
  tok = Tokenizer.from_file(folder / "tokenizer.json")
  eos = config.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else tok.token_to_id("<|endoftext|>")
  if eos is None: raise OlmoeError(f"{folder}: no eos_token_id in config.json and no <|endoftext|> token")
  return tok, eos

class _Recorder:
  """Stands in for a layer's MoE block and keeps what enters it (the router's input)."""
  def __init__(self, mlp): self.mlp, self.seen = mlp, []
  def __call__(self, x, *args):
    self.seen.append(x.float().mean((0, 1)).numpy())
    return self.mlp(x, *args)

def router_embedding(model: FlexOlmo, windows: np.ndarray, n: int = 16) -> np.ndarray:
  """(L, D) a domain's router rows: at each layer, the router's input (the residual stream entering the MoE block)
  averaged over the first n windows of the domain's text, scaled to unit length, so that every domain's row has the
  same length and no logit is large enough to saturate the softmax."""
  rec = [_Recorder(layer.mlp) for layer in model.layers]
  for layer, r in zip(model.layers, rec): layer.mlp = r
  try: model(Tensor(windows[:n, :-1]))
  finally:
    for layer, r in zip(model.layers, rec): layer.mlp = r.mlp
  mean = np.stack([r.seen[0] for r in rec])                                  # (L, D)
  return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)

def two_expert_model(config: dict, raw: dict[str, Raw]) -> tuple[FlexOlmoConfig, FlexOlmo]:
  """The public model as a 2-expert FlexOlmo (fp32): both expert slots hold the public FFN, router rows zero."""
  base = {k: v for k, v in config.items() if k != "model_type"}
  cfg = FlexOlmoConfig.from_dict({**base, "model_type": "flex_olmo", "num_experts": 2, "num_experts_per_tok": 2,
                                  "expert_names": None})
  L, D = cfg.num_hidden_layers, cfg.hidden_size
  state = {k: Tensor(raw_to_numpy(v)) for k, v in raw.items() if ".mlp." not in k}
  for l in range(L):
    for part in PARTS:
      w = Tensor(raw_to_numpy(public_expert(raw, config, l, part)))
      state[expert_key(l, 0, part)], state[expert_key(l, 1, part)] = w, w
    state[gate_key(l)] = Tensor.zeros(2, D)
  model = FlexOlmo(cfg)
  load_weights(model, state, dtypes.float32, progress=False)
  return cfg, model

def train_expert(public: Path, data: list[Path], out: Path, name: str, steps: int = 100, lr: float = 1e-3,
                 seq_len: int = 64, batch: int = 8, seed: int = 0, public_data: list[Path] | None = None,
                 z_loss: float = 0.001, progress: bool = True, router: str = "learn") -> list[float]:
  """Train one data owner's expert against the frozen public model; write a 2-expert FlexOlmo checkpoint.

  Expert 0 and router row 0 are the public model's and never change; so do the embeddings, attention, norms and LM
  head. Expert 1 (initialised as a copy of the public FFN) is trained on CE + z-loss, on the owner's text only.
  Router rows are domain-informed: at each layer, the public model's own router input averaged over a sample of the
  owner's text (`router_embedding`; the paper used an external embedder, GritLM, and one vector for every layer). A
  dense public model has no router: its row is the same average over `public_data`, or zero.
  router="learn" trains row 1 with the expert, as the paper does; router="fixed" keeps the embedding (trained only
  on its own domain, a learned row also rises on text it never sees, which the merged model then misroutes:
  demo/RESULTS.md measures both). Returns the training losses."""
  if min(steps, seq_len, batch) <= 0 or lr <= 0: raise OlmoeError("--steps, --seq-len, --batch and --lr must be positive")
  if router not in ("learn", "fixed"): raise OlmoeError(f"--router {router!r}: expected learn or fixed")
  config, raw = read_public(public)
  check_out(out, [public])
  names = (config.get("expert_names") or ["public"])[:1] + [name]
  if not name or name == names[0]: raise OlmoeError(f"the expert needs a name other than the public expert's ({names[0]!r})")
  tok, eos = tokenizer_and_eos(public, config)
  windows = read_windows(data, tok, seq_len, eos)
  cfg, model = two_expert_model(config, raw)
  L, D = cfg.num_hidden_layers, cfg.hidden_size
  # router rows: the public row as published (FlexOlmo) or from public text (dense), the owner's from its data
  if config["model_type"] == "flex_olmo": r_pub = [raw_to_numpy(raw[gate_key(l)])[0] for l in range(L)]
  else: r_pub = router_embedding(model, read_windows(public_data, tok, seq_len, eos)) if public_data else np.zeros((L, D), np.float32)
  r_dom = router_embedding(model, windows)
  # the trainable tensors: per layer expert 1 (gate_up, down) and router row 1; everything else is a constant
  frozen = [(layer.mlp.experts.gate_up_proj[0].contiguous().realize(), layer.mlp.experts.down_proj[0].contiguous().realize(),
             Tensor(r_pub[l]).reshape(1, D).realize()) for l, layer in enumerate(model.layers)]
  train = [(gu.clone().realize(), dn.clone().realize(), Tensor(r_dom[l]).reshape(1, D).contiguous().realize()) for l, (gu, dn, _) in enumerate(frozen)]
  for p in model.parameters().values(): p.requires_grad = False
  params = [t for gu, dn, r in train for t in ((gu, dn, r) if router == "learn" else (gu, dn))]
  for p in params: p.requires_grad = True
  def assemble():   # the layer tensors as [public; owner] along the expert axis
    for layer, (gu0, dn0, r0), (gu1, dn1, r1) in zip(model.layers, frozen, train):
      layer.mlp.experts.gate_up_proj = gu0.unsqueeze(0).cat(gu1.unsqueeze(0))        # (2, 2I, D)
      layer.mlp.experts.down_proj = dn0.unsqueeze(0).cat(dn1.unsqueeze(0))           # (2, D, I)
      layer.mlp.gate = r0.cat(r1)                                                     # (2, D)
  opt = AdamW(params, lr=lr, b1=0.9, b2=0.95, weight_decay=0.0)
  @TinyJit
  def step(x: Tensor) -> Tensor:
    assemble()
    logits, routing = model(x[:, :-1], return_routing=True)                           # (B, T, V)
    loss = logits.float().sparse_categorical_crossentropy(x[:, 1:]) + z_loss * olmoe.router_z_loss(routing.logits)
    opt.zero_grad()
    loss.backward()
    Tensor.realize(*opt.schedule_step(), loss)         # one realize: the loss is read before the weights change
    return loss
  rng, losses = np.random.default_rng(seed), []
  run = olmoe.step_runner()                     # the compiled step as generate runs its own (olmoe_speedups)
  try:
    with Context(TRAINING=1):
      for _ in (bar := tqdm(range(steps), desc=f"train {name}", disable=not progress)):
        losses.append(run(step, Tensor(windows[rng.integers(0, len(windows), batch)])).item())
        bar.set_description(f"train {name} loss {losses[-1]:.3f}")
  finally: run.finish()
  # write: frozen tensors as the input's bytes; expert 1 and the router in the public model's dtype
  dt = public_expert(raw, config, 0, "up_proj").dtype
  I = cfg.intermediate_size
  tensors = {k: v for k, v in raw.items() if ".mlp." not in k}
  for l, ((gu1, dn1, r1), (_, _, r0)) in enumerate(zip(train, frozen)):
    for part in PARTS: tensors[expert_key(l, 0, part)] = public_expert(raw, config, l, part)
    gu = gu1.numpy()
    tensors[expert_key(l, 1, "gate_proj")] = to_raw(gu[:I], dt)
    tensors[expert_key(l, 1, "up_proj")] = to_raw(gu[I:], dt)
    tensors[expert_key(l, 1, "down_proj")] = to_raw(dn1.numpy(), dt)
    row0 = row(raw[gate_key(l)], 0) if config["model_type"] == "flex_olmo" else to_raw(r0.numpy().reshape(D), dt)
    tensors[gate_key(l)] = Raw(dt, [2, D], row0.as_bytes() + to_raw(r1.numpy().reshape(D), dt).as_bytes())
  new_config = {**config, "model_type": "flex_olmo", "architectures": ["FlexOlmoForCausalLM"], "num_experts": 2,
                "num_experts_per_tok": 2, "expert_names": names}
  write_checkpoint(out, new_config, tensors, public / "tokenizer.json", [public])
  return losses


def train_router(merged: Path, data: list[Path], out: Path, steps: int = 300, lr: float = 5e-3, seq_len: int = 64,
                 batch: int = 8, seed: int = 0, per_file: int = 128, progress: bool = True) -> list[float]:
  """Router training on proxy data (the paper's "RT", its -RT release): after the merge, every layer's router rows
  learn on a mix of text standing in for each domain, on the cross-entropy alone (no load balancing, no z-loss,
  as the paper); experts, attention, norms, embeddings and LM head stay frozen. Each file gives `per_file` windows
  (or all it has), so that each domain weighs the same. Writes the checkpoint with the new rows; every other tensor
  is the input's bytes. Opting out still masks a row, so it still equals deleting that expert."""
  if min(steps, seq_len, batch, per_file) <= 0 or not lr > 0:
    raise OlmoeError("--steps, --seq-len, --batch, --per-file and --lr must be positive")
  config = checked_config(read_config(merged), merged)
  if config.get("model_type") != "flex_olmo": raise OlmoeError(f"{merged}: not a flex_olmo checkpoint (merge first)")
  check_out(out, [merged])
  tok, eos = tokenizer_and_eos(merged, config)
  rng = np.random.default_rng(seed)
  windows = []
  for f in data:   # the same number of windows from every file, chosen at random
    w = read_windows([f], tok, seq_len, eos)
    windows.append(w[rng.choice(len(w), min(per_file, len(w)), replace=False)])
  windows = np.concatenate(windows)
  raw = read_raw(merged)
  model, _ = load(str(merged), dtype="float32", progress=False)
  for p in model.parameters().values(): p.requires_grad = False
  rows = [layer.mlp.gate.contiguous().realize() for layer in model.layers]            # (E, D) each, trained
  for layer, r in zip(model.layers, rows): r.requires_grad, layer.mlp.gate = True, r
  opt = AdamW(rows, lr=lr, b1=0.9, b2=0.95, weight_decay=0.0)
  @TinyJit
  def step(x: Tensor) -> Tensor:
    opt.zero_grad()
    loss, _ = olmoe.lm_loss(model, x, alpha=0.0, beta=0.0)                            # CE alone
    loss.backward()
    Tensor.realize(*opt.schedule_step(), loss)         # one realize: the loss is read before the rows change
    return loss
  losses, run = [], olmoe.step_runner()
  try:
    with Context(TRAINING=1):
      for _ in (bar := tqdm(range(steps), desc="train router", disable=not progress)):
        losses.append(run(step, Tensor(windows[rng.integers(0, len(windows), batch)])).item())
        bar.set_description(f"train router loss {losses[-1]:.3f}")
  finally: run.finish()
  tensors = dict(raw)
  for l, r in enumerate(rows): tensors[gate_key(l)] = to_raw(r.numpy(), raw[gate_key(l)].dtype)
  write_checkpoint(out, config, tensors, merged / "tokenizer.json", [merged])
  return losses


# ================================================= merging =================================================

SAME_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
               "tie_word_embeddings")

def merge(public: Path, owners: list[tuple[str, Path]], out: Path, top_k: int | None = None) -> None:
  """Assemble independently trained experts into one FlexOlmo: expert 0 and router row 0 from the public model,
  expert i and row i from owner i. Every shared tensor must be bit-identical across the inputs."""
  if not owners: raise OlmoeError("merge needs at least one --expert NAME=DIR")
  E = 1 + len(owners)
  k = top_k or E
  if not 0 < k <= E: raise OlmoeError(f"--top-k must be in 1..{E}")
  pub_config, pub = read_public(public)
  names = [(pub_config.get("expert_names") or ["public"])[0]] + [n for n, _ in owners]
  if len(set(names)) != len(names) or not all(names): raise OlmoeError(f"expert names must be distinct and non-empty: {names}")
  for n, d in owners:
    if not d.is_dir(): raise OlmoeError(f"{d}: expert {n!r} is not a model folder")
  check_out(out, [public] + [d for _, d in owners])
  inputs = [(checked_config(read_config(d), d), read_raw(d), n, d) for n, d in owners]
  for config, raw, n, d in inputs:
    if config.get("model_type") != "flex_olmo" or config.get("num_experts") != 2:
      raise OlmoeError(f"{d}: expert {n!r} must be a 2-expert flex_olmo checkpoint (from train-expert)")
    for field in SAME_CONFIG:
      if config.get(field) != pub_config.get(field):
        raise OlmoeError(f"{d}: config {field} is {config.get(field)!r}, the public model has {pub_config.get(field)!r}")
  L, D = pub_config["num_hidden_layers"], pub_config["hidden_size"]
  shared = sorted(k for k in pub if ".mlp." not in k)
  describe = lambda t: "missing" if t is None else f"{t.dtype} {t.shape}"
  for config, raw, n, d in inputs:
    # the layout first: the public model's shared tensors, two experts shaped like the public FFN, a (2, D) router
    odd = sorted(set(k for k in raw if ".mlp." not in k) ^ set(shared))
    if odd: raise OlmoeError(f"{d}: tensor {odd[0]} is in only one of expert {n!r} and the public model")
    for l in range(L):
      want = {expert_key(l, e, p): public_expert(pub, pub_config, l, p)[:2] for e in (0, 1) for p in PARTS}
      want[gate_key(l)] = (want[expert_key(l, 0, "up_proj")][0], [2, D])
      for key, (dt, shape) in want.items():
        if (t := raw.get(key)) is None or (t.dtype, list(t.shape)) != (dt, list(shape)):
          raise OlmoeError(f"{d}: tensor {key} of expert {n!r} is {describe(t)}, expected {dt} {list(shape)}")
    # then the values: everything the owner did not train must be the public model's, bit for bit
    checks = [(k, raw[k], pub[k]) for k in shared]
    checks += [(expert_key(l, 0, p), raw[expert_key(l, 0, p)], public_expert(pub, pub_config, l, p)) for l in range(L) for p in PARTS]
    if pub_config["model_type"] == "flex_olmo":
      checks += [(f"{gate_key(l)}[0]", row(raw[gate_key(l)], 0), row(pub[gate_key(l)], 0)) for l in range(L)]
    else:    # a dense public model has no router: the owners' public rows must agree with each other
      first = inputs[0][1]
      checks += [(f"{gate_key(l)}[0]", row(raw[gate_key(l)], 0), row(first[gate_key(l)], 0)) for l in range(L)]
    for key, a, b in checks:
      if a != b: raise OlmoeError(f"{d}: tensor {key} differs from the public model's (expert {n!r}); "
                                  f"experts must be trained against the same frozen public model")
  tensors = {k: pub[k] for k in shared}
  for l in range(L):
    for p in PARTS:
      tensors[expert_key(l, 0, p)] = public_expert(pub, pub_config, l, p)
      for e, (_, raw, _, _) in enumerate(inputs, start=1): tensors[expert_key(l, e, p)] = raw[expert_key(l, 1, p)]
    rows = [row(inputs[0][1][gate_key(l)], 0)] + [row(raw[gate_key(l)], 1) for _, raw, _, _ in inputs]
    tensors[gate_key(l)] = Raw(rows[0].dtype, [E, D], b"".join(r.as_bytes() for r in rows))         # (E, D)
  config = {**inputs[0][0], "num_experts": E, "num_experts_per_tok": k, "expert_names": names}
  write_checkpoint(out, config, tensors, public / "tokenizer.json", [public] + [d for _, d in owners])

def row(t: Raw, i: int) -> Raw:
  """Row i of a 2-D raw tensor."""
  data = t.as_bytes()
  n = len(data) // t.shape[0]
  return Raw(t.dtype, list(t.shape[1:]), data[i * n:(i + 1) * n])



# =============================================== attribution ===============================================

def attribution(steps: Iterable[Step], names: list[str], stop_ids: Iterable[int] = ()) -> list[dict[str, float]]:
  """Each expert's share of the router weight over the generated tokens, one {name: share} per prompt of the batch,
  from the `Step`s of `olmoe.generate(..., with_routing=True)`; `names[e]` names router row e (`cfg.names()`).

  A step's routing is that of the forward pass that computed its token (the prefill's last position for the first
  token), so the shares say which experts produced the text. For row b, over its T generated tokens t (up to and
  including its first stop id; generate pads a stopped row until the batch ends) and the L layers l:

      share(e) = 1 / (L T) * sum_{l, t} sum_{s < k} g~_{l,t,s} [i_{l,t,s} = e],   g~_{l,t,s} = g_{l,t,s} / sum_s' g_{l,t,s'}

  The weights are the top-k weights renormalised over the k slots, so that the shares sum to 1: without
  renormalisation (OLMoE's and FlexOlmo's g = p) they sum to the probability the top k hold, and the mass of experts
  that did not run, which never reaches the output, would depend on k. With k = E (the released FlexOlmo, the demo)
  g already sums to 1 (up to the model dtype's rounding) and renormalising changes nothing."""
  stop, total, done = set(stop_ids), None, None
  for step in steps:
    if step.weights is None or step.experts is None:
      raise OlmoeError("attribution needs the routing: generate(..., with_routing=True)")
    if total is None: total, done = np.zeros((len(step.tokens), len(names))), np.zeros(len(step.tokens), bool)
    g = step.weights / step.weights.sum(-1, keepdims=True)                    # (L, B, k) renormalised over the slots
    for b in np.flatnonzero(~done): np.add.at(total[b], step.experts[:, b].ravel(), g[:, b].ravel())
    done |= np.array([t in stop for t in step.tokens])
  if total is None: return []
  # each (token, layer) adds weights summing to 1, so dividing by the row's sum is dividing by L T
  return [dict(zip(names, (row / row.sum()).tolist())) for row in total]

def format_shares(shares: dict[str, float]) -> str:
  """`public 61%, math 30%, code 9%`: largest first, whole percents that sum to 100 (largest remainder rounding)."""
  order = sorted(shares, key=lambda n: -shares[n])                          # stable: ties keep the router-row order
  pct = {n: int(shares[n] * 100) for n in order}
  for n in sorted(order, key=lambda n: -(shares[n] * 100 - pct[n]))[:100 - sum(pct.values())]: pct[n] += 1
  return ", ".join(f"{n} {pct[n]}%" for n in order)


# ============================================== command line ==============================================

DEMO_MODEL = Path(__file__).resolve().parent / "models" / "flexolmo-demo"
REAL_MODEL = "allenai/FlexOlmo-7x7B-1T"

def main(argv=None) -> int:
  """`python flexolmo.py --prompt TEXT [--experts a,b | --opt-out c]`, `... train-expert ...`, `... merge ...` or
  `... train-router ...`."""
  argv = sys.argv[1:] if argv is None else argv
  olmoe_compiler.use_cpu_target()                                        # before the first kernel is compiled
  if argv[:1] == ["train-expert"]:
    ap = argparse.ArgumentParser(prog="flexolmo.py train-expert", description=train_expert.__doc__.split("\n")[0])
    ap.add_argument("--public", required=True, type=Path, help="the public model folder (olmo2 or flex_olmo)")
    ap.add_argument("--data", required=True, nargs="+", type=Path, help="the owner's text files")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", default=None, help="the expert's name (default: the --out folder's name)")
    ap.add_argument("--public-data", nargs="*", type=Path, help="public text for the public router row (dense public model)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router", choices=("learn", "fixed"), default="learn",
                    help="train the owner's router row with its expert (the paper) or keep its domain embedding")
    a = ap.parse_args(argv[1:])
    def run():
      losses = train_expert(a.public, a.data, a.out, a.name or a.out.name, a.steps, a.lr, a.seq_len, a.batch, a.seed,
                            a.public_data, progress=sys.stderr.isatty(), router=a.router)
      print(f"trained {a.name or a.out.name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {a.out}")
  elif argv[:1] == ["train-router"]:
    ap = argparse.ArgumentParser(prog="flexolmo.py train-router", description=train_router.__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="a merged FlexOlmo folder")
    ap.add_argument("--data", required=True, nargs="+", type=Path, help="proxy text, one file per domain")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--per-file", type=int, default=128, help="windows taken from each file")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv[1:])
    def run():
      losses = train_router(a.model, a.data, a.out, a.steps, a.lr, a.seq_len, a.batch, a.seed, a.per_file,
                            progress=sys.stderr.isatty())
      print(f"trained the router rows: loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {a.out}")
  elif "--serve" in argv:                                                # the HTTP server: olmoe_server.py
    import olmoe_server                 # every expert is loaded: a request may choose any of them
    load_model = lambda name, dtype, quantize: load(name, dtype=dtype, progress=sys.stderr.isatty(), quantize=quantize)
    return olmoe_server.main("flexolmo.py", argv, load_model, DEMO_MODEL, REAL_MODEL)
  elif argv[:1] == ["merge"]:
    ap = argparse.ArgumentParser(prog="flexolmo.py merge", description=merge.__doc__.split("\n")[0])
    ap.add_argument("--public", required=True, type=Path)
    ap.add_argument("--expert", required=True, action="append", help="NAME=DIR of a train-expert output")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--top-k", type=int, default=None, help="experts per token (default: all)")
    a = ap.parse_args(argv[1:])
    def run():
      owners = []
      for spec in a.expert:
        if "=" not in spec: raise OlmoeError(f"--expert {spec!r}: expected NAME=DIR")
        n, d = spec.split("=", 1)
        owners.append((n, Path(d)))
      merge(a.public, owners, a.out, a.top_k)
      print(f"merged {len(owners) + 1} experts into {a.out}")
  else:
    ap = olmoe_cli.build_parser("flexolmo.py")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--experts", help="comma-separated experts to enable (names or indices); default: all")
    group.add_argument("--opt-out", help="comma-separated experts to exclude")
    ap.add_argument("--attribution", action="store_true",
                    help="after the text, each expert's share of the router weight over the generated tokens")
    a = ap.parse_args(argv)
    def run():
      if a.model is None: a.model = olmoe_cli.default_model(DEMO_MODEL, REAL_MODEL)
      olmoe_cli.check_request(a)
      dtype = olmoe_cli.prepare_compiler(a.dtype)                          # before the first kernel is compiled
      split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None
      model, tok = load(a.model, split(a.experts), split(a.opt_out), dtype, progress=sys.stderr.isatty(), quantize=a.quantize)
      steps: list[Step] = []
      olmoe_cli.run_cli(a, model, tok, model.cfg.names(), **({"on_step": steps.append} if a.attribution else {}))
      if a.attribution:
        shares = attribution(steps, model.cfg.names(), model.cfg.eos_ids)
        for b, s in enumerate(shares):
          print(f"attribution{f' (prompt {b + 1})' if len(shares) > 1 else ''}: {format_shares(s)}", file=sys.stderr)
  return olmoe_cli.exit_code(run)

if __name__ == "__main__":
  olmoe_cli.exit_now(main())
