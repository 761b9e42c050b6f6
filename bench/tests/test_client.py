"""The bench's stream parser (kbench.client.parse_stream): a response received in arbitrary
pieces gives the same text and counts, and each event is timed by the piece its last byte
came in."""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kbench.client import decode_rate, parse_stream  # noqa: E402


def sse(*events):
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def chunked(body, sizes):
    out, i = b"", 0
    for n in sizes:
        piece = body[i : i + n]
        i += n
        if piece:
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    if i < len(body):
        out += f"{len(body) - i:x}\r\n".encode() + body[i:] + b"\r\n"
    return out + b"0\r\n\r\n"


def content(text):
    return {"choices": [{"delta": {"content": text}}]}


EVENTS = sse(
    {"choices": [{"delta": {"role": "assistant"}}]},  # no content: not a chunk
    content("Hel"),
    content("lo"),
    content("!"),
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}},
    b"[DONE]",
)


def arrivals(raw, cuts, t0=100.0):
    """raw split at the offsets in `cuts`; piece k arrives at t0 + k + 1."""
    bounds = [0, *cuts, len(raw)]
    return [(raw[a:b], t0 + k + 1) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


class ParseStream(unittest.TestCase):
    def test_chunked_response_in_arbitrary_pieces(self):
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = head + chunked(EVENTS, [5, 40, 3, 60])
        for cuts in ([], [1], [len(head) - 2, len(head) + 3], list(range(7, len(raw), 11))):
            with self.subTest(cuts=cuts):
                res = parse_stream(arrivals(raw, cuts), 100.0)
                self.assertEqual(res["status"], 200)
                self.assertEqual(res["text"], "Hello!")
                self.assertEqual(res["content_chunks"], 3)
                self.assertEqual(res["completion_tokens"], 3)
                self.assertEqual(res["prompt_tokens"], 7)
                self.assertEqual(res["total"], len(cuts) + 1)

    def test_each_event_is_timed_by_the_arrival_of_its_last_byte(self):
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = sse(content("a"), content("b"), content("c"))
        # One chunk per event; the stream cut right after each event's chunk.
        events = [sse(content(x)) for x in "abc"]
        raw, cuts = head, []
        for e in events:
            raw += f"{len(e):x}\r\n".encode() + e + b"\r\n"
            cuts.append(len(raw))
        raw += b"0\r\n\r\n"
        self.assertEqual(b"".join(events), body)
        res = parse_stream(arrivals(raw, cuts), 100.0)
        self.assertEqual(res["ttft"], 1)  # the first event arrived with the first piece
        self.assertEqual(res["t_last"], 3)
        self.assertEqual(res["total"], 4)  # the terminating chunk came last
        self.assertEqual(decode_rate(res), (3 - 1) / (3 - 1))

    def test_an_event_split_across_pieces_counts_when_its_last_byte_arrives(self):
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n"
        body = sse(content("x"))
        raw = head % len(body) + body
        res = parse_stream(arrivals(raw, [len(raw) - 4]), 100.0)  # its end comes in piece 2
        self.assertEqual(res["ttft"], 2)
        self.assertEqual(res["text"], "x")

    def test_an_error_status_returns_the_body(self):
        raw = b'HTTP/1.1 429 Too Many Requests\r\ncontent-length: 17\r\n\r\n{"error": "busy"}'
        res = parse_stream(arrivals(raw, [20]), 100.0)
        self.assertEqual(res["status"], 429)
        self.assertEqual(res["body"], '{"error": "busy"}')
        self.assertIsNone(res["ttft"])

    def test_a_truncated_head_is_an_error(self):
        with self.assertRaises(RuntimeError):
            parse_stream(arrivals(b"HTTP/1.1 200 OK\r\ncontent-", []), 100.0)


if __name__ == "__main__":
    unittest.main()
