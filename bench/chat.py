#!/usr/bin/env python3
"""A chat's second turn: time to its first token against the length of the first turn, with the KV cache of the
earlier turn reused (`generate(..., reuse_cache=True)`, what `--chat` does) and without (the whole conversation run
again). Bundled demo model, in-process, after a warm-up of every shape; median of --rounds.

  python bench/chat.py [--rounds 5]
"""
import argparse, statistics, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import olmoe_compiler
olmoe_compiler.use_cpu_target()
import olmoe


def first_token(model, ids, reuse: bool) -> float:
  t0 = time.perf_counter()
  next(iter(olmoe.generate(model, [ids], 1, reuse_cache=reuse)))
  return time.perf_counter() - t0


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=5)
  a = ap.parse_args()
  model, tok = olmoe.load(str(ROOT / "models" / "olmoe-demo"), progress=False)
  text = tok.encode((ROOT / "README.md").read_text())
  turn2 = tok.encode(" And the second question, which is about sixteen tokens long, goes here?")
  print(f"demo model ({model.dtype}), second turn of {len(turn2)} new tokens, median of {a.rounds} rounds")
  print(f"{'first turn':>10} {'reused (ms)':>12} {'run again (ms)':>15}")
  for n in (16, 64, 128, 192):
    first = text[:n]
    conv = first + turn2
    times = {True: [], False: []}
    for r in range(a.rounds + 1):                     # round 0 compiles and captures every shape
      for reuse in (True, False):
        list(olmoe.generate(model, [first], 1, reuse_cache=True))         # the first turn, held in the cache
        t = first_token(model, conv, reuse)
        if r: times[reuse].append(t)
    print(f"{n:>10} {1e3 * statistics.median(times[True]):>12.1f} {1e3 * statistics.median(times[False]):>15.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
