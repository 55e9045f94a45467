"""A TCP proxy on 127.0.0.1 that a test can cut and restore: a storage outage without killing
the server behind it.

    with TcpProxy(("127.0.0.1", moto_port)) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}"    # clients use this
        proxy.cut()       # open connections are reset; new ones are refused (port closed)
        proxy.restore()   # the same port accepts and forwards again

A cut closes the listening socket, so a client sees what it sees when a server is down:
"connection refused". Threads only (one per direction of each connection); loopback only.
"""

from __future__ import annotations

import socket
import struct
import threading


class TcpProxy:
    """Forwards every connection to `target`; `cut()` and `restore()` switch it off and on."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        """The port clients connect to (fixed across cuts)."""
        self.connections = 0
        """Connections accepted and forwarded so far."""
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.cut()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def restore(self) -> None:
        """Listen (again, on the same port) and forward new connections."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            # The port's closed connections linger in TIME_WAIT; without this, re-binding fails.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening (new connections are refused) and reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            # close() alone leaves the port listening while accept() blocks on it (Linux);
            # shutdown() stops it listening and wakes the accepting thread.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for sock in sockets:
            _reset(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed by cut()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _reset(client)
                    _reset(upstream)
                    return
                self._sockets.update((client, upstream))
                self.connections += 1
            done = threading.Barrier(2)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, done), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, done: threading.Barrier) -> None:
        """Copy bytes one way until `source` closes, then pass the close on (a FIN after the
        last byte, so nothing sent is lost); the second direction to finish closes both."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # reset by the other side, or by cut()
            pass
        if done.wait() == 0:
            with self._lock:
                self._sockets.difference_update((source, sink))
            source.close()
            sink.close()


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset (SO_LINGER 0), as a crashed server's kernel would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
