# The bundled OLMoE demo's training run, from the log demo/train.py wrote beside the
# weights: the loss terms at the start and the end, and per layer how far the busiest
# and the idlest expert were from the uniform load, and the entropy of the load.
# requires: models/olmoe-demo/train_log.json
import json, math
log = json.load(open("models/olmoe-demo/train_log.json"))
steps, E = log["steps"], len(log["load_every_10_steps"]["1"][0])
print(f"objective: {log['objective']}, alpha = {log['alpha_lb']}, beta = {log['beta_z']}")
print(f"{steps} steps of {log['batch_size']} x {log['seq_len']} tokens")
mean = lambda v, a, b: sum(v[a:b]) / (b - a)
for name in ("ce", "lb", "z"):
  v = log[f"{name}_every_step"]
  print(f"{name:>3}: first 50 steps {mean(v, 0, 50):.3f}, last 50 steps {mean(v, steps - 50, steps):.3f}")
print(f"load per layer, as (busiest / uniform, idlest / uniform, entropy); balanced: (1, 1, ln E = {math.log(E):.3f})")
for step in (1, steps // 10, steps):
  i = step - 1
  cells = [f"({mx:.2f}, {mn:.2f}, {h:.3f})" for mx, mn, h in zip(log["load_max_over_uniform_every_step"][i],
           log["load_min_over_uniform_every_step"][i], log["load_entropy_every_step"][i])]
  print(f"  step {step:>4}: " + "  ".join(cells))
