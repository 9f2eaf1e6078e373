"""A check of tinygrad's CPU compiler on this machine, run before the first kernel is compiled.

tinygrad compiles CPU kernels with `clang -march=native`. On x86 CPUs with AVX512-BF16 and AVX10.1 (Intel Sapphire
Rapids and later), clang 19 never finishes some bf16 kernels, e.g. four neighbouring bf16 stores of a constant (the
zero-fill of a bf16 KV cache): it runs until its memory is exhausted. Turning those two CPU features off for the
compiler avoids it; bf16 values are then converted with integer instructions, as on any other CPU.

With those features off (and on every x86 CPU without them), clang turns a bf16 value copied through a register into
a call of the compiler-runtime function `__truncsfbf2`, which tinygrad's loader looks up in libgcc_s: GCC has it
only since version 13 (Debian 12 ships 12), and the kernel then fails to load. `bf16_runtime()` builds, once, a
small library with that one function that links libgcc_s for the rest, and `use_cpu_target()` points tinygrad's
runtime library at it (tinygrad reads its path from RT_PATH).

`cpu_target()` returns the tinygrad device target that avoids the hang on every CPU with those features whose clang
takes its flags (asked once, under the target, where the probe compiles at once: waiting for it to time out under
-march=native would cost a first run seconds), or None elsewhere.
`use_cpu_target()` makes this process's tinygrad use it, unless `DEV` is already set. `compiler()` says whether
there is a compiler at all and whether it can compile bf16 (clang before 19 cannot); the command lines then name the
fix, or run bf16 weights in fp32. This module does not import tinygrad.
"""
from __future__ import annotations
import ctypes, functools, hashlib, json, os, platform, shutil, subprocess, tempfile
from pathlib import Path

PROBE = """void probe(__bf16* restrict out) {
  for (int i = 0; i < 16384; i++) {
    out[4*i+1] = (__bf16)(0.0f); out[4*i+2] = (__bf16)(0.0f); out[4*i+3] = (__bf16)(0.0f); out[4*i] = (__bf16)(0.0f);
  }
}
"""
FEATURES_OFF = ("avx512bf16", "avx10.1-256")      # clang feature names; tinygrad's arch string turns each off
TARGET = "CPU:CLANG:x86_64,native," + ",".join("-" + f for f in FEATURES_OFF)
PROBE_SECONDS = 3.0     # the probe compiles at once under the target; far longer means clang hangs on it

RUNTIME = """typedef unsigned int u32;
typedef unsigned short u16;
__bf16 __truncsfbf2(float f) {            /* float -> bf16, rounded to nearest even; a NaN stays a (quiet) NaN */
  u32 u = __builtin_bit_cast(u32, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __builtin_bit_cast(__bf16, (u16)((u >> 16) | 0x40u));
  return __builtin_bit_cast(__bf16, (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
}
"""

def _cpu_flags() -> set[str]:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"): return set(line.split(":", 1)[1].split())
  except OSError: pass
  return set()

def _compile(args: list[str]) -> str:
  """"ok", "error" (clang refuses the probe: no bf16 in this clang) or "timeout" (clang does not finish it)."""
  cmd = [os.environ.get("CC", "clang"), "-c", "-x", "c", "-O2", "-ffreestanding", "-nostdlib",
         f"--target={platform.machine().lower().replace('amd64', 'x86_64')}-none-unknown-elf", *args, "-", "-o", os.devnull]
  try: return "ok" if subprocess.run(cmd, input=PROBE.encode(), capture_output=True, timeout=PROBE_SECONDS).returncode == 0 else "error"
  except subprocess.TimeoutExpired: return "timeout"
  except OSError: return "error"

@functools.lru_cache(maxsize=None)
def _verdict_file(cc: str, cache_home: str) -> Path | None:
  """The file of verdicts for this compiler (its path and --version) and CPU; asked once per process."""
  try: version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.TimeoutExpired): return None
  key = hashlib.sha256(json.dumps([cc, version, sorted(_cpu_flags())]).encode()).hexdigest()[:16]
  return Path(cache_home).expanduser() / "tinygrad" / f"olmoe-clang-{key}.json"

def _verdict(name: str, probe) -> object:
  """probe()'s result, kept in a small file per compiler and CPU (a read-only folder only costs the probe again)."""
  cache = _verdict_file(shutil.which(os.environ.get("CC", "clang")), os.environ.get("XDG_CACHE_HOME", "~/.cache"))
  if cache is None: return probe()
  try: known = json.loads(cache.read_text())
  except (OSError, ValueError): known = {}
  if not isinstance(known, dict): known = {}
  if name in known: return known[name]
  known[name] = probe()
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f: json.dump(known, f)
    os.replace(tmp, cache)
  except OSError: pass
  return known[name]

def cpu_target() -> str | None:
  """The tinygrad target (a `DEV` value) that avoids clang's bf16 hang on this machine, or None if none is needed:
  on every x86 CPU with AVX512-BF16 whose clang takes the target's flags. Under them the probe compiles at once, so
  only that is asked of clang (kept per compiler and CPU): probing -march=native instead would wait PROBE_SECONDS
  on a first run wherever clang hangs, and the target costs nothing where it does not, since tinygrad converts bf16
  with integer operations. A clang that does not know the flags (clang 14 has no AVX10.1) gets no target."""
  if platform.machine().lower() not in ("x86_64", "amd64") or "avx512_bf16" not in _cpu_flags(): return None
  if shutil.which(os.environ.get("CC", "clang")) is None: return None      # no compiler at all: see compiler()
  flags = ["-march=native"] + ["-mno-" + f for f in FEATURES_OFF]
  return _verdict("target", lambda: TARGET if _compile(flags) == "ok" else None)

def compiler() -> str | None:
  """For tinygrad's CPU device: None when its C compiler is fine, "missing" when there is none, "no-bf16" when it
  cannot compile bf16 (clang before 19 has no `__bf16` for a freestanding target)."""
  if shutil.which(os.environ.get("CC", "clang")) is None: return "missing"
  arch = ["-march=native"] + (["-mno-" + f for f in FEATURES_OFF] if cpu_target() else [])
  return "no-bf16" if _verdict("bf16", lambda: _compile(arch)) == "error" else None

def bf16_runtime() -> str | None:
  """The path of a library that adds `__truncsfbf2` to libgcc_s (built on first use and kept beside the verdicts),
  or None where libgcc_s has it already, or on other than x86-64 Linux, or where it cannot be built."""
  if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"): return None
  try:
    if hasattr(ctypes.CDLL("libgcc_s.so.1"), "__truncsfbf2"): return None
  except OSError: return None
  cc = shutil.which(os.environ.get("CC", "clang"))
  verdicts = _verdict_file(cc, os.environ.get("XDG_CACHE_HOME", "~/.cache")) if cc else None
  if verdicts is None: return None
  lib = verdicts.with_name(verdicts.stem + "-bf16rt.so")
  if lib.exists(): return str(lib)
  try:
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".tmp")
    os.close(fd)
    try:
      r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-x", "c", "-", "-o", tmp, "-l:libgcc_s.so.1"],
                         input=RUNTIME.encode(), capture_output=True, timeout=60)
      if r.returncode != 0: return None
      os.replace(tmp, lib)
    finally: Path(tmp).unlink(missing_ok=True)
  except (OSError, subprocess.TimeoutExpired): return None
  return str(lib)

def use_cpu_target() -> str | None:
  """Unless DEV is set, point this process's tinygrad (and its child processes) at `cpu_target()`; returns it. Also
  gives tinygrad's CPU loader `bf16_runtime()` where libgcc_s lacks `__truncsfbf2` (unless RT_PATH is set)."""
  import sys
  if not os.environ.get("RT_PATH") and (rt := bf16_runtime()) is not None:
    os.environ["RT_PATH"] = rt                     # read when tinygrad's CPU runtime is imported
    if (cpu := sys.modules.get("tinygrad.runtime.ops_cpu")) is not None:   # already imported: its loader's library
      cpu.CPUProgram.rt_lib = type(cpu.CPUProgram.rt_lib)("rt", rt)
  if os.environ.get("DEV") or (target := cpu_target()) is None: return None
  os.environ["DEV"] = target                       # read by tinygrad when it is imported, and by child processes
  if "tinygrad.helpers" in sys.modules:            # already imported: set its DEV for the kernels still to compile
    sys.modules["tinygrad.helpers"].DEV.value = target
  return target
