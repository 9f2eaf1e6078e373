# Exercise 5, solution: the bundled FlexOlmo's loss per domain, with all experts
# and with each owner's expert opted out in turn.
# requires: models/flexolmo-demo/config.json
from pathlib import Path
from tinygrad import Tensor
import flexolmo

model, tok = flexolmo.load("models/flexolmo-demo", progress=False)
names = model.cfg.names()                          # ['public', 'code', 'math']
# held-out text of each domain, as the demo ships it (512 tokens each)
texts = {d: Path(f"demo/samples/{d}.txt").read_text() for d in ("prose", "code", "math")}

def loss(text: str) -> float:
  """Mean next-token cross-entropy (nats) of the model as currently selected."""
  ids = Tensor([tok.encode(text)[:512]])
  logits = model(ids)                              # (1, T, V)
  return logits[:, :-1].float().sparse_categorical_crossentropy(ids[:, 1:]).item()

print("experts:", names)
print(f"{'enabled':22s}" + "".join(f"{d:>8s}" for d in texts))
for out in [None] + names[1:]:
  on = model.select_experts(opt_out=[out] if out else None)
  print(f"{'+'.join(on):22s}" + "".join(f"{loss(t):8.3f}" for t in texts.values()))
model.select_experts()                             # all experts again
