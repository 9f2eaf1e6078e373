#!/usr/bin/env python3
"""Time olmoe.py against transformers' OlmoeForCausalLM on the same checkpoint, alternating, in one run; with
`--before DIR`, also the olmoe.py of another checkout of this repository, so that a before/after comparison is one
command.

Each measurement is a fresh subprocess (`--worker ours|hf`), so peak RSS (VmHWM) and time to first token are per
implementation and per process. Per round: ours with a cold tinygrad kernel cache (a new, empty CACHEDB file in a
folder of its own, and so no olmoe.py program cache beside it), transformers, ours again with the now warm caches;
the order alternates between rounds. With `--before DIR`, each round also runs DIR's olmoe.py ("before"; this
checkout's is "after") cold and then warm, with a cache folder of its own, interleaved with the others (before and
after swap places between rounds). Figures are medians over rounds; prefill, decode, import and load come from the
warm-cache process (cold differs only in compile time).

In a worker: import (timed alone: `import_s`); load (`load_s`, without the import); time to first token = the first
`generate` call up to its first token (prefill + any kernel compilation, model already loaded), and the decode tok/s
of that same call (`decode_first_tok_s`, which includes the capture of the compiled decode step); then `generate` of
64 greedy tokens (EOS ignored) twice, the second one timed (decode tok/s = 63 tokens / time from the first token to
the 64th); then prefill = median of 5 calls of generate with 1 new token on the same 32-token prompt. The ours worker
calls only `olmoe.load(folder, dtype=..., progress=False)` and `olmoe.generate(model, [ids], n, stop_ids=())`, with
the checkout's folder first on sys.path: whatever that olmoe.py turns on by itself is what is timed.
`--before-env KEY=VALUE` sets a variable for the before processes only (`--before . --before-env OLMOE_SPEEDUPS=0`
compares this checkout with and without olmoe_speedups.py).

python bench/run.py small-fp32 [small-bf16 real-bf16 demo] [--rounds 3] [--new 64] [--ours-only] [--before DIR]
                    [--before-env KEY=VALUE]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT_LEN = 32


def prompt_ids(folder: str) -> list[int]:
  """The same 32 random token ids for every run on a checkpoint (below its vocab_size)."""
  import random
  vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
  r = random.Random(1234)
  return [r.randrange(2, vocab) for _ in range(PROMPT_LEN)]

def checkpoint(name: str) -> Path:
  """bench/out/<name> (written by make_ckpt.py), or the bundled demo model for `demo`."""
  return ROOT / "models" / "olmoe-demo" if name == "demo" else HERE / "out" / name

def vm_hwm_gib() -> float:
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM"): return int(line.split()[1]) / 2**20
  return float("nan")

def commit(root: Path) -> str:
  """The checkout's commit, with "-dirty" when its tracked files differ from it ("?" outside git)."""
  r = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                     text=True)
  return r.stdout.strip() if r.returncode == 0 else "?"


def worker_ours(folder: str, dtype: str, new: int, prefill_reps: int, root: str) -> dict:
  sys.path.insert(0, root)
  t0 = time.perf_counter()
  import olmoe
  t1 = time.perf_counter()
  if Path(root).resolve() not in Path(olmoe.__file__).resolve().parents:
    raise RuntimeError(f"imported {olmoe.__file__}, not the olmoe.py in {root}")
  model, _ = olmoe.load(folder, dtype=dtype, progress=False)
  import_s, load_s, ids, out = t1 - t0, time.perf_counter() - t1, prompt_ids(folder), {}
  def run(n):
    t, stamps = time.perf_counter(), []
    for _ in olmoe.generate(model, [ids], n, stop_ids=()): stamps.append(time.perf_counter() - t)
    return stamps
  first = run(new)                                       # cold start: prefill, compile, JIT capture
  out["ttft_s"], out["decode_first_tok_s"] = first[0], (len(first) - 1) / (first[-1] - first[0])
  second = run(new)
  out["decode_tok_s"] = (len(second) - 1) / (second[-1] - second[0])
  out["prefill_s"] = statistics.median(run(1)[0] for _ in range(prefill_reps))
  out["tokens"] = len(second)
  return dict(out, import_s=import_s, load_s=load_s, peak_rss_gib=vm_hwm_gib())


def worker_hf(folder: str, dtype: str, new: int, prefill_reps: int) -> dict:
  t0 = time.perf_counter()
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.generation.streamers import BaseStreamer
  t1 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
  import_s, load_s, ids, out = t1 - t0, time.perf_counter() - t1, torch.tensor([prompt_ids(folder)]), {}
  class Stamps(BaseStreamer):
    def __init__(self): self.t, self.stamps, self.calls = time.perf_counter(), [], 0
    def put(self, value):
      self.calls += 1
      if self.calls > 1: self.stamps.append(time.perf_counter() - self.t)   # the first put is the prompt
    def end(self): pass
  def run(n):
    s = Stamps()
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     streamer=s, pad_token_id=1)
    return s.stamps
  first = run(new)
  out["ttft_s"], out["decode_first_tok_s"] = first[0], (len(first) - 1) / (first[-1] - first[0])
  second = run(new)
  out["decode_tok_s"] = (len(second) - 1) / (second[-1] - second[0])
  out["prefill_s"] = statistics.median(run(1)[0] for _ in range(prefill_reps))
  out["tokens"] = len(second)
  out["torch_threads"] = torch.get_num_threads()
  return dict(out, import_s=import_s, load_s=load_s, peak_rss_gib=vm_hwm_gib())


def weight_gib(folder: Path) -> float:
  return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30

def spawn(kind: str, folder: Path, dtype: str, new: int, reps: int, cachedb: str | None, root: Path = ROOT,
          extra_env: dict[str, str] | None = None) -> dict:
  env = dict(os.environ, **({"CACHEDB": cachedb} if cachedb else {}), **(extra_env or {}))
  cmd = [sys.executable, __file__, "--worker", kind, "--folder", str(folder), "--dtype", dtype, "--new", str(new),
         "--prefill-reps", str(reps), "--root", str(root)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if r.returncode: raise RuntimeError(f"{kind} ({root}) failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])

def load_avg() -> float: return os.getloadavg()[0]

def cpu_target() -> None:
  """Unless DEV is set, set it for every worker to the tinygrad CPU target that this checkout's olmoe_compiler.py
  picks (where clang cannot compile bf16 kernels under -march=native), so that both checkouts compile for the same
  target; a checkout without that module leaves DEV alone."""
  sys.path.insert(0, str(ROOT))
  try: import olmoe_compiler
  except ImportError: return
  finally: sys.path.remove(str(ROOT))
  olmoe_compiler.use_cpu_target()

def round_order(r: int, with_hf: bool, with_before: bool) -> list[str]:
  """The processes of round r, in order. Each implementation's cold process comes before its warm one (which reuses
  the cache it filled); transformers moves from the middle to the front, and before and after swap, every round."""
  if with_before:
    order = (["ours_cold", "before_cold", "hf", "ours_warm", "before_warm"] if r % 2 == 0 else
             ["hf", "before_cold", "ours_cold", "before_warm", "ours_warm"])
  else: order = ["ours_cold", "hf", "ours_warm"] if r % 2 == 0 else ["hf", "ours_cold", "ours_warm"]
  return order if with_hf else [k for k in order if k != "hf"]

METRICS = (("prefill_s", "s"), ("decode_tok_s", "tok/s"), ("decode_first_tok_s", "tok/s"), ("ttft_cold_s", "s"),
           ("ttft_warm_s", "s"), ("import_s", "s"), ("load_s", "s"), ("peak_rss_gib", "GiB"))

def bench(name: str, rounds: int, new: int, reps: int, with_hf: bool = True, before: Path | None = None,
          before_env: dict[str, str] | None = None) -> dict:
  folder = checkpoint(name)
  dtype = "bfloat16" if name.endswith("bf16") or name == "demo" else "float32"
  kinds = ["ours_cold", "hf", "ours_warm"] + (["before_cold", "before_warm"] if before else [])
  runs: dict[str, list[dict]] = {k: [] for k in kinds}
  loads = []
  for r in range(rounds):
    caches = {impl: tempfile.mkdtemp(prefix=f"olmoe-bench-{impl}-") for impl in ("ours", "before")}
    try:
      for kind in round_order(r, with_hf, before is not None):
        impl = kind.split("_")[0]
        loads.append(load_avg())
        res = (spawn("hf", folder, dtype, new, reps, None) if kind == "hf" else
               spawn("ours", folder, dtype, new, reps, os.path.join(caches[impl], "cache.db"),
                     before if impl == "before" else ROOT, before_env if impl == "before" else None))
        runs[kind].append(res)
        print(f"  [{name} round {r + 1}/{rounds}] {kind:11s} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else
              f"{k}={v}" for k, v in res.items()) + f" load1={loads[-1]:.2f}", flush=True)
    finally:
      for d in caches.values(): shutil.rmtree(d, ignore_errors=True)
  def summary_of(impl: str) -> dict:
    """The medians of one olmoe.py (warm process, cold for ttft_cold) or of transformers (impl "hf")."""
    cold, warm = (impl, impl) if impl == "hf" else (f"{impl}_cold", f"{impl}_warm")
    med = lambda kind, key: statistics.median(x[key] for x in runs[kind]) if runs[kind] else float("nan")
    s = {k: med(warm, k) for k in ("prefill_s", "decode_tok_s", "decode_first_tok_s", "import_s", "load_s")}
    s.update(ttft_cold_s=med(cold, "ttft_s"), ttft_warm_s=med(warm, "ttft_s"),
             peak_rss_gib=max((x["peak_rss_gib"] for k in {cold, warm} for x in runs[k]), default=float("nan")))
    return s
  ours, hf = summary_of("ours"), summary_of("hf")
  summary = {"config": name, "rounds": rounds, "commit": commit(ROOT), "dev": os.environ.get("DEV", ""),
             "weights_gib": weight_gib(folder),
             "load1_median": statistics.median(loads), **{k: (ours[k], hf[k]) for k, _ in METRICS}}
  if before: summary.update(before_dir=str(before), before_commit=commit(before), before=summary_of("before"),
                            before_env=before_env or {})
  return summary

def table(rows: list[dict]) -> str:
  """Markdown: olmoe.py against transformers; with a before checkout, before, after and transformers side by side
  (a column of "-" where transformers was not run)."""
  label = lambda key, unit: f"{key.removesuffix('_s').removesuffix('_gib')} ({unit})"
  num = lambda v, fmt=".3f", unit="": "-" if v != v else f"{v:{fmt}}{unit}"      # v != v: NaN, not measured
  if not any("before" in s for s in rows):
    out = ["| config | metric | olmoe.py | transformers | ours / theirs |", "|---|---|---|---|---|"]
    for s in rows:
      for key, unit in METRICS:
        a, b = s[key]
        out.append(f"| {s['config']} | {label(key, unit)} | {num(a)} | {num(b)} | {num(a / b, '.2f', 'x')} |")
      w, (a, b) = s["weights_gib"], s["peak_rss_gib"]
      out.append(f"| {s['config']} | weights (GiB) / median load1 | {w:.2f} | load {s['load1_median']:.2f} "
                 f"| RSS/weights {num(a / w, '.2f')} vs {num(b / w, '.2f')} |")
    return "\n".join(out)
  out = ["| config | metric | before | after | transformers | after / transformers | before / transformers |",
         "|---|---|---|---|---|---|---|"]
  for s in rows:
    for key, unit in METRICS:
      (a, h), b = s[key], s.get("before", {}).get(key, float("nan"))
      out.append(f"| {s['config']} | {label(key, unit)} | {num(b)} | {num(a)} | {num(h)} | {num(a / h, '.2f', 'x')} "
                 f"| {num(b / h, '.2f', 'x')} |")
    w, (a, h), b = s["weights_gib"], s["peak_rss_gib"], s.get("before", {}).get("peak_rss_gib", float("nan"))
    out.append(f"| {s['config']} | peak RSS / weights ({w:.2f} GiB; median load1 {s['load1_median']:.2f}) "
               f"| {num(b / w, '.2f')} | {num(a / w, '.2f')} | {num(h / w, '.2f')} | | |")
  commits = {(s["before_commit"], " ".join(f"{k}={v}" for k, v in s.get("before_env", {}).items()), s["commit"])
             for s in rows if "before" in s}
  return "\n".join(out + [f"\nbefore: {b}{' with ' + e if e else ''}, after: {a}" for b, e, a in sorted(commits)])


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("configs", nargs="*", default=["small-fp32", "small-bf16"])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--prefill-reps", type=int, default=5)
  ap.add_argument("--ours-only", action="store_true", help="skip transformers (it does not fit next to the real-size "
                  "bf16 model in 24 GiB: its peak RSS measured about 2x the weights)")
  ap.add_argument("--before", type=Path, metavar="DIR", help="another checkout of this repository (for example "
                  "`git worktree add /tmp/olmoe-before <commit>`): its olmoe.py is timed too, cold and warm, "
                  "with caches of its own, and the table shows before, after and transformers side by side")
  ap.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable "
                  "for the before processes only; with it, --before may name this checkout itself, e.g. "
                  "`--before . --before-env OLMOE_SPEEDUPS=0` times olmoe.py without its runtime accelerations")
  ap.add_argument("--worker", choices=["ours", "hf"])
  ap.add_argument("--folder"); ap.add_argument("--dtype"); ap.add_argument("--root", default=str(ROOT))
  a = ap.parse_args()
  if a.worker:
    res = worker_ours(a.folder, a.dtype, a.new, a.prefill_reps, a.root) if a.worker == "ours" else \
          worker_hf(a.folder, a.dtype, a.new, a.prefill_reps)
    print(json.dumps(res))
    sys.exit(0)
  if a.before is not None:
    a.before = a.before.resolve()
    if not ((a.before / "olmoe.py").is_file() or (a.before / "olmoe" / "__init__.py").is_file()):
      ap.error(f"--before {a.before}: no olmoe.py there")
    if a.before == ROOT and not a.before_env: ap.error("--before names this checkout itself (without --before-env)")
  if any("=" not in kv for kv in a.before_env): ap.error("--before-env takes KEY=VALUE")
  before_env = dict(kv.split("=", 1) for kv in a.before_env)
  cpu_target()
  print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, load {os.getloadavg()}; "
        f"{'after' if a.before else 'olmoe.py at'} {commit(ROOT)}"
        + (f", before {commit(a.before)} ({a.before})" if a.before else "")
        + (f" with {' '.join(a.before_env)}" if a.before_env else "")
        + (f"; DEV={os.environ['DEV']}" if os.environ.get("DEV") else ""), flush=True)
  rows = [bench(c, a.rounds, a.new, a.prefill_reps, not a.ours_only, a.before, before_env) for c in a.configs]
  print(table(rows))
  (HERE / "out").mkdir(exist_ok=True)
  with open(HERE / "out" / "results.jsonl", "a") as f:
    for r in rows: f.write(json.dumps(dict(r, date=time.strftime("%Y-%m-%d %H:%M"))) + "\n")
