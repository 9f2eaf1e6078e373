#!/usr/bin/env python3
"""Peak memory of `flexolmo.load` with every expert against only the kept ones, each load in a fresh process.

Checkpoints: the bundled models/flexolmo-demo (bf16, 3 experts), and a random FlexOlmo with the released model's 7
named experts in float32, sized so that the expert weights are most of the model (D 512, I 2048, 8 layers, V 4096),
written into a temporary folder by olmoe_checkpoint.write_safetensors. For each, and each choice of experts, the
child process prints its peak RSS (VmHWM) after the imports and after the load; the table gives the
medians over the rounds, and the bytes of weights the choice keeps (from the safetensors headers).

python bench/expert_memory.py [--keep public,math] [--rounds 3]
"""
import argparse, json, statistics, subprocess, sys, tempfile
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from olmoe_checkpoint import read_safetensors_header, to_raw, write_safetensors   # noqa: E402
import flexolmo                                                                      # noqa: E402

RANDOM = dict(model_type="flex_olmo", vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, num_experts=7, num_experts_per_tok=7,
              max_position_embeddings=256, eos_token_id=0, pad_token_id=1, expert_names=flexolmo.RELEASED_NAMES)

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child would report the parent's peak
CHILD = """
import sys
import olmoe_compiler
olmoe_compiler.use_cpu_target()
import flexolmo
hwm = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = hwm()
flexolmo.load(sys.argv[1], sys.argv[2].split(",") if sys.argv[2] else None, progress=False)
print(before, hwm())
"""


def write_random(folder: Path) -> Path:
  """A random FlexOlmo checkpoint of the RANDOM shape, float32, per-expert keys as on the hub."""
  c, rng = RANDOM, np.random.default_rng(0)
  D, I, E, V = c["hidden_size"], c["intermediate_size"], c["num_experts"], c["vocab_size"]
  w = lambda *shape: to_raw(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02), "F32")
  t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": to_raw(np.ones(D, np.float32), "F32"),
       "lm_head.weight": w(V, D)}
  for l in range(c["num_hidden_layers"]):
    p = f"model.layers.{l}."
    t.update({p + f"self_attn.{n}.weight": w(D, D) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    t.update({p + n: to_raw(np.ones(D, np.float32), "F32") for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight",
                                                                      "post_attention_layernorm.weight",
                                                                      "post_feedforward_layernorm.weight")})
    t[p + "mlp.gate.weight"] = w(E, D)
    for e in range(E):
      t.update({p + f"mlp.experts.{e}.gate_proj.weight": w(I, D), p + f"mlp.experts.{e}.up_proj.weight": w(I, D),
                p + f"mlp.experts.{e}.down_proj.weight": w(D, I)})
  folder.mkdir(parents=True)
  write_safetensors(folder / "model.safetensors", t, {"format": "pt"})
  (folder / "config.json").write_text(json.dumps(RANDOM))
  return folder


def weight_bytes(folder: Path, keep: list[str] | None) -> int:
  """Bytes of the tensors a load keeping `keep` (None: all) holds: shared ones, kept experts, kept router rows."""
  names = flexolmo.FlexOlmoConfig.from_dict(json.loads((folder / "config.json").read_text())).names()
  on = flexolmo.expert_indices(names, keep)
  header, _ = read_safetensors_header(folder / "model.safetensors")
  total = 0
  for k, v in header.items():
    if k == "__metadata__": continue
    n = v["data_offsets"][1] - v["data_offsets"][0]
    if (m := flexolmo.EXPERT_KEY.fullmatch(k)): n *= int(m[2]) in on
    elif k.endswith("mlp.gate.weight"): n = n * len(on) // len(names)
    total += n
  return total


def peak_rss(folder: Path, keep: list[str] | None) -> tuple[int, int]:
  """(KiB after the imports, KiB after the load): the peak RSS of a fresh process loading the folder."""
  r = subprocess.run([sys.executable, "-c", CHILD, str(folder), ",".join(keep or [])], cwd=ROOT, capture_output=True,
                     text=True, check=True)
  before, after = map(int, r.stdout.split())
  return before, after


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--keep", default="public,math", help="the experts of the smaller load")
  ap.add_argument("--rounds", type=int, default=3)
  a = ap.parse_args()
  keep = a.keep.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    folders = {"flexolmo-demo (bf16)": flexolmo.DEMO_MODEL, "random 7 experts (fp32)": write_random(Path(tmp) / "random")}
    print("| checkpoint | experts | weights held | peak RSS after imports | peak RSS after load | load adds |")
    print("|---|---|---:|---:|---:|---:|")
    for label, folder in folders.items():
      choices = [None, keep if label.startswith("random") else [n for n in ("public", "math")]]
      for choice in choices:
        runs = [peak_rss(folder, choice) for _ in range(a.rounds)]                   # KiB
        before, after = (statistics.median(r[i] for r in runs) for i in (0, 1))
        print(f"| {label} | {'all' if choice is None else ', '.join(choice)} | {weight_bytes(folder, choice) / 2**20:.1f} MiB "
              f"| {before / 1024:.0f} MiB | {after / 1024:.0f} MiB | {(after - before) / 1024:.0f} MiB |", flush=True)


if __name__ == "__main__":
  main()
