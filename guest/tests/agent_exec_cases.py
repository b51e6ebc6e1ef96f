"""Cases of test_agent.py: HELLO, running commands, their environment, users, stdin, a tty and big output."""
import hashlib
import os
import shutil
import struct
import sys
import tempfile
import time

from agent_harness import *  # noqa: F401,F403 (the wire format and @test)


@test
def t_hello_caps(a, n):
    c = a.conn(do_hello=False)
    caps = c.hello()
    assert caps == 0x37, hex(caps)  # EXEC|MOUNT|POWEROFF|TTY|USER, no TIME_ENTROPY natively
    assert c.hello() == 0x37  # a second HELLO is answered again
    c.close()
    c = n.conn(do_hello=False)
    assert c.hello() == 0x6, "nodev must lack EXEC"
    c.close()


@test
def t_not_ready(a, n):
    c = a.conn(do_hello=False)
    c.send(frame(SYNC))
    expect_error(c, E_NOT_READY, 0)
    c.send(exec_frame([b"true"]))
    expect_error(c, E_NOT_READY, 0)
    c.hello()
    c.send(frame(SYNC))
    assert c.recv() == (G_OK, b"")
    c.close()


@test
def t_version_mismatch(a, n):
    c = a.conn(do_hello=False)
    c.send(hello(version=2))
    msg = expect_error(c, E_VERSION, 1)
    assert b"2" in msg and b"1" in msg, msg
    c.expect_closed()
    # a future version's HELLO may have another layout: still a VERSION error
    c = a.conn(do_hello=False)
    c.send(frame(HELLO, b"\x00\x03\xff"))
    expect_error(c, E_VERSION, 1)
    c.expect_closed()


@test
def t_echo(a, n):
    c = a.conn()
    r = run(c, ["echo", "hi"])
    assert r.pid and r.out == b"hi\n" and r.err == b"" and r.exit == (0, 0, b""), vars(r)
    c.close()


@test
def t_exit_codes_and_sequence(a, n):
    c = a.conn()
    assert run(c, ["sh", "-c", "exit 7"]).exit == (0, 7, b"")
    assert run(c, ["sh", "-c", "kill -9 $$"]).exit == (1, 9, b"")
    assert run(c, ["false"]).exit == (0, 1, b"")
    r = run(c, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.out, r.err, r.exit) == (b"out\n", b"err\n", (0, 3, b"")), vars(r)
    for i in range(20):
        assert run(c, ["printf", "%s", str(i)]).out == str(i).encode()
    c.close()


@test
def t_exec_failures(a, n):
    c = a.conn()
    r = run(c, ["nope-mvm-xyz"])
    assert r.pid is None and r.exit == (3, 127, b'exec "nope-mvm-xyz": No such file or directory'), r.exit
    r = run(c, ["/nonexistent/bin"])
    assert r.exit[:2] == (3, 127), r.exit
    d = tempfile.mkdtemp(prefix="mvm-exec-")
    with open(d + "/noexec", "w") as f:
        f.write("#!/bin/sh\necho no\n")
    os.chmod(d + "/noexec", 0o644)
    r = run(c, [d + "/noexec"])
    assert r.exit == (3, 126, ('exec "%s/noexec": Permission denied' % d).encode()), r.exit
    with open(d + "/garbage", "wb") as f:
        f.write(b"\x01\x02garbage")
    os.chmod(d + "/garbage", 0o755)
    r = run(c, [d + "/garbage"])
    # (a glibc build's execvp runs such a file with /bin/sh instead)
    assert (r.exit[:2] == (3, 126) and b"Exec format error" in r.exit[2]) or r.exit[0] == 0, r.exit
    r = run(c, ["true"], cwd=b"/nonexistent/dir")
    assert r.exit[:2] == (3, 126) and b"/nonexistent/dir" in r.exit[2], r.exit
    r = run(c, [""])
    assert r.exit[:2] == (3, 127), r.exit
    # the connection is still usable
    assert run(c, ["true"]).exit == (0, 0, b"")
    c.close()


@test
def t_cwd_env(a, n):
    c = a.conn()
    d = tempfile.mkdtemp(prefix="mvm-cwd-")
    sub = os.path.join(d, "x", "y")
    r = run(c, ["pwd"], cwd=sub.encode(), flags=F_MKDIR)
    assert r.out == (sub + "\n").encode() and r.exit == (0, 0, b""), vars(r)
    assert run(c, ["pwd"]).out == b"/\n"
    r = run(c, ["env"])
    env = sorted(r.out.decode().splitlines())
    assert env == sorted(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                          "HOME=/root", "PWD=/"]) or \
        sorted(e for e in env if not e.startswith("PWD=")) == sorted(
            ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]), env
    r = run(c, ["env"], env=[b"HOME=/home/x", b"X=1", b"X=2", b"EMPTY="])
    env = sorted(r.out.decode().splitlines())
    assert "HOME=/home/x" in env and "X=2" in env and "X=1" not in env and "EMPTY=" in env, env
    assert "HOME=/root" not in env, env
    r = run(c, ["sh", "-c", 'echo "$X" é'], env=[b"X=1"])
    assert r.out == "1 é\n".encode(), r.out
    r = run(c, ["printf", "[%s]", ""])
    assert r.out == b"[]", r.out
    c.close()


@test
def t_user(a, n):
    if os.getuid() != 0:
        return  # dropping to another user needs root
    c = a.conn()
    d = tempfile.mkdtemp(prefix="mvm-user-", dir="/tmp")  # the suite's own tmpdir is 0700
    os.chmod(d, 0o755)
    sub = os.path.join(d, "made")
    r = run(c, ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME"; pwd'], cwd=sub.encode(), flags=F_MKDIR,
            user=(65534, 65533))
    assert r.exit == (0, 0, b""), vars(r)
    assert r.out.decode().split("\n")[:4] == ["65534", "65533", "65533", "/nonexistent"] or \
        r.out.decode().split("\n")[:3] == ["65534", "65533", "65533"], r.out
    assert os.stat(sub).st_uid == 0  # the cwd was made as root, before the switch
    # no passwd entry: HOME is /, and the primary group is the uid's own number
    r = run(c, ["sh", "-c", 'id -u; id -g; echo "$HOME"'], user=(4242, GID_OF_USER))
    assert r.out == b"4242\n4242\n/\n", r.out
    r = run(c, ["sh", "-c", 'id -g'], user=(0, GID_OF_USER))
    assert r.out == b"0\n", r.out
    # a cwd the user may not enter is a start failure, not a command left in it
    os.chmod(d, 0o700)
    r = run(c, ["true"], cwd=sub.encode(), user=(4242, 4242))
    assert r.exit[0] == 3 and r.exit[1] == 126 and b"Permission denied" in r.exit[2], r.exit
    shutil.rmtree(d)
    c.close()


@test
def t_stdin_cat(a, n):
    c = a.conn()
    c.send(exec_frame([b"cat"], flags=F_STDIN))
    c.send(frame(STDIN, b"abc\n"))
    c.send(frame(STDIN, b"def\n"))
    c.send(frame(STDIN_EOF))
    r = collect(c)
    assert r.out == b"abc\ndef\n" and r.exit == (0, 0, b"") and r.acked == 8, vars(r)
    # no STDIN flag: stdin is /dev/null
    r = run(c, ["cat"])
    assert r.out == b"" and r.exit == (0, 0, b""), vars(r)
    c.close()


@test
def t_tty(a, n):
    c = a.conn()
    # one output stream, a controlling terminal of the given size, its own session
    r = run(c, ["sh", "-c", "tty; stty size; echo err >&2; exit 3"], tty=(30, 100))
    assert r.exit == (0, 3, b"") and r.err == b"", vars(r)
    assert b"/dev/pts/" in r.out and b"30 100" in r.out and b"err" in r.out, vars(r)
    # input goes through the line discipline: RESIZE is seen, ^C interrupts the foreground
    # process group and not the shell, STDIN_EOF is ^D
    c.send(exec_frame([b"sh"], flags=F_STDIN, tty=(24, 80)))
    r = Result()
    c.send(frame(RESIZE, struct.pack(">HH", 40, 120)))
    c.send(frame(STDIN, b"stty size; echo mark-$((6*7))\n"))
    while b"mark-42" not in r.out:
        t, p = c.recv()
        if t == G_STDOUT:
            r.out += p
        elif t == G_STARTED:
            r.pid = struct.unpack(">I", p)[0]
    assert b"40 120" in r.out, r.out
    c.send(frame(STDIN, b"sleep %d\n" % (MARK + 7)))
    time.sleep(0.5)
    c.send(frame(STDIN, b"\x03"))
    c.send(frame(STDIN, b"echo rc=$?; exit 5\n"))
    r = collect(c, r=r)
    assert r.exit == (0, 5, b"") and b"rc=130" in r.out, vars(r)
    c.send(exec_frame([b"cat"], flags=F_STDIN, tty=(24, 80)))
    c.send(frame(STDIN, b"abc\n"))
    c.send(frame(STDIN_EOF))
    r = collect(c)
    assert r.exit == (0, 0, b"") and r.out.count(b"abc") == 2, vars(r)  # echo, then cat
    c.close()


def stream_stdin(c, data, argv):
    """send data respecting the window, read output concurrently"""
    import select
    c.send(exec_frame(argv, flags=F_STDIN))
    r = Result()
    sent = 0
    eof = False
    c.sock.setblocking(True)
    while True:
        while not eof and sent - r.acked < WINDOW and sent < len(data):
            chunk = min(65536, len(data) - sent, WINDOW - (sent - r.acked))
            c.send(frame(STDIN, data[sent:sent + chunk]))
            sent += chunk
        if sent == len(data) and not eof:
            c.send(frame(STDIN_EOF))
            eof = True
        t, p = c.recv(30)
        if t == G_STARTED:
            r.pid = struct.unpack(">I", p)[0]
        elif t == G_STDOUT:
            r.out += p
        elif t == G_STDERR:
            r.err += p
        elif t == G_STDIN_ACK:
            r.acked += struct.unpack(">I", p)[0]
            assert r.acked <= sent
        elif t == G_EXIT:
            r.exit = parse_exit(p)
            return r


@test
def t_stdin_large(a, n):
    c = a.conn()
    data = os.urandom(5 * 1024 * 1024 + 123)
    r = stream_stdin(c, data, [b"cat"])
    assert r.exit == (0, 0, b"") and r.out == data and r.acked == len(data), (r.exit, len(r.out), r.acked)
    # the command closes stdin early: data is discarded and still acknowledged
    r = stream_stdin(c, data[:2000000], [b"head", b"-c", b"10"])
    assert r.exit == (0, 0, b"") and r.out == data[:10], r.exit
    assert r.acked <= 2000000
    c.close()


@test
def t_stdin_window_exceeded(a, n):
    c = a.conn()
    c.send(exec_frame([b"sleep", str(MARK + 1).encode()], flags=F_STDIN))
    t, p = c.recv()
    assert t == G_STARTED
    try:
        # the pipe absorbs some (acknowledged); 8 frames are beyond any window left
        for _ in range(8):
            c.send(frame(STDIN, b"x" * 65536))
    except OSError:
        pass
    while True:
        t, p = c.recv()
        if t == G_STDIN_ACK:
            continue
        assert t == G_ERROR and parse_error(p)[:2] == (E_PROTOCOL, 1), (t, p)
        break
    c.expect_closed()
    wait_no_procs("sleep %d" % (MARK + 1))


@test
def t_big_output(a, n):
    c = a.conn()
    t0 = time.monotonic()
    c.send(exec_frame([b"head", b"-c", b"100000000", b"/dev/urandom"]))
    h = hashlib.sha256()
    total = 0
    while True:
        t, p = c.recv(60)
        if t == G_STDOUT:
            assert 1 <= len(p) <= 65536
            total += len(p)
        elif t == G_EXIT:
            assert parse_exit(p) == (0, 0, b""), parse_exit(p)
            break
        else:
            assert t == G_STARTED, t
    assert total == 100000000, total
    sys.stderr.write("  100 MB of output in %.2fs\n" % (time.monotonic() - t0))
    c.close()
