#!/usr/bin/env python3
"""Train the tiny demo models (models/olmoe-demo, and the public model of models/flexolmo-demo) from scratch on CPU.

  python demo/data.py                                   # the text domains -> demo/build/data (once)
  python demo/train.py --out models/olmoe-demo          # ~30 min on 2 CPU cores; --resume continues an interrupted run

What it does, in order:
  1. trains a byte-level BPE tokenizer on an equal share of the three domains (demo/data.py) -> tokenizer.json;
  2. tokenises the domains with Tokenizer (the tokenizer.json -> tiktoken path the real checkpoints use);
  3. trains the model on CE + 0.01 * load balancing + 0.001 * router z-loss (the OLMoE paper's coefficients, with
     the load balancing in transformers' pooled form, olmoe.lm_loss(..., convention="transformers")), AdamW, linear warm-up then cosine decay; each batch row is a random window of one
     domain, the domain drawn uniformly, all from numpy's generator seeded with (seed, step): any step's batch can be
     rebuilt, so resuming is exact;
  4. saves a resumable checkpoint (weights, optimizer state, losses) every --save-every steps and snapshots of the
     weights at --snapshots fractions of the run (for the router-saturation analysis), all in --work;
  5. writes the final model in Hugging Face layout (config.json, model.safetensors with per-expert keys as in the
     released OLMoE files, tokenizer.json), `train_log.json` and `hashes.json` (sha256 of each file) into --out.

The gradients come from PyTorch: the network is transformers' `OlmoeForCausalLM` (or `Olmo2ForCausalLM`), the
model olmoe.py is tested equal to (tests/test_olmoe.py), built from the same config. On this 2-core CPU a training
step of olmoe.py's training path still takes several times PyTorch's (bench/README.md, "Training step"); tinygrad's
training path is tested against transformers' gradients (tests/test_training.py) and is what flexolmo.py's
train-expert uses.
Everything the demo *runs* (generation, --show-routing, the analyses and figures) is olmoe.py.

`--arch olmo2` trains a dense OLMo 2 model instead (`model_type: olmo2`): the public model of the FlexOlmo demo
(demo/build_flexolmo.py), whose experts are then trained by flexolmo.py's own train-expert and merged.
"""
from __future__ import annotations
import argparse, hashlib, json, math, os, shutil, sys, time
from dataclasses import asdict
from pathlib import Path
import numpy as np
from tinygrad.helpers import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
import olmoe                                    # noqa: E402
from olmoe_checkpoint import to_raw, write_safetensors  # noqa: E402
from olmoe_tokenizer import Tokenizer           # noqa: E402
import data as D                                # noqa: E402


# ================================================ the model ================================================

# the bundled model: 4 layers of 16 experts, 2 per token (k/E = 1/8 as in OLMoE-1B-7B's 8 of 64)
ARCH = dict(vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_experts=16, num_experts_per_tok=2, max_position_embeddings=256, rope_theta=10000.0,
            tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=None)
ALPHA, BETA = 0.01, 0.001                       # load-balancing and router z-loss coefficients (OLMoE's)


def build_model(arch: str, cfg_dict: dict, seed: int):
  """A freshly initialised transformers model (OLMoE, or a dense OLMo 2 for --arch olmo2), seeded."""
  import torch
  from transformers import OlmoeConfig, OlmoeForCausalLM, Olmo2Config, Olmo2ForCausalLM
  torch.manual_seed(seed)
  if arch == "olmoe":
    cfg = OlmoeConfig(**cfg_dict, router_aux_loss_coef=ALPHA, output_router_logits=False, norm_topk_prob=False)
    return OlmoeForCausalLM(cfg).float()
  dense = {k: v for k, v in cfg_dict.items() if k not in ("num_experts", "num_experts_per_tok")}
  return Olmo2ForCausalLM(Olmo2Config(**dense)).float()

def losses(model, x, arch: str):
  """(total, ce, lb, z) for a batch x (B, T + 1) of token ids: next-token CE on x[:, :-1] -> x[:, 1:], plus for
  OLMoE the load-balancing loss E * sum_e f_e P_e (transformers' form: k at uniform load) and the router z-loss
  mean(logsumexp(z)^2), as olmoe.load_balancing_loss(..., convention="transformers") and olmoe.router_z_loss
  compute them."""
  import torch
  moe = arch == "olmoe"
  out = model(input_ids=x[:, :-1], **({"output_router_logits": True} if moe else {}))
  ce = next_token_ce(out.logits, x)
  if not moe: return ce, ce, ce.new_zeros(()), ce.new_zeros(())
  z = torch.cat([r.float().logsumexp(-1) for r in out.router_logits]).square().mean()
  return ce + ALPHA * out.aux_loss + BETA * z, ce, out.aux_loss, z

def next_token_ce(logits, x):
  """Mean cross-entropy of logits (B, T, V) for x[:, :-1] against the next tokens x[:, 1:]."""
  import torch
  return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())


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

def hf_tensors(model, arch: str) -> dict[str, np.ndarray]:
  """The weights under transformers' on-disk names, with per-expert keys for OLMoE as in the released files: the
  fused (E, 2I, D) gate_up_proj of transformers 5 splits into gate_proj = rows [0, I) and up_proj = rows [I, 2I)."""
  out = {}
  for name, t in model.state_dict().items():
    a = t.detach().float().cpu().numpy()
    if ".mlp.experts." in name:
      prefix, part = name.rsplit(".experts.", 1)
      I = a.shape[1] // 2
      for e in range(a.shape[0]):
        split = {"gate_proj": a[e, :I], "up_proj": a[e, I:]} if part == "gate_up_proj" else {"down_proj": a[e]}
        for p, w in split.items(): out[f"{prefix}.experts.{e}.{p}.weight"] = w
    else: out[name] = a
  return out

NOISE = ("_name_or_path", "id2label", "label2id", "problem_type", "return_dict", "chunk_size_feed_forward",
         "is_encoder_decoder", "output_attentions", "output_hidden_states", "transformers_version")

def hf_config(model) -> dict:
  """config.json as the released checkpoints have it: transformers' full config, with the architecture named and
  without the generic fields that only concern transformers' own training loop."""
  d = {k: v for k, v in model.config.to_dict().items() if k not in NOISE}
  return {**d, "architectures": [type(model).__name__]}

def sha256(path: Path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def write_hashes(folder: Path) -> dict:
  """hashes.json beside the files: the sha256 of every other file in the folder."""
  hashes = {p.name: sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != "hashes.json"}
  (Path(folder) / "hashes.json").write_text(json.dumps(hashes, indent=2) + "\n")
  return hashes

def save_model(model, arch: str, folder: Path, tokenizer: Path, dtype: str = "BF16", extra: dict | None = None) -> None:
  """config.json + model.safetensors + tokenizer.json (+ extra json files) + hashes.json, written to a temporary
  folder that then replaces `folder`, so an interrupted save never leaves a half-written model."""
  folder = Path(folder)
  tmp = folder.parent / f".{folder.name}.partial"
  shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
  config = hf_config(model)
  config["dtype"] = config["torch_dtype"] = {"BF16": "bfloat16", "F32": "float32"}[dtype]
  (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  write_safetensors(tmp / "model.safetensors", {k: to_raw(a, dtype) for k, a in hf_tensors(model, arch).items()})
  shutil.copy(tokenizer, tmp / "tokenizer.json")
  for name, obj in (extra or {}).items(): (tmp / name).write_text(json.dumps(obj, indent=1) + "\n")
  write_hashes(tmp)
  if folder.exists(): shutil.rmtree(folder)
  os.rename(tmp, folder)

def save_state(work: Path, model, opt, step: int, log: dict) -> None:
  """The resumable checkpoint work/last.pt (weights, optimizer moments, RNG-free: batches depend on the step only)."""
  import torch
  tmp = work / "last.pt.partial"
  torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, tmp)
  os.replace(tmp, work / "last.pt")

def load_state(work: Path, model, opt) -> tuple[int, dict]:
  import torch
  st = torch.load(work / "last.pt", weights_only=False)
  model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])
  return st["step"], st["log"]


# ================================================ training ================================================

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
  """Linear warm-up to lr, then cosine decay to lr/10."""
  if step < warmup: return lr * (step + 1) / warmup
  t = (step - warmup) / max(1, steps - warmup)
  return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

def evaluate(model, windows: dict[str, np.ndarray], batch_size: int = 16) -> dict[str, float]:
  """Mean next-token cross-entropy (nats) per domain on fixed validation windows."""
  import torch
  out = {}
  with torch.no_grad():
    for d, w in windows.items():
      x = torch.from_numpy(w.astype(np.int64))
      tot = sum(next_token_ce(model(input_ids=xb[:, :-1]).logits, xb).item() * len(xb)
                for xb in x.split(batch_size))
      out[d] = tot / len(w)
  return out

def train(data_dir: Path, out: Path, work: Path, arch: str = "olmoe", domains: tuple[str, ...] = D.DOMAINS,
          steps: int = 2000, batch_size: int = 16, seq_len: int = 128, lr: float = 3e-3, warmup: int = 100,
          weight_decay: float = 0.01, seed: int = 0, tokenizer: Path | None = None, arch_overrides: dict | None = None,
          save_every: int = 200, snapshots: tuple[float, ...] = (0.01, 0.1, 0.25, 0.5), eval_windows_per_domain: int = 16,
          resume: bool = False, progress: bool = True, dtype: str = "BF16", threads: int | None = None,
          stop_after: int | None = None) -> dict:
  """Train from scratch (or resume from work/last.pt) and write the model to `out`. Returns the training log.
  With `stop_after`, stop after that many steps of this call, leaving work/last.pt to --resume from (out unwritten)."""
  import torch
  if threads: torch.set_num_threads(threads)
  work.mkdir(parents=True, exist_ok=True)
  cfg_dict = {**ARCH, **(arch_overrides or {})}
  # 1. tokenizer: trained once per work folder (or given), then always read back through Tokenizer
  tok_path = work / "tokenizer.json"
  if tokenizer is not None: shutil.copy(tokenizer, tok_path)
  elif not tok_path.exists():
    D.train_tokenizer([D.read_domain(data_dir, d, "train") for d in D.DOMAINS], cfg_dict["vocab_size"], tok_path)
  tok = Tokenizer.from_file(tok_path)
  if tok.vocab_size > cfg_dict["vocab_size"]: raise SystemExit(f"tokenizer has {tok.vocab_size} ids > vocab_size")
  # 2. data
  train_streams = tokenize_domains(data_dir, tok, list(domains), "train")
  valid = eval_windows(tokenize_domains(data_dir, tok, list(domains), "valid"), seq_len, eval_windows_per_domain)
  # 3. model and optimizer
  model = build_model(arch, cfg_dict, seed).train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
  start, log = 0, {"loss": [], "ce": [], "lb": [], "z": [], "eval": {}, "seconds": 0.0}
  if resume and (work / "last.pt").exists():
    start, log = load_state(work, model, opt)
    print(f"resumed from {work / 'last.pt'} at step {start}", file=sys.stderr)
  snap_steps = sorted({max(1, round(f * steps)) for f in snapshots})
  t0 = time.time() - log["seconds"]
  bar = tqdm(range(start, steps), desc="train", disable=not progress, total=steps - start)
  for step in bar:
    for g in opt.param_groups: g["lr"] = lr_at(step, steps, lr, warmup)
    x = torch.from_numpy(batch(train_streams, step, seed, batch_size, seq_len).astype(np.int64))
    loss, ce, lb, z = losses(model, x, arch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for k, v in (("loss", loss), ("ce", ce), ("lb", lb), ("z", z)): log[k].append(round(float(v.detach()), 5))
    bar.set_description(f"train loss {log['loss'][-1]:.3f} ce {log['ce'][-1]:.3f} lb {log['lb'][-1]:.3f}")
    done = step + 1
    log["seconds"] = time.time() - t0
    if done in snap_steps: save_model(model, arch, work / f"step-{done:06d}", tok_path, "F32")
    if done % save_every == 0 or done == steps: save_state(work, model, opt, done, log)
    if stop_after and done - start >= stop_after and done < steps:
      save_state(work, model, opt, done, log)
      print(f"stopped at step {done} of {steps}; continue with --resume", file=sys.stderr)
      return log
  model.eval()
  log["eval"] = evaluate(model, valid)
  summary = {"arch": arch, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup": warmup,
             "weight_decay": weight_decay, "seed": seed, "domains": list(domains), "snapshot_steps": snap_steps,
             "alpha_lb": ALPHA if arch == "olmoe" else 0.0, "beta_z": BETA if arch == "olmoe" else 0.0,
             "tokens_seen": steps * batch_size * seq_len, "train_seconds": round(log["seconds"], 1),
             "torch": torch.__version__, "threads": torch.get_num_threads(),
             "final_train_loss_mean_last_50": float(np.mean(log["loss"][-50:])) if log["loss"] else None,
             "valid_ce": log["eval"], "data_manifest": json.loads((Path(data_dir) / "manifest.json").read_text())
             if (Path(data_dir) / "manifest.json").exists() else None,
             "loss_every_step": log["loss"], "lb_every_step": log["lb"], "z_every_step": log["z"]}
  save_model(model, arch, out, tok_path, dtype, extra={"train_log.json": summary})
  return log


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", type=Path, default=ROOT / "demo" / "build" / "data", help="folder written by demo/data.py")
  ap.add_argument("--out", type=Path, default=ROOT / "models" / "olmoe-demo")
  ap.add_argument("--work", type=Path, default=None, help="checkpoints and snapshots (default demo/build/<out name>)")
  ap.add_argument("--arch", choices=("olmoe", "olmo2"), default="olmoe")
  ap.add_argument("--domains", default=",".join(D.DOMAINS), help="comma-separated domains to train on")
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--warmup", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                  help="override an architecture field, e.g. --set hidden_size=64 (JSON values)")
  ap.add_argument("--save-every", type=int, default=200)
  ap.add_argument("--dtype", choices=("BF16", "F32"), default="BF16", help="storage dtype of the final model")
  ap.add_argument("--resume", action="store_true", help="continue from <work>/last.pt if it exists")
  ap.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: all cores)")
  ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this call (then --resume)")
  a = ap.parse_args(argv)
  overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
  work = a.work or ROOT / "demo" / "build" / a.out.name
  log = train(a.data, a.out, work, a.arch, tuple(a.domains.split(",")), a.steps, a.batch_size, a.seq_len, a.lr,
              a.warmup, seed=a.seed, tokenizer=a.tokenizer, arch_overrides=overrides, save_every=a.save_every,
              resume=a.resume, progress=sys.stderr.isatty(), dtype=a.dtype, threads=a.threads,
              stop_after=a.stop_after)
  print(json.dumps({"final_loss": log["loss"][-1] if log["loss"] else None, "valid_ce": log.get("eval"),
                    "seconds": round(log["seconds"], 1)}))
  return 0

if __name__ == "__main__":
  sys.exit(main())
