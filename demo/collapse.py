#!/usr/bin/env python3
"""Router collapse, live: train a small OLMoE three times from the same seed and log the expert load at every step.

  python demo/data.py --out demo/build/data     # the text domains (once)
  python demo/collapse.py                       # the three runs -> demo/collapse/{off,lb,bias}.json (a few minutes)
  python demo/collapse.py --plot DIR            # only the figure collapse.png, from the cached logs

The three runs differ only in what balances the load:
  off   alpha = 0: nothing (the language-model loss and the router z-loss only);
  lb    alpha = 0.01: OLMoE's load-balancing loss (MegaBlocks' per-layer form, `olmoe.load_balancing_loss`);
  bias  alpha = 0, auxiliary-loss-free balancing (DeepSeek-V3): the router's top-k is chosen on p + b and after each
        step `olmoe.update_router_bias` moves b_e by gamma * sign(mean load - load_e).
Each is tinygrad's training path of olmoe.py (the TRAINING context: expert-sorted blocks), AdamW with demo/train.py's
schedule and batches (its `batch`: every row a random window of a random domain, fixed by (seed, step)), on the
bundled demo model's tokenizer. The logs keep, per step, the loss terms and how many (token, slot) pairs each
expert of each layer took (the load is that over all pairs), from which the page computes its numbers and the figure
its curves.
"""
from __future__ import annotations
import argparse, json, math, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
from olmoe import OlmoeError                    # noqa: E402
from train import load_stats                    # noqa: E402  per layer: busiest and idlest over uniform, entropy

OUT = ROOT / "demo" / "collapse"
TOKENIZER = ROOT / "models" / "olmoe-demo" / "tokenizer.json"
RUNS = ("off", "lb", "bias")
LABELS = {"off": "no balancing (alpha = 0)", "lb": "load-balancing loss (alpha = 0.01)",
          "bias": "bias balancing (alpha = 0, gamma = {gamma})"}
# the bundled demo model's architecture (demo/train.py ARCH), on smaller batches and a short schedule: a few minutes a run
SETUP = dict(steps=250, batch_size=8, seq_len=64, lr=3e-3, warmup=20, weight_decay=0.01, seed=0, alpha=0.01,
             beta=0.001, gamma=0.01, arch=dict(num_hidden_layers=4, hidden_size=128, intermediate_size=128,
                                                num_experts=16, num_experts_per_tok=2))


def train_run(kind: str, data_dir: Path, setup: dict, progress: bool = False, keep_choices: bool = False) -> dict:
  """One run (kind "off", "lb" or "bias"); returns its log: per step the loss terms, and per layer the number of
  (token, slot) pairs each expert took ("pairs", (L, E), summing to batch * (seq_len + 1) * k: a window of
  seq_len + 1 tokens goes through the model, the last one's logits unused) and, in the bias run, the
  biases after the step's update. keep_choices: also every step's chosen experts ("chosen", (L, N, k))."""
  import olmoe, olmoe_cli
  olmoe_cli.prepare_compiler()                  # before the first kernel is compiled
  from tinygrad import Tensor, TinyJit
  from tinygrad.helpers import Context
  from tinygrad.nn.optim import AdamW
  import train as T
  from olmoe_tokenizer import Tokenizer
  s = setup
  alpha = s["alpha"] if kind == "lb" else 0.0
  gamma = s["gamma"] if kind == "bias" else 0.0
  cfg = {**T.ARCH, **s["arch"]}
  Tensor.manual_seed(s["seed"])
  model = olmoe.Olmoe(olmoe.OlmoeConfig(**cfg, rms_norm_eps=T.RMS_EPS, router_aux_loss_coef=alpha,
                                        router_z_loss_coef=s["beta"], router_bias_rate=gamma).checked())
  E, k = model.cfg.num_experts, model.cfg.num_experts_per_tok
  streams = T.tokenize_domains(data_dir, Tokenizer.from_file(TOKENIZER), list(T.D.DOMAINS), "train")
  params = model.parameters()
  for p in params.values(): p.requires_grad = True
  opt = AdamW(list(params.values()), lr=s["lr"], b1=0.9, b2=0.95, weight_decay=s["weight_decay"])
  biases = [layer.mlp.expert_bias for layer in model.layers] if gamma else []

  @TinyJit
  def step(x: Tensor, lr_now: Tensor):
    """One AdamW step on CE + alpha * LB + beta * Z (olmoe.py's losses); with a router bias, then the bias update."""
    opt.lr.assign(lr_now)
    logits, routing = model(x, return_routing=True)
    ce = olmoe.cross_entropy(logits[:, :-1], x[:, 1:])
    lb = olmoe.load_balancing_loss(routing.logits, E, k)
    z = olmoe.router_z_loss(routing.logits)
    loss = ce + alpha * lb + s["beta"] * z
    opt.zero_grad()
    loss.backward()
    if biases: olmoe.update_router_bias(model, routing)   # the bias update, from the routing this step used
    values, load, chosen = Tensor.stack(ce, lb, z), olmoe.expert_load(routing, E), Tensor.stack(*routing.experts)
    # one realize for the weights' and the biases' updates and what is logged: every value is read before the
    # assignments change the weights or the biases it depends on (realized later, it would be recomputed from them)
    Tensor.realize(*opt.schedule_step(), *biases, values, load, chosen)
    return values, load, chosen                 # (3,), (L, E), (L, N, k)

  log = {"kind": kind, "alpha": alpha, "beta": s["beta"], "gamma": gamma, "num_experts": E, "k": k,
         "ce": [], "lb": [], "z": [], "pairs": [], "bias": [], **({"chosen": []} if keep_choices else {})}
  pairs = s["batch_size"] * (s["seq_len"] + 1) * k                                # (token, slot) pairs per layer and step
  t0 = time.time()
  with Context(TRAINING=1):
    for i in range(s["steps"]):
      x = Tensor(T.batch(streams, i, s["seed"], s["batch_size"], s["seq_len"]))
      values, load, chosen = step(x, Tensor([T.lr_at(i, s["steps"], s["lr"], s["warmup"])], dtype=opt.lr.dtype))
      for name, v in zip(("ce", "lb", "z"), values.numpy().tolist()): log[name].append(round(v, 4))
      log["pairs"].append(np.rint(load.numpy() * pairs).astype(int).tolist())     # exact: shares of `pairs` pairs
      if biases: log["bias"].append([b.numpy().astype(np.float64).round(4).tolist() for b in biases])
      if keep_choices: log["chosen"].append(chosen.numpy().tolist())
      if progress and (i + 1) % 25 == 0:
        lo = load.numpy() * E
        print(f"  {kind} step {i + 1}: ce {log['ce'][-1]:.3f}  load/uniform max {lo.max(1).round(2)} min {lo.min(1).round(2)}",
              file=sys.stderr)
  log["seconds"] = round(time.time() - t0, 1)
  return log


def read_logs(folder: Path = OUT) -> dict[str, dict]:
  """The cached runs, kind -> log, with "setup" (setup.json) and "load", the shares of each step's pairs (steps, L, E)."""
  folder = Path(folder)
  if not (folder / "setup.json").is_file(): raise OlmoeError(f"{folder}: no setup.json (run python demo/collapse.py)")
  setup = json.loads((folder / "setup.json").read_text())
  logs = {}
  for kind in RUNS:
    f = folder / f"{kind}.json"
    if not f.is_file(): raise OlmoeError(f"{f}: missing (run python demo/collapse.py)")
    log = json.loads(f.read_text())
    pairs = np.array(log["pairs"], dtype=np.float64)
    logs[kind] = {**log, "setup": setup, "load": pairs / pairs.sum(-1, keepdims=True)}
  return logs

def plot(logs: dict[str, dict], path: Path, smooth: int = 10) -> Path:
  """One figure, one column per run: the busiest and idlest expert's load over uniform per layer (log scale), and
  the entropy of each layer's load, both over training (averaged over `smooth` steps)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, len(logs), figsize=(4.2 * len(logs), 5.6), sharex=True, sharey="row", layout="constrained")
  avg = lambda v: np.convolve(v, np.ones(smooth) / smooth, mode="valid")
  for c, (kind, log) in enumerate(logs.items()):
    st = load_stats(log["load"])                 # (steps, L) each
    E = log["num_experts"]
    x = np.arange(smooth, len(log["load"]) + 1)
    for l in range(st["max"].shape[1]):
      colour = f"C{l}"
      axes[0, c].plot(x, avg(st["max"][:, l]), color=colour, label=f"layer {l}")
      axes[0, c].plot(x, np.maximum(avg(st["min"][:, l]), 1e-2), color=colour, ls="--")
      axes[1, c].plot(x, avg(st["entropy"][:, l]), color=colour)
    axes[0, c].axhline(1, color="k", lw=0.8)
    axes[1, c].axhline(math.log(E), color="k", lw=0.8)
    axes[0, c].set_yscale("log"); axes[0, c].set_ylim(8e-3, E * 1.2)
    axes[0, c].set_title(LABELS[kind].format(gamma=log["gamma"]), fontsize=10)
    axes[1, c].set_xlabel("step")
  axes[0, 0].set_ylabel("load / uniform (busiest solid,\nidlest dashed; 0 drawn at 0.01)")
  axes[1, 0].set_ylabel(f"entropy of the load (nats)\nuniform: ln {logs['off']['num_experts']}")
  axes[1, 0].legend(*axes[0, 0].get_legend_handles_labels(), fontsize=8, loc="lower right")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
  plt.close(fig)
  return path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", type=Path, default=ROOT / "demo" / "build" / "data", help="folder written by demo/data.py")
  ap.add_argument("--out", type=Path, default=OUT, help="where the logs go")
  ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
  ap.add_argument("--steps", type=int, default=SETUP["steps"])
  ap.add_argument("--lr", type=float, default=SETUP["lr"])
  ap.add_argument("--gamma", type=float, default=SETUP["gamma"], help="bias step of the bias run")
  ap.add_argument("--plot", type=Path, default=None, metavar="DIR", help="only draw DIR/collapse.png from the logs in --out")
  a = ap.parse_args(argv)
  try:
    if a.plot is not None:
      plot(read_logs(a.out), a.plot / "collapse.png")
      return 0
    runs = a.runs.split(",")
    if not runs or any(r not in RUNS for r in runs): raise OlmoeError(f"--runs {a.runs}: name runs among {', '.join(RUNS)}")
    if a.steps <= 0 or not a.lr > 0 or not a.gamma > 0:
      raise OlmoeError(f"--steps, --lr and --gamma must be > 0 (got {a.steps}, {a.lr}, {a.gamma})")
    for d in ("code", "math", "prose"):
      f = a.data / f"{d}.train.txt"
      if not f.is_file() or f.stat().st_size == 0: raise OlmoeError(f"{f}: missing or empty (build the data with demo/data.py)")
    if not TOKENIZER.is_file(): raise OlmoeError(f"{TOKENIZER}: missing (the bundled demo model's tokenizer)")
    setup = {**SETUP, "steps": a.steps, "lr": a.lr, "gamma": a.gamma}
    a.out.mkdir(parents=True, exist_ok=True)
    for kind in runs:
      log = train_run(kind, a.data, setup, progress=True)
      (a.out / f"{kind}.json").write_text(json.dumps(log, separators=(",", ":")) + "\n")
      print(f"{kind}: {log['seconds']} s -> {a.out / f'{kind}.json'}", file=sys.stderr)
    (a.out / "setup.json").write_text(json.dumps(setup, indent=1) + "\n")
  except OlmoeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0

if __name__ == "__main__":
  sys.exit(main())
