"""A TCP proxy for the integration tests' network faults and Services."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Proxy:
    """A TCP proxy on loopback for network faults: it can delay every answer, cut every connection and refuse new ones,
    leave its connections open but carry nothing more on them, close them at their next request,
    or send new connections elsewhere while the open ones stay where they are (a Service whose
    endpoints changed)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.latency = 0.0
        """Seconds every chunk from the upstream waits before it is passed on (a slow answer)."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._broken = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._frozen: set[socket.socket] = set()
        self._clients: set[socket.socket] = set()
        self._hanging_up: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._broken.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._sockets |= {conn, upstream}
                self._clients.add(conn)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if source in self._hanging_up:
                    break
                if self.latency and source not in self._clients:
                    time.sleep(self.latency)
                if source not in self._frozen:
                    target.sendall(data)
        self._close(source, target)

    def _close(self, *sockets: socket.socket) -> None:
        with self._lock:
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                self._sockets.discard(s)
                self._frozen.discard(s)
                self._clients.discard(s)
                self._hanging_up.discard(s)

    def cut(self) -> None:
        self._broken.set()
        with self._lock:
            sockets = list(self._sockets)
        self._close(*sockets)

    def freeze(self) -> None:
        """What comes on the connections open now is dropped, and they stay open: a load balancer
        that forgot them without a word. New connections are carried as before."""
        with self._lock:
            self._frozen |= self._sockets

    def hang_up(self) -> None:
        """The connections open now are closed unanswered when their client sends anything more (its
        next request), as by a server restarting under kept connections; those that only receive
        (watches) go on, and new connections are carried as before."""
        with self._lock:
            self._hanging_up |= self._clients

    def retarget(self, upstream: tuple[str, int]) -> None:
        """New connections go to `upstream`; those open stay with the old one, as kube-proxy's do."""
        self.upstream = upstream

    def heal(self) -> None:
        self._broken.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
