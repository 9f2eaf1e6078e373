"""The OpenAI-compatible server (olmoe_server.py) and its routing explorer page.

Each server runs as `python olmoe.py --serve --port 0` (or flexolmo.py) in a subprocess and is driven by the official
`openai` client. Oracles: the command line's greedy output for the same prompt, `olmoe.generate(..., with_routing=True)`
run here for the routing, and the openai client's own parsing of the responses and errors."""
import http.client, json, os, re, shutil, subprocess, sys, threading, time
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT
from test_chat import TEMPLATES, chat_tokenizer
import olmoe

openai = pytest.importorskip("openai")
DEMO = ROOT / "models" / "olmoe-demo"
FLEX_DEMO = ROOT / "models" / "flexolmo-demo"
PROMPT = "The mixture of experts"


class Server:
  """A server subprocess; its address comes from the line it prints once it listens."""
  def __init__(self, script: str, model: Path):
    self.proc = subprocess.Popen([sys.executable, str(ROOT / script), "--serve", "--port", "0", "--model", str(model)],
                                 cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    self.log = []
    deadline = time.time() + 120
    while time.time() < deadline:
      line = self.proc.stderr.readline()
      if not line: break
      self.log.append(line)
      if m := re.search(r"serving \S+ at http://([\d.]+):(\d+)/", line):
        self.host, self.port = m[1], int(m[2])
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        return
    self.proc.kill()
    raise RuntimeError("the server did not start:\n" + "".join(self.log))

  @property
  def url(self) -> str: return f"http://{self.host}:{self.port}"

  def client(self, timeout: float = 60):
    return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=timeout, max_retries=0)

  def post(self, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())

  def stop(self) -> None:
    self.proc.terminate()
    try: self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired: self.proc.kill()


@pytest.fixture(scope="module")
def demo_server():
  s = Server("olmoe.py", DEMO)
  yield s
  s.stop()
  assert "Traceback" not in "".join(s.log), "".join(s.log)


@pytest.fixture(scope="module")
def demo_model():
  return olmoe.load(str(DEMO), progress=False)


def cli_text(script: str, model: Path, *args) -> str:
  """What the command line prints after the prompt (greedy), without its final newline."""
  r = subprocess.run([sys.executable, str(ROOT / script), "--model", str(model), "--temperature", "0", *map(str, args)],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  return r.stdout[:-1]


def assert_routing_equal(got: list, steps: list, names: list | None = None) -> None:
  """Server routing (per token, per layer {experts, weights[, names]}) against generate's Steps."""
  assert len(got) == len(steps)
  for layers, step in zip(got, steps):
    assert len(layers) == step.experts.shape[0]
    for l, cell in enumerate(layers):
      assert cell["experts"] == step.experts[l, 0].tolist()
      np.testing.assert_allclose(cell["weights"], step.weights[l, 0], rtol=0, atol=1e-6)
      if names: assert cell["names"] == [names[e] for e in step.experts[l, 0]]


def test_completions_equal_the_command_line_streamed_or_not(demo_server):
  want = cli_text("olmoe.py", DEMO, "--prompt", PROMPT, "--max-new-tokens", 12)[len(PROMPT):]
  client = demo_server.client()
  r = client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=12, temperature=0)
  assert r.choices[0].text == want
  assert r.choices[0].finish_reason == "length"
  from tokenizers import Tokenizer                       # the prompt's length by Hugging Face's tokenizer
  n = len(Tokenizer.from_file(str(DEMO / "tokenizer.json")).encode(PROMPT).ids)
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 12, n + 12)
  chunks = list(client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == want
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].usage.completion_tokens == 12
  assert [m.id for m in client.models.list().data] == ["olmoe-demo"]


def test_stop_strings_end_the_text_before_them(demo_server):
  full = cli_text("olmoe.py", DEMO, "--prompt", PROMPT, "--max-new-tokens", 12)[len(PROMPT):]
  stop = full[5:9]                                       # a piece of the greedy text, not at its start
  want = full[:full.index(stop)]
  client = demo_server.client()
  r = client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "\x00"])
  assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
  chunks = client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True)
  assert "".join(c.choices[0].text for c in chunks) == want


def test_routing_equals_generate(demo_server, demo_model):
  model, tok = demo_model
  steps = list(olmoe.generate(model, [tok.encode(PROMPT)], 6, with_routing=True))
  client = demo_server.client()
  r = client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"routing": True})
  choice = r.choices[0].model_dump()
  assert_routing_equal(choice["routing"], steps)
  assert [t["id"] for t in choice["routing_tokens"]] == [s.tokens[0] for s in steps]
  streamed = [c.choices[0].model_dump() for c in client.completions.create(
    model="olmoe-demo", prompt=PROMPT, max_tokens=6, temperature=0, stream=True, extra_body={"routing": True})]
  assert_routing_equal([cell for c in streamed for cell in c["routing"]], steps)


def test_seeded_sampling_repeats(demo_server):
  client = demo_server.client()
  ask = lambda: client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.95,
                                          seed=7).choices[0].text
  assert ask() == ask()


def test_left_out_fields_take_the_generation_config(demo_server):
  """A request that gives only the prompt samples as the command line does by default: both read the demo's
  generation_config.json (temperature 0.7, top-p 0.9, top-k 50, seed 0, 64 new tokens)."""
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", str(DEMO), "--prompt", PROMPT], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  got = demo_server.client().completions.create(model="olmoe-demo", prompt=PROMPT)
  assert got.choices[0].text == r.stdout[len(PROMPT):-1] and got.usage.completion_tokens <= 64


def test_bad_requests_get_an_error_object_and_the_server_goes_on(demo_server):
  status, body = demo_server.post("/v1/completions", b'{"prompt": "unterminated')
  assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["message"]
  status, body = demo_server.post("/v1/nothing", b"{}")
  assert status == 404 and "error" in body
  client = demo_server.client()
  with pytest.raises(openai.NotFoundError, match="not served here"):
    client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model="olmoe-demo", prompt="word " * 400, max_tokens=2)
  assert e.value.code == "context_length_exceeded"
  for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2}, {"prompt": ""}, {"prompt": [1, 2]},
              {"stop": [""]}, {"extra_body": {"experts": ["public"]}}, {"extra_body": {"routing": "yes"}}):
    kw = {"model": "olmoe-demo", "prompt": PROMPT, "max_tokens": 2, **bad}
    with pytest.raises(openai.BadRequestError): client.completions.create(**kw)
  with pytest.raises(openai.BadRequestError, match="no chat template"):
    client.chat.completions.create(model="olmoe-demo", messages=[{"role": "user", "content": "hi"}])
  want = cli_text("olmoe.py", DEMO, "--prompt", PROMPT, "--max-new-tokens", 4)[len(PROMPT):]
  assert client.completions.create(model="olmoe-demo", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text == want


def test_four_concurrent_requests_are_each_answered(demo_server):
  prompts = [PROMPT, "Experts and routers", "def add(a, b):", "12 + 30 ="]
  want = [cli_text("olmoe.py", DEMO, "--prompt", p, "--max-new-tokens", 8)[len(p):] for p in prompts]
  client, got, errors = demo_server.client(timeout=60), [None] * 4, []
  def ask(i):
    try:
      if i % 2: got[i] = "".join(c.choices[0].text for c in client.completions.create(
        model="olmoe-demo", prompt=prompts[i], max_tokens=8, temperature=0, stream=True))
      else: got[i] = client.completions.create(model="olmoe-demo", prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text
    except Exception as e: errors.append(e)
  start = time.time()
  threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
  for t in threads: t.start()
  for t in threads: t.join(timeout=60)
  assert not errors and time.time() - start < 60
  assert got == want
  assert client.models.list().data[0].id == "olmoe-demo"


def test_chat_completions_equal_the_command_line_chat(tmp_path):
  # the demo model's weights (its kernels are compiled already) with a small tokenizer that has a chat template
  (folder := tmp_path / "chat").mkdir()
  for name in ("config.json", "model.safetensors"): shutil.copy(DEMO / name, folder / name)
  chat_tokenizer(folder, TEMPLATES["tulu"])
  question = "What is a mixture of experts?"
  want = cli_text("olmoe.py", folder, "--chat", "--prompt", question, "--max-new-tokens", 8)
  server = Server("olmoe.py", folder)
  try:
    client, messages = server.client(), [{"role": "user", "content": question}]
    r = client.chat.completions.create(model=folder.name, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=folder.name, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
  finally: server.stop()


def test_flexolmo_experts_are_masked_per_request_and_restored(tmp_path):
  import flexolmo
  model, tok = flexolmo.load(str(FLEX_DEMO), progress=False)
  names, ids = model.cfg.names(), tok.encode("def add")
  full = list(olmoe.generate(model, [ids], 4, with_routing=True))
  model.select_experts(["public", "math"])
  masked = list(olmoe.generate(model, [ids], 4, with_routing=True))
  server = Server("flexolmo.py", FLEX_DEMO)
  try:
    client = server.client()
    ask = lambda **extra: client.completions.create(model="flexolmo-demo", prompt="def add", max_tokens=4, temperature=0,
                                                    extra_body={"routing": True, **extra}).choices[0].model_dump()
    assert_routing_equal(ask(experts=["public", "math"])["routing"], masked, names)
    assert_routing_equal(ask()["routing"], full, names)                  # the mask was the request's only
    with pytest.raises(openai.BadRequestError, match="unknown expert"): ask(experts=["poetry"])
  finally: server.stop()


def chromium() -> str | None:
  return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_the_page_streams_and_draws_the_heatmap(demo_server, tmp_path):
  """Headless Chromium loads the page, submits a prompt, and the heatmap has one cell per generated token and layer."""
  browser = chromium()
  if browser is None: pytest.skip("no chromium on this machine (apt-get install chromium)")
  websocket = pytest.importorskip("websocket", reason="websocket-client drives Chromium's DevTools protocol")
  proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900", "about:blank"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    port_file, deadline = tmp_path / "profile" / "DevToolsActivePort", time.time() + 30
    while not port_file.exists() and time.time() < deadline: time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/json")
    page = next(t for t in json.loads(conn.getresponse().read()) if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
    counter, console_errors = iter(range(1, 10**6)), []
    def call(method, **params):
      n = next(counter)
      ws.send(json.dumps({"id": n, "method": method, "params": params}))
      while True:
        msg = json.loads(ws.recv())
        if msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
          console_errors.append(msg["params"]["args"])
        if msg.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded") and \
           (msg["method"] == "Runtime.exceptionThrown" or msg["params"]["entry"]["level"] == "error"):
          console_errors.append(msg["params"])
        if msg.get("id") == n: return msg.get("result", {})
    evaluate = lambda expr: call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")
    call("Runtime.enable"); call("Log.enable"); call("Page.enable")
    call("Page.navigate", url=demo_server.url + "/")
    deadline = time.time() + 30
    while not evaluate("!!(window.explorer && window.explorer.info)") and time.time() < deadline: time.sleep(0.1)
    evaluate(f"document.getElementById('prompt').value = {json.dumps(PROMPT)}; document.getElementById('max').value = 10;"
             "document.getElementById('go').click()")
    while evaluate("document.body.dataset.state") not in ("done", "error") and time.time() < deadline: time.sleep(0.1)
    state = evaluate("JSON.stringify({state: document.body.dataset.state, tokens: explorer.tokens.length, "
                     "text: explorer.text, cells: document.getElementById('heat').dataset.cells, error: explorer.error, "
                     "bars: document.querySelectorAll('#hist canvas').length})")
    state = json.loads(state)
    shot = call("Page.captureScreenshot", format="png")["data"]
    out = Path(os.environ.get("OLMOE_SCREENSHOT", tmp_path / "page.png"))
    out.write_bytes(__import__("base64").b64decode(shot))
    ws.close()
  finally:
    proc.terminate()
    proc.wait(timeout=10)
  want = cli_text("olmoe.py", DEMO, "--prompt", PROMPT, "--max-new-tokens", 10)[len(PROMPT):]
  assert state["state"] == "done" and state["error"] is None, state
  assert state["text"] == want and state["tokens"] == 10
  assert state["cells"] == str(10 * 4) and state["bars"] == 4                # 4 layers in the demo model
  assert not console_errors, console_errors
