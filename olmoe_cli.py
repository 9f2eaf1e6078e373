"""The command line shared by `python olmoe.py` and `python flexolmo.py`: options, checks, streamed output.

Bad input (an impossible request, a missing or malformed model folder) ends in one line on stderr and exit code 2,
checked before any model is loaded where it can be.
"""
from __future__ import annotations
import argparse, atexit, contextlib, json, os, signal, sys, threading
from pathlib import Path
from typing import Callable
from olmoe import OlmoeError, Step, generate
from olmoe_int8 import check_quantize
from olmoe_tokenizer import TextStream


def build_parser(prog: str) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog=prog, description="Generate text with a mixture-of-experts language model.")
  ap.add_argument("--prompt", action="append", help="text to continue (repeat for a batch); with --chat, the user's "
                  "turn (repeat for several turns; none: read turns from stdin)")
  ap.add_argument("--chat", action="store_true", help="talk with a chat model through its chat template (Ctrl-D ends)")
  ap.add_argument("--system", default=None, help="with --chat: a system message that opens the conversation")
  ap.add_argument("--model", default=None,
                  help="folder with config.json + safetensors + tokenizer.json, a hub repo id, or a GGUF file (olmoe.py)")
  # sampling: a flag given wins, then the model folder's generation_config.json, then greedy with 64 new tokens
  ap.add_argument("--max-new-tokens", type=int, default=None, help="(default: generation_config.json's, else 64)")
  ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json's)")
  ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = all)")
  ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
  ap.add_argument("--seed", type=int, default=None)
  ap.add_argument("--show-routing", action="store_true", help="print each generated token's experts per layer")
  add_load_options(ap)
  if prog == "olmoe.py":                   # FlexOlmo chooses its experts by name: --experts, --opt-out
    ap.add_argument("--disable-experts", default=None, metavar="IDS", help="comma-separated expert ids no token may use")
  ap.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                  help="route each token to K experts instead of the config's k (not to be confused with --top-k, "
                       "which is sampling's)")
  return ap

def add_load_options(ap: argparse.ArgumentParser) -> None:
  """How the weights are held: --dtype and --quantize (the command lines and `--serve`)."""
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                  help="compute in this dtype (default: the checkpoint's)")
  ap.add_argument("--quantize", default=None, metavar="int8",
                  help="hold the large weights in int8, one scale per output row (olmoe_int8.py); default: as stored")

def check_request(args) -> None:
  """Reject impossible requests before spending time on loading a model (options not given are checked once
  generation_config.json has filled them)."""
  if args.max_new_tokens is not None and args.max_new_tokens <= 0:
    raise OlmoeError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
  if not args.prompt and not args.chat: raise OlmoeError("--prompt TEXT is required (or --chat to talk)")
  if args.system is not None and not args.chat: raise OlmoeError("--system needs --chat")
  if any(not p for p in args.prompt or []): raise OlmoeError("empty prompt")
  check_quantize(getattr(args, "quantize", None))
  if (args.temperature or 0) < 0 or (args.top_k or 0) < 0 or not 0 < (1 if args.top_p is None else args.top_p) <= 1:
    raise OlmoeError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")

def generation_config(folder: Path) -> dict:
  """The sampling defaults of a model folder's generation_config.json, as transformers reads them: greedy unless
  do_sample is true, and then temperature 1, top_k 50 and top_p 1 unless given; max_new_tokens; extra EOS ids; and
  `seed`, this project's own key (transformers ignores it), so that a bundled demo samples the same text every time.
  {} when there is no file; a value of the wrong type or range is one OlmoeError naming the file and the key."""
  path = folder / "generation_config.json"
  if not path.exists(): return {}
  try: spec = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e: raise OlmoeError(f"{path}: unreadable ({e.__class__.__name__})") from None
  if not isinstance(spec, dict): raise OlmoeError(f"{path}: not a JSON object")
  def get(key, kind, ok, default):
    v = spec.get(key)
    if v is None: return default
    if not isinstance(v, kind) or isinstance(v, bool) != (kind is bool) or not ok(v):
      raise OlmoeError(f"{path}: {key} = {v!r} is not a valid value")
    return v
  out = {"seed": get("seed", int, lambda v: v >= 0, None), "eos_ids": ()}
  if (n := get("max_new_tokens", int, lambda v: v > 0, None)) is not None: out["max_new_tokens"] = n
  eos = spec.get("eos_token_id")
  eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
  if eos is not None:
    if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
      raise OlmoeError(f"{path}: eos_token_id = {spec.get('eos_token_id')!r} is not a valid value")
    out["eos_ids"] = tuple(eos)
  if get("do_sample", bool, lambda v: True, False):
    out.update(temperature=get("temperature", (int, float), lambda v: v >= 0, 1.0),
               top_k=get("top_k", int, lambda v: v >= 0, 50), top_p=get("top_p", (int, float), lambda v: 0 < v <= 1, 1.0))
  return out

def sampling(args, folder: Path | None) -> dict:
  """The options generation runs with: flags given, then generation_config.json's, then greedy and 64 tokens."""
  defaults = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "eos_ids": ()}
  defaults.update(generation_config(folder) if folder is not None else {})
  out = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in defaults.items()}
  check_request(argparse.Namespace(**{**vars(args), **out}))
  return out

def prepare_compiler(requested: str | None = None) -> str | None:
  """Before anything is compiled: point tinygrad at a CPU target clang can finish (olmoe_compiler.py); then, on the
  CPU device, one line naming the fix when there is no C compiler, or "float32" (said once) when the compiler
  cannot compile bf16, so that bf16 weights are loaded as fp32. Returns the dtype to load with (None: as stored):
  `requested` (--dtype) where it can be compiled."""
  import olmoe_compiler
  from tinygrad import Device
  olmoe_compiler.use_cpu_target()
  state = olmoe_compiler.compiler()
  try: device = Device.DEFAULT
  except RuntimeError: device = None            # no device opened: the CPU cannot open without its compiler
  if device not in (None, "CPU"): return requested
  if state == "missing":
    raise OlmoeError("no C compiler: tinygrad compiles CPU kernels with clang; install it (Debian/Ubuntu: "
                     "sudo apt-get install clang-19) or name another device with DEV=")
  if state == "no-bf16" and requested == "bfloat16":
    raise OlmoeError("this clang cannot compile bf16 kernels (clang 19 or newer can): drop --dtype bfloat16 to run in fp32")
  if state == "no-bf16" and requested is None:
    print("[this clang cannot compile bf16 kernels: weights are run in fp32 (bf16 ones take twice the memory); "
          "clang 19 or newer runs them in bf16]", file=sys.stderr)
    return "float32"
  return requested

def default_model(demo: Path, real: str) -> str:
  """The bundled demo model when no --model is given (saying so), or a clear error saying how to get one."""
  if not (demo / "config.json").exists():
    raise OlmoeError(f"no model: pass --model DIR (config.json + safetensors + tokenizer.json) or --model {real}")
  print(f"[running the bundled demo model {demo.parent.name}/{demo.name}; for the real one: --model {real}]",
        file=sys.stderr)
  return str(demo)

def show_routing(step: Step, names: list[str] | None = None, row: int = 0) -> str:
  """One line per layer: the token's k experts (ids, or names) with their weights, e.g. `L3   12 .31 | 40 .12 | ...`."""
  name = (lambda e: names[e]) if names else str
  return "\n".join(f"  L{l:<3}" + " | ".join(f"{name(int(e))} {w:.2f}".replace(" 0.", " .") for e, w in
                                             zip(step.experts[l, row], step.weights[l, row])) for l in range(step.experts.shape[0]))

def run_cli(args, model, tok, expert_names: list[str] | None = None, on_step: Callable[[Step], None] | None = None) -> None:
  """Encode the prompts and stream the first one's continuation; other prompts of a batch print at the end.
  `on_step` (e.g. FlexOlmo's attribution) sees every generated step, with its routing."""
  check_request(args)
  if tok is None: raise OlmoeError("the model folder has no tokenizer.json")
  from olmoe_checkpoint import resolve_model_dir
  opts = sampling(args, resolve_model_dir(args.model) if args.model else None)
  route_as_asked(args, model)
  stop = set(model.cfg.eos_ids) | set(opts.pop("eos_ids"))
  if args.chat: return run_chat(args, model, tok, opts, stop, expert_names, on_step)
  prompts = [tok.encode(p) for p in args.prompt]
  streams, texts, done = [TextStream(tok) for _ in prompts], ["" for _ in prompts], [False for _ in prompts]
  print(args.prompt[0], end="", flush=True)
  try:
    with stop_between_tokens() as interrupted:
      for step in generate(model, prompts, **opts, stop_ids=tuple(stop), with_routing=args.show_routing or on_step is not None):
        emit(args, stop, step, streams, texts, done, expert_names)
        if on_step is not None: on_step(step)
        if interrupted.is_set(): raise KeyboardInterrupt
  finally:                                   # also on Ctrl-C: every prompt's text so far
    print(streams[0].flush(), flush=True)
    for p, t, s in list(zip(args.prompt, texts, streams))[1:]: print(f"--- {p}{t}{s.flush()}", flush=True)

def run_chat(args, model, tok, opts: dict, stop: set[int], expert_names: list[str] | None = None,
             on_step: Callable[[Step], None] | None = None) -> None:
  """A conversation: each user turn (the --prompt values in order, else lines read from stdin until Ctrl-D) is
  rendered with the chat template together with the turns before it, and the reply streams until the template's
  end-of-turn token. The KV cache keeps the earlier turns, so a turn costs its own length, not the conversation's."""
  messages = [{"role": "system", "content": args.system}] if args.system else []
  tok.apply_chat_template(messages + [{"role": "user", "content": "hi"}])    # no template: say so before reading
  stop = stop | tok.end_of_turn_ids()
  for text in args.prompt or user_turns():
    messages.append({"role": "user", "content": text})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    stream, said = TextStream(tok), []
    try:
      with stop_between_tokens() as interrupted:
        for step in generate(model, [ids], **opts, stop_ids=tuple(stop), with_routing=args.show_routing or on_step is not None,
                             reuse_cache=True):
          if on_step is not None: on_step(step)
          if step.tokens[0] in stop: break
          said.append(step.tokens[0])
          print(stream.push(step.tokens[0]), end="", flush=True)
          if args.show_routing: print("\n" + show_routing(step, expert_names), flush=True)
          if interrupted.is_set(): raise KeyboardInterrupt
    finally: print(stream.flush(), flush=True)
    messages.append({"role": "assistant", "content": tok.decode(said)})

def user_turns():
  """Lines from stdin, one user turn each (empty ones skipped), with a `> ` prompt when stdin is a terminal."""
  while True:
    if sys.stdin.isatty(): print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line: return                                   # Ctrl-D
    if line.strip(): yield line.rstrip("\n")

def route_as_asked(args, model) -> None:
  """--disable-experts (OLMoE; FlexOlmo has --experts and --opt-out) and --experts-per-token, through the model's
  routing knobs: an expert mask and k."""
  E, n_on = model.cfg.num_experts, model.cfg.num_experts
  if (off := getattr(args, "disable_experts", None)):
    try: ids = sorted({int(x) for x in off.split(",") if x.strip()})
    except ValueError: raise OlmoeError(f"--disable-experts takes expert ids, e.g. 3,17; got {off!r}") from None
    if not ids or ids[0] < 0 or ids[-1] >= E: raise OlmoeError(f"--disable-experts: ids must be in 0..{E - 1}, got {off!r}")
    if len(ids) == E: raise OlmoeError("--disable-experts cannot disable every expert")
    model.enable_experts([e for e in range(E) if e not in ids])
    n_on = E - len(ids)
  if (k := getattr(args, "experts_per_token", None)) is not None:
    if not 0 < k <= n_on: raise OlmoeError(f"--experts-per-token must be in 1..{n_on} (the experts enabled), got {k}")
    model.top_k = k

def emit(args, stop: set[int], step: Step, streams, texts, done, expert_names) -> None:
  """Decode one step's tokens: the first prompt's text goes to stdout now, the others' is kept for the end."""
  for b, t in enumerate(step.tokens):
    if done[b] or t in stop:
      done[b] = True
      continue
    piece = streams[b].push(t)
    texts[b] += piece
    if b == 0: print(piece, end="", flush=True)
  if args.show_routing and not done[0]: print("\n" + show_routing(step, expert_names), flush=True)

@contextlib.contextmanager
def stop_between_tokens():
  """Turn the first Ctrl-C into a request to stop after the current token (the event it yields), so that the interrupt
  never lands inside tinygrad, half-way through building a buffer; a second Ctrl-C interrupts at once."""
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    yield stop                               # only the main thread may handle signals; an ignored Ctrl-C stays ignored
    return
  def first(signum, frame):
    stop.set()
    signal.signal(signal.SIGINT, previous)
  previous = signal.signal(signal.SIGINT, first)
  try: yield stop
  finally: signal.signal(signal.SIGINT, previous)

def exit_code(run: Callable[[], None]) -> int:
  """Run a command: 0 when it succeeds, 2 with one `error: ...` line on stderr when it raises OlmoeError, 130 (the
  shell's code for SIGINT) without a traceback when Ctrl-C stops it."""
  try: run()
  except OlmoeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("[stopped]", file=sys.stderr)
    return 130
  return 0

def exit_now(code: int) -> None:
  """End the command with `code` once its output is flushed and the exit handlers (tinygrad's, the thread pool's)
  have run, without the interpreter's teardown: that frees, one by one, every object of tinygrad's graphs and
  caches, which the process no longer needs; it took longer than the last tokens of a short generation."""
  for stream in (sys.stdout, sys.stderr):
    try: stream.flush()
    except (OSError, ValueError): pass            # a closed pipe: there is no one left to read it
  atexit._run_exitfuncs()
  os._exit(code)
