"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for testing prompt rewriting offline.

Its answer is built from the request, so a test can check what was sent: the rewritten prompt is
`"<user prompt> | model=<model> | mode=<normal|master>"`, wrapped the way real models answer (a reasoning
block, a "Rewritten prompt:" label, quotes). The mode is read back from our instruction text (only the
Master instructions ask for aesthetic detail). Every request is kept in `requests`.

    with FakeChatServer() as server:
        run(["--rewrite-endpoint", server.url, ...])
        server.requests[0]["body"]["messages"]
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def expected_rewrite(prompt: str, model: str, mode: str) -> str:
    """What `clean_rewrite` should make of this server's answer to `prompt`."""
    return f"{prompt} | model={model} | mode={mode}"


class FakeChatServer:
    """Serves POST /v1/chat/completions; `delay_s` makes it slow, `status`/`raw_body` make it fail."""

    def __init__(self, *, delay_s: float = 0.0, status: int = 200, raw_body: bytes | None = None) -> None:
        self.delay_s, self.status, self.raw_body = delay_s, status, raw_body
        self.requests: list[dict] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL, as users give it (`/v1`)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def answer(self, body: dict) -> str:
        system = next(m["content"] for m in body["messages"] if m["role"] == "system")
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        mode = "master" if "aesthetic" in system else "normal"
        return (f"<think>The user wants a {mode} rewrite.</think>\n\n"
                f"**Rewritten prompt:** \"{expected_rewrite(user, body['model'], mode)}\"")

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if server.delay_s:
                    time.sleep(server.delay_s)
                if server.raw_body is not None or server.status != 200:
                    payload = server.raw_body or json.dumps({"error": {"message": "boom"}}).encode()
                else:
                    reply = {"id": "x", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": server.answer(body)}}]}
                    payload = json.dumps(reply).encode("utf-8")
                try:
                    self.send_response(server.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        return Handler
