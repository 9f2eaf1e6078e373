"""Runtime accelerations of tinygrad 0.14.0's CPU backend, used by `olmoe.generate`; the model does not need them.

Written for tinygrad 0.14.0 (`WRITTEN_FOR`), and used only there, only on the CPU device, and only while one of the
project's own compiled steps runs: `import olmoe` and `import olmoe_speedups` change nothing in tinygrad, and after
each step every tinygrad class and global is as it was. With another tinygrad version generation runs on stock
tinygrad and says so once on stderr; `OLMOE_SPEEDUPS=0` (or `enable(False)`) turns them all off. None of them
changes a kernel or an operand, so results are the same bit for bit with and without them (tests/test_speedups.py).
What each gives is measured in bench/README.md ("Runtime accelerations: on and off").

1. Kernel slices at once (`slices_at_once`). tinygrad's compiler cuts a large CPU kernel into one slice per core
   (the slice number `core_id` is a kernel argument, and each slice writes its own part of the output), but the
   CPU runtime calls the slices one after another, so every kernel runs on one core. Here slices 1, 2, ... go to a
   pool of threads while the calling thread runs slice 0; ctypes releases the GIL for the length of each call.
   `THREADS=0`, tinygrad's switch for the slicing, leaves one slice per kernel.
2. Planned replay (`plan_replay`, `PlannedCapturedJit`). To replay a captured TinyJit step, tinygrad resolves again,
   for every kernel on every call, its buffers, launch size and statistics in Python. The plan resolves once what
   does not change between calls: each kernel's program, and for each buffer argument the buffer itself or the call
   input that fills it. Only the project's captured steps are given the planned replay (their class is swapped for
   a subclass); a step with copies, several devices, views of inputs or written inputs keeps tinygrad's replay, and
   so does `DEBUG>=2`, whose per-kernel timings come from it.
3. Lowered-program cache (`ProgramCache`). tinygrad keeps each compiled binary on disk, but lowers every distinct
   kernel graph to C again in each new process (in Python), which is most of a fresh process's time to its first
   token. The lowered programs of the project's steps are kept in a file beside tinygrad's cache database, read
   once per process and written when a generation lowered new ones (to a temporary file, then renamed).
   `CACHELEVEL=0`, tinygrad's switch for its disk caches, turns it off. Only a process that schedules a step reads
   it, and only such a process writes it.
4. Captured-step cache (`StepCache`). A new process would still schedule each step (the tensor graph to kernels, in
   Python), run it once uncaptured and capture it on its second call: seconds before its first token and through its
   first decode steps. The captured steps are kept, one file each, without the weights and KV caches (named by
   position, bound to the model in memory when read), and a new process replays them from its first call; a step
   not in the cache is captured on its first call. `CACHELEVEL=0` turns it off.
"""
from __future__ import annotations
import ctypes, hashlib, importlib.metadata, io, itertools, os, pickle, platform, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

WRITTEN_FOR = "0.14.0"                          # the tinygrad version whose internals this file uses
TINYGRAD = importlib.metadata.version("tinygrad")
try:                                            # private names: a tinygrad that renamed one leaves us switched off
  from tinygrad.engine.jit import CapturedJit, TinyJit
  from tinygrad.engine.realize import get_call_arg_uops, get_runtime
  from tinygrad.helpers import CACHEDB, CACHELEVEL, DEBUG, NUM_CPU_THREADS
  from tinygrad.runtime.ops_cpu import CPUProgram
  from tinygrad.uop.ops import Ops, UOp
  from tinygrad.device import Buffer
  from tinygrad.tensor import Tensor
  import tinygrad.codegen
  _IMPORTED = hasattr(tinygrad.codegen, "to_program_cache")
except ImportError:
  _IMPORTED = False

_enabled = os.environ.get("OLMOE_SPEEDUPS", "1") != "0"
_warned = False

def enable(on: bool = True) -> None:
  """Use the accelerations in the next compiled steps (on) or run stock tinygrad (off)."""
  global _enabled
  _enabled = on

def usable(device: str) -> bool:
  """Whether the accelerations apply to `device`: on, the CPU, and the tinygrad version they were written for."""
  global _warned
  if not _enabled or device.split(":")[0] != "CPU": return False
  if TINYGRAD != WRITTEN_FOR or not _IMPORTED:
    if not _warned:
      print(f"note: olmoe_speedups was written for tinygrad {WRITTEN_FOR} (found {TINYGRAD}); running stock tinygrad",
            file=sys.stderr)
      _warned = True
    return False
  return True


# ============================================ kernel slices at once ============================================

_pool: ThreadPoolExecutor | None = None

def _launch_slices_at_once(stock: Callable) -> Callable:
  """A CPUProgram.__call__ that runs slice 0 on the caller and slices 1.. on the pool; `stock` for anything else."""
  def launch(prg, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False, timeout=None):
    global _pool
    slot = prg.runtimevars.get("core_id")         # position of the slice number among the kernel's arguments
    if prg.lvp or slot is None or global_size[0] == 1:
      return stock(prg, *bufs, global_size=global_size, local_size=local_size, vals=vals, wait=wait, timeout=timeout)
    start, args = time.perf_counter(), [b.va_addr for b in bufs] + list(vals)
    def run(core: int): prg.fxn(*[ctypes.c_uint64(core if j == slot else a) for j, a in enumerate(args)])
    if _pool is None: _pool = ThreadPoolExecutor(max(1, NUM_CPU_THREADS.value - 1), thread_name_prefix="slice")
    others = [_pool.submit(run, core) for core in range(1, global_size[0])]
    run(0)
    for f in others: f.result()
    return time.perf_counter() - start if wait else None
  launch.stock = stock
  return launch

@contextmanager
def slices_at_once() -> Iterator[None]:
  """Inside the block, the per-core slices of tinygrad's CPU kernels run at once; tinygrad's launcher is restored
  at its end (whatever it was: nesting and module reloads are safe)."""
  stock = CPUProgram.__call__
  CPUProgram.__call__ = _launch_slices_at_once(getattr(stock, "stock", stock))
  try: yield
  finally: CPUProgram.__call__ = stock


# =============================================== planned replay ===============================================

def plan_replay(captured: CapturedJit) -> tuple[str, list] | None:
  """(device, [(program, buffer arguments, kernel info)]) for a captured step, a buffer argument being the device
  buffer or the index of the call input that fills it; None unless the step is kernels on one device."""
  plan, devices = [], {call.src[1].device for call in captured.linear.src}
  if len(devices) != 1 or not isinstance(device := devices.pop(), str): return None
  for call in captured.linear.src:
    ast, args = call.src[0], get_call_arg_uops(call)
    if ast.op is not Ops.PROGRAM: return None
    if any(args[j].op is Ops.PARAM for j in ast.arg.outs): return None          # writes an input: copied per call
    bufs = []
    for j in ast.arg.globals:
      if args[j].op is Ops.PARAM: bufs.append(args[j].arg.slot)
      elif Ops.PARAM in {u.op for u in args[j].toposort()}: return None        # a view of an input
      else: bufs.append(args[j].buffer.ensure_allocated().get_buf(device))
    plan.append((get_runtime(device, ast), bufs, ast.arg))
  return device, plan

if _IMPORTED:
  class PlannedCapturedJit(CapturedJit):
    """A captured step replayed from its plan (`replay_plan`): the same programs on the same buffers in the same
    order as tinygrad's replay."""
    replay_plan: tuple[str, list]

    def __call__(self, input_uops: list, var_vals: dict[str, int]):
      if DEBUG >= 2: return super().__call__(input_uops, var_vals)
      device, plan = self.replay_plan
      inputs = [u.buffer.get_buf(device) for u in input_uops]
      for prg, bufs, info in plan:
        global_size, local_size = info.launch_dims(var_vals)
        prg(*[inputs[b] if isinstance(b, int) else b for b in bufs], global_size=global_size, local_size=local_size,
            vals=info.vals(var_vals))
      return self.ret

def use_plan(step) -> None:
  """Once `step` has been captured (TinyJit captures on its second call), replay it from a plan, if it has one."""
  captured = step.captured
  if captured is None or captured.__class__ is not CapturedJit: return
  if (plan := plan_replay(captured)) is not None:
    captured.replay_plan = plan
    captured.__class__ = PlannedCapturedJit


# ============================================ lowered-program cache ============================================

PROGRAM_CACHE_MAX = 2_000      # entries; a larger file reads as empty and is replaced

def program_cache_path() -> Path: return Path(CACHEDB).with_suffix(".olmoe-programs.pkl")

class ProgramCache:
  """The lowered programs of the project's compiled steps, kept in a file across processes. `read` adds the stored
  programs to tinygrad's table; `record` notes which programs a call lowered; `write` stores them with those
  already in the file. A missing, stale (other tinygrad version), oversized or unreadable file reads as empty, and
  a folder that cannot be written costs only speed: a cache must never stop generation."""
  def __init__(self, path: Path | None = None):
    self.path, self.ours, self.stored = path or program_cache_path(), {}, 0

  def _load(self) -> dict:
    if CACHELEVEL.value == 0 or not self.path.exists(): return {}
    try: version, stored = pickle.loads(self.path.read_bytes())
    except Exception: return {}            # noqa: BLE001 -- any failure to unpickle means "no cache"
    if version != TINYGRAD or not isinstance(stored, dict) or len(stored) > PROGRAM_CACHE_MAX: return {}
    return stored

  def read(self) -> int:
    """Add the stored programs to tinygrad's table; returns how many the file held."""
    stored = self._load()
    table = tinygrad.codegen.to_program_cache
    table.update({k: v for k, v in stored.items() if k not in table})
    self.ours.update(stored)
    self.stored = len(stored)
    return len(stored)

  @contextmanager
  def record(self) -> Iterator[None]:
    """Note the programs that tinygrad lowers inside the block as the project's own."""
    table = tinygrad.codegen.to_program_cache
    n = len(table)
    try: yield
    finally:                               # tinygrad only ever adds to its table: the new entries are the last ones
      for key in itertools.islice(reversed(table), len(table) - n): self.ours[key] = table[key]

  def write(self) -> None:
    """Store the project's programs (with those other processes stored meanwhile), if there are new ones."""
    if CACHELEVEL.value == 0 or len(self.ours) <= self.stored: return
    merged = {**self._load(), **self.ours}
    if len(merged) > PROGRAM_CACHE_MAX: merged = dict(self.ours)
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
      try:
        with os.fdopen(fd, "wb") as f: pickle.dump((TINYGRAD, merged), f)
        os.replace(tmp, self.path)
      finally: Path(tmp).unlink(missing_ok=True)
    except OSError: pass                     # a read-only cache folder: nothing is kept, generation goes on
    self.stored = len(self.ours)


# ============================================== captured-step cache ==============================================

STEP_FORMAT = 1              # bumped when the layout of a step file changes
CONSTANT_MAX = 1 << 24       # bytes: a step whose own constant buffers hold more is not kept

def step_cache_dir() -> Path: return Path(CACHEDB).parent / "olmoe-steps"

def _source_digest(*modules) -> str:
  """A digest of the modules' source files: a change to the model's code changes every key."""
  h = hashlib.sha256()
  for m in modules:
    f = getattr(m, "__file__", None)
    h.update(Path(f).read_bytes() if f and Path(f).exists() else repr(m).encode())
  return h.hexdigest()

def _cpu_identity() -> str:
  """The CPU's model and flags: a step's binaries are compiled for this CPU (`-march=native`)."""
  try: lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError: return platform.processor()
  return "|".join(next((l for l in lines if l.startswith(k)), "") for k in ("model name", "flags"))

def _held_buffers(model, B: int) -> list:
  """The base BUFFER uops of the model's weights and its KV caches for batch size B, in an order that is the same in
  every process that loads the same checkpoint: a step file names them by position instead of holding them."""
  tensors = [t for _, t in sorted(model.parameters().items())] + list(model._caches.get(B, []))
  seen: dict = {}
  for t in tensors:
    for u in t.uop.toposort():
      if u.op is Ops.BUFFER and u not in seen: seen[u] = len(seen)
  return list(seen)

def _first_reads(linear) -> set:
  """The base buffers that some kernel of the step reads before any kernel writes them: its constants."""
  written, read_first = set(), set()
  for call in linear.src:
    ast, args = call.src[0], get_call_arg_uops(call)
    if ast.op is not Ops.PROGRAM: raise ValueError("not a kernel")
    bases = lambda j: {u for u in args[j].toposort() if u.op is Ops.BUFFER}
    for j in ast.arg.ins:
      read_first |= bases(j) - written
    for j in ast.arg.outs: written |= bases(j)
  return read_first

class _StepPickler(pickle.Pickler):
  """Pickles a captured step with its buffers named instead of copied: ("held", position) for the model's weights
  and KV caches, ("own", number, dtype, size, device, contents or None) for the step's own buffers, whose number
  in the file is theirs only (tinygrad's buffer numbers are per process)."""
  def __init__(self, f, held: dict, constants: set):
    super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
    self.held, self.constants, self.own = held, constants, {}

  def persistent_id(self, obj):
    if obj.__class__ is Tensor: return ("tensor", obj.uop)
    if isinstance(obj, Buffer): raise ValueError("a device buffer outside a uop")   # would copy its contents
    # a kernel's own registers are BUFFERs too, of no device: they are code, pickled as they are
    if obj.__class__ is not UOp or obj.op is not Ops.BUFFER or obj.arg.device is None: return None
    size, device = obj.src[0].arg, obj.arg.device
    if (i := self.held.get(obj)) is not None: return ("held", i, obj.dtype, size, device)
    content = None
    if obj in self.constants:
      if obj.buffer.nbytes > CONSTANT_MAX: raise ValueError("constant too large to keep")
      content = bytes(obj.buffer.as_memoryview())
    return ("own", self.own.setdefault(obj, len(self.own)), obj.dtype, size, device, content)

class _StepUnpickler(pickle.Unpickler):
  """Reads what `_StepPickler` wrote, binding the named buffers to `held` (the model's, by position) and making each
  of the step's own buffers once, new in this process."""
  def __init__(self, f, held: list):
    super().__init__(f)
    self.held, self.own = held, {}

  def persistent_load(self, pid):
    if pid[0] == "tensor": return Tensor(pid[1])
    if pid[0] == "held":
      _, i, dtype, size, device = pid
      u = self.held[i]
      if u.dtype != dtype or u.arg.device != device or u.src[0].arg != size: raise ValueError("another buffer layout")
      return u
    _, n, dtype, size, device, content = pid
    if (u := self.own.get(n)) is None:
      u = self.own[n] = UOp.new_buffer(device, size, dtype)
      if content is not None: u.buffer.ensure_allocated().copyin(memoryview(bytearray(content)))
    return u

class StepCache:
  """Captured TinyJit steps (a prefill per padded length, the decode step) kept across processes, one file per
  step, so that a new process replays them at once instead of scheduling, lowering and capturing them again.

  A file holds the step's kernels (with their binaries), its memory plan and the buffers it returns, but not the
  model's weights or KV caches: those are named by position and bound, when the file is read, to the buffers of
  the model in memory. The file name is a digest of everything the step depends on (tinygrad's version and
  settings, the device and compile target, the CPU, the model's code, configuration, dtype and buffer layout, the
  step's shapes), so a step is never used for another model, shape, dtype, device or version. An unreadable,
  truncated or mismatching file reads as absent and is replaced; files are written to a temporary name and renamed,
  so two processes writing at once leave one whole file; a folder that cannot be written costs only speed.
  `CACHELEVEL=0` turns it off."""
  def __init__(self, folder: Path | None = None): self.folder = folder or step_cache_dir()

  def key(self, model, kind: str, shape: tuple, device: str) -> str:
    """The name of the step `kind` ("prefill", "decode") of `model` for `shape` (batch size first) on `device`."""
    import tinygrad.helpers
    from tinygrad import Device
    modules = sorted({c.__module__ for c in type(model).__mro__} - {"builtins"})
    if (quantize := getattr(model, "quantize", None)) is not None:        # the code of its weights' expressions
      modules.append("olmoe_gguf" if quantize.startswith("gguf") else "olmoe_int8")
    settings = sorted((k, repr(v.value)) for k, v in tinygrad.helpers.ContextVar._cache.items())
    renderer = Device[device].renderer            # its target, and THREADS, which it reads once (not a setting)
    parts = (STEP_FORMAT, TINYGRAD, sys.version_info[:2], device, str(renderer.target),
             getattr(renderer, "has_threads", None), _cpu_identity(),
             _source_digest(*(sys.modules[m] for m in modules)), type(model).__qualname__, repr(model.cfg),
             str(model.dtype), quantize, kind, shape, settings, [(str(u.dtype), u.src[0].arg) for u in _held_buffers(model, shape[0])])
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

  def path(self, key: str) -> Path: return self.folder / f"{key}.pkl"

  def load(self, model, key: str, B: int) -> CapturedJit | None:
    """The step stored under `key` (for batch size B), bound to `model`'s buffers, or None (no file, another format,
    unreadable or mismatching)."""
    if CACHELEVEL.value == 0: return None
    try: data = self.path(key).read_bytes()
    except OSError: return None
    try:
      fmt, stored_key, (ret, linear, names, info) = _StepUnpickler(io.BytesIO(data), _held_buffers(model, B)).load()
      if fmt != STEP_FORMAT or stored_key != key: return None
      return CapturedJit(ret, linear, names, info)
    except Exception: return None            # noqa: BLE001 -- corrupt or stale: as if there were no file

  def store(self, model, key: str, B: int, captured: CapturedJit) -> bool:
    """Write the step (temporary file, then rename); False where it cannot be kept (nothing is raised)."""
    if CACHELEVEL.value == 0: return False
    try:
      held = {u: i for i, u in enumerate(_held_buffers(model, B))}
      f = io.BytesIO()
      _StepPickler(f, held, _first_reads(captured._linear) - held.keys()).dump(
        (STEP_FORMAT, key, (captured.ret, captured._linear, captured.expected_names, captured.expected_input_info)))
    except Exception: return False           # noqa: BLE001 -- a step this cache cannot hold is simply not kept
    try:
      self.folder.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=key, suffix=".tmp")
      try:
        with os.fdopen(fd, "wb") as out: out.write(f.getvalue())
        os.replace(tmp, self.path(key))
      finally: Path(tmp).unlink(missing_ok=True)
    except OSError: return False             # a read-only cache folder: nothing is kept, generation goes on
    return True


# ================================================ the runner ================================================

class Runner:
  """Runs the project's compiled steps (and the small calls around them) with the accelerations, and makes the steps
  (`step`), taking them from the step cache where it holds them; `finish()` writes the program cache. One per
  process (`runner()`)."""
  def __init__(self):
    self.programs, self.programs_read = ProgramCache(), None    # programs_read: how many the file held, once read
    self.steps = StepCache()

  def step(self, model, kind: str, shape: tuple, fn: Callable, device: str) -> TinyJit:
    """A TinyJit of fn for this model and shape: the stored capture where the step cache has it (replayed from the
    first call), else one that captures on its first call (the kernels it then runs are those of the capture), to
    be stored once captured."""
    jit = TinyJit(fn)
    if CACHELEVEL.value == 0: return jit
    key = self.steps.key(model, kind, shape, device)
    if (captured := self.steps.load(model, key, shape[0])) is not None:
      jit.captured, jit.cnt = captured, 2     # TinyJit's state after its capture
      use_plan(jit)
    else:
      jit.cnt = 1                             # capture on the first call: one scheduling instead of two
      jit.olmoe_store = (model, key, shape[0])
    return jit

  def run(self, fn: Callable, *args) -> Any:
    """fn(*args) with the kernel slices at once. Until fn is a captured step, the programs that the call lowers are
    recorded for the cache; once it is captured, it is stored in the step cache and its replay is planned."""
    if getattr(fn, "captured", None) is not None:
      with slices_at_once(): return fn(*args)
    if hasattr(fn, "captured") and self.programs_read is None:   # read only by a process that schedules a step
      self.programs_read = self.programs.read()
    with slices_at_once(), self.programs.record(): out = fn(*args)
    if getattr(fn, "captured", None) is not None:
      if (pending := getattr(fn, "olmoe_store", None)) is not None:
        self.steps.store(*pending, fn.captured)
        del fn.olmoe_store
      use_plan(fn)
    return out

  def finish(self) -> None:
    """Write the program cache, only in a process that read it (one that scheduled a step): a process whose steps
    all came from the step cache lowers only the small calls around them, and rewrites no file at its exit."""
    if self.programs_read is not None: self.programs.write()

class StockRunner:
  """The same interface on stock tinygrad."""
  def step(self, model, kind: str, shape: tuple, fn: Callable, device: str) -> TinyJit: return TinyJit(fn)
  def run(self, fn: Callable, *args) -> Any: return fn(*args)
  def finish(self) -> None: pass

_runner: Runner | None = None

def runner(device: str) -> Runner | StockRunner:
  """The accelerated runner where `usable(device)`, else the stock one."""
  global _runner
  if not usable(device): return StockRunner()
  if _runner is None: _runner = Runner()
  return _runner
