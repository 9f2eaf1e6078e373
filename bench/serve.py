#!/usr/bin/env python3
"""The OpenAI-compatible server (olmoe_server.py) on the demo model: requests per second and time to the first
streamed token with 1 and 4 concurrent clients, and the server's overhead against `olmoe.generate` run in this process
for the same greedy prompt.

The server runs as `python olmoe.py --serve --port 0` in a subprocess; clients speak plain HTTP (http.client), so the
figures hold no client library's cost. A request streams `--new` tokens from a fixed prompt, greedy; the first
request of each kind is a warm-up and is not counted. Requests are served one at a time, so 4 clients share the
same throughput and wait in turn: their time to first token includes the queue.

python bench/serve.py [--model models/olmoe-demo] [--new 32] [--requests 16]
"""
import argparse, http.client, json, re, statistics, subprocess, sys, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "The mixture of experts"


def start_server(model: Path) -> tuple[subprocess.Popen, int]:
  proc = subprocess.Popen([sys.executable, str(ROOT / "olmoe.py"), "--serve", "--port", "0", "--model", str(model)],
                          cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  for line in proc.stderr:
    if m := re.search(r"serving \S+ at http://[\d.]+:(\d+)/", line):
      threading.Thread(target=proc.stderr.read, daemon=True).start()   # keep draining: a full pipe would block it
      return proc, int(m[1])
  raise SystemExit("the server did not start")

def stream_request(port: int, new: int, stream: bool = True) -> tuple[float, float, str]:
  """(seconds to the first streamed token, seconds to the end, text) of one greedy completion."""
  body = json.dumps({"prompt": PROMPT, "max_tokens": new, "temperature": 0, "stream": stream}).encode()
  start = time.perf_counter()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
  conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
  r = conn.getresponse()
  if not stream:
    text = json.loads(r.read())["choices"][0]["text"]
    return float("nan"), time.perf_counter() - start, text
  first, text = None, ""
  for line in r:
    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]": continue
    text += json.loads(line[6:])["choices"][0]["text"]
    if first is None: first = time.perf_counter() - start
  return first, time.perf_counter() - start, text

def clients(port: int, n_clients: int, n_requests: int, new: int) -> dict:
  """n_requests streamed requests spread over n_clients threads."""
  ttft, lock, todo = [], threading.Lock(), list(range(n_requests))
  def client():
    while True:
      with lock:
        if not todo: return
        todo.pop()
      first, _, _ = stream_request(port, new)
      with lock: ttft.append(first)
  start = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(n_clients)]
  for t in threads: t.start()
  for t in threads: t.join()
  wall = time.perf_counter() - start
  return {"clients": n_clients, "requests": n_requests, "req_per_s": n_requests / wall,
          "tok_per_s": n_requests * new / wall, "ttft_median_ms": 1e3 * statistics.median(ttft),
          "ttft_max_ms": 1e3 * max(ttft)}

def in_process(model_dir: Path, new: int, rounds: int) -> tuple[float, float, list[int]]:
  """Median (first token, whole generation) seconds of `generate` in this process, and its tokens."""
  import olmoe_compiler
  olmoe_compiler.use_cpu_target()                # before tinygrad opens its device (clang hangs on some bf16 kernels)
  import olmoe
  model, tok = olmoe.load(str(model_dir), progress=False)
  ids, firsts, totals = tok.encode(PROMPT), [], []
  for _ in range(rounds + 1):                    # the first round is a warm-up
    start = time.perf_counter()
    toks = []
    for step in olmoe.generate(model, [ids], new):
      if not toks: first = time.perf_counter() - start
      toks.append(step.tokens[0])
    firsts.append(first); totals.append(time.perf_counter() - start)
  return statistics.median(firsts[1:]), statistics.median(totals[1:]), tok.decode([t for t in toks if t not in model.cfg.eos_ids])

def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", type=Path, default=ROOT / "models" / "olmoe-demo")
  ap.add_argument("--new", type=int, default=32, help="tokens per request")
  ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
  a = ap.parse_args()
  proc, port = start_server(a.model)
  try:
    stream_request(port, a.new)                                               # warm-up: compiles or loads the steps
    rows = [clients(port, c, a.requests, a.new) for c in (1, 4)]
    serial = [stream_request(port, a.new, stream=False)[1:] for _ in range(8)]
    served, served_text = statistics.median(s for s, _ in serial), serial[0][1]
    streamed = [stream_request(port, a.new) for _ in range(8)]
    served_first = statistics.median(f for f, _, _ in streamed)
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  first, total, text = in_process(a.model, a.new, 8)
  print(f"model {a.model.name}, {a.new} new tokens per request, greedy")
  print("clients  requests  req/s   tokens/s  TTFT median  TTFT max")
  for r in rows:
    print(f"{r['clients']:>7}  {r['requests']:>8}  {r['req_per_s']:5.2f}  {r['tok_per_s']:8.1f}  "
          f"{r['ttft_median_ms']:8.1f} ms  {r['ttft_max_ms']:6.1f} ms")
  print(f"one request, whole answer: served {1e3 * served:.1f} ms, generate in process {1e3 * total:.1f} ms "
        f"(overhead {1e3 * (served - total):+.1f} ms); first token: streamed {1e3 * served_first:.1f} ms, "
        f"in process {1e3 * first:.1f} ms")
  print(f"same text as generate: {served_text == text}")

if __name__ == "__main__":
  main()
