#!/usr/bin/env python3
"""Write the routing figures of the bundled OLMoE demo model, and the numbers behind them, to a folder.

  python demo/figures.py --out docs/figures

Reads models/olmoe-demo and the held-out text samples in demo/samples/ (one file per domain: prose, code, math),
routes every sample token through the model and applies demo/analysis.py:
  routing_<domain>.png       tokens x experts per layer for a short prompt of each domain (colour = router weight)
  load.png                   expert load per layer on all samples, with the uniform line k/E
  coactivation_layer<l>.png  co-activation over all pairs of the top-k, first and last layer
  domains_layer<l>.png       domain specialisation per expert, every layer
  saturation.png             router saturation of training snapshots against the final model
  training.png               the training run's loss terms and the load per expert over training (train_log.json)
  stats.json                 every number above (rounded), for the docs and demo/RESULTS.md

Router saturation needs snapshots of the training run (demo/build/olmoe-demo/step-*, written by demo/train.py,
not committed). When they exist the per-layer saturation is computed and saved to demo/saturation.json (committed);
otherwise that file is read, so the figure can be redrawn from a fresh clone.
"""
from __future__ import annotations
import argparse, json, sys
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
import olmoe                      # noqa: E402
import analysis as A              # noqa: E402

DOMAINS = ("prose", "code", "math")
SAMPLES = ROOT / "demo" / "samples"
SATURATION = ROOT / "demo" / "saturation.json"
PROMPTS = {"prose": "The interpreter reads the file and returns a list of the names it defines.",
           "code": "def add(a, b):\n    return a + b\n",
           "math": "37 + 48 = 85\n12 * 7 = 84\n"}


def sample_windows(tok, domain: str, T: int = 128, n: int = 16) -> np.ndarray:
  """Up to n consecutive (T)-token windows of a domain's held-out sample."""
  ids = tok.encode((SAMPLES / f"{domain}.txt").read_text(encoding="utf-8"))
  n = min(n, len(ids) // T)
  return np.array(ids[: n * T], dtype=np.int32).reshape(n, T)

def domain_tables(model, tok, T: int = 128, n: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """domain -> (token ids (N,), experts (L, N, k)) on the held-out samples."""
  out = {}
  for d in DOMAINS:
    w = sample_windows(tok, d, T, n)
    experts, _ = A.routing_tables(model, w)
    out[d] = (w.reshape(-1), experts)
  return out

def specialisation_stats(tables: dict, E: int, k: int) -> dict:
  """Per layer and domain: the share of the domain's tokens at its favourite expert (vs uniform k/E), and which."""
  L = next(iter(tables.values()))[1].shape[0]
  stats = {"uniform": k / E, "layers": []}
  for l in range(L):
    row = {}
    for d, (ids, ex) in tables.items():
      s = A.domain_specialisation(ex[l], E)
      row[d] = {"top_expert": int(s.argmax()), "share": round(float(s.max()), 3), "vs_uniform": round(float(s.max() / (k / E)), 2),
                "vocab_spec": round(A.vocabulary_specialisation_score(ex[l], ids, E, min_count=5), 3)}
    every = np.concatenate([ex[l] for _, ex in tables.values()])
    row["all"] = {"busiest_vs_uniform": round(A.busiest_ratio(every, E), 2)}
    stats["layers"].append(row)
  return stats

def saturation(model_dir: Path, work: Path, tables: dict, tok) -> dict | None:
  """Top-k and top-1 saturation per layer of each training snapshot against the final model, on all samples."""
  snaps = sorted(work.glob("step-*"))
  if not snaps: return json.loads(SATURATION.read_text()) if SATURATION.exists() else None
  final = np.concatenate([ex for _, ex in tables.values()], axis=1)                       # (L, N, k)
  windows = np.concatenate([sample_windows(tok, d) for d in DOMAINS])
  res = {"steps": [], "total_steps": None, "topk": [], "top1": []}
  log = json.loads((model_dir / "train_log.json").read_text())
  res["total_steps"] = log["steps"]
  for s in snaps:
    m, _ = olmoe.load(str(s), progress=False)
    early, _ = A.routing_tables(m, windows)
    res["steps"].append(int(s.name.split("-")[1]))
    res["topk"].append([round(A.router_saturation(early[l], final[l]), 4) for l in range(final.shape[0])])
    res["top1"].append([round(A.router_saturation_top1(early[l], final[l]), 4) for l in range(final.shape[0])])
  SATURATION.write_text(json.dumps(res, indent=1) + "\n")
  return res

def prompt_routing(model, tok, text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  ids = tok.encode(text)
  experts, weights = A.routing_tables(model, np.array([ids]))
  return [tok.decode([i]) for i in ids], experts, weights

def write_figures(out: Path, model_dir: Path = ROOT / "models" / "olmoe-demo", work: Path | None = None) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  model, tok = olmoe.load(str(model_dir), progress=False)
  E, k, L = model.cfg.num_experts, model.cfg.num_experts_per_tok, model.cfg.num_hidden_layers
  tables = domain_tables(model, tok)
  for d, text in PROMPTS.items():
    toks, ex, w = prompt_routing(model, tok, text)
    A.plot_routing_heatmap(toks, ex, w, E, out / f"routing_{d}.png", f"{d} prompt: router weight of each token's {k} experts")
  every = np.concatenate([ex for _, ex in tables.values()], axis=1)                       # (L, N, k)
  A.plot_load_histogram(np.stack([A.expert_load(every[l], E) for l in range(L)]), k, out / "load.png",
                        "expert load on held-out prose, code and math")
  for l in (0, L - 1):
    A.plot_coactivation(A.coactivation(every[l], E), out / f"coactivation_layer{l}.png", f"co-activation, layer {l}")
  for l in range(L):
    A.plot_domain_specialisation({d: A.domain_specialisation(ex[l], E) for d, (_, ex) in tables.items()}, k,
                                 out / f"domains_layer{l}.png", f"domain specialisation, layer {l}")
  stats = specialisation_stats(tables, E, k)
  if (log := model_dir / "train_log.json").exists(): A.plot_training(json.loads(log.read_text()), out / "training.png")
  sat = saturation(model_dir, work or ROOT / "demo" / "build" / model_dir.name, tables, tok)
  if sat:
    A.plot_saturation(sat["steps"], np.array(sat["topk"]), np.array(sat["top1"]), sat["total_steps"], out / "saturation.png")
    stats["saturation"] = sat
  (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
  return stats

if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", type=Path, required=True)
  ap.add_argument("--model", type=Path, default=ROOT / "models" / "olmoe-demo")
  ap.add_argument("--work", type=Path, default=None, help="folder with the training snapshots step-*")
  a = ap.parse_args()
  s = write_figures(a.out, a.model, a.work)
  for l, row in enumerate(s["layers"]):
    print(f"layer {l}: " + "  ".join(f"{d} e{v['top_expert']} {v['share']:.2f} ({v['vs_uniform']}x)" for d, v in row.items() if d != "all"))
