# What quantising the weights changes, on the bundled demo model: its weights read
# as fp32 are the reference; the same weights are then held in bf16 (as stored),
# in int8 (olmoe_int8.py), and in GGUF Q8_0 and Q4_0 files (olmoe_gguf.py; written
# by bench/make_gguf.py with llama.cpp's gguf package). One teacher-forced pass over
# a text each: the logits, the top-1 token, and each (token, layer)'s set of k
# experts, against fp32's.
# requires: models/olmoe-demo/config.json bench/make_gguf.py
import sys, tempfile
from pathlib import Path
import numpy as np
from tinygrad import Tensor
import olmoe
sys.path.insert(0, "bench")
from make_gguf import convert

DEMO = "models/olmoe-demo"
text = ("A mixture of experts sends each token to a few of its feed-forward "
        "experts, chosen by a router. def add(a, b):\n    return a + b\n"
        "12 + 30 = 42. ") * 3
ref_model, tok = olmoe.load(DEMO, "float32", progress=False)
ids = tok.encode(text)[:128]

def run(model):
  logits, routing = model(Tensor([ids]), return_routing=True)
  experts = np.stack([np.sort(i.numpy(), -1) for i in routing.experts])  # (L,T,k)
  return logits[0].float().numpy(), experts

ref_logits, ref_experts = run(ref_model)
tmp = Path(tempfile.mkdtemp())
int8 = olmoe.load(DEMO, "float32", progress=False, quantize="int8")[0]
rows = [("bf16 (as stored)", olmoe.load(DEMO, progress=False)[0], 2),
        ("int8, one scale per row", int8, 1)]
for kind, per_weight in (("Q8_0", 34 / 32), ("Q4_0", 18 / 32)):
  convert(Path(DEMO), tmp / f"{kind}.gguf", kind)
  model = olmoe.load(str(tmp / f"{kind}.gguf"), progress=False)[0]
  rows.append((f"GGUF {kind}", model, per_weight))

print("| weights | bytes per weight | mean abs logit diff | max |",
      "top-1 agreement | routing flips |")
print("|---|---:|---:|---:|---:|---:|")
for name, model, per_weight in rows:
  logits, experts = run(model)
  d = np.abs(logits - ref_logits)
  top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).mean()
  flips = (experts != ref_experts).any(-1).mean()   # share of (layer, token) sets
  print(f"| {name} | {per_weight:.2f} | {d.mean():.4f} | {d.max():.3f} |",
        f"{top1:.3f} | {flips:.1%} |")
print(f"\n{len(ids)} tokens, {ref_experts.shape[0]} layers; fp32 logits' spread (std):",
      f"{ref_logits.std():.2f}")
