#!/usr/bin/env python3
"""Phases of fresh processes on a checkpoint without a tokenizer (bench/out/real-bf16, written by make_ckpt.py):
import, load, first token, decode of N tokens from 32 fixed random ids, exit; for this checkout and, with `--before
DIR`, another one. Per checkout: a process with a fresh cache folder (cold: it compiles and captures), then
`--rounds` processes with that folder warm. transformers is not run: beside the 12.9 GiB model it does not fit in
24 GiB (bench/README.md).

python bench/startup_real.py bench/out/real-bf16 [--new 32] [--rounds 2] [--before DIR]
"""
import argparse, json, os, random, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, time
t0 = time.time()
folder, n, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
import olmoe, olmoe_cli
t1 = time.time()
dtype = olmoe_cli.prepare_compiler()
model, _ = olmoe.load(folder, dtype, progress=False)
t2 = time.time()
stamps = [time.time() for _ in olmoe.generate(model, [ids], n, stop_ids=())]
print(json.dumps({"import": t1, "load": t2, "first": stamps[0], "last": stamps[-1], "tokens": len(stamps)}), flush=True)
if hasattr(olmoe_cli, "exit_now"): olmoe_cli.exit_now(0)
"""

def phases(checkout: Path, cache: Path, folder: str, n: int, ids: list) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XDG_CACHE_HOME", "CACHEDB")}
  env.update(PYTHONPATH=str(checkout), XDG_CACHE_HOME=str(cache))
  spawn = time.time()
  r = subprocess.run([sys.executable, "-c", WORKER, folder, str(n), json.dumps(ids)], env=env, cwd=checkout,
                     capture_output=True, text=True, timeout=1800)
  end = time.time()
  if r.returncode != 0: raise SystemExit(r.stderr[-3000:])
  s = json.loads(r.stdout.strip().splitlines()[-1])
  return {"import": s["import"] - spawn, "load": s["load"] - s["import"], "first": s["first"] - s["load"],
          "decode": s["last"] - s["first"], "tok_s": (s["tokens"] - 1) / (s["last"] - s["first"]),
          "exit": end - s["last"], "total": end - spawn}

def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("folder")
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--before", type=Path, default=None)
  a = ap.parse_args()
  vocab = json.loads((Path(a.folder) / "config.json").read_text())["vocab_size"]
  r = random.Random(1234)
  ids = [r.randrange(2, vocab) for _ in range(32)]
  tmp = Path(tempfile.mkdtemp(prefix="olmoe-real-"))
  print("| process | import | load | first token | decode (tok/s) | exit | total |\n|---|---|---|---|---|---|---|")
  for name, checkout in [("after", ROOT)] + ([("before", a.before.resolve())] if a.before else []):
    rows = [("cold", phases(checkout, tmp / name, a.folder, a.new, ids))]
    rows += [("warm", phases(checkout, tmp / name, a.folder, a.new, ids)) for _ in range(a.rounds)]
    for kind in ("cold", "warm"):
      ps = [p for k, p in rows if k == kind]
      m = {k: statistics.median(p[k] for p in ps) for k in ps[0]}
      print(f"| {name} {kind} | {m['import']:.2f} | {m['load']:.2f} | {m['first']:.2f} | {m['decode']:.2f} "
            f"({m['tok_s']:.1f}) | {m['exit']:.2f} | {m['total']:.2f} |", flush=True)
  shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
  main()
