"""tests/tcp_proxy.py: the cuttable proxy the storage-outage tests put in front of S3."""

from __future__ import annotations

import socket
import socketserver
import threading

import pytest
from tcp_proxy import TcpProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionResetError:  # the proxy's cut
            pass


@pytest.fixture
def echo_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            received += data
        return received


@pytest.mark.timeout(30)
def test_forwards_then_cut_refuses_and_resets_then_restore_forwards(echo_server) -> None:
    with TcpProxy(echo_server) as proxy:
        payload = bytes(range(256)) * 4096  # 1 MiB: several reads each way
        assert _round_trip(proxy.port, payload) == payload
        port = proxy.port

        open_conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        open_conn.sendall(b"ping")
        assert open_conn.recv(4) == b"ping"
        proxy.cut()
        assert proxy.is_cut
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # reset, not left hanging
            open_conn.sendall(b"more")
            if not open_conn.recv(4):
                raise ConnectionResetError("closed")
        open_conn.close()

        proxy.restore()
        assert proxy.port == port and not proxy.is_cut
        assert _round_trip(port, b"back") == b"back"
        assert proxy.connections == 3
