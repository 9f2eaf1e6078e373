# Domain specialisation of the bundled OLMoE demo: for each layer and domain,
# the expert that gets the largest share of the domain's tokens, and that share
# against the uniform k/E. Held-out samples from demo/samples/.
# requires: models/olmoe-demo/config.json
from pathlib import Path
import numpy as np
import olmoe
from demo import analysis

model, tok = olmoe.load("models/olmoe-demo", progress=False)
E, k, L = model.cfg.num_experts, model.cfg.num_experts_per_tok, model.cfg.num_hidden_layers
experts = {}
for d in ("prose", "code", "math"):
  ids = tok.encode(Path(f"demo/samples/{d}.txt").read_text())[:1024]
  experts[d], _ = analysis.routing_tables(model, np.array(ids).reshape(8, 128))   # (L, N, k)

print(f"| layer | " + " | ".join(f"{d}: top expert, share" for d in experts) + " |")
print("|---|" + "---|" * len(experts))
for l in range(L):
  cells = []
  for d, ex in experts.items():
    spec = analysis.domain_specialisation(ex[l], E)      # (E,) share of d's tokens per expert
    cells.append(f"e{spec.argmax()}: {spec.max():.2f} ({spec.max() / (k / E):.1f}x)")
  print(f"| {l} | " + " | ".join(cells) + " |")
print(f"\nUniform routing would give every expert k/E = {k}/{E} = {k / E:.3f} of each domain's tokens.")
