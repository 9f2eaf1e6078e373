#!/usr/bin/env python3
"""Weight-only int8 (`--quantize int8`, olmoe_int8.py) against the checkpoint's own dtype: memory, speed, quality.

Checkpoint: make_ckpt.py's `small` shape (D 1024, I 512, E 64, top-8, 8 layers, V 50304; transformers'
OlmoeForCausalLM with its random init, saved by save_pretrained in bf16 and fp32), seen through bench/out/int8-small/
(links to small-bf16's files, plus the demo's tokenizer.json, whose 4096 ids fit the vocabulary, so that the command
line runs on it). Written by make_ckpt.py when absent.

1. Peak RSS of a whole `python olmoe.py --model ... --prompt ... --max-new-tokens 32 --temperature 0` process, with
   and without `--quantize int8` (`/usr/bin/time -v`'s maximum resident set size; each command is run once before,
   unmeasured, so that both find their compiled steps in the caches, as a user's second run does).
2. Decode tok/s, in a fresh process per setting: 32 greedy tokens three times, the last timed (31 tokens / time
   from the first token to the last), with the bytes of the model's weight buffers and the growth of tinygrad's
   allocated memory across the generation (a dequantised full-precision copy of a weight would show there).
3. Quality against the fp32 model of the same weights (small-fp32, and the bundled demo read as fp32), teacher-forced
   on one 128-token sequence (a forward with routing): mean and max |logit difference|, top-1 agreement, and the
   routing flip rate (share of (token, layer) top-k expert sets that differ from fp32's), for bf16, int8 over bf16
   activations (what `--quantize int8` runs on a bf16 checkpoint) and int8 over fp32 activations (the quantisation
   alone).

python bench/int8.py [--skip rss,speed,quality] [--rounds 3]
"""
import argparse, json, re, shutil, statistics, subprocess, sys
from pathlib import Path
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "models" / "olmoe-demo"
PROMPT = "The experts of a mixture are chosen by a router, token by token, and"


def checkpoint() -> Path:
  """bench/out/int8-small: small-bf16's config and weights (linked) with the demo's tokenizer."""
  src, out = HERE / "out" / "small-bf16", HERE / "out" / "int8-small"
  if not (src / "model.safetensors").exists() or not (HERE / "out" / "small-fp32" / "model.safetensors").exists():
    subprocess.run([sys.executable, str(HERE / "make_ckpt.py"), "small"], check=True)
  out.mkdir(parents=True, exist_ok=True)
  for name in ("config.json", "model.safetensors"):
    if not (out / name).exists(): (out / name).symlink_to(src / name)
  shutil.copy(DEMO / "tokenizer.json", out / "tokenizer.json")
  return out


def peak_rss_mib(folder: Path, quantize: bool) -> float:
  cmd = [sys.executable, str(ROOT / "olmoe.py"), "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "32",
         "--temperature", "0", *(["--quantize", "int8"] if quantize else [])]
  subprocess.run(cmd, check=True, capture_output=True)                          # warms the caches, unmeasured
  r = subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, capture_output=True, text=True)
  return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1]) / 1024


SPEED = """
NAMES = {"signed char": "int8", "__bf16": "bf16", "float": "fp32", "half": "fp16"}   # tinygrad's names are C's
import json, sys, time
sys.path.insert(0, sys.argv[1])
import olmoe_compiler; olmoe_compiler.use_cpu_target()
import olmoe, olmoe_int8
from tinygrad.helpers import GlobalCounters
model, tok = olmoe.load(sys.argv[2], progress=False, quantize=sys.argv[3] or None)
ids = tok.encode(sys.argv[4])
for _ in range(2): list(olmoe.generate(model, [ids], 32, stop_ids=()))
mem = GlobalCounters.mem_used
t = []
for _ in olmoe.generate(model, [ids], 32, stop_ids=()): t.append(time.perf_counter())
print(json.dumps({"tok_s": (len(t) - 1) / (t[-1] - t[0]), "grew_mib": (GlobalCounters.mem_used - mem) / 2**20,
                  "weights_mib": {NAMES.get(k.name, k.name): v / 2**20 for k, v in olmoe_int8.held_bytes(model).items()}}))
"""

def decode(folder: Path, quantize: bool) -> dict:
  r = subprocess.run([sys.executable, "-c", SPEED, str(ROOT), str(folder), "int8" if quantize else "", PROMPT],
                     capture_output=True, text=True)
  if r.returncode: sys.exit(f"decode benchmark failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def quality(fp32: Path, stored: Path, text_tok: Path) -> dict:
  """The comparisons of part 3 on one checkpoint (fp32 copy and stored copy), in this process."""
  import numpy as np
  import olmoe
  from tinygrad import Tensor
  from olmoe_tokenizer import Tokenizer
  ids = Tokenizer.from_file(text_tok / "tokenizer.json").encode((PROMPT + " ") * 16)[:128]
  def run(folder, dtype=None, quantize=None):
    model, _ = olmoe.load(str(folder), dtype, progress=False, quantize=quantize)
    logits, routing = model(Tensor([ids]), return_routing=True)
    out = logits[0].float().numpy(), np.stack([np.sort(i.numpy(), -1) for i in routing.experts])   # (T, V), (L, T, k)
    del model
    return out
  ref_logits, ref_experts = run(fp32, "float32")
  rows = {}
  for name, args in (("bf16", (stored,)), ("int8, bf16 activations", (stored, None, "int8")),
                     ("int8, fp32 activations", (fp32, "float32", "int8"))):
    logits, experts = run(*args)
    d = np.abs(logits - ref_logits)
    rows[name] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "logit_std": float(ref_logits.std()),
                  "top1": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
                  "flip": float((experts != ref_experts).any(-1).mean())}
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--skip", default="", help="comma-separated parts to skip: rss, speed, quality")
  ap.add_argument("--rounds", type=int, default=3, help="decode measurements of each, alternating")
  args = ap.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  sys.path.insert(0, str(ROOT))
  import olmoe_compiler
  olmoe_compiler.use_cpu_target()                  # for this process's kernels and the children's
  folder = checkpoint()
  if "rss" not in skip:
    bf, q = peak_rss_mib(folder, False), peak_rss_mib(folder, True)
    print(f"peak RSS of the whole command: bf16 {bf:.0f} MiB, int8 {q:.0f} MiB ({q / bf:.2f}x; asked <= 0.6x)", flush=True)
  if "speed" not in skip:                         # rounds alternate the two, as the cores are shared
    runs = [(decode(folder, False), decode(folder, True)) for _ in range(args.rounds)]
    bf, q = (min(rs, key=lambda r: abs(r["tok_s"] - statistics.median(x["tok_s"] for x in rs))) for rs in zip(*runs))
    print(f"decode (median of {args.rounds}): bf16 {bf['tok_s']:.1f} tok/s, int8 {q['tok_s']:.1f} tok/s "
          f"({q['tok_s'] / bf['tok_s']:.2f}x; asked >= 1.5x); rounds: "
          + ", ".join(f"{a['tok_s']:.1f}/{b['tok_s']:.1f}" for a, b in runs))
    for name, r in (("bf16", bf), ("int8", q)):
      print(f"  {name}: weight buffers {', '.join(f'{k} {v:.0f} MiB' for k, v in r['weights_mib'].items())}; "
            f"allocated during a generation: {r['grew_mib']:.1f} MiB", flush=True)
  if "quality" not in skip:
    for label, fp32, stored in (("small", HERE / "out" / "small-fp32", folder), ("demo", DEMO, DEMO)):
      for name, r in quality(fp32, stored, folder if label == "small" else DEMO).items():
        print(f"{label:5} {name:24} |logit diff| mean {r['mean_abs']:.4f} max {r['max_abs']:.4f} (fp32 logits' std "
              f"{r['logit_std']:.3f}); top-1 agreement {r['top1']:.3f}; routing flips {r['flip']:.4f}", flush=True)


if __name__ == "__main__":
  main()
