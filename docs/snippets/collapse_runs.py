# The three runs of demo/collapse.py, from their cached logs (demo/collapse/*.json).
# First table, over the last 50 steps: how many of the L x E experts are idle (a mean
# share of the (token, slot) pairs under 1% of the uniform 1/E); the least and the most
# used expert's mean load over uniform (extremes over the layers); the busiest expert's
# load on a single step (mean over steps and layers); the entropy of each layer's load
# (ln E when uniform); the cross-entropy. Second table: idle experts per 25 steps.
import numpy as np
from demo import collapse

logs = collapse.read_logs()
setup, last, window = logs["off"]["setup"], 50, 25
E, L = setup["arch"]["num_experts"], setup["arch"]["num_hidden_layers"]

def idle(load):
  """Experts idle over these steps; load (steps, L, E)."""
  return int((load.mean(0) * E < 0.01).sum())

print(f"{setup['steps']} steps of {setup['batch_size']} x {setup['seq_len']} tokens, "
      f"{L} layers of E = {E} experts, k = {setup['arch']['num_experts_per_tok']}, "
      f"lr {setup['lr']}; alpha = {setup['alpha']} (lb), gamma = {setup['gamma']} (bias), "
      f"beta = {setup['beta']} in all three\n")
print("| run | idle experts | least / most used, mean load | busiest on one step "
      f"| entropy (ln {E} = {np.log(E):.2f}) | cross-entropy |")
print("|---|---|---|---|---|---|")
for kind, log in logs.items():
  load = log["load"][-last:]                         # (last, L, E) shares of the pairs
  mean = load.mean(0) * E                            # (L, E) over uniform
  st = collapse.load_stats(load)                     # per step and layer
  entropy, busiest = st["entropy"].mean(), st["max"].mean()
  print(f"| {kind} | {idle(load)} of {L * E} | {mean.min():.2f} / {mean.max():.2f} "
        f"| {busiest:.2f} | {entropy:.2f} | {np.mean(log['ce'][-last:]):.2f} |")
print("\n| idle experts in steps | " + " | ".join(logs) + " |")
print("|---|" + "---|" * len(logs))
for s in range(0, setup["steps"], window):
  cells = [str(idle(log["load"][s:s + window])) for log in logs.values()]
  print(f"| {s + 1}–{s + window} | " + " | ".join(cells) + " |")
