#!/usr/bin/env python3
"""A training step (forward, backward, AdamW) of olmoe.py in tinygrad next to transformers' OlmoeForCausalLM in
PyTorch eager, same config, same batches, in one process, their steps alternating; prints the median step times and
their ratio.

  python bench/train_step.py                        # the bundled demo's config: L=4, D=128, E=16, k=2, I=128, V=4096
  python bench/train_step.py --scaled               # D=256, E=64, k=8 (OLMoE's E/k), I=128
  python bench/train_step.py --steps 8 --batch 16 --seq 128

Both minimise CE + 0.01 * load balancing (tinygrad: lm_loss's OLMoE form plus its z-loss; PyTorch: transformers'
aux_loss), AdamW(0.9, 0.95). The first `--warmup` steps of each (tinygrad compiles and captures its step in them)
are left out of the medians; after them PyTorch and tinygrad alternate in rounds of `--round` steps. The last line
times the expert sums alone (forward and backward of every layer's, on the same number of tokens, routed at random)
in the training path's blocked form and in the dense all-experts form.
"""
from __future__ import annotations
import argparse, os, statistics, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = dict(vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_experts=16, num_experts_per_tok=2, max_position_embeddings=256)
SCALED = dict(DEMO, hidden_size=256, num_experts=64, num_experts_per_tok=8)

def tinygrad_stepper(cfg_dict: dict):
  """A function that runs one tinygrad training step on a batch and returns its wall time in seconds."""
  import olmoe
  from tinygrad import Tensor, TinyJit
  from tinygrad.helpers import Context
  from tinygrad.nn.optim import AdamW
  Tensor.manual_seed(0)
  model = olmoe.Olmoe(olmoe.OlmoeConfig(**cfg_dict))
  params = list(model.parameters().values())
  for p in params: p.requires_grad = True
  opt = AdamW(params, lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.01)
  @TinyJit
  def step(x: Tensor) -> Tensor:
    opt.zero_grad()
    loss, _ = olmoe.lm_loss(model, x)
    loss.backward()
    opt.step()
    return loss.realize()
  run = olmoe.step_runner()
  def timed(x: np.ndarray) -> float:
    with Context(TRAINING=1):
      t = time.perf_counter(); run(step, Tensor(x)).item(); return time.perf_counter() - t
  return timed

def experts_weighted(h, G, W_gate_up, W_down):
  """sum_e G[n, e] * expert_e(h_n), every expert on every token (G (N, E) zero off the chosen experts): two plain
  products, E/k times the arithmetic of the chosen experts alone; the baseline of the blocked form."""
  import olmoe
  (N, D), (E, I2, _) = h.shape, W_gate_up.shape
  I = I2 // 2
  gu = olmoe.matmul(h, W_gate_up.reshape(E * I2, D)).reshape(N, E, I2)      # (N, E, 2I)
  a = gu[..., :I].silu() * gu[..., I:] * G.unsqueeze(-1)                     # (N, E, I)
  return olmoe.matmul(a.reshape(N, E * I), W_down.permute(1, 0, 2).reshape(D, E * I))   # (N, D)

def expert_products(cfg_dict: dict, N: int, n: int, form: str) -> list[float]:
  """Forward and backward of all layers' expert sums on N tokens routed at random: form "blocks" (the training
  path, olmoe.experts_in_blocks) or "dense" (every expert on every token, experts_weighted)."""
  import olmoe
  from tinygrad import Tensor, TinyJit
  from tinygrad.helpers import Context
  E, D, I, L, k = (cfg_dict[f] for f in ("num_experts", "hidden_size", "intermediate_size", "num_hidden_layers", "num_experts_per_tok"))
  Ws = [(Tensor.normal(E, 2 * I, D, std=0.02).realize(), Tensor.normal(E, D, I, std=0.02).realize()) for _ in range(L)]
  for w in (w for pair in Ws for w in pair): w.requires_grad = True
  def moe(h, g, i, gu, dn):
    if form == "blocks": return olmoe.experts_in_blocks(h, g, i, gu, dn)
    return experts_weighted(h, (i.unsqueeze(-1) == Tensor.arange(E)).where(g.unsqueeze(-1), 0).sum(1), gu, dn)
  @TinyJit
  def f(h: Tensor, g: Tensor, i: Tensor) -> Tensor:
    loss = sum(moe(h, g, i, gu, dn).square().mean() for gu, dn in Ws)
    loss.backward()
    return Tensor.stack(*[w.grad.sum() for pair in Ws for w in pair]).realize()
  run, times, rng = olmoe.step_runner(), [], np.random.default_rng(0)
  with Context(TRAINING=1):
    for _ in range(n):
      h, g = Tensor(rng.standard_normal((N, D), dtype=np.float32)), Tensor(rng.random((N, k), dtype=np.float32))
      i = Tensor(np.argsort(rng.random((N, E)), axis=1)[:, :k].astype(np.int32))
      for w in (w for pair in Ws for w in pair): w.grad = None
      t = time.perf_counter(); run(f, h, g, i).numpy(); times.append(time.perf_counter() - t)
  return times

def torch_stepper(cfg_dict: dict):
  """The same for transformers' OlmoeForCausalLM in PyTorch eager."""
  import torch
  from transformers import OlmoeConfig, OlmoeForCausalLM
  torch.manual_seed(0)
  cfg = OlmoeConfig(**cfg_dict, router_aux_loss_coef=0.01, attn_implementation="eager")
  model = OlmoeForCausalLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
  def timed(x: np.ndarray) -> float:
    t = time.perf_counter()
    ids = torch.from_numpy(x.astype(np.int64))
    out = model(ids, labels=ids, output_router_logits=True)
    opt.zero_grad(); out.loss.backward(); opt.step()
    return time.perf_counter() - t
  return timed

def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--scaled", action="store_true", help="D=256, E=64, k=8 instead of the demo's config")
  ap.add_argument("--steps", type=int, default=19)
  ap.add_argument("--warmup", type=int, default=3, help="steps of each left out of the median (tinygrad compiles and captures its step)")
  ap.add_argument("--round", type=int, default=4, help="steps of one framework before the other's")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  a = ap.parse_args()
  from olmoe_cli import prepare_compiler
  prepare_compiler()
  cfg = SCALED if a.scaled else DEMO
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, cfg["vocab_size"], (a.batch, a.seq)).astype(np.int32) for _ in range(a.steps)]
  import torch
  # the first steps of each compile (tinygrad) or warm up (PyTorch); after them the two alternate in rounds of
  # `--round` steps, so that a slower stretch of the machine weighs on both. The first step of a round runs with
  # threads and caches left cold by the other framework; it is timed but left out of the median, for both.
  tg_step, pt_step = tinygrad_stepper(cfg), torch_stepper(cfg)
  tg, pt = [tg_step(x) for x in batches[:a.warmup]], [pt_step(x) for x in batches[:a.warmup]]
  kept_tg, kept_pt = [], []
  for r in range(a.warmup, a.steps, a.round):
    for step, times, kept in ((pt_step, pt, kept_pt), (tg_step, tg, kept_tg)):
      t = [step(x) for x in batches[r:r + a.round]]
      times += t; kept += t[1:]
  ex = expert_products(cfg, a.batch * a.seq, a.steps, "blocks")
  dense = expert_products(cfg, a.batch * a.seq, a.steps, "dense")
  med = lambda t: statistics.median(t[a.warmup:]) if len(t) > a.warmup else statistics.median(t)
  name = "scaled (D=256, E=64, k=8)" if a.scaled else "demo (D=128, E=16, k=2)"
  print(f"config {name}, B={a.batch}, T={a.seq}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
  print(f"  pytorch eager step   {statistics.median(kept_pt) * 1e3:8.0f} ms   (steps: {' '.join(f'{t:.2f}' for t in pt)})")
  print(f"  tinygrad step        {statistics.median(kept_tg) * 1e3:8.0f} ms   (steps: {' '.join(f'{t:.2f}' for t in tg)})")
  print(f"  ratio tinygrad/pytorch  {statistics.median(kept_tg) / statistics.median(kept_pt):.1f}x")
  print(f"  expert sums, forward and backward, all layers: blocks (the training path) {med(ex) * 1e3:.0f} ms"
        f" = {med(ex) / statistics.median(kept_tg):.0%} of the step; dense (every expert) {med(dense) * 1e3:.0f} ms")

if __name__ == "__main__":
  main()
