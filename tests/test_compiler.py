"""olmoe_compiler and the command line's compiler checks: a missing compiler, a clang without bf16, clang's bf16 hang.

Oracles: clang itself run on the probe kernel with a time limit, and the same weights loaded in fp32 in this process
(with the usual compiler) for the greedy text of a run whose compiler cannot do bf16."""
import json, os, shutil, subprocess, sys
import pytest
from conftest import ROOT, save_hf_olmoe
import olmoe, olmoe_compiler

DEMO = ROOT / "models" / "olmoe-demo"


def run_cli(*args, **env):
  return subprocess.run([sys.executable, str(ROOT / "olmoe.py"), *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=600, env=dict(os.environ, **env))


def test_no_compiler_is_one_line_naming_the_fix(tmp_path):
  ckpt = save_hf_olmoe(tmp_path / "m", seed=1)
  r = run_cli("--model", str(ckpt), "--prompt", "hi", CC=str(tmp_path / "no-such-clang"), DEV="")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no C compiler"), r.stderr
  assert "apt-get install clang" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("clang-14") is None, reason="clang-14 is not installed (.ci/run installs it)")
def test_a_clang_without_bf16_runs_the_bf16_demo_in_fp32(tmp_path):
  """clang 14 has no __bf16 for a freestanding target: the bf16 demo runs in fp32, says so once, and prints the
  greedy text that the same weights in fp32 give here."""
  assert olmoe_compiler._compile(["-march=native"]) != "error"              # the usual compiler does bf16
  env = dict(CC="clang-14", XDG_CACHE_HOME=str(tmp_path / "xdg"), CACHEDB=str(tmp_path / "cache.db"), DEV="")
  r = run_cli("--prompt", "The mixture of experts", "--max-new-tokens", "12", "--temperature", "0", **env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count("cannot compile bf16") == 1 and "Traceback" not in r.stderr
  model, tok = olmoe.load(str(DEMO), dtype="float32", progress=False)
  ids = [s.tokens[0] for s in olmoe.generate(model, [tok.encode("The mixture of experts")], 12)]
  ids = ids[:next((n for n, t in enumerate(ids) if t in model.cfg.eos_ids), len(ids))]
  assert r.stdout == "The mixture of experts" + tok.decode(ids) + "\n"


def test_the_target_is_the_one_clang_finishes_under(tmp_path, monkeypatch):
  """cpu_target() asks for the target exactly on x86 CPUs with AVX512-BF16 (for a clang that takes its flags), without
  waiting on -march=native; under it clang compiles the probe (the zero-fill that hangs clang 19 under -march=native
  on such CPUs) within the time limit. The verdicts are kept and read back; a missing compiler is said as such."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  target = olmoe_compiler.cpu_target()
  x86_bf16 = olmoe_compiler.platform.machine().lower() in ("x86_64", "amd64") and "avx512_bf16" in olmoe_compiler._cpu_flags()
  assert target == (olmoe_compiler.TARGET if x86_bf16 else None)                # clang 19 takes the target's flags
  arch = ["-march=native"] + (["-mno-" + f for f in olmoe_compiler.FEATURES_OFF] if target else [])
  assert olmoe_compiler._compile(arch) == "ok"
  assert olmoe_compiler.compiler() is None                                     # this machine's clang does bf16
  kept = [json.loads(p.read_text()) for p in (tmp_path / "tinygrad").glob("olmoe-clang-*.json")]
  assert kept and all(k.get("bf16") == "ok" and k.get("target", target) == target for k in kept)
  monkeypatch.setenv("CC", str(tmp_path / "no-such-clang"))
  assert olmoe_compiler.compiler() == "missing" and olmoe_compiler.cpu_target() is None


@pytest.mark.skipif(not olmoe_compiler.platform.machine().lower() in ("x86_64", "amd64"), reason="an x86 target")
def test_the_bf16_demo_on_a_cpu_without_bf16_instructions(tmp_path):
  """A laptop CPU without AVX512-BF16 (x86-64-v3: AVX2 and FMA): the bf16 demo compiles with no bf16 instruction and
  no compiler-runtime call, and prints the greedy text that the same weights give here in fp32."""
  env = dict(DEV="CPU:CLANG:x86_64,x86-64-v3", XDG_CACHE_HOME=str(tmp_path / "xdg"), CACHEDB=str(tmp_path / "cache.db"))
  r = run_cli("--prompt", "The mixture of experts", "--max-new-tokens", "12", "--temperature", "0", **env)
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  model, tok = olmoe.load(str(DEMO), dtype="float32", progress=False)
  ids = [s.tokens[0] for s in olmoe.generate(model, [tok.encode("The mixture of experts")], 12)]
  ids = ids[:next((n for n, t in enumerate(ids) if t in model.cfg.eos_ids), len(ids))]
  assert r.stdout == "The mixture of experts" + tok.decode(ids) + "\n"


def test_the_bf16_runtime_rounds_as_torch_does():
  """bf16_runtime()'s __truncsfbf2 (where libgcc_s lacks it) rounds float32 to bf16 as torch does: to nearest, ties
  to even, infinities kept, NaN stays NaN; the library also resolves libgcc_s's own functions."""
  import ctypes, numpy as np, torch
  path = olmoe_compiler.bf16_runtime()
  if path is None: pytest.skip("libgcc_s has __truncsfbf2 (GCC 13 or newer), or not x86-64 Linux: nothing to add")
  lib = ctypes.CDLL(path)
  f = lib.__truncsfbf2
  f.argtypes, f.restype = [ctypes.c_float], ctypes.c_uint32      # the bf16 comes back in xmm0's low 16 bits
  rng = np.random.default_rng(0)
  halfway = (rng.integers(0, 2 ** 16, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)   # exact ties
  x = np.concatenate([rng.standard_normal(2000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 2000),
                      halfway[np.isfinite(halfway)], np.float32([0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, -1e-45])])
  ours = np.array([f(float(v)) & 0xFFFF for v in x], dtype=np.uint16)
  theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
  assert (ours == theirs).all(), x[ours != theirs][:5]
  assert np.isnan(np.uint32((f(float("nan")) & 0xFFFF) << 16).view(np.float32))
  assert hasattr(lib, "__floattidf")
