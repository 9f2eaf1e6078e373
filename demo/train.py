#!/usr/bin/env python3
"""Train the tiny demo models (models/olmoe-demo, and the public model of models/flexolmo-demo) from scratch on CPU.

  python demo/data.py                                   # the text domains -> demo/build/data (once)
  python demo/train.py --out models/olmoe-demo          # ~1 h on 2 CPU cores; --resume continues an interrupted run

What it does, in order:
  1. trains a byte-level BPE tokenizer on an equal share of the three domains (demo/data.py) -> tokenizer.json;
  2. tokenises the domains with Tokenizer (the tokenizer.json -> tiktoken path the real checkpoints use);
  3. trains the model in tinygrad on CE + 0.01 * load balancing + 0.001 * router z-loss, `olmoe.lm_loss` (OLMoE's
     recipe: the load balancing in MegaBlocks' per-layer form), with AdamW (decoupled weight decay, as PyTorch's),
     linear warm-up then cosine decay; each batch row is a random window of one domain, the domain drawn uniformly,
     all from numpy's generator seeded with (seed, step): any step's batch can be rebuilt, so resuming is exact;
  4. saves a resumable checkpoint (weights, AdamW's moments, the log) every --save-every steps and snapshots of the
     weights at --snapshots fractions of the run (for the router-saturation analysis), all in --work;
  5. writes the final model in Hugging Face layout (config.json, model.safetensors with per-expert keys as in the
     released OLMoE files, tokenizer.json), `train_log.json` and `hashes.json` (sha256 of each file) into --out.

train_log.json holds every step's loss terms and, per layer, the expert load's largest and smallest share over the
uniform one and its entropy, plus the full load per expert every 10 steps; demo/figures.py draws them.
The training step is tinygrad's TRAINING path of olmoe.py (expert-sorted blocks, bench/README.md "Training step"),
whose gradients tests/test_training.py checks against transformers'.

`--arch olmo2` trains a dense OLMo 2 model instead (`model_type: olmo2`), as a FlexOlmo of flexolmo.py with one
expert: the public model of the FlexOlmo demo (demo/build_flexolmo.py), whose experts are then trained by
flexolmo.py's own train-expert and merged.
"""
from __future__ import annotations
import argparse, hashlib, json, math, os, shutil, sys, time
from dataclasses import fields
from pathlib import Path
import numpy as np
from tinygrad import Device, Tensor, TinyJit
from tinygrad.helpers import Context, tqdm
from tinygrad.nn.optim import AdamW
from tinygrad.nn.state import safe_load

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
import olmoe, olmoe_cli, olmoe_speedups, flexolmo  # noqa: E402
from olmoe import OlmoeError                   # noqa: E402
from olmoe_checkpoint import to_raw, write_safetensors  # noqa: E402
from olmoe_tokenizer import Tokenizer           # noqa: E402
import data as D                                # noqa: E402


# ================================================ the model ================================================

# the bundled model: 4 layers of 16 experts, 2 per token (k/E = 1/8 as in OLMoE-1B-7B's 8 of 64)
ARCH = dict(vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_experts=16, num_experts_per_tok=2, max_position_embeddings=256, rope_theta=10000.0,
            tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=None)
ALPHA, BETA = 0.01, 0.001                       # load-balancing and router z-loss coefficients (OLMoE's)
RMS_EPS = 1e-5


def build_model(arch: str, cfg_dict: dict, seed: int, alpha: float = ALPHA, beta: float = BETA) -> olmoe.Olmoe:
  """A freshly initialised model, seeded (tinygrad's generator): an Olmoe, or for --arch olmo2 a dense OLMo 2 block
  stack, which is a FlexOlmo with one expert (its router's softmax over one row is 1, so the MoE is the FFN)."""
  Tensor.manual_seed(seed)
  if arch == "olmoe":
    return olmoe.Olmoe(olmoe.OlmoeConfig(**cfg_dict, rms_norm_eps=RMS_EPS, router_aux_loss_coef=alpha,
                                         router_z_loss_coef=beta).checked())
  return flexolmo.FlexOlmo(flexolmo.FlexOlmoConfig(**{**cfg_dict, "num_experts": 1, "num_experts_per_tok": 1},
                                                   rms_norm_eps=RMS_EPS, router_aux_loss_coef=0.0, router_z_loss_coef=0.0))

def trained(model: olmoe.Olmoe, arch: str) -> dict[str, Tensor]:
  """The tensors the optimizer moves: all of them, less the dense model's one-row router (always weight 1)."""
  return {n: t for n, t in model.parameters().items() if not (arch == "olmo2" and n.endswith(".mlp.gate"))}

def cross_entropy(model: olmoe.Olmoe, windows: np.ndarray, batch: int = 8) -> float:
  """Mean next-token cross-entropy (nats) of the model on (n, T + 1) windows: x[:, :-1] predicts x[:, 1:]."""
  tot = 0.0
  for b in range(0, len(windows), batch):
    x = Tensor(windows[b:b + batch])
    tot += model(x[:, :-1]).float().sparse_categorical_crossentropy(x[:, 1:]).item() * len(windows[b:b + batch])
  return tot / len(windows)

def load_stats(load) -> dict[str, np.ndarray]:
  """From expert loads (..., E), the shares of (token, slot) pairs (one layer's step per row): the largest and smallest
  expert load over the uniform 1/E, and the entropy of the load in nats (log E when uniform, 0 when one expert takes
  everything), each of shape (...)."""
  load = np.asarray(load, dtype=np.float64)
  E = load.shape[-1]
  p = np.clip(load, 1e-12, None)
  return {"max": load.max(-1) * E, "min": load.min(-1) * E, "entropy": -(p * np.log(p)).sum(-1)}


# ================================================= the data =================================================

def tokenize_domains(data_dir: Path, tok: Tokenizer, domains: list[str], part: str) -> dict[str, np.ndarray]:
  """Each domain's split as one int32 stream of token ids (documents separated by EOS)."""
  return {d: np.array(tok.encode(D.read_domain(data_dir, d, part)), dtype=np.int32) for d in domains}

def batch(streams: dict[str, np.ndarray], step: int, seed: int, B: int, T: int) -> np.ndarray:
  """(B, T + 1) windows for this step: each row from a domain drawn uniformly, at a uniform offset. Depends only
  on (seed, step), so a resumed run sees exactly the batches an uninterrupted one would."""
  rng = np.random.default_rng([seed, step])
  names = list(streams)
  rows = []
  for d in rng.integers(0, len(names), B):
    s = streams[names[d]]
    o = rng.integers(0, len(s) - T - 1)
    rows.append(s[o:o + T + 1])
  return np.stack(rows)

def eval_windows(streams: dict[str, np.ndarray], T: int, n: int) -> dict[str, np.ndarray]:
  """n evenly spaced, non-overlapping (T + 1)-windows of each domain's validation stream (fixed for every eval)."""
  out = {}
  for d, s in streams.items():
    starts = np.linspace(0, len(s) - T - 1, n).astype(np.int64)
    out[d] = np.stack([s[o:o + T + 1] for o in starts])
  return out


# =============================================== checkpoints ===============================================

def hf_tensors(model: olmoe.Olmoe, arch: str) -> dict[str, np.ndarray]:
  """The weights under transformers' on-disk names, with per-expert keys for OLMoE as in the released files: the
  fused (E, 2I, D) gate_up_proj splits into gate_proj = rows [0, I) and up_proj = rows [I, 2I). The dense OLMo 2
  model's single expert is its FFN (mlp.gate_proj / up_proj / down_proj) and its router is dropped."""
  out = {}
  for name, t in model.parameters().items():
    a = t.float().numpy()
    if ".mlp.experts." in name:
      prefix, part = name.rsplit(".experts.", 1)
      I = a.shape[1] // 2
      for e in range(a.shape[0]):
        split = {"gate_proj": a[e, :I], "up_proj": a[e, I:]} if part == "gate_up_proj" else {"down_proj": a[e]}
        for p, w in split.items():
          out[f"model.{prefix}.{p}.weight" if arch == "olmo2" else f"model.{prefix}.experts.{e}.{p}.weight"] = w
    elif not (arch == "olmo2" and name.endswith(".mlp.gate")):
      out["lm_head.weight" if name == "lm_head" else f"model.{name}.weight"] = a
  return out

def hf_config(model: olmoe.Olmoe, arch: str) -> dict:
  """config.json as transformers writes it for OlmoeForCausalLM (or Olmo2ForCausalLM), the released files' keys."""
  c = model.cfg
  d = {"architectures": ["OlmoeForCausalLM" if arch == "olmoe" else "Olmo2ForCausalLM"], "model_type": arch,
       "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
       "use_cache": True, "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
       **{k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
                                     "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id")},
       "num_key_value_heads": c.n_kv_heads}
  if arch == "olmoe":
    d.update(clip_qkv=None, norm_topk_prob=False, num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
             output_router_logits=False, router_aux_loss_coef=c.router_aux_loss_coef)
  return d

# the sampling a bundled demo's first command uses (generation_config.json; `seed` is this project's own key): greedy
# decoding of a model this small repeats itself within a sentence
GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 64, "seed": 0}

def generation_config(eos_token_id) -> dict: return {**GENERATION, "eos_token_id": eos_token_id}

def sha256(path: Path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def write_hashes(folder: Path) -> dict:
  """hashes.json beside the files: the sha256 of every other file in the folder."""
  hashes = {p.name: sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != "hashes.json"}
  (Path(folder) / "hashes.json").write_text(json.dumps(hashes, indent=2) + "\n")
  return hashes

def replace_folder(tmp: Path, folder: Path) -> None:
  """Move the finished folder tmp to `folder`, replacing what was there only once tmp is complete."""
  old = folder.parent / f".{folder.name}.old"
  shutil.rmtree(old, ignore_errors=True)
  if folder.exists(): os.rename(folder, old)
  os.rename(tmp, folder)
  shutil.rmtree(old, ignore_errors=True)

def save_model(model: olmoe.Olmoe, arch: str, folder: Path, tokenizer: Path, dtype: str = "BF16", extra: dict | None = None) -> None:
  """config.json + model.safetensors + tokenizer.json (+ extra json files) + hashes.json, written to a temporary
  folder that then replaces `folder`, so an interrupted save never leaves a half-written model."""
  folder = Path(folder)
  tmp = folder.parent / f".{folder.name}.partial"
  shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
  config = {**hf_config(model, arch), "dtype": {"BF16": "bfloat16", "F32": "float32"}[dtype]}
  config["torch_dtype"] = config["dtype"]
  (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  write_safetensors(tmp / "model.safetensors", {k: to_raw(a, dtype) for k, a in hf_tensors(model, arch).items()})
  shutil.copy(tokenizer, tmp / "tokenizer.json")
  (tmp / "generation_config.json").write_text(json.dumps(generation_config(config["eos_token_id"]), indent=2) + "\n")
  for name, obj in (extra or {}).items(): (tmp / name).write_text(json.dumps(obj, separators=(",", ":")) + "\n")
  write_hashes(tmp)
  replace_folder(tmp, folder)

def optimizer_state(params: dict[str, Tensor], opt) -> dict[str, Tensor]:
  """Everything a resumed run needs besides the step: the weights, AdamW's moments m and v, and b1^t, b2^t."""
  out = {f"param.{n}": t for n, t in params.items()}
  for i, n in enumerate(params): out[f"m.{n}"], out[f"v.{n}"] = opt.m[i], opt.v[i]
  return {**out, "b1_t": opt.b1_t, "b2_t": opt.b2_t}

def save_state(work: Path, params: dict[str, Tensor], opt, step: int, log: dict) -> None:
  """The resumable checkpoint work/last/ (state.safetensors in fp32, state.json with the step and the log; no RNG
  state: batches depend on the step only), replaced only once complete."""
  tmp = work / ".last.partial"
  shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
  write_safetensors(tmp / "state.safetensors", {k: to_raw(t.float().numpy(), "F32") for k, t in optimizer_state(params, opt).items()})
  (tmp / "state.json").write_text(json.dumps({"step": step, "log": log}))
  replace_folder(tmp, work / "last")

def load_state(work: Path, params: dict[str, Tensor], opt) -> tuple[int, dict]:
  """Put work/last/'s weights and optimizer state back into the model and the optimizer; returns (step, log)."""
  saved = safe_load(str(work / "last" / "state.safetensors"))
  for k, t in optimizer_state(params, opt).items():
    if k not in saved or saved[k].shape != t.shape: raise OlmoeError(f"{work / 'last'}: no {k} of shape {t.shape}; not this run's state")
    t.assign(Tensor(saved[k].numpy(), dtype=t.dtype)).realize()
  st = json.loads((work / "last" / "state.json").read_text())
  return st["step"], st["log"]


# ================================================ training ================================================

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
  """Linear warm-up to lr, then cosine decay to lr/10."""
  if step < warmup: return lr * (step + 1) / warmup
  t = (step - warmup) / max(1, steps - warmup)
  return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

def evaluate(model: olmoe.Olmoe, windows: dict[str, np.ndarray]) -> dict[str, float]:
  """Mean next-token cross-entropy (nats) per domain on fixed validation windows."""
  return {d: cross_entropy(model, w) for d, w in windows.items()}

def check_run(data_dir: Path, domains, cfg_dict: dict, steps: int, batch_size: int, seq_len: int, lr: float,
              warmup: int, weight_decay: float, alpha: float, beta: float) -> None:
  """OlmoeError (one line) for a run that cannot start, before anything is written."""
  unknown = sorted(set(cfg_dict) - {f.name for f in fields(olmoe.OlmoeConfig)})
  if unknown: raise OlmoeError(f"--set: unknown field {unknown[0]!r}")
  if min(steps, batch_size, seq_len) <= 0 or warmup < 0: raise OlmoeError("--steps, --batch-size and --seq-len must be > 0, --warmup >= 0")
  if not (lr > 0 and weight_decay >= 0): raise OlmoeError(f"--lr must be > 0 and weight decay >= 0 (got {lr}, {weight_decay})")
  for name, v in (("--alpha", alpha), ("--beta", beta)):
    if not (olmoe.has_type(v, "float") and v >= 0): raise OlmoeError(f"{name} = {v!r} must be a number >= 0")
  try: olmoe.OlmoeConfig.from_dict({**cfg_dict, "model_type": "olmoe"})
  except TypeError as e: raise OlmoeError(f"--set: {e}") from None
  if seq_len > cfg_dict["max_position_embeddings"]:
    raise OlmoeError(f"--seq-len {seq_len} is longer than the model's context: max_position_embeddings = {cfg_dict['max_position_embeddings']}")
  if not domains or not all(domains): raise OlmoeError("--domains: name at least one domain")
  for d in domains:
    for part in ("train", "valid"):
      f = Path(data_dir) / f"{d}.{part}.txt"
      if not f.is_file() or f.stat().st_size == 0: raise OlmoeError(f"{f}: missing or empty (build the data with demo/data.py)")

LOAD_EVERY = 10                                 # the full (L, E) load goes into the log every this many steps

def train(data_dir: Path, out: Path, work: Path, arch: str = "olmoe", domains: tuple[str, ...] = D.DOMAINS,
          steps: int = 3000, batch_size: int = 16, seq_len: int = 128, lr: float = 3e-3, warmup: int = 100,
          weight_decay: float = 0.01, seed: int = 0, tokenizer: Path | None = None, arch_overrides: dict | None = None,
          save_every: int = 200, snapshots: tuple[float, ...] = (0.01, 0.1, 0.25, 0.5), eval_windows_per_domain: int = 16,
          resume: bool = False, progress: bool = True, dtype: str = "BF16", stop_after: int | None = None,
          alpha: float = ALPHA, beta: float = BETA) -> dict:
  """Train from scratch (or resume from work/last/) and write the model to `out`. Returns the training log.
  With `stop_after`, stop after that many steps of this call, leaving work/last/ to --resume from (out unwritten)."""
  cfg_dict = {**ARCH, **(arch_overrides or {})}
  check_run(data_dir, domains, cfg_dict, steps, batch_size, seq_len, lr, warmup, weight_decay, alpha, beta)
  olmoe_cli.prepare_compiler()                  # before the first kernel is compiled
  work.mkdir(parents=True, exist_ok=True)
  # 1. tokenizer: trained once per work folder (or given), then always read back through Tokenizer
  tok_path = work / "tokenizer.json"
  if tokenizer is not None: shutil.copy(tokenizer, tok_path)
  elif not tok_path.exists():
    D.train_tokenizer([D.read_domain(data_dir, d, "train") for d in D.DOMAINS], cfg_dict["vocab_size"], tok_path)
  tok = Tokenizer.from_file(tok_path)
  if tok.vocab_size > cfg_dict["vocab_size"]: raise OlmoeError(f"tokenizer has {tok.vocab_size} ids > vocab_size")
  # 2. data
  train_streams = tokenize_domains(data_dir, tok, list(domains), "train")
  if (short := [d for d, s in train_streams.items() if len(s) < seq_len + 2]):
    raise OlmoeError(f"{data_dir}: too little {', '.join(short)} text for one window of {seq_len + 1} tokens")
  valid = eval_windows(tokenize_domains(data_dir, tok, list(domains), "valid"), seq_len, eval_windows_per_domain)
  # 3. model and optimizer (AdamW as PyTorch's: decoupled weight decay on every tensor)
  model = build_model(arch, cfg_dict, seed, alpha, beta)
  params = trained(model, arch)
  for p in model.parameters().values(): p.requires_grad = False
  for p in params.values(): p.requires_grad = True
  opt = AdamW(list(params.values()), lr=lr, b1=0.9, b2=0.95, weight_decay=weight_decay)
  Tensor.realize(*optimizer_state(params, opt).values())
  start, log = 0, {"loss": [], "ce": [], "lb": [], "z": [], "load_max": [], "load_min": [], "load_entropy": [],
                   "load": {}, "eval": {}, "seconds": 0.0}
  if resume and (work / "last" / "state.json").exists():
    start, log = load_state(work, params, opt)
    print(f"resumed from {work / 'last'} at step {start}", file=sys.stderr)

  @TinyJit
  def step(x: Tensor, lr_now: Tensor) -> tuple[Tensor, Tensor]:
    """One AdamW step on CE + alpha * LB + beta * Z (olmoe.lm_loss, OLMoE's recipe); returns the four loss values
    and the expert load (L, E)."""
    opt.lr.assign(lr_now)
    loss, parts = olmoe.lm_loss(model, x)
    opt.zero_grad()
    loss.backward()
    values, load = Tensor.stack(loss, parts["ce"], parts["lb"], parts["z"]), parts["load"]
    Tensor.realize(*opt.schedule_step(), values, load)   # one realize: the values are read before the weights change
    return values, load

  snap_steps = sorted({max(1, round(f * steps)) for f in snapshots})
  t0 = time.time() - log["seconds"]
  run = olmoe.step_runner()                     # the compiled step, run as generate runs its own (olmoe_speedups)
  bar = tqdm(range(start, steps), desc="train", disable=not progress, total=steps - start)
  try:
    with Context(TRAINING=1):
      for i in bar:
        x = Tensor(batch(train_streams, i, seed, batch_size, seq_len))
        values, load = run(step, x, Tensor([lr_at(i, steps, lr, warmup)], dtype=opt.lr.dtype))
        for k, v in zip(("loss", "ce", "lb", "z"), values.numpy().tolist()): log[k].append(round(v, 5))
        load = load.numpy()
        for k, v in load_stats(load).items(): log[f"load_{k}"].append(v.round(4).tolist())
        done = i + 1
        if done % LOAD_EVERY == 0 or done == 1: log["load"][str(done)] = load.round(4).tolist()
        bar.set_description(f"train loss {log['loss'][-1]:.3f} ce {log['ce'][-1]:.3f} lb {log['lb'][-1]:.3f}")
        log["seconds"] = time.time() - t0
        if done in snap_steps: save_model(model, arch, work / f"step-{done:06d}", tok_path, "F32")
        if done % save_every == 0 or done == steps: save_state(work, params, opt, done, log)
        if stop_after and done - start >= stop_after and done < steps:
          save_state(work, params, opt, done, log)
          print(f"stopped at step {done} of {steps}; continue with --resume", file=sys.stderr)
          return log
  finally: run.finish()
  log["eval"] = evaluate(model, valid)
  moe = arch == "olmoe"
  summary = {"arch": arch, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup": warmup,
             "weight_decay": weight_decay, "seed": seed, "domains": list(domains), "snapshot_steps": snap_steps,
             "objective": "CE + alpha * LB + beta * Z, olmoe.lm_loss (LB in MegaBlocks' per-layer form, balanced value 1)"
             if moe else "CE", "alpha_lb": alpha if moe else 0.0, "beta_z": beta if moe else 0.0,
             "tokens_seen": steps * batch_size * seq_len, "train_seconds": round(log["seconds"], 1),
             "tinygrad": olmoe_speedups.TINYGRAD, "device": Device.DEFAULT,
             "final_train_loss_mean_last_50": round(float(np.mean(log["loss"][-50:])), 5) if log["loss"] else None,
             "valid_ce": log["eval"], "data_manifest": json.loads((Path(data_dir) / "manifest.json").read_text())
             if (Path(data_dir) / "manifest.json").exists() else None,
             "loss_every_step": log["loss"], "ce_every_step": log["ce"], "lb_every_step": log["lb"], "z_every_step": log["z"],
             **({"load_max_over_uniform_every_step": log["load_max"], "load_min_over_uniform_every_step": log["load_min"],
                 "load_entropy_every_step": log["load_entropy"], "load_every_10_steps": log["load"]} if moe else {})}
  save_model(model, arch, out, tok_path, dtype, extra={"train_log.json": summary})
  return log

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", type=Path, default=ROOT / "demo" / "build" / "data", help="folder written by demo/data.py")
  ap.add_argument("--out", type=Path, default=ROOT / "models" / "olmoe-demo")
  ap.add_argument("--work", type=Path, default=None, help="checkpoints and snapshots (default demo/build/<out name>)")
  ap.add_argument("--arch", choices=("olmoe", "olmo2"), default="olmoe")
  ap.add_argument("--domains", default=",".join(D.DOMAINS), help="comma-separated domains to train on")
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--warmup", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                  help="override an architecture field, e.g. --set hidden_size=64 (JSON values)")
  ap.add_argument("--alpha", type=float, default=ALPHA, help="load-balancing coefficient (0 = off)")
  ap.add_argument("--beta", type=float, default=BETA, help="router z-loss coefficient (0 = off)")
  ap.add_argument("--save-every", type=int, default=200)
  ap.add_argument("--dtype", choices=("BF16", "F32"), default="BF16", help="storage dtype of the final model")
  ap.add_argument("--resume", action="store_true", help="continue from <work>/last/ if it exists")
  ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this call (then --resume)")
  a = ap.parse_args(argv)
  try:
    overrides = {}
    for s in a.set:
      k, eq, v = s.partition("=")
      try: overrides[k] = json.loads(v) if eq else None
      except json.JSONDecodeError: raise OlmoeError(f"--set {s}: the value is not JSON (e.g. --set hidden_size=64)") from None
      if not eq: raise OlmoeError(f"--set {s}: expected FIELD=VALUE")
    work = a.work or ROOT / "demo" / "build" / a.out.name
    log = train(a.data, a.out, work, a.arch, tuple(a.domains.split(",")), a.steps, a.batch_size, a.seq_len, a.lr,
                a.warmup, seed=a.seed, tokenizer=a.tokenizer, arch_overrides=overrides, save_every=a.save_every,
                resume=a.resume, progress=sys.stderr.isatty(), dtype=a.dtype, stop_after=a.stop_after,
                alpha=a.alpha, beta=a.beta)
  except OlmoeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"final_loss": log["loss"][-1] if log["loss"] else None, "valid_ce": log.get("eval"),
                    "seconds": round(log["seconds"], 1)}))
  return 0

if __name__ == "__main__":
  sys.exit(main())
