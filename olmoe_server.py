"""An OpenAI-compatible HTTP server for OLMoE and FlexOlmo, with each generated token's routing, and a page that
shows it: `python olmoe.py --serve [--model DIR] [--host 127.0.0.1] [--port 8000]` (or `python flexolmo.py --serve`).

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events with
`"stream": true`), and `GET /` (olmoe_server_page.html, the routing explorer). One model, loaded once; requests are
served one at a time (a lock around each generation), since they share the model's KV cache.

Handled: prompt (one string), messages (rendered with the model's chat template; the reply stops at the template's
end-of-turn token or the EOS), max_tokens (max_completion_tokens for chat), temperature (default 1, as OpenAI's),
top_p, top_k (an extension, as vLLM's), seed; a field left out takes the model's generation_config.json value when it
has one (greedy unless do_sample, as transformers reads it; its extra EOS ids stop every reply too), stop (up to 4 strings; the text ends before the first one), n = 1,
stream and stream_options.include_usage, usage counts, finish_reason "stop" or "length". Extensions: `"routing":
true` adds to each choice (and each streamed chunk) `routing`, per generated token a list over layers of
{"experts": [ids], "weights": [...]} (FlexOlmo: and "names"), with `routing_tokens`, each token's {"id", "text"};
FlexOlmo: `"experts": [names]` or `"opt_out": [names]` masks experts for that request (the model's mask is restored
afterwards). Every generated token counts in completion_tokens and has routing, the final EOS or end-of-turn one too.

Not handled: batches (a list of prompts, n > 1, best_of), logprobs, echo, suffix, tools and function calls,
penalties, logit_bias, token-id prompts, images; they are refused with a 400 error, and unknown fields are ignored.
Bad requests get an OpenAI-style error object ({"error": {"message", "type", "param", "code"}}) with a 4xx status
and the server goes on serving. No authentication: the server binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations
import argparse, itertools, json, queue, socket, sys, threading, time, uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from olmoe import OlmoeError, Step, generate
from olmoe_tokenizer import TextStream

PAGE = Path(__file__).resolve().parent / "olmoe_server_page.html"
MAX_BODY = 1 << 20            # bytes of request JSON; far beyond any prompt that fits a context
MAX_STOPS = 4                 # OpenAI's limit on stop strings


class RequestError(Exception):
  """A request the server refuses: its HTTP status and the OpenAI error object's fields."""
  def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.code, self.param, self.kind = status, code, param, kind

  def body(self) -> dict:
    return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
  """A checked completion request: everything generation needs."""
  chat: bool
  prompt: str | None
  messages: list | None
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  seed: int | None
  stop: list[str]
  stream: bool
  include_usage: bool
  routing: bool
  experts: list | None
  opt_out: list | None


@dataclass
class Piece:
  """What one generated token adds to a choice: text (possibly empty: held back for a stop string or an incomplete
  UTF-8 character), the token and its routing, and the finish reason on the last piece."""
  text: str
  token: int | None = None
  routing: list | None = None
  finish: str | None = None


def field(body: dict, name: str, kinds: tuple, default, check: Callable[[object], bool] = lambda v: True,
          need: str = ""):
  """body[name] if present and not null, of one of the Python `kinds` (bool is never a number) and passing `check`,
  else `default`; anything else is a 400 naming the field."""
  v = body.get(name)
  if v is None: return default
  numeric = any(k in (int, float) for k in kinds)
  if not isinstance(v, kinds) or (numeric and isinstance(v, bool)) or not check(v):
    raise RequestError(f"{name}: {v!r} is not {need or ' or '.join(k.__name__ for k in kinds)}", param=name,
                       code="invalid_value")
  return v

def parse_request(body, chat: bool, defaults: dict | None = None) -> Request:
  """Check a /v1/completions (chat=False) or /v1/chat/completions body; a RequestError names the first bad field.
  `defaults` (the model's generation_config.json, as olmoe_cli.generation_config reads it) stand in for the sampling
  fields a request leaves out, before OpenAI's own defaults."""
  d = defaults or {}
  if not isinstance(body, dict): raise RequestError("the request body must be a JSON object", code="invalid_json")
  refused = {"n": lambda v: v != 1, "best_of": lambda v: v != 1, "logprobs": bool, "top_logprobs": bool,
             "echo": bool, "suffix": bool, "tools": bool, "functions": bool, "logit_bias": bool,
             "presence_penalty": bool, "frequency_penalty": bool}
  for name, used in refused.items():
    if body.get(name) is not None and used(body[name]):
      raise RequestError(f"{name}: {body[name]!r} is not supported by this server", param=name, code="unsupported")
  prompt = messages = None
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RequestError("messages: a non-empty list of {'role': ..., 'content': ...} is required", param="messages")
    for m in messages:
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise RequestError("messages: each message needs a string 'role' and a string 'content'", param="messages")
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str): prompt = prompt[0]
    if not isinstance(prompt, str): raise RequestError("prompt: one string is required (no batches, no token ids)",
                                                       param="prompt")
    if not prompt: raise RequestError("prompt: empty", param="prompt")
  max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
  positive = lambda v: v > 0
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
  if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
    raise RequestError(f"stop: a string or a list of up to {MAX_STOPS} non-empty strings", param="stop")
  names = lambda n: field(body, n, (list,), None, lambda v: all(isinstance(x, (str, int)) for x in v) and v != [],
                          "a non-empty list of expert names")
  options = field(body, "stream_options", (dict,), {})
  return Request(chat, prompt, messages,
                 field(body, max_name, (int,), d.get("max_new_tokens", 16 if not chat else None), positive, "a positive integer"),
                 float(field(body, "temperature", (int, float), d.get("temperature", 0.0 if d else 1.0),
                             lambda v: 0 <= v <= 2, "a number in [0, 2]")),
                 float(field(body, "top_p", (int, float), d.get("top_p", 1.0), lambda v: 0 < v <= 1, "a number in (0, 1]")),
                 field(body, "top_k", (int,), d.get("top_k", 0), lambda v: v >= 0, "an integer >= 0"),
                 field(body, "seed", (int,), d.get("seed")), stop, field(body, "stream", (bool,), False),
                 bool(options.get("include_usage")), field(body, "routing", (bool,), False),
                 names("experts"), names("opt_out"))


def first_stop(text: str, stops: list[str], start: int) -> int | None:
  """Where the earliest stop string begins in text (looking from `start`), or None."""
  found = [i for s in stops if (i := text.find(s, start)) >= 0]
  return min(found) if found else None

def held_back(text: str, stops: list[str]) -> int:
  """How many characters at the end of text could begin a stop string: they are not sent until the next tokens say."""
  return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


class Service:
  """The model behind the endpoints: turns checked requests into pieces of text with their routing."""
  def __init__(self, model, tok, model_id: str, aliases: tuple[str, ...] = (), defaults: dict | None = None):
    self.model, self.tok, self.model_id, self.defaults = model, tok, model_id, defaults or {}
    self.ids = {model_id, *aliases}
    self.names = model.cfg.names() if hasattr(model.cfg, "names") else None   # FlexOlmo's expert names
    self.lock = threading.Lock()            # one request at a time: generations share the KV cache
    self.jobs: queue.Queue = queue.Queue()

  def run_jobs(self) -> None:
    """Run the requests' generations, one after the other, on the calling thread, which must be the one that loaded
    the model: tinygrad's disk cache is an sqlite connection that only the thread that opened it may use."""
    while (job := self.jobs.get()) is not None: job()

  def on_worker(self, make: Callable[[], Iterator], cancelled: threading.Event) -> Iterator:
    """Iterate make() on the jobs' thread, yielding its items here as they come; its exception is raised here. Once
    `cancelled` is set (the client left), the generation stops after its current item."""
    out: queue.Queue = queue.Queue()
    def job():
      try:
        for item in make():
          out.put((True, item))
          if cancelled.is_set(): break
      except Exception as e: out.put((False, e))
      out.put((False, None))
    self.jobs.put(job)
    while True:
      ok, item = out.get()
      if ok: yield item
      elif item is None: return
      else: raise item

  def answer(self, r: Request) -> Iterator:
    """On the jobs' thread: the prompt's token count, then the pieces of the request's generation, with the request's
    expert mask applied around it (and the model's own restored after)."""
    saved = self.model.expert_mask, self.model.top_k
    try:
      self.select(r)
      try:
        ids = self.prompt_ids(r)
        yield len(ids)
        yield from self.pieces(r, ids)
      except OlmoeError as e: raise RequestError(str(e)) from None     # e.g. a chat template's error, an empty prompt
    finally: self.model.expert_mask, self.model.top_k = saved

  def describe(self) -> dict:
    cfg = self.model.cfg
    return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "olmoe-tinygrad",
            "num_layers": cfg.num_hidden_layers, "num_experts": cfg.num_experts, "experts_per_token": cfg.num_experts_per_tok,
            "context_length": cfg.context_length, "expert_names": self.names}

  def prompt_ids(self, r: Request) -> list[int]:
    ids = self.tok.apply_chat_template(r.messages, add_generation_prompt=True) if r.chat else self.tok.encode(r.prompt)
    if len(ids) > self.model.cfg.context_length - 1:
      raise RequestError(f"the prompt has {len(ids)} tokens; this model's context holds {self.model.cfg.context_length} "
                         f"positions, and at least one must be left to generate", param="prompt" if not r.chat else "messages",
                         code="context_length_exceeded")
    return ids

  def select(self, r: Request) -> None:
    """Apply a request's expert choice (FlexOlmo); the caller restores the model's mask."""
    if r.experts is None and r.opt_out is None: return
    if self.names is None: raise RequestError("experts: this model has no named experts (FlexOlmo has)", param="experts")
    try: self.model.select_experts(r.experts, r.opt_out)
    except OlmoeError as e: raise RequestError(str(e), param="experts", code="unknown_expert") from None

  def routing(self, step: Step) -> list[dict]:
    """One {"experts", "weights"[, "names"]} per layer for the single row of a step."""
    out = []
    for e, w in zip(step.experts[:, 0].tolist(), step.weights[:, 0].tolist()):
      out.append({"experts": e, "weights": w, **({"names": [self.names[i] for i in e]} if self.names else {})})
    return out

  def pieces(self, r: Request, ids: list[int]) -> Iterator[Piece]:
    """Generate for one checked request; the last piece has the finish reason. A prompt that starts with the previous
    request's prompt and reply (a chat's next turn) runs only its new tokens: the weights never change here."""
    cfg = self.model.cfg
    stop_ids = set(cfg.eos_ids) | set(self.defaults.get("eos_ids", ())) | (self.tok.end_of_turn_ids() if r.chat else set())
    stream, text, sent = TextStream(self.tok), "", 0
    longest = max(map(len, r.stop), default=0)
    for step in generate(self.model, [ids], r.max_tokens or cfg.context_length, r.temperature, r.top_k, r.top_p, r.seed,
                         stop_ids=tuple(stop_ids), with_routing=r.routing, reuse_cache=True):
      t = step.tokens[0]
      route = self.routing(step) if r.routing else None
      if t in stop_ids:
        yield Piece(text[sent:] + stream.flush(), t, route, "stop")
        return
      text += stream.push(t)
      if (cut := first_stop(text, r.stop, max(0, sent - longest))) is not None:
        yield Piece(text[sent:cut], t, route, "stop")
        return
      upto = len(text) - held_back(text, r.stop)
      yield Piece(text[sent:upto], t, route)
      sent = upto
    text += stream.flush()
    cut = first_stop(text, r.stop, max(0, sent - longest))
    yield Piece(text[sent:cut], finish="stop" if cut is not None else "length")


class Handler(BaseHTTPRequestHandler):
  server_version = "olmoe-tinygrad"
  service: Service            # set on the subclass that make_server builds

  def log_message(self, format, *args): pass     # quiet: errors are logged by `fail`

  def setup(self):
    super().setup()
    # each streamed token is a small write: send it at once rather than wait to coalesce it with the next (Nagle)
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def send_json(self, status: int, obj) -> None:
    data = json.dumps(obj).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def fail(self, e: RequestError) -> None:
    print(f"[{self.command} {self.path}: {e.status} {e}]", file=sys.stderr, flush=True)
    try: self.send_json(e.status, e.body())
    except OSError: pass                            # the client left

  def do_GET(self):
    if self.path in ("/", "/index.html"):
      data = PAGE.read_bytes()
      self.send_response(200)
      self.send_header("Content-Type", "text/html; charset=utf-8")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    elif self.path == "/v1/models": self.send_json(200, {"object": "list", "data": [self.service.describe()]})
    elif self.path.startswith("/v1/models/") and self.path[len("/v1/models/"):] in self.service.ids:
      self.send_json(200, self.service.describe())
    else: self.fail(RequestError(f"no such endpoint: GET {self.path}", 404, "not_found"))

  def do_POST(self):
    routes = {"/v1/completions": False, "/v1/chat/completions": True}
    try:
      if self.path not in routes: raise RequestError(f"no such endpoint: POST {self.path}", 404, "not_found")
      body = self.read_json()
      if isinstance(body, dict) and body.get("model") is not None and body["model"] not in self.service.ids:
        raise RequestError(f"model {body['model']!r} is not served here (this server has {self.service.model_id!r})",
                           404, "model_not_found", "model")
      self.complete(parse_request(body, routes[self.path], self.service.defaults))
    except RequestError as e: self.fail(e)
    except OSError: pass                            # the client closed the connection mid-answer
    except Exception as e:                          # a bug: one line in the log, a 500 to the client
      self.fail(RequestError(f"internal error: {e.__class__.__name__}: {e}", 500, "internal_error", kind="server_error"))

  def read_json(self):
    try: n = int(self.headers.get("Content-Length", ""))
    except ValueError: raise RequestError("a Content-Length header is required", 411, "length_required") from None
    if not 0 <= n <= MAX_BODY: raise RequestError(f"the request body is over {MAX_BODY} bytes", 413, "too_large")
    try: return json.loads(self.rfile.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      raise RequestError(f"the request body is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})",
                         code="invalid_json") from None

  def complete(self, r: Request) -> None:
    svc, cancelled = self.service, threading.Event()
    with svc.lock:
      items = svc.on_worker(lambda: svc.answer(r), cancelled)
      try:
        answer = Answer(r, svc, next(items))
        first = next(items)                         # the first token: the prompt was accepted, headers can go
        if r.stream: return self.stream(answer, first, items)
        for piece in [first, *items]: answer.add(piece)
      finally:
        cancelled.set()
        items.close()
    self.send_json(200, answer.whole())

  def stream(self, answer: "Answer", first: Piece, pieces: Iterator[Piece]) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.end_headers()
    send = lambda obj: (self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n"), self.wfile.flush())
    if answer.r.chat: send(answer.chunk({"delta": {"role": "assistant", "content": ""}}))
    for piece in itertools.chain([first], pieces):     # each piece as it comes
      answer.add(piece)
      send(answer.chunk(answer.choice_delta(piece)))
    if answer.r.include_usage: send({**answer.chunk(None), "choices": [], "usage": answer.usage()})
    self.wfile.write(b"data: [DONE]\n\n")
    self.wfile.flush()


class Answer:
  """A choice being built from pieces, as a whole response or as stream chunks."""
  def __init__(self, r: Request, svc: Service, prompt_tokens: int):
    self.r, self.svc, self.prompt_tokens = r, svc, prompt_tokens
    self.id = ("chatcmpl-" if r.chat else "cmpl-") + uuid.uuid4().hex
    self.created = int(time.time())
    self.text, self.tokens, self.routing, self.finish = "", [], [], None

  def add(self, piece: Piece) -> None:
    self.text += piece.text
    if piece.token is not None: self.tokens.append(piece.token)
    if piece.routing is not None: self.routing.append(piece.routing)
    self.finish = piece.finish or self.finish

  def usage(self) -> dict:
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
            "total_tokens": self.prompt_tokens + len(self.tokens)}

  def token_info(self, tokens: list[int]) -> list[dict]:
    return [{"id": t, "text": self.svc.tok.decode([t])} for t in tokens]

  def extras(self, piece: Piece | None) -> dict:
    """The routing extension of a choice: the whole answer's (piece None), or one piece's."""
    if not self.r.routing: return {}
    routing, tokens = (self.routing, self.tokens) if piece is None else \
      ([piece.routing] if piece.routing is not None else [], [piece.token] if piece.token is not None else [])
    return {"routing": routing, "routing_tokens": self.token_info(tokens)}

  def chunk(self, choice: dict | None) -> dict:
    obj = "chat.completion.chunk" if self.r.chat else "text_completion"
    return {"id": self.id, "object": obj, "created": self.created, "model": self.svc.model_id,
            "choices": [] if choice is None else [{"index": 0, **choice}]}

  def choice_delta(self, piece: Piece) -> dict:
    content = {"delta": {"content": piece.text}} if self.r.chat else {"text": piece.text, "logprobs": None}
    return {**content, "finish_reason": piece.finish, **self.extras(piece)}

  def whole(self) -> dict:
    if self.r.chat: choice = {"message": {"role": "assistant", "content": self.text}}
    else: choice = {"text": self.text, "logprobs": None}
    obj = "chat.completion" if self.r.chat else "text_completion"
    return {"id": self.id, "object": obj, "created": self.created, "model": self.svc.model_id,
            "choices": [{"index": 0, **choice, "finish_reason": self.finish, **self.extras(None)}], "usage": self.usage()}


def make_server(model, tok, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                aliases: tuple[str, ...] = (), defaults: dict | None = None) -> ThreadingHTTPServer:
  """A server for `model`, not yet serving: call serve_forever (on any thread) and server.service.run_jobs() (on the
  thread that loaded the model). Port 0 picks a free one (server.server_port). `defaults`: see `parse_request`."""
  service = Service(model, tok, model_id, aliases, defaults)
  handler = type("BoundHandler", (Handler,), {"service": service})
  try: server = ThreadingHTTPServer((host, port), handler)
  except OSError as e: raise OlmoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  server.daemon_threads = True
  server.service = service
  return server


def main(prog: str, argv: list[str] | None, load_model: Callable, demo: Path, real: str) -> int:
  """`python PROG --serve [--model DIR] [--host H] [--port N]`: load the model, serve until Ctrl-C.
  `load_model(name, dtype, quantize)` gives (model, tokenizer)."""
  import olmoe_cli
  ap = argparse.ArgumentParser(prog=f"{prog} --serve", description="Serve the model over an OpenAI-compatible API.")
  ap.add_argument("--serve", action="store_true", required=True)
  ap.add_argument("--model", default=None, help="folder with config.json + safetensors + tokenizer.json, or a hub repo id")
  ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
  ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
  olmoe_cli.add_load_options(ap)
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  def run():
    if args.model is None: args.model = olmoe_cli.default_model(demo, real)
    if not 0 <= args.port < 65536: raise OlmoeError(f"--port {args.port}: not a port number")
    dtype = olmoe_cli.prepare_compiler(args.dtype)                       # before the first kernel is compiled
    model, tok = load_model(args.model, dtype, args.quantize)
    if tok is None: raise OlmoeError("the model folder has no tokenizer.json")
    model_id = Path(args.model).name
    from olmoe_checkpoint import resolve_model_dir
    defaults = olmoe_cli.generation_config(resolve_model_dir(args.model))
    server = make_server(model, tok, model_id, args.host, args.port, aliases=(args.model,), defaults=defaults)
    host, port = server.server_address[:2]
    print(f"[serving {model_id} at http://{host}:{port}/ (OpenAI API under /v1); Ctrl-C stops]", file=sys.stderr, flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try: server.service.run_jobs()               # the generations, on this thread: the one that loaded the model
    finally:
      server.shutdown()
      server.server_close()
  return olmoe_cli.exit_code(run)
