#!/usr/bin/env python3
"""Build the tiny FlexOlmo demo (models/flexolmo-demo) with flexolmo.py's own recipe, and measure it.

  python demo/build_flexolmo.py                 # after demo/data.py and demo/train.py (it reuses the OLMoE demo's
                                                # tokenizer); ~20 min on 2 CPU cores, each stage skipped when done

The recipe, as in the FlexOlmo paper, at toy scale:
  1. public   a dense OLMo 2 model trained on the public domain only (prose), by demo/train.py --arch olmo2;
  2. owners   one expert per data owner (code, math), each trained by `flexolmo.py train-expert` against the frozen
              public model: only the owner's FFN (initialised as a copy of the public FFN) learns, on the owner's data
              only; the router rows are domain embeddings (at each layer, the public model's router input averaged
              over the domain's text, unit length), kept fixed (`--router fixed`);
  3. merge    `flexolmo.py merge` stacks the public FFN and the owners' experts, and their router rows, into one
              3-expert FlexOlmo (all experts active, as in the released 7x7B);
  4. RT       `flexolmo.py train-router` trains the merged model's router rows alone on a mix of the three domains'
              training text (the paper's router training on proxy data, its -RT release) -> models/flexolmo-demo.
              The toy has no proxy corpus: the sample comes from the owners' own training text, which the paper's
              proxies stand in for.

Then every variant is evaluated on the held-out split of every domain (mean next-token cross-entropy in nats,
olmoe.py / flexolmo.py forward passes): the public model alone, each 2-expert model, the merged model, and the
merged model before and after RT, each with each owner opted out. The same owners are also trained with
`--router learn` (the paper's choice: the owner's row trains with its expert) and merged, as the ablation. The tables
go to demo/RESULTS.md (the docs include it) and the numbers to demo/flexolmo_results.json.

Not handled: the paper's learned negative bias; experts here are trained sequentially on one machine, where the
paper's owners train in parallel and never meet.
"""
from __future__ import annotations
import argparse, json, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
import flexolmo                  # noqa: E402
from olmoe_tokenizer import Tokenizer   # noqa: E402
import data as D                 # noqa: E402
import train                     # noqa: E402

PUBLIC_DOMAIN, OWNERS = "prose", ("code", "math")
ROUTERS = ("fixed", "learn")                  # the bundled recipe first, then the ablation
RT = "merged, then RT"                        # rows of the bundled model: the merged model after router training
# the public model: the OLMoE demo's attention sizes, a dense FFN of width 256 (each expert is a copy of it)
PUBLIC_ARCH = ["hidden_size=128", "intermediate_size=256", "num_hidden_layers=4", "num_attention_heads=4"]


def run(cmd: list[str]) -> None:
  print("+ " + " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)

def evaluate(variants: list[tuple[str, Path, list | None, list | None]], data: Path) -> dict:
  """Cross-entropy per domain of every (name, folder, experts, opt_out) variant (rows) on every domain (columns)."""
  tok = Tokenizer.from_file(variants[0][1] / "tokenizer.json")
  windows = train.eval_windows(train.tokenize_domains(data, tok, list(D.DOMAINS), "valid"), 128, 16)   # as train.py evaluates
  rows = {}
  for name, folder, experts, opt_out in variants:
    model, _ = flexolmo.load(str(folder), experts, opt_out, dtype="float32", progress=False)
    rows[name] = {d: round(train.cross_entropy(model, w), 4) for d, w in windows.items()}
    print(f"  {name:34s} " + "  ".join(f"{d} {v:.3f}" for d, v in rows[name].items()), flush=True)
  return rows

def table(rows: dict) -> list[str]:
  best = {d: min(r[d] for r in rows.values()) for d in D.DOMAINS}
  out = ["| model | " + " | ".join(D.DOMAINS) + " |", "|---|" + "---:|" * len(D.DOMAINS)]
  for name, r in rows.items():
    out.append(f"| {name} | " + " | ".join(f"**{r[d]:.3f}**" if r[d] == best[d] else f"{r[d]:.3f}" for d in D.DOMAINS) + " |")
  return out

def gaps(ce: dict, public: dict, merged: str, owners_models: dict[str, str]) -> dict[str, float]:
  """The headline's distances: merged minus the public model on the public domain, merged minus the matching
  two-expert specialist on each owner's domain (nats; the paper's claim is that these are small)."""
  out = {PUBLIC_DOMAIN: round(ce[merged][PUBLIC_DOMAIN] - public[PUBLIC_DOMAIN], 3)}
  for o, spec in owners_models.items(): out[o] = round(ce[merged][o] - ce[spec][o], 3)
  return out

def results_markdown(rows: dict, ablation: dict, gap: dict, meta: dict) -> str:
  out = ["Held-out cross-entropy (nats per token, lower is better) of the FlexOlmo demo's models, "
         f"measured by `demo/build_flexolmo.py` on {meta['date']}. The public model saw only {PUBLIC_DOMAIN}; "
         f"each owner's expert saw only its own domain ({', '.join(OWNERS)}), {meta['expert_steps']} steps of "
         f"{meta['expert_batch']}, router rows fixed at their domain embeddings. \"Merged, then RT\" (the bundled "
         f"`models/flexolmo-demo`) is the merged model after {meta['rt_steps']} steps of router training on an equal "
         "mix of the three domains, every other weight frozen. Bold: the best of a column.", ""]
  out += table(rows)
  out += ["", "Opting an owner out masks its router logit before the softmax, which is the same function as the "
          "model without that expert. Before RT the rows \"merged, X opted out\" and \"public + Y\" agree to float "
          "precision; after RT the remaining rows are the jointly retrained ones, so they differ from Y's own.",
          "", "The same owners' experts with the router row learned alongside each expert (`--router learn`, the "
          "paper's choice), against the bundled recipe (`--router fixed`):", ""]
  out += table(ablation)
  out += ["", "The merged model's distance, in nats, to the public model on " + PUBLIC_DOMAIN + " and to the matching "
          "specialist (public + owner) on each owner's domain:", "",
          "| router rows | " + " | ".join(gap[next(iter(gap))]) + " |", "|---|" + "---:|" * len(gap[next(iter(gap))])]
  out += [f"| {v} | " + " | ".join(f"{x:+.3f}" for x in g.values()) + " |" for v, g in gap.items()]
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
  ap.add_argument("--rt-steps", type=int, default=300, help="steps of router training (stage 4)")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  py, t0 = sys.executable, time.time()
  public = a.build / "public"
  if not (public / "config.json").exists():        # 1. the public model, dense, on the public domain only
    run([py, "demo/train.py", "--arch", "olmo2", "--domains", PUBLIC_DOMAIN, "--out", str(public),
         "--work", str(a.build / "public-work"), "--tokenizer", str(a.tokenizer), "--steps", str(a.public_steps),
         "--seed", str(a.seed)] + [x for s in PUBLIC_ARCH for x in ("--set", s)])
  built = {}
  for router in ROUTERS:                            # 2. each owner's expert, against the frozen public model
    for owner in OWNERS:
      if not (a.build / router / owner / "config.json").exists():
        run([py, "flexolmo.py", "train-expert", "--public", str(public), "--data", str(a.data / f"{owner}.train.txt"),
             "--public-data", str(a.data / f"{PUBLIC_DOMAIN}.train.txt"), "--out", str(a.build / router / owner),
             "--name", owner, "--steps", str(a.expert_steps), "--lr", str(a.expert_lr), "--seq-len", "64",
             "--batch", "8", "--seed", str(a.seed), "--router", router])
    built[router] = merged = a.build / router / "merged"
    if not (merged / "config.json").exists():      # 3. merge
      run([py, "flexolmo.py", "merge", "--public", str(public), "--out", str(merged)] +
          [x for o in OWNERS for x in ("--expert", f"{o}={a.build / router / o}")])
  merged, chosen = built[ROUTERS[0]], a.build / ROUTERS[0]
  rt = chosen / "merged-rt"
  if not (rt / "config.json").exists():            # 4. router training on proxy data
    run([py, "flexolmo.py", "train-router", "--model", str(merged), "--out", str(rt), "--steps", str(a.rt_steps),
         "--seed", str(a.seed), "--data"] + [str(a.data / f"{d}.train.txt") for d in D.DOMAINS])
  rows = evaluate([("public only", merged, ["public"], None)] + [(f"public + {o}", chosen / o, None, None) for o in OWNERS]
                  + [("merged (all experts)", merged, None, None)]
                  + [(f"merged, {o} opted out", merged, None, [o]) for o in OWNERS]
                  + [(f"{RT} (all experts)", rt, None, None)]
                  + [(f"{RT}, {o} opted out", rt, None, [o]) for o in OWNERS], a.data)
  other = ROUTERS[1]
  ablation = {f"router {ROUTERS[0]}: {n}": r for n, r in rows.items() if n.startswith(("public +", "merged (all"))}
  ablation.update({f"router {other}: {n}": r for n, r in evaluate(
      [(f"public + {o}", a.build / other / o, None, None) for o in OWNERS] + [("merged (all experts)", built[other], None, None)],
      a.data).items()})
  gap = {r: gaps(ablation, rows["public only"], f"router {r}: merged (all experts)", {o: f"router {r}: public + {o}" for o in OWNERS}) for r in ROUTERS}
  gap[f"{ROUTERS[0]}, then RT"] = gaps(rows, rows["public only"], f"{RT} (all experts)", {o: f"public + {o}" for o in OWNERS})
  meta = {"date": time.strftime("%Y-%m-%d"), "public_steps": a.public_steps, "expert_steps": a.expert_steps,
          "expert_lr": a.expert_lr, "expert_batch": "8 x 64 tokens", "router": ROUTERS[0], "rt_steps": a.rt_steps,
          "bundled": RT, "seed": a.seed, "minutes": round((time.time() - t0) / 60, 1)}
  (ROOT / "demo" / "flexolmo_results.json").write_text(json.dumps({"meta": meta, "cross_entropy": rows, "ablation": ablation,
                                                                   "gaps": gap}, indent=1) + "\n")
  (ROOT / "demo" / "RESULTS.md").write_text(results_markdown(rows, ablation, gap, meta))
  tmp = a.out.parent / f".{a.out.name}.partial"     # the bundled copy, with hashes of its files
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(rt, tmp)
  eos = json.loads((tmp / "config.json").read_text())["eos_token_id"]
  (tmp / "generation_config.json").write_text(json.dumps(train.generation_config(eos), indent=2) + "\n")
  train.write_hashes(tmp)
  train.replace_folder(tmp, a.out)
  print(f"wrote {a.out} and demo/RESULTS.md in {meta['minutes']} min")
  return 0

if __name__ == "__main__":
  sys.exit(main())
