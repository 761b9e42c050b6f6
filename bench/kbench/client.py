"""A small HTTP client for both servers: timed streaming (SSE) and plain JSON requests."""

import bisect
import http.client
import json
import socket
import time
import urllib.parse


class _Tally:
    """What a stream's server-sent events add up to: the content chunks and their text, the usage
    and llama-server's timings, and the times of the first and last content chunk (`when`: the
    event's time, or a function giving it, called only for content)."""

    def __init__(self):
        self.chunks, self.ttft, self.t_last, self.usage, self.timings, self.text = 0, None, None, None, None, []

    def add(self, ev, when):
        if ev.get("usage"):
            self.usage = ev["usage"]
        if ev.get("timings"):
            self.timings = ev["timings"]
        for ch in ev.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content") or ch.get("text") or ""
            if piece:
                self.chunks += 1
                self.text.append(piece)
                self.t_last = when() if callable(when) else when
                if self.ttft is None:
                    self.ttft = self.t_last

    def fields(self):
        return dict(
            ttft=self.ttft,
            content_chunks=self.chunks,
            t_last=self.t_last,
            completion_tokens=(self.usage or {}).get("completion_tokens", self.chunks),
            prompt_tokens=(self.usage or {}).get("prompt_tokens"),
            timings=self.timings,
            text="".join(self.text),
        )


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
        tally = _Tally()
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
            now = time.perf_counter() - t0
            tally.add(json.loads(payload), now)
        r.read()
        out.update(total=time.perf_counter() - t0, **tally.fields())
        return out


def stream_quiet(url, path, body, timeout=600):
    """A streaming request that takes as little of the machine's CPU as a client can while the
    server generates: its own connection (`connection: close`), each arrival only received and
    timestamped, everything parsed once the server has closed. A client that parses every chunk
    as it arrives (`Conn.stream`) runs on the same cores as the server's decode threads, and its
    CPU time comes off the rate being measured; a device's real client is usually on another
    machine. Returns what `Conn.stream` returns."""
    u = urllib.parse.urlparse(url)
    body = dict(body, stream=True, stream_options={"include_usage": True})
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {u.hostname}:{u.port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\naccept: text/event-stream\r\nconnection: close\r\n\r\n"
    ).encode()
    s = socket.create_connection((u.hostname, u.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    arrivals = []
    recv, now, keep = s.recv, time.perf_counter, arrivals.append
    try:
        t0 = now()
        s.sendall(head + data)
        while True:
            b = recv(65536)
            t = now()
            if not b:
                break
            keep((b, t))
    finally:
        s.close()
    return parse_stream(arrivals, t0)


def parse_stream(arrivals, t0):
    """Parses a whole HTTP/1.1 response received as (bytes, arrival time) pieces: the status,
    headers, the body (chunked or not), and each server-sent event timed by the arrival of its
    last byte."""
    raw = b"".join(b for b, _ in arrivals)
    ends, n = [], 0
    for b, _ in arrivals:
        n += len(b)
        ends.append(n)
    times = [t for _, t in arrivals]

    def arrived(off):  # the time the byte at raw offset `off` arrived
        return times[bisect.bisect_right(ends, off)] - t0

    hend = raw.find(b"\r\n\r\n")
    if hend < 0:
        raise RuntimeError(f"no complete HTTP response head in {raw[:200]!r}")
    lines = raw[:hend].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    # The body as (raw offset, bytes) pieces: one per chunk when chunked.
    pieces, pos = [], hend + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            eol = raw.index(b"\r\n", pos)
            size = int(raw[pos:eol].split(b";")[0], 16)
            if size == 0:
                break
            pieces.append((eol + 2, raw[eol + 2 : eol + 2 + size]))
            pos = eol + 2 + size + 2
    else:
        pieces.append((pos, raw[pos:]))
    out = {"status": status, "headers": headers, "ttft": None, "total": times[-1] - t0 if times else 0.0}
    if status != 200:
        out["body"] = b"".join(p for _, p in pieces).decode(errors="replace")
        return out
    body = b"".join(p for _, p in pieces)
    starts = [o for o, _ in pieces]
    bstarts, n = [], 0
    for _, p in pieces:
        bstarts.append(n)
        n += len(p)

    def raw_offset(boff):  # body offset -> raw offset
        i = bisect.bisect_right(bstarts, boff) - 1
        return starts[i] + (boff - bstarts[i])

    tally, at = _Tally(), 0
    for ev in body.split(b"\n\n"):
        end = at + len(ev)
        at = end + 2
        for line in ev.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data: ") and line[6:] != b"[DONE]":
                tally.add(json.loads(line[6:]), lambda: arrived(raw_offset(max(end - 1, 0))))
    out.update(**tally.fields())
    return out


def decode_rate(res):
    """Tokens/s after the first token: (tokens - 1) over the time from the first to the last chunk."""
    n = res.get("completion_tokens") or 0
    if res.get("ttft") is None or res.get("t_last") is None or n < 2:
        return None
    span = res["t_last"] - res["ttft"]
    return (n - 1) / span if span > 0 else None
