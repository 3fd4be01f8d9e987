"""NORMSWAP_FORK_ENGINE's at-fork hook (vllm_normswap/runtime/engine_fork.py) on real sockets in a real forked child: it
closes the TCP server sockets the child inherited (bound, or listening) and nothing else. The servers started by
the suite run forked (tests/conftest.py); tests/serving/test_openai_server.py checks one of them from outside."""

import os
import socket

from vllm_normswap.runtime.engine_fork import close_inherited_server_sockets


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_child_closes_bound_and_listening_tcp_sockets_only():
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))  # what vLLM's API server holds when it starts the engine: bound, not listening
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    client = socket.create_connection(listening.getsockname())
    accepted, _ = listening.accept()
    unix_a, unix_b = socket.socketpair(socket.AF_UNIX)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    closed_fds = {bound.fileno(), listening.fileno()}
    kept_fds = {client.fileno(), accepted.fileno(), unix_a.fileno(), unix_b.fileno(), udp.fileno()}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and never returns into pytest
        try:
            n = close_inherited_server_sockets()
            wrong = [fd for fd in closed_fds if _open(fd)] + [fd for fd in kept_fds if not _open(fd)]
            os.write(w, f"{n} {wrong}".encode())
        finally:
            os._exit(0)
    os.close(w)
    report = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    os.close(r)
    n, wrong = report.split(" ", 1)
    assert wrong == "[]", f"fds wrongly closed or kept in the child: {wrong}"
    assert int(n) >= 2, report  # ours, and any server socket the test process held already
    # the parent's sockets are untouched: its listener still accepts
    with socket.create_connection(listening.getsockname()) as again:
        conn, _ = listening.accept()
        conn.close()
    assert bound.getsockname()[1] > 0
    for s in (bound, listening, client, accepted, unix_a, unix_b, udp):
        s.close()
