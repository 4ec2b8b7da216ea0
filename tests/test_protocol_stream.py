"""The protocol's stream framing (``StreamChannel``): whole messages, large ones written from where they lie,
and bounded waits on a peer that stops reading or stops half-way through a message."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from orchestrator import _protocol as proto


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return proto.StreamChannel(a), proto.StreamChannel(b)


def test_a_large_message_arrives_whole_and_in_order_behind_a_small_one():
    ours, theirs = _pair()
    big = np.arange(3 * 2**20, dtype=np.float32).reshape(3, 2**20)  # 12 MiB: many partial writes
    received = []
    reader = threading.Thread(target=lambda: received.extend([theirs.recv(), theirs.recv()]))
    reader.start()
    ours.send(proto.encode(proto.STARTED, 1, status=proto.OK, rank=0), timeout=10.0)
    ours.send(proto.encode(proto.REPLY, 2, status=proto.OK, arrays={"y": big, "empty": np.zeros([0], np.int64)}),
              timeout=10.0)
    reader.join(10.0)
    small, reply = (proto.decode(frames) for frames in received)
    assert (small.kind, small.id, reply.kind, reply.id) == (proto.STARTED, 1, proto.REPLY, 2)
    arrays = reply.arrays()
    np.testing.assert_array_equal(arrays["y"], big)
    assert arrays["empty"].shape == (0,)
    ours.close(), theirs.close()


def test_a_send_to_a_peer_that_does_not_read_gives_up_at_its_timeout():
    ours, theirs = _pair()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not take the message"):
        ours.send([b"PREDICT", b"{}", bytes(16 * 2**20)], timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3.0
    ours.close(), theirs.close()


def test_a_message_cut_off_half_way_is_a_timeout_not_a_hang():
    ours, theirs = _pair()
    theirs.sock.sendall(struct.pack("<Q", 1000) + b"\x02\x00\x00\x00")  # the length, then 4 of 1000 bytes
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not send the rest of its message"):
        ours.recv(timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3.0
    ours.close(), theirs.close()


def test_a_peer_that_closes_half_way_through_a_message_is_eof():
    ours, theirs = _pair()
    theirs.sock.sendall(struct.pack("<Q", 1000) + b"\x02\x00")
    theirs.close()
    with pytest.raises(EOFError):
        ours.recv(timeout=5.0)
    ours.close()


def test_a_header_made_from_the_cached_template_is_the_header_json_makes():
    x, ids = np.zeros((1, 32, 256), np.float32), np.zeros((2, 5), np.int64)
    specs = [{"name": "x", "dtype": "<f4", "shape": [1, 32, 256]}, {"name": "ids", "dtype": "<i8", "shape": [2, 5]}]
    for request_id in (0, 7, 123456789012):
        frames = proto.encode(proto.PREDICT, request_id, arrays={"x": x, "ids": ids})
        expected = {"v": proto.VERSION, "kind": proto.PREDICT, "id": request_id, "arrays": specs}
        assert json.loads(bytes(frames[1])) == expected
        assert proto.decode(frames).header == expected
    # scalar fields whose values change call after call (a REPLY's seconds), of every JSON type
    for seconds, who, flag in ((0.1, "rank 0 of 2", True), (1e-7, 'a "quoted" \\ name \u2192', False),
                               (float("nan"), "", None), (3, "x", True)):
        fields = {"status": proto.OK, "rank": 1, "seconds": seconds, "who": who, "flag": flag}
        frames = proto.encode(proto.REPLY, 9, arrays={"x": x}, **fields)
        assert bytes(frames[1]) == json.dumps({"v": proto.VERSION, "kind": proto.REPLY, "id": 9, **fields,
                                               "arrays": specs[:1]}).encode()
        header = proto.decode(frames).header
        assert header["who"] == who and header["flag"] is flag and header["rank"] == 1
        assert header["seconds"] == seconds or (seconds != seconds and header["seconds"] != header["seconds"])
    # values that are not plain scalars take json's own path
    frames = proto.encode(proto.ERROR, 3, status=proto.FAILED, error={"type": "ValueError"}, count=np.int64(4))
    assert json.loads(bytes(frames[1]))["count"] == 4 and json.loads(bytes(frames[1]))["error"] == {"type": "ValueError"}
    # trailing bytes after the header's JSON are not a message of ours
    with pytest.raises(proto.ProtocolError, match="not a message of the worker protocol"):
        proto.decode([b"PREDICT", bytes(frames[1]) + b" trailing"])
