#!/usr/bin/env python3
"""Time the command a person types first, as whole processes: `python olmoe.py --prompt TEXT --max-new-tokens N`
(or flexolmo.py) beside a short transformers script doing the same greedy generation on the same files, in turn.

Each round runs, in an order that alternates between rounds: our command with a cold cache folder (a new, empty
XDG_CACHE_HOME: tinygrad compiles every kernel and the compiler's verdicts are probed again), our command with the
warm cache folder of this checkout, the transformers script (HF_SCRIPT), and with `--before DIR` the same command of
another checkout, cold and warm, with a cache folder of its own. Each is timed by /usr/bin/time (wall seconds and
peak RSS). Then, with `--phases`, one more process of each kind reports where its time went: interpreter start and
imports (`import`), loading the model and tokenizer (`load`), the first token (`first`), the other tokens
(`decode`), and the time from the last token to the end of the process (`exit`), measured from outside.

python bench/startup.py [--model olmoe|flexolmo] [--rounds 3] [--new 64] [--before DIR] [--phases]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The mixture of experts"

HF_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=n, do_sample=False)
print(prompt + tok.decode(out[0, ids.shape[1]:]))
"""

# the phases of our command, timed inside a process that does what `main` does (olmoe_cli.run_cli's work, without
# printing), with wall-clock stamps so that the parent can add interpreter start and exit
OURS_PHASES = """
import json, sys, time
t0 = time.time()
module, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
import olmoe, olmoe_cli
mod = __import__(module)
t1 = time.time()
dtype = olmoe_cli.prepare_compiler()
model, tok = mod.load(folder, dtype=dtype, progress=False) if module == "olmoe" else mod.load(folder, None, None, dtype, False)
t2 = time.time()
stamps = [time.time() for _ in olmoe.generate(model, [tok.encode(sys.argv[4])], n)]
print(json.dumps({"start": t0, "import": t1, "load": t2, "first": stamps[0], "last": stamps[-1], "tokens": len(stamps)}),
      flush=True)
if hasattr(olmoe_cli, "exit_now"): olmoe_cli.exit_now(0)     # as the command ends, where the checkout has it
"""

HF_PHASES = """
import json, sys, time
t0 = time.time()
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
t1 = time.time()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
t2 = time.time()
class Stamps(TextStreamer):
  def __init__(self): self.t = []
  def put(self, value): self.t.append(time.time())
  def end(self): pass
ids = tok(prompt, return_tensors="pt").input_ids
s = Stamps()
model.generate(ids, max_new_tokens=n, do_sample=False, streamer=s)
# the streamer's first put is the prompt itself
print(json.dumps({"start": t0, "import": t1, "load": t2, "first": s.t[1], "last": s.t[-1], "tokens": len(s.t) - 1}),
      flush=True)
"""


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
  """Wall seconds and peak RSS (GiB) of one process, from /usr/bin/time."""
  with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
    r = subprocess.run(["/usr/bin/time", "-o", f.name, "-f", "%e %M", *cmd], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0: raise SystemExit(f"{cmd} failed:\n{r.stderr[-2000:]}")
    wall, rss = f.read().split()[-2:]
  return {"wall": float(wall), "rss": int(rss) / 2**20, "text": r.stdout}

def phases(cmd: list[str], env: dict, cwd: Path) -> dict:
  """import / load / first / decode / exit seconds of one process (start counted from the parent's spawn)."""
  spawn = time.time()
  r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
  end = time.time()
  if r.returncode != 0: raise SystemExit(f"{cmd} failed:\n{r.stderr[-2000:]}")
  s = json.loads(r.stdout.strip().splitlines()[-1])
  return {"import": s["import"] - spawn, "load": s["load"] - s["import"], "first": s["first"] - s["load"],
          "decode": s["last"] - s["first"], "exit": end - s["last"], "total": end - spawn,
          "decode_tok_s": (s["tokens"] - 1) / max(s["last"] - s["first"], 1e-9)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=["olmoe", "flexolmo"], default="olmoe")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--before", type=Path, default=None, help="another checkout of this repository, timed alongside")
  ap.add_argument("--phases", action="store_true", help="also one process of each kind with its phase breakdown")
  ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache processes")
  a = ap.parse_args()
  folder = str(ROOT / "models" / f"{a.model}-demo")
  tmp = Path(tempfile.mkdtemp(prefix="olmoe-startup-"))
  checkouts = {"after": ROOT} | ({"before": a.before.resolve()} if a.before else {})
  base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XDG_CACHE_HOME", "CACHEDB")}
  def env_for(name: str, cache: Path) -> dict:
    return dict(base, PYTHONPATH=str(checkouts[name]), XDG_CACHE_HOME=str(cache))
  warm = {name: tmp / f"warm-{name}" for name in checkouts}
  cli = lambda name: [sys.executable, f"{a.model}.py", "--prompt", PROMPT, "--max-new-tokens", str(a.new), "--temperature", "0"]
  hf = [sys.executable, "-c", HF_SCRIPT, folder, PROMPT, str(a.new)]
  for name in checkouts: timed(cli(name), env_for(name, warm[name]), checkouts[name])   # fill the warm folders
  timed(hf, dict(base), ROOT)                                                           # and the page cache
  runs: dict[str, list] = {}
  texts = set()
  for r in range(a.rounds):
    kinds = [(n, "warm") for n in checkouts] + ([] if a.no_cold else [(n, "cold") for n in checkouts]) + [("hf", "")]
    for name, kind in (kinds if r % 2 == 0 else kinds[::-1]):
      if name == "hf": out = timed(hf, dict(base), ROOT); label = "transformers"
      else:
        cache = warm[name] if kind == "warm" else tmp / f"cold-{name}-{r}"
        out = timed(cli(name), env_for(name, cache), checkouts[name]); label = f"{name} {kind}"
        if kind == "cold": shutil.rmtree(cache, ignore_errors=True)
      texts.add(out["text"].strip())
      runs.setdefault(label, []).append(out)
      print(f"round {r + 1} {label:14s} {out['wall']:7.2f} s {out['rss']:.2f} GiB", file=sys.stderr, flush=True)
  hf_wall = statistics.median(o["wall"] for o in runs["transformers"])
  print(f"\n{a.model}.py --max-new-tokens {a.new} vs transformers, medians of {a.rounds} rounds"
        f" (load average {os.getloadavg()[0]:.2f} at the end; same text from every process: {len(texts) == 1})\n")
  print("| process | wall (s) | / transformers | peak RSS (GiB) |\n|---|---|---|---|")
  for label, outs in runs.items():
    w = statistics.median(o["wall"] for o in outs)
    print(f"| {label} | {w:.2f} | {w / hf_wall:.2f}x | {statistics.median(o['rss'] for o in outs):.2f} |")
  if a.phases:
    print("\n| process | import | load | first token | decode (tok/s) | exit | total |\n|---|---|---|---|---|---|---|")
    rows = [(f"{n} warm", [sys.executable, "-c", OURS_PHASES, a.model, folder, str(a.new), PROMPT],
             env_for(n, warm[n]), checkouts[n]) for n in checkouts]
    rows.append(("transformers", [sys.executable, "-c", HF_PHASES, folder, PROMPT, str(a.new)], dict(base), ROOT))
    for label, cmd, env, cwd in rows:
      ps = [phases(cmd, env, cwd) for _ in range(a.rounds)]
      m = {k: statistics.median(p[k] for p in ps) for k in ps[0]}
      print(f"| {label} | {m['import']:.2f} | {m['load']:.2f} | {m['first']:.2f} | {m['decode']:.2f} "
            f"({m['decode_tok_s']:.0f}) | {m['exit']:.2f} | {m['total']:.2f} |")
  shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
  main()
