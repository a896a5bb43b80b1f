"""A PostgreSQL outage on demand: a byte-for-byte relay in front of the test
server, on a Unix socket of its own, that can drop every connection and
refuse new ones (`cut`), then carry traffic again (`restore`). It also counts
round trips: every ReadyForQuery the server sends ends one (`round_trips`)."""

import os
import socket
import threading
import urllib.parse

import psycopg.conninfo


class PostgresRelay:
    """Relays a PostgreSQL URL's traffic; `url` is the same database through the relay."""

    def __init__(self, url, directory):
        info = psycopg.conninfo.conninfo_to_dict(url)
        host, port = info.get("host") or "/var/run/postgresql", info.get("port") or "5432"
        self._target = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") \
            else (socket.AF_INET, (host, int(port)))
        path = os.path.join(directory, f".s.PGSQL.{port}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        query["host"] = directory
        user = parts.netloc.split("@")[0] + "@" if "@" in parts.netloc else ""
        self.url = (f"{parts.scheme}://{user}{parts.path}?"
                    + urllib.parse.urlencode(query, quote_via=urllib.parse.quote))
        self.down = False
        self.round_trips = 0
        self._lock = threading.Lock()
        self._sockets = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self):
        """Drop every open connection and refuse new ones: the database is gone."""
        with self._lock:
            self.down = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def restore(self):
        """Carry traffic again: the database is back."""
        self.down = False

    def close(self):
        self.cut()
        self._listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            server = socket.socket(self._target[0], socket.SOCK_STREAM)
            try:
                server.connect(self._target[1])
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            for source, sink, count in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, count),
                                 daemon=True).start()

    def _pump(self, source, sink, count):
        pending = b""  # the server's messages: a type byte, then a length that counts itself
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if count:
                    pending += data
                    while len(pending) >= 5:
                        length = int.from_bytes(pending[1:5], "big")
                        if len(pending) < 1 + length:
                            break
                        if pending[:1] == b"Z":
                            with self._lock:
                                self.round_trips += 1
                        pending = pending[1 + length:]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass
