"""The heads-up display: a small local web page that shows captions as they are made, over Server-Sent Events.

    GET /          the page (white text on black, the caption being spoken at the bottom, the last ones above)
    GET /events    text/event-stream: `caption` events (a Caption as JSON) and one `end` event when the audio ends;
                   a client that reconnects with Last-Event-ID gets the final captions it missed
    GET /captions  the final captions so far, as a JSON list

The server runs in its own threads and never blocks the captioner: each subscriber has a queue, and one that stops
reading is dropped rather than waited for.
"""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qwenkit.apps.translate.captioner import Caption
from qwenkit.errors import QwenkitError

HISTORY = 200
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>qwenkit captions</title>
<style>
  html, body { margin: 0; height: 100%; background: #000; color: #fff;
               font-family: system-ui, "Noto Sans CJK SC", "PingFang SC", sans-serif; }
  #hud { position: absolute; left: 4vw; right: 4vw; bottom: 6vh; }
  .done { opacity: .55; font-size: 3.2vh; margin: .6vh 0; }
  .done .src, #live .src { font-size: 2.2vh; color: #9ad; display: block; }
  #live { font-size: 4.6vh; min-height: 6vh; margin-top: 1.2vh; }
  #live .rest { color: #888; }
  #state { position: absolute; top: 2vh; right: 3vw; font-size: 1.8vh; color: #666; }
</style></head>
<body><div id="state">connecting</div><div id="hud"><div id="done"></div><div id="live"></div></div>
<script>
const done = document.getElementById("done"), live = document.getElementById("live"),
      state = document.getElementById("state");
const KEEP = 3;
function line(el, c, fixed) {
  el.textContent = "";
  const src = document.createElement("span"); src.className = "src"; src.textContent = c.source; el.append(src);
  const a = document.createElement("span"); a.className = "fixed"; a.textContent = fixed; el.append(a);
  const b = document.createElement("span"); b.className = "rest"; b.textContent = c.text.slice(fixed.length);
  el.append(b);
}
const events = new EventSource("events");
events.addEventListener("open", () => { state.textContent = "live"; });
events.addEventListener("error", () => { state.textContent = "reconnecting"; });
events.addEventListener("caption", (e) => {
  const c = JSON.parse(e.data);
  if (c.final) {
    if (!c.text && !c.source) { live.textContent = ""; return; }
    const d = document.createElement("div"); d.className = "done"; d.dataset.index = c.index;
    line(d, c, c.text); done.append(d);
    while (done.children.length > KEEP) done.firstChild.remove();
    live.textContent = "";
  } else {
    line(live, c, c.text.startsWith(c.text_fixed) ? c.text_fixed : "");
  }
});
events.addEventListener("end", () => { state.textContent = "ended"; events.close(); });
</script></body></html>
"""


class CaptionServer:
    """Serve the page on host:port (port 0: any free port; `url` says which)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.lock = threading.Lock()
        self.history: list[tuple[int, Caption]] = []  # (event id, final caption)
        self.latest: tuple[int, Caption] | None = None  # the partial caption on screen now
        self.subscribers: list[queue.Queue] = []
        self.next_id = 1
        self.ended = False
        try:
            self.httpd = ThreadingHTTPServer((host, port), self._handler())
        except OSError as e:
            raise QwenkitError(f"cannot serve the caption page on {host}:{port} ({e.strerror or e})") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="qwenkit-captions-web", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    # ---- the captioner's side --------------------------------------------------------------------------------------
    def add(self, caption: Caption) -> None:
        with self.lock:
            event = (self.next_id, caption)
            self.next_id += 1
            if caption.final:
                self.history = (self.history + [event])[-HISTORY:]
                self.latest = None
            else:
                self.latest = event
            self._publish(("caption", event))

    def close(self) -> None:
        """The audio ended: tell the pages, then stop serving."""
        with self.lock:
            self.ended = True
            self._publish(("end", None))
        self.httpd.shutdown()
        self.httpd.server_close()

    def _publish(self, item) -> None:
        for q in list(self.subscribers):
            try:
                q.put_nowait(item)
            except queue.Full:  # a page that stopped reading: drop it, never block the captions
                self.subscribers.remove(q)
                with q.mutex:  # what it missed is replaced by word to reconnect: its EventSource comes back
                    q.queue.clear()  # with Last-Event-ID and gets the history it lacks
                q.put_nowait(("reconnect", None))

    def _subscribe(self, last_id: int) -> tuple[queue.Queue, list]:
        with self.lock:
            q: queue.Queue = queue.Queue(maxsize=1000)
            backlog = [("caption", e) for e in self.history if e[0] > last_id]
            if self.latest is not None and self.latest[0] > last_id:
                backlog.append(("caption", self.latest))
            if self.ended:
                backlog.append(("end", None))
            else:
                self.subscribers.append(q)
            return q, backlog

    def _unsubscribe(self, q: queue.Queue) -> None:
        with self.lock:
            if q in self.subscribers:
                self.subscribers.remove(q)

    # ---- HTTP -------------------------------------------------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the terminal shows captions, not access logs
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif path == "/captions":
                    with server.lock:
                        body = [c.to_dict() for _, c in server.history]
                    self._send(200, "application/json", json.dumps(body, ensure_ascii=False).encode())
                elif path == "/events":
                    self._events()
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _events(self) -> None:
                try:
                    last = int(self.headers.get("Last-Event-ID") or 0)
                except ValueError:
                    last = 0
                q, backlog = server._subscribe(last)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    self.wfile.write(b"retry: 1000\n\n")
                    for item in backlog:
                        if not self._write(item):
                            return
                    while True:
                        try:
                            item = q.get(timeout=15)
                        except queue.Empty:
                            self.wfile.write(b": keep-alive\n\n")
                            self.wfile.flush()
                            continue
                        if not self._write(item):
                            return
                except (BrokenPipeError, ConnectionResetError, OSError):
                    return
                finally:
                    server._unsubscribe(q)

            def _write(self, item) -> bool:
                kind, event = item
                if kind == "reconnect":  # dropped as too slow: closing makes the page reconnect and catch up
                    return False
                if kind == "end":
                    self.wfile.write(b"event: end\ndata: {}\n\n")
                    self.wfile.flush()
                    return False
                number, caption = event
                data = json.dumps(caption.to_dict(), ensure_ascii=False)
                self.wfile.write(f"id: {number}\nevent: caption\ndata: {data}\n\n".encode())
                self.wfile.flush()
                return True

        return Handler
