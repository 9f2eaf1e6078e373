#!/usr/bin/env python3
"""Time olmoe.py against transformers' OlmoeForCausalLM on the same checkpoint, alternating, in one run.

Each measurement is a fresh subprocess (`--worker ours|hf`), so peak RSS (VmHWM) and time to first token are per
implementation and per process. Per round: ours with a cold tinygrad kernel cache (a new, empty CACHEDB file, and
so no olmoe.py program cache beside it), transformers, ours again with the now warm caches; the order of the three
alternates between rounds. Figures are medians over rounds; "ours" prefill/decode come from the warm-cache
process (cold differs only in compile time).

In a worker: load; time to first token = the first `generate` call up to its first token (prefill + any kernel
compilation, model already loaded); then `generate` of 64 greedy tokens (EOS ignored) twice, the second one timed
(decode tok/s = 63 tokens / time from the first token to the 64th); then prefill = median of 5 calls of generate
with 1 new token on the same 32-token prompt.

python bench/run.py small-fp32 [small-bf16 real-bf16 demo] [--rounds 3] [--new 64] [--ours-only]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
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


def worker_ours(folder: str, dtype: str, new: int, prefill_reps: int) -> dict:
  sys.path.insert(0, str(ROOT))
  t0 = time.perf_counter()
  import olmoe
  model, _ = olmoe.load(folder, dtype=dtype, progress=False)
  load_s, ids, out = time.perf_counter() - t0, prompt_ids(folder), {}
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
  return dict(out, load_s=load_s, peak_rss_gib=vm_hwm_gib())


def worker_hf(folder: str, dtype: str, new: int, prefill_reps: int) -> dict:
  t0 = time.perf_counter()
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.generation.streamers import BaseStreamer
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
  load_s, ids, out = time.perf_counter() - t0, torch.tensor([prompt_ids(folder)]), {}
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
  return dict(out, load_s=load_s, peak_rss_gib=vm_hwm_gib())


def weight_gib(folder: Path) -> float:
  return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30

def spawn(kind: str, folder: Path, dtype: str, new: int, reps: int, cachedb: str | None) -> dict:
  env = dict(os.environ, **({"CACHEDB": cachedb} if cachedb else {}))
  cmd = [sys.executable, __file__, "--worker", kind, "--folder", str(folder), "--dtype", dtype, "--new", str(new),
         "--prefill-reps", str(reps)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if r.returncode: raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])

def load_avg() -> float: return os.getloadavg()[0]


def bench(name: str, rounds: int, new: int, reps: int, with_hf: bool = True) -> dict:
  folder = checkpoint(name)
  dtype = "bfloat16" if name.endswith("bf16") or name == "demo" else "float32"
  runs = {"ours_cold": [], "hf": [], "ours_warm": []}
  loads = []
  for r in range(rounds):
    db = tempfile.mktemp(prefix="tinygrad-cold-", suffix=".db")
    order = ["ours_cold", "hf", "ours_warm"] if r % 2 == 0 else ["hf", "ours_cold", "ours_warm"]
    if not with_hf: order.remove("hf")
    for kind in order:
      loads.append(load_avg())
      res = spawn("hf" if kind == "hf" else "ours", folder, dtype, new, reps, db if kind != "hf" else None)
      runs[kind].append(res)
      print(f"  [{name} round {r + 1}/{rounds}] {kind:9s} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in res.items()) + f" load1={loads[-1]:.2f}", flush=True)
    for p in (db, db + "-journal", db + "-wal", db + "-shm", str(Path(db).with_suffix(".olmoe-programs.pkl"))):
      if os.path.exists(p): os.remove(p)
  med = lambda kind, key: statistics.median(x[key] for x in runs[kind]) if runs[kind] else float("nan")
  o, h = "ours_warm", "hf"
  summary = {
    "config": name, "rounds": rounds, "weights_gib": weight_gib(folder), "load1_median": statistics.median(loads),
    "prefill_s": (med(o, "prefill_s"), med(h, "prefill_s")),
    "decode_tok_s": (med(o, "decode_tok_s"), med(h, "decode_tok_s")),
    "ttft_cold_s": (med("ours_cold", "ttft_s"), med(h, "ttft_s")),
    "ttft_warm_s": (med(o, "ttft_s"), med(h, "ttft_s")),
    "load_s": (med(o, "load_s"), med(h, "load_s")),
    "peak_rss_gib": (max(max(x["peak_rss_gib"] for x in runs[k]) for k in ("ours_cold", "ours_warm")), max((x["peak_rss_gib"] for x in runs[h]), default=float("nan"))),
  }
  return summary

def table(rows: list[dict]) -> str:
  out = ["| config | metric | olmoe.py | transformers | ours / theirs |", "|---|---|---|---|---|"]
  for s in rows:
    for key, unit in (("prefill_s", "s"), ("decode_tok_s", "tok/s"), ("ttft_cold_s", "s"), ("ttft_warm_s", "s"),
                      ("load_s", "s"), ("peak_rss_gib", "GiB")):
      a, b = s[key]
      out.append(f"| {s['config']} | {key.removesuffix('_s').removesuffix('_gib')} ({unit}) | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    out.append(f"| {s['config']} | weights (GiB) / median load1 | {s['weights_gib']:.2f} | load {s['load1_median']:.2f} | "
               f"RSS/weights {s['peak_rss_gib'][0] / s['weights_gib']:.2f} vs {s['peak_rss_gib'][1] / s['weights_gib']:.2f} |")
  return "\n".join(out)


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("configs", nargs="*", default=["small-fp32", "small-bf16"])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--prefill-reps", type=int, default=5)
  ap.add_argument("--ours-only", action="store_true", help="skip transformers (it does not fit next to the real-size "
                  "bf16 model in 24 GiB: its peak RSS measured about 2x the weights)")
  ap.add_argument("--worker", choices=["ours", "hf"])
  ap.add_argument("--folder"); ap.add_argument("--dtype")
  a = ap.parse_args()
  if a.worker:
    fn = worker_ours if a.worker == "ours" else worker_hf
    print(json.dumps(fn(a.folder, a.dtype, a.new, a.prefill_reps)))
    sys.exit(0)
  print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
  rows = [bench(c, a.rounds, a.new, a.prefill_reps, not a.ours_only) for c in a.configs]
  print(table(rows))
  (HERE / "out").mkdir(exist_ok=True)
  with open(HERE / "out" / "results.jsonl", "a") as f:
    for r in rows: f.write(json.dumps(dict(r, date=time.strftime("%Y-%m-%d %H:%M"))) + "\n")
