#!/usr/bin/env python3
"""Quantised weights against the checkpoint's own dtype: memory, speed, quality. The settings: bf16 (as stored),
`--quantize int8` (olmoe_int8.py), and GGUF files (olmoe_gguf.py) of the same weights in Q8_0, Q4_0 and Q4_K, written
by make_gguf.py (llama.cpp's `gguf` package for Q8_0 and Q4_0, plain rounding for Q4_K) and kept beside the checkpoint.

Checkpoints: `--checkpoint small`, make_ckpt.py's small shape (D 1024, I 512, E 64, top-8, 8 layers, V 50304;
transformers' random init in bf16 and fp32), or `--checkpoint real`, the OLMoE-1B-7B shape in bf16 (make_ckpt.py real,
N(0, 0.02) weights), each seen through a folder of links plus the demo's tokenizer.json (its 4096 ids fit the
vocabulary), so that the command line runs on it. Written when absent.

1. Peak RSS of a whole `python olmoe.py --model ... --prompt ... --max-new-tokens 32 --temperature 0` process per
   setting (`/usr/bin/time -v`'s maximum resident set size; each command is run once before, unmeasured, so that all
   find their compiled steps in the caches, as a user's second run does).
2. Decode tok/s, in a fresh process per setting: 32 greedy tokens three times, the last timed (31 tokens / time
   from the first token to the last), with the bytes of the model's weight buffers and the growth of tinygrad's
   allocated memory across the generation (a dequantised full-precision copy of a weight would show there).
3. Quality against the fp32 model of the same weights (small-fp32, and the bundled demo read as fp32), teacher-forced
   on one 128-token sequence (a forward with routing): mean and max |logit difference|, top-1 agreement, and the
   routing flip rate (share of (token, layer) top-k expert sets that differ from fp32's), for bf16, int8 over bf16
   activations (what `--quantize int8` runs on a bf16 checkpoint), int8 over fp32 activations (the quantisation
   alone) and the GGUF types (fp32 activations; the demo's rows of 128 take no K-quant, whose blocks are 256).

python bench/quant.py [--checkpoint small|real] [--settings bf16,int8,Q8_0,Q4_0,Q4_K] [--skip rss,speed,quality] [--rounds 3]
"""
import argparse, json, re, shutil, statistics, subprocess, sys
from pathlib import Path
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "models" / "olmoe-demo"
PROMPT = "The experts of a mixture are chosen by a router, token by token, and"


GGUF = ("Q8_0", "Q4_0", "Q4_K")

def checkpoint(name: str) -> Path:
  """bench/out/<name>-cli: the bf16 checkpoint's config and weights (linked) with the demo's tokenizer."""
  src = HERE / "out" / {"small": "small-bf16", "real": "real-bf16"}[name]
  if not (src / "config.json").exists() or (name == "small" and not (HERE / "out" / "small-fp32" / "config.json").exists()):
    subprocess.run([sys.executable, str(HERE / "make_ckpt.py"), name], check=True)
  out = HERE / "out" / f"{name}-cli"
  out.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.suffix in (".json", ".safetensors") and f.name != "tokenizer.json" and not (out / f.name).exists():
      (out / f.name).symlink_to(f)
  shutil.copy(DEMO / "tokenizer.json", out / "tokenizer.json")
  return out

def gguf_folder(folder: Path, kind: str) -> Path:
  """bench/out/<folder's name>-<kind>/: the checkpoint as a GGUF file of that type (written once) beside the same
  tokenizer.json."""
  out = HERE / "out" / f"{folder.name}-{kind}"
  if not (out / "model.gguf").exists():
    out.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "make_gguf.py"), str(folder), str(out / "model.gguf"), "--type", kind], check=True)
  shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")
  return out

def setting(folder: Path, name: str) -> tuple[Path, str | None]:
  """(model path, --quantize value) of a setting."""
  if name in GGUF: return gguf_folder(folder, name), None
  return folder, "int8" if name == "int8" else None


def peak_rss_mib(model: Path, quantize: str | None) -> float:
  cmd = [sys.executable, str(ROOT / "olmoe.py"), "--model", str(model), "--prompt", PROMPT, "--max-new-tokens", "32",
         "--temperature", "0", *(["--quantize", quantize] if quantize else [])]
  subprocess.run(cmd, check=True, capture_output=True)                          # warms the caches, unmeasured
  r = subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, capture_output=True, text=True)
  return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1]) / 1024


SPEED = """
NAMES = {"signed char": "int8", "unsigned char": "uint8", "__bf16": "bf16", "float": "fp32", "half": "fp16"}   # tinygrad's names are C's
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

def decode(model: Path, quantize: str | None) -> dict:
  r = subprocess.run([sys.executable, "-c", SPEED, str(ROOT), str(model), quantize or "", PROMPT],
                     capture_output=True, text=True)
  if r.returncode: sys.exit(f"decode benchmark failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def quality(fp32: Path, stored: Path, text_tok: Path, kinds: list[str]) -> dict:
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
                     ("int8, fp32 activations", (fp32, "float32", "int8")),
                     *((f"GGUF {k}", (gguf_folder(fp32, k),)) for k in kinds)):
    logits, experts = run(*args)
    d = np.abs(logits - ref_logits)
    rows[name] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "logit_std": float(ref_logits.std()),
                  "top1": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
                  "flip": float((experts != ref_experts).any(-1).mean())}
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", default="small", choices=["small", "real"])
  ap.add_argument("--settings", default="bf16,int8," + ",".join(GGUF), help="comma-separated: bf16, int8, " + ", ".join(GGUF))
  ap.add_argument("--skip", default="", help="comma-separated parts to skip: rss, speed, quality")
  ap.add_argument("--rounds", type=int, default=3, help="decode measurements of each, alternating")
  args = ap.parse_args()
  skip, names = set(filter(None, args.skip.split(","))), args.settings.split(",")
  sys.path.insert(0, str(ROOT))
  import olmoe_compiler
  olmoe_compiler.use_cpu_target()                  # for this process's kernels and the children's
  folder = checkpoint(args.checkpoint)
  where = {n: setting(folder, n) for n in names} if {"rss", "speed"} - skip else {}   # writes the GGUF files once
  if "rss" not in skip:
    rss = {n: peak_rss_mib(*where[n]) for n in names}
    print(f"peak RSS of the whole command ({args.checkpoint}): " + ", ".join(
      f"{n} {v:.0f} MiB ({v / rss[names[0]]:.2f}x)" for n, v in rss.items()), flush=True)
  if "speed" not in skip:                         # rounds alternate the settings, as the cores are shared
    runs = [[decode(*where[n]) for n in names] for _ in range(args.rounds)]
    med = [min(rs, key=lambda r: abs(r["tok_s"] - statistics.median(x["tok_s"] for x in rs))) for rs in zip(*runs)]
    print(f"decode tok/s ({args.checkpoint}, median of {args.rounds}): " + ", ".join(
      f"{n} {r['tok_s']:.1f} ({r['tok_s'] / med[0]['tok_s']:.2f}x)" for n, r in zip(names, med))
      + "; rounds: " + "; ".join("/".join(f"{r['tok_s']:.1f}" for r in rnd) for rnd in runs))
    for n, r in zip(names, med):
      print(f"  {n}: weight buffers {', '.join(f'{k} {v:.0f} MiB' for k, v in r['weights_mib'].items())}; "
            f"allocated during a generation: {r['grew_mib']:.1f} MiB", flush=True)
  if "quality" not in skip:
    small = checkpoint("small")
    for label, fp32, stored, kinds in (("small", HERE / "out" / "small-fp32", small, [k for k in GGUF if k in names]),
                                       ("demo", DEMO, DEMO, [k for k in GGUF if k in names and not k.endswith("_K")])):
      if label == "small": shutil.copy(DEMO / "tokenizer.json", fp32 / "tokenizer.json")
      for name, r in quality(fp32, stored, small if label == "small" else DEMO, kinds).items():
        print(f"{label:5} {name:24} |logit diff| mean {r['mean_abs']:.4f} max {r['max_abs']:.4f} (fp32 logits' std "
              f"{r['logit_std']:.3f}); top-1 agreement {r['top1']:.3f}; routing flips {r['flip']:.4f}", flush=True)


if __name__ == "__main__":
  main()
