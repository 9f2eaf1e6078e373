# %% [markdown]
# # Build it 5: a third FlexOlmo expert
#
# Train an expert for a new domain against the bundled FlexOlmo's frozen public expert, merge it with the two
# experts the demo already has, and measure every domain's loss with and without it. The question and the written
# answers are on the course page "Build it" (docs/build.md).

# %%
# The models and samples are found from the repository root, wherever the notebook runs inside the checkout.
import os, sys
from pathlib import Path
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "models" / "flexolmo-demo").is_dir())
os.chdir(ROOT); sys.path.insert(0, str(ROOT))
import olmoe_compiler; olmoe_compiler.use_cpu_target()   # a CPU compile target clang can finish (bf16)

# %%
import shutil, tempfile
import numpy as np
from tinygrad import Tensor
import flexolmo
from olmoe_checkpoint import Raw, read_config, read_raw

DEMO = Path("models/flexolmo-demo")

def sorting_text(seed: int, lines: int) -> str:
  """The new domain, generated from a seed: lines such as "sort 42 7 19 -> 7 19 42"."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(lines):
    xs = rng.integers(0, 100, rng.integers(3, 7))
    out.append("sort " + " ".join(map(str, xs)) + " -> " + " ".join(map(str, np.sort(xs))))
  return "\n".join(out) + "\n"

work = Path(tempfile.mkdtemp(prefix="third-expert-"))
(work / "sort.train.txt").write_text(sorting_text(seed=1, lines=2000))
held_out = sorting_text(seed=2, lines=60)            # another seed: lines the expert never saw

# %% [markdown]
# The bundled checkpoint is already merged. `flexolmo.merge` takes each owner's two-expert checkpoint
# ([public, owner]), so first cut the demo back into those: expert 0 with router row 0, and expert e with row e.

# %%
def owner_checkpoint(merged: Path, e: int, out: Path) -> None:
  """The two-expert checkpoint [public, expert e] that `flexolmo.train_expert` would have written for owner e."""
  config, raw = read_config(merged), read_raw(merged)
  name, D = config["expert_names"][e], config["hidden_size"]
  tensors = {}
  for key, t in raw.items():
    if ".mlp.experts." in key:
      layer, rest = key.split(".mlp.experts.")
      expert, part = rest.split(".", 1)
      if int(expert) in (0, e): tensors[f"{layer}.mlp.experts.{0 if int(expert) == 0 else 1}.{part}"] = t
    elif key.endswith(".mlp.gate.weight"):       # rows 0 and e of the (E, D) router
      tensors[key] = Raw(t.dtype, [2, D], flexolmo.row(t, 0).as_bytes() + flexolmo.row(t, e).as_bytes())
    else: tensors[key] = t
  config = {**config, "num_experts": 2, "num_experts_per_tok": 2, "expert_names": [config["expert_names"][0], name]}
  flexolmo.write_checkpoint(out, config, tensors, merged / "tokenizer.json", [merged])

owners = read_config(DEMO)["expert_names"][1:]       # ['code', 'math']
for e, name in enumerate(owners, start=1): owner_checkpoint(DEMO, e, work / name)

# %% [markdown]
# Train the new owner's expert against the frozen public expert (the demo's own recipe, `--router fixed`, with far
# fewer steps), then merge all three owners.

# %%
losses = flexolmo.train_expert(DEMO, [work / "sort.train.txt"], work / "sort", "sort", steps=16, lr=2e-3, seq_len=32,
                               batch=8, seed=0, progress=False, router="fixed")
print(f"training loss of the sort expert: {losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last")
flexolmo.merge(DEMO, [(n, work / n) for n in owners + ["sort"]], work / "merged")

# %%
model, tok = flexolmo.load(str(work / "merged"), dtype="float32", progress=False)
print("experts:", model.cfg.names())
texts = {d: Path(f"demo/samples/{d}.txt").read_text() for d in ("prose", "code", "math")} | {"sort": held_out}
ids = {d: tok.encode(t)[:257] for d, t in texts.items()}

def loss(d: str) -> tuple[float, float]:
  """Mean next-token cross-entropy (nats) on 256 predictions of domain d, with the experts currently selected, and
  the sort expert's router probability averaged over the positions and layers (0 when it is opted out)."""
  x = Tensor([ids[d]])
  logits, routing = model(x[:, :-1], return_routing=True)
  p_sort = np.mean([z.float().softmax(-1).numpy()[:, -1].mean() for z in routing.logits])
  return logits.float().sparse_categorical_crossentropy(x[:, 1:]).item(), p_sort

rows, p_sort = {}, {}
for label, opt_out in (("all four experts", None), ("sort opted out", ["sort"])):
  model.select_experts(opt_out=opt_out)
  results = {d: loss(d) for d in texts}
  rows[label] = {d: ce for d, (ce, _) in results.items()}
  if opt_out is None: p_sort = {d: p for d, (_, p) in results.items()}
model.select_experts()
print(f"{'':18s}" + "".join(f"{d:>8s}" for d in texts))
for label, r in rows.items(): print(f"{label:18s}" + "".join(f"{v:8.3f}" for v in r.values()))
gain = {d: rows["sort opted out"][d] - rows["all four experts"][d] for d in texts}
print("loss the sort expert saves:", "  ".join(f"{d} {v:+.3f}" for d, v in gain.items()))
print("sort expert's mean router probability:", "  ".join(f"{d} {v:.3f}" for d, v in p_sort.items()))

# %%
# Opting the new expert out is the bundled three-expert model: the merge kept every other tensor bit for bit.
bundled, _ = flexolmo.load(str(DEMO), dtype="float32", progress=False)
x = Tensor([ids["prose"][:64]])
model.select_experts(opt_out=["sort"])
assert np.allclose(model(x).numpy(), bundled(x).numpy(), atol=1e-4)
model.select_experts()
# the new expert must help its own domain most
assert max(gain, key=gain.get) == "sort" and gain["sort"] > 0
# prose hardly moves; math, whose digits the router confuses with the sort lines, gets worse
assert abs(gain["prose"]) < 0.05 and gain["math"] < 0 and p_sort["math"] > p_sort["prose"]
shutil.rmtree(work)
