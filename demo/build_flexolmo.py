#!/usr/bin/env python3
"""Build the tiny FlexOlmo demo (models/flexolmo-demo) with flexolmo.py's own recipe, and measure it.

  python demo/build_flexolmo.py                 # after demo/data.py and demo/train.py (it reuses the OLMoE demo's
                                                # tokenizer); ~20 min on 2 CPU cores, each stage skipped when done

The recipe, as in the FlexOlmo paper, at toy scale:
  1. public   a dense OLMo 2 model trained on the public domain only (prose), by demo/train.py --arch olmo2;
  2. owners   one expert per data owner (code, math), each trained by `flexolmo.py train-expert` against the frozen
              public model: only the owner's FFN (initialised as a copy of the public FFN) and its router row
              (initialised as the public model's mean hidden state on the owner's text) learn, on the owner's data only;
  3. merge    `flexolmo.py merge` stacks the public FFN and the owners' experts, and their router rows, into one
              3-expert FlexOlmo -> models/flexolmo-demo (all experts active, as in the released 7x7B).

Then every variant is evaluated on the held-out split of every domain (mean next-token cross-entropy in nats,
olmoe.py / flexolmo.py forward passes): the public model alone, each 2-expert model, the merged model, and the
merged model with each owner opted out. The table goes to demo/RESULTS.md (the docs include it) and the numbers to
demo/flexolmo_results.json.

Not handled: the paper's router fine-tuning on proxy data ("RT") and its learned negative bias; experts here are
trained sequentially on one machine, where the paper's owners train in parallel and never meet.
"""
from __future__ import annotations
import argparse, json, shutil, subprocess, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
import olmoe, flexolmo           # noqa: E402
from olmoe_tokenizer import Tokenizer   # noqa: E402
import data as D                 # noqa: E402
import train                     # noqa: E402

PUBLIC_DOMAIN, OWNERS = "prose", ("code", "math")
# the public model: the OLMoE demo's attention sizes, a dense FFN of width 256 (each expert is a copy of it)
PUBLIC_ARCH = ["hidden_size=128", "intermediate_size=256", "num_hidden_layers=4", "num_attention_heads=4"]


def run(cmd: list[str]) -> None:
  print("+ " + " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)

def cross_entropy(model, windows: np.ndarray, batch: int = 8) -> float:
  """Mean next-token cross-entropy (nats) of a tinygrad model on (n, T + 1) windows."""
  from tinygrad import Tensor
  tot = 0.0
  for b in range(0, len(windows), batch):
    x = Tensor(windows[b:b + batch])
    tot += model(x[:, :-1]).float().sparse_categorical_crossentropy(x[:, 1:]).item() * len(windows[b:b + batch])
  return tot / len(windows)

def evaluate(build: Path, merged: Path, data: Path) -> dict:
  """Cross-entropy per domain of every variant (rows) on every domain (columns)."""
  tok = Tokenizer.from_file(merged / "tokenizer.json")
  windows = train.eval_windows(train.tokenize_domains(data, tok, list(D.DOMAINS), "valid"), 128, 16)   # as train.py evaluates
  variants = [("public only", merged, ["public"], None)]
  variants += [(f"public + {o}", build / o, None, None) for o in OWNERS]
  variants += [("merged (all experts)", merged, None, None)]
  variants += [(f"merged, {o} opted out", merged, None, [o]) for o in OWNERS]
  rows = {}
  for name, folder, experts, opt_out in variants:
    model, _ = flexolmo.load(str(folder), experts, opt_out, dtype="float32", progress=False)
    rows[name] = {d: round(cross_entropy(model, w), 4) for d, w in windows.items()}
    print(f"  {name:28s} " + "  ".join(f"{d} {v:.3f}" for d, v in rows[name].items()), flush=True)
  return rows

def results_markdown(rows: dict, meta: dict) -> str:
  best = {d: min(r[d] for r in rows.values()) for d in D.DOMAINS}
  out = ["Held-out cross-entropy (nats per token, lower is better) of the bundled FlexOlmo demo, "
         f"measured by `demo/build_flexolmo.py` on {meta['date']}. The public model saw only {PUBLIC_DOMAIN}; "
         f"each owner's expert saw only its own domain ({', '.join(OWNERS)}). Bold: the best of a column.", "",
         "| model | " + " | ".join(D.DOMAINS) + " |", "|---|" + "---:|" * len(D.DOMAINS)]
  for name, r in rows.items():
    out.append(f"| {name} | " + " | ".join(f"**{r[d]:.3f}**" if r[d] == best[d] else f"{r[d]:.3f}" for d in D.DOMAINS) + " |")
  out += ["", "Opting an owner out masks its router logit before the softmax, which is the same function as the "
          "2-expert model without it: the rows \"merged, X opted out\" and \"public + Y\" agree to float precision."]
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", type=Path, default=ROOT / "demo" / "build" / "data")
  ap.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "olmoe-demo" / "tokenizer.json")
  ap.add_argument("--build", type=Path, default=ROOT / "demo" / "build" / "flexolmo", help="intermediate models")
  ap.add_argument("--out", type=Path, default=ROOT / "models" / "flexolmo-demo")
  ap.add_argument("--public-steps", type=int, default=1500)
  ap.add_argument("--expert-steps", type=int, default=60)
  ap.add_argument("--expert-lr", type=float, default=2e-3)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  py, t0 = sys.executable, time.time()
  public = a.build / "public"
  if not (public / "config.json").exists():        # 1. the public model, dense, on the public domain only
    run([py, "demo/train.py", "--arch", "olmo2", "--domains", PUBLIC_DOMAIN, "--out", str(public),
         "--work", str(a.build / "public-work"), "--tokenizer", str(a.tokenizer), "--steps", str(a.public_steps),
         "--seed", str(a.seed)] + [x for s in PUBLIC_ARCH for x in ("--set", s)])
  for owner in OWNERS:                              # 2. each owner's expert, against the frozen public model
    if not (a.build / owner / "config.json").exists():
      run([py, "flexolmo.py", "train-expert", "--public", str(public), "--data", str(a.data / f"{owner}.train.txt"),
           "--public-data", str(a.data / f"{PUBLIC_DOMAIN}.train.txt"), "--out", str(a.build / owner), "--name", owner,
           "--steps", str(a.expert_steps), "--lr", str(a.expert_lr), "--seq-len", "64", "--batch", "8",
           "--seed", str(a.seed)])
  merged = a.build / "merged"
  if not (merged / "config.json").exists():         # 3. merge
    run([py, "flexolmo.py", "merge", "--public", str(public), "--out", str(merged)] +
        [x for o in OWNERS for x in ("--expert", f"{o}={a.build / o}")])
  rows = evaluate(a.build, merged, a.data)
  meta = {"date": time.strftime("%Y-%m-%d"), "public_steps": a.public_steps, "expert_steps": a.expert_steps,
          "expert_lr": a.expert_lr, "expert_batch": "8 x 64 tokens",
          "seed": a.seed, "minutes": round((time.time() - t0) / 60, 1)}
  (ROOT / "demo" / "flexolmo_results.json").write_text(json.dumps({"meta": meta, "cross_entropy": rows}, indent=1) + "\n")
  (ROOT / "demo" / "RESULTS.md").write_text(results_markdown(rows, meta))
  tmp = a.out.parent / f".{a.out.name}.partial"     # the bundled copy, with hashes of its files
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(merged, tmp)
  train.write_hashes(tmp)
  shutil.rmtree(a.out, ignore_errors=True)
  tmp.rename(a.out)
  print(f"wrote {a.out} and demo/RESULTS.md in {meta['minutes']} min")
  return 0

if __name__ == "__main__":
  sys.exit(main())
