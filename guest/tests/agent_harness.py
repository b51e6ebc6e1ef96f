"""The harness of test_agent.py: the wire format, a connection, a running agent, and the list of
cases that @test fills."""
import os
import socket
import struct
import subprocess
import tempfile
import time

HELLO, EXEC, STDIN, STDIN_EOF, SIGNAL, MOUNT, UNMOUNT, SYNC, POWEROFF, RESIZE = range(1, 11)
G_HELLO, G_STARTED, G_STDOUT, G_STDERR, G_EXIT, G_OK, G_ERROR, G_STDIN_ACK = range(0x81, 0x89)
E_PROTOCOL, E_VERSION, E_EXEC_UNAVAILABLE, E_BUSY, E_NOT_READY, E_BAD_REQUEST, E_MOUNT_FAILED = range(1, 8)
F_STDIN, F_MKDIR, F_TTY = 1, 2, 4
WINDOW = 262144
UNAVAILABLE = b"exec is not available in this image (agent built without dev shell)"
MARK = 4000 + os.getpid() % 1000  # unique sleep durations, to find leftover processes


def frame(t, payload=b""):
    return struct.pack(">IB", len(payload), t) + payload


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">I", len(b)) + b


def hello(version=1, t=0, ent=b""):
    return frame(HELLO, struct.pack(">HQH", version, t, len(ent)) + ent)


F_USER = 8
GID_OF_USER = 0xFFFFFFFF


def exec_frame(argv, env=(), cwd=b"", flags=0, timeout=0, tty=None, user=None):
    if tty:
        flags |= F_TTY
    if user is not None:
        flags |= F_USER
    p = struct.pack(">II", timeout, flags) + s(cwd) + struct.pack(">I", len(argv))
    p += b"".join(s(a) for a in argv) + struct.pack(">I", len(env)) + b"".join(s(e) for e in env)
    if tty:
        p += struct.pack(">HH", *tty)
    if user is not None:
        p += struct.pack(">II", *user)
    return frame(EXEC, p)


class Closed(Exception):
    pass


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self.off = 0

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n, deadline):
        while len(self.buf) - self.off < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for a frame")
            self.sock.settimeout(left)
            try:
                d = self.sock.recv(1 << 20)
            except ConnectionResetError:
                d = b""
            if not d:
                raise Closed()
            if self.off:
                del self.buf[:self.off]
                self.off = 0
            self.buf += d

    def recv(self, timeout=10):
        deadline = time.monotonic() + timeout
        self._fill(5, deadline)
        ln, t = struct.unpack_from(">IB", self.buf, self.off)
        assert ln <= 1 << 20, ln
        self._fill(5 + ln, deadline)
        p = bytes(self.buf[self.off + 5:self.off + 5 + ln])
        self.off += 5 + ln
        return t, p

    def expect_closed(self, timeout=5):
        try:
            t, p = self.recv(timeout)
        except Closed:
            return
        raise AssertionError("expected the connection to close, got frame 0x%x %r" % (t, p[:64]))

    def hello(self):
        self.send(hello(t=time.time_ns(), ent=os.urandom(32)))
        t, p = self.recv()
        assert t == G_HELLO, (t, p)
        ver, caps, n = struct.unpack(">HII", p[:10])
        assert ver == 1 and p[10:] == b"mvm-agent 0.2.0" and n == 15, p
        return caps

    def close(self):
        self.sock.close()


def parse_error(p):
    code, fatal, n = struct.unpack(">HBI", p[:7])
    assert len(p) == 7 + n
    return code, fatal, p[7:]


def parse_exit(p):
    kind, code, n = struct.unpack(">BiI", p[:9])
    assert len(p) == 9 + n
    return kind, code, p[9:]


def expect_error(c, code, fatal):
    t, p = c.recv()
    assert t == G_ERROR, (t, p)
    got = parse_error(p)
    assert got[0] == code and got[1] == fatal, got
    return got[2]


class Result:
    def __init__(self):
        self.out = bytearray()
        self.err = bytearray()

    pid = None
    exit = None
    acked = 0
    frames = 0


def collect(c, timeout=30, max_frame_check=True, r=None):
    """Read frames until EXIT."""
    r = r or Result()
    while True:
        t, p = c.recv(timeout)
        r.frames += 1
        if t == G_STARTED:
            assert r.pid is None
            (r.pid,) = struct.unpack(">I", p)
        elif t == G_STDOUT:
            assert 1 <= len(p) <= 65536
            r.out += p
        elif t == G_STDERR:
            assert 1 <= len(p) <= 65536
            r.err += p
        elif t == G_STDIN_ACK:
            r.acked += struct.unpack(">I", p)[0]
        elif t == G_EXIT:
            r.exit = parse_exit(p)
            return r
        else:
            raise AssertionError("unexpected frame 0x%x %r" % (t, p[:100]))


def run(c, argv, **kw):
    c.send(exec_frame([a.encode() if isinstance(a, str) else a for a in argv], **kw))
    return collect(c)


def procs_with(needle):
    """pids of processes whose command line contains needle"""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cl = f.read()
        except OSError:
            continue
        if needle.encode() in cl.replace(b"\0", b" "):
            try:
                with open("/proc/%s/stat" % d) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            out.append(int(d))
    return out


def wait_no_procs(needle, timeout=3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not procs_with(needle):
            return
        time.sleep(0.05)
    raise AssertionError("leftover processes for %r: %r" % (needle, procs_with(needle)))


class Agent:
    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="mvm-agent-test-")
        self.path = os.path.join(self.dir, "a.sock")
        self.log = open(os.path.join(self.dir, "stderr"), "w+b")
        # cwd: relative paths in requests (a MOUNT's mkdir -p) land in the temporary directory
        self.proc = subprocess.Popen([os.path.abspath(binary), "--listen", "unix:" + self.path],
                                     stderr=self.log, cwd=self.dir)
        end = time.monotonic() + 5
        while not os.path.exists(self.path):
            assert time.monotonic() < end, "agent did not create its socket"
            assert self.proc.poll() is None, "agent exited"
            time.sleep(0.01)

    def conn(self, do_hello=True):
        c = Conn(self.path)
        if do_hello:
            c.hello()
        return c

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn
