"""A small HTTP client for both servers: timed streaming (SSE) and plain JSON requests."""

import http.client
import json
import time
import urllib.parse


class Conn:
    """One keep-alive connection to a server (both kilnd and llama-server keep connections open)."""

    def __init__(self, url, timeout=600):
        u = urllib.parse.urlparse(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.c = None

    def _conn(self):
        if self.c is None:
            self.c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.c

    def close(self):
        if self.c is not None:
            self.c.close()
            self.c = None

    def request(self, method, path, body=None):
        """(status, headers, parsed JSON or text, seconds from send to the last byte)."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"content-type": "application/json"} if data else {}
        for attempt in (0, 1):
            c = self._conn()
            try:
                t0 = time.perf_counter()
                c.request(method, path, body=data, headers=hdrs)
                r = c.getresponse()
                raw = r.read()
                t1 = time.perf_counter()
                break
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed, t1 - t0

    def stream(self, path, body):
        """A streaming request, timed per content chunk. Returns a dict: status, headers,
        ttft (send to the first chunk with content), total, content_chunks, the time of the last
        content chunk, completion_tokens (from usage when the server sends it) and timings
        (llama-server's own figures)."""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        data = json.dumps(body).encode()
        c = self._conn()
        t0 = time.perf_counter()
        try:
            c.request("POST", path, body=data, headers={"content-type": "application/json"})
            r = c.getresponse()
        except (ConnectionError, http.client.HTTPException):
            self.close()
            c = self._conn()
            t0 = time.perf_counter()
            c.request("POST", path, body=data, headers={"content-type": "application/json"})
            r = c.getresponse()
        out = {"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()}, "ttft": None}
        if r.status != 200:
            out["body"] = r.read().decode(errors="replace")
            out["total"] = time.perf_counter() - t0
            return out
        chunks, t_last, usage, timings, text = 0, None, None, None, []
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                break
            now = time.perf_counter()
            ev = json.loads(payload)
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("timings"):
                timings = ev["timings"]
            for ch in ev.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") or ch.get("text") or ""
                if piece:
                    chunks += 1
                    text.append(piece)
                    t_last = now
                    if out["ttft"] is None:
                        out["ttft"] = now - t0
        r.read()
        out.update(
            total=time.perf_counter() - t0,
            content_chunks=chunks,
            t_last=None if t_last is None else t_last - t0,
            completion_tokens=(usage or {}).get("completion_tokens", chunks),
            prompt_tokens=(usage or {}).get("prompt_tokens"),
            timings=timings,
            text="".join(text),
        )
        return out


def decode_rate(res):
    """Tokens/s after the first token: (tokens - 1) over the time from the first to the last chunk."""
    n = res.get("completion_tokens") or 0
    if res.get("ttft") is None or res.get("t_last") is None or n < 2:
        return None
    span = res["t_last"] - res["ttft"]
    return (n - 1) / span if span > 0 else None
