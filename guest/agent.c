/* mvm-agent: the in-guest agent of mvmctl. Protocol: docs/protocol.md.
 *
 * One single-threaded poll() loop serves one connection at a time and runs at most one command
 * per connection. Built twice: with -DMVM_DEV_SHELL=1 (EXEC available) and without (no exec code
 * compiled in at all). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

#ifndef MVM_DEV_SHELL
#define MVM_DEV_SHELL 0
#endif

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
/* <linux/vm_sockets.h> is not available to musl-gcc; the layout is part of the kernel ABI. */
struct mvm_sockaddr_vm {
	unsigned short svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_zero[4];
};
#define MVM_VMADDR_CID_ANY 0xffffffffu
/* <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]) */
#define MVM_RNDADDENTROPY 0x40085203
/* <linux/random.h>: RNDRESEEDCRNG = _IO('R', 0x07). Since Linux 5.18 added entropy only reaches
 * the CRNG at its next scheduled reseed (up to a minute): clones of one snapshot would keep producing
 * the same /dev/urandom bytes until then, so the agent forces the reseed. */
#define MVM_RNDRESEEDCRNG 0x5207

#define TX_CAP (256u * 1024u)
#define CTRL_RESERVE 8192u
#define DATA_ROOM (MVM_HDR_LEN + MVM_MAX_DATA + CTRL_RESERVE)
#define DRAIN_IDLE_NS (100 * 1000000LL)
#define DRAIN_MAX_NS (2000 * 1000000LL)
#define PORT_IDLE_MS 20
#define FLUSH_LINGER_MS 2000

enum transport { T_UNIX, T_VSOCK, T_PORT };

static enum transport g_tkind;
static char g_unix_path[108];
static unsigned g_vsock_port = MVM_AGENT_VSOCK_PORT;
static char g_port_name[256] = "org.mvm.agent";
static int g_guest_mode;

static int g_listen_fd = -1;
static int g_conn = -1; /* the session's transport fd (for a port: the port, kept open) */
static int g_sig_r = -1, g_sig_w = -1;

/* session */
static int g_session;    /* a session is in progress (bytes seen on a port / accepted socket) */
static int g_hello_done; /* HELLO accepted */
static int g_closing;    /* a fatal error was queued: flush, then end the session */
static int g_poweroff;   /* POWEROFF: flush, then power off / exit */
static int g_port_nohost;  /* port read 0: no host attached, poll it again later */
static int g_port_discard; /* after a fatal error on a port: drop bytes until the host detaches */

static uint8_t g_rx[MVM_HDR_LEN + MVM_MAX_PAYLOAD];
static size_t g_rxlen;
static uint32_t g_rx_plen;
static uint8_t g_rx_type;

static uint8_t g_tx[TX_CAP];
static size_t g_txhead, g_txtail;

static char g_scratch[MVM_MAX_PAYLOAD + 8];

#if MVM_DEV_SHELL
struct command {
	int active; /* between STARTED and EXIT */
	pid_t pid;  /* also the process group id */
	int exited; /* main process reaped */
	int status;
	int timed_out;
	int64_t deadline; /* monotonic ns, 0 = none */
	int64_t drain_idle, drain_max;
	int out_fd, err_fd, in_fd;
	int stdin_eof;
	uint64_t in_received, in_acked;
	uint32_t pending_ack;
	size_t in_head, in_len;
};
static struct command g_cmd = { .out_fd = -1, .err_fd = -1, .in_fd = -1 };
static uint8_t g_inbuf[MVM_STDIN_WINDOW];
#endif

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof(buf), "mvm-agent: ");
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(2, buf, (size_t)n) < 0) {
		/* nothing to do */
	}
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#if MVM_DEV_SHELL
static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}
#endif

static void on_sigchld(int sig)
{
	int e = errno;
	char c = 0;
	(void)sig;
	if (write(g_sig_w, &c, 1) < 0) {
		/* pipe full: a wakeup is already pending */
	}
	errno = e;
}

/* mkdir -p; returns 0 or -1 with errno */
static int mkdir_p(char *path)
{
	char *p = path;
	struct stat st;

	if (!*p)
		return 0;
	for (p = path + 1;; p++) {
		if (*p == '/' || *p == 0) {
			char c = *p;
			*p = 0;
			if (mkdir(path, 0755) < 0 && errno != EEXIST) {
				*p = c;
				return -1;
			}
			*p = c;
			if (!c)
				break;
		}
	}
	if (stat(path, &st) < 0)
		return -1;
	if (!S_ISDIR(st.st_mode)) {
		errno = ENOTDIR;
		return -1;
	}
	return 0;
}

/* ---------------------------------------------------------------- output buffer */

static size_t tx_used(void)
{
	return g_txtail - g_txhead;
}

static int tx_room(size_t n)
{
	return TX_CAP - tx_used() >= n;
}

/* Contiguous space for n bytes at the tail (caller checked tx_room). */
static uint8_t *tx_tail_ptr(size_t n)
{
	if (g_txhead == g_txtail)
		g_txhead = g_txtail = 0;
	if (TX_CAP - g_txtail < n) {
		memmove(g_tx, g_tx + g_txhead, tx_used());
		g_txtail -= g_txhead;
		g_txhead = 0;
	}
	return g_tx + g_txtail;
}

static void tx_ctrl_error(uint16_t code, int fatal, const char *msg)
{
	uint8_t *p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
	g_txtail += mvm_enc_error(p, code, fatal, msg, strlen(msg));
}

static void tx_ok(void)
{
	uint8_t *p = tx_tail_ptr(MVM_HDR_LEN);
	g_txtail += mvm_enc_ok(p);
}

/* Write what we can. Returns -1 if the connection failed. */
static int tx_flush(void)
{
	while (g_txhead < g_txtail) {
		ssize_t n = write(g_conn, g_tx + g_txhead, g_txtail - g_txhead);
		if (n > 0) {
			g_txhead += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		return -1;
	}
	g_txhead = g_txtail = 0;
	return 0;
}

/* Block (up to ms) until the output buffer is written. */
static void tx_flush_linger(int ms)
{
	int64_t end = now_ns() + (int64_t)ms * 1000000;
	while (g_txhead < g_txtail) {
		struct pollfd p = { g_conn, POLLOUT, 0 };
		int64_t left = end - now_ns();
		if (left <= 0 || tx_flush() < 0)
			return;
		if (g_txhead >= g_txtail)
			return;
		if (poll(&p, 1, (int)(left / 1000000) + 1) < 0 && errno != EINTR)
			return;
		if (p.revents & (POLLERR | POLLHUP))
			return;
	}
}

/* ---------------------------------------------------------------- commands */

#if MVM_DEV_SHELL

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

static void cmd_exited(int status)
{
	int64_t now = now_ns();
	g_cmd.exited = 1;
	g_cmd.status = status;
	g_cmd.drain_idle = now + DRAIN_IDLE_NS;
	g_cmd.drain_max = now + DRAIN_MAX_NS;
	/* the command is gone: whatever stdin is still buffered is discarded (and acknowledged) */
	g_cmd.pending_ack += (uint32_t)g_cmd.in_len;
	g_cmd.in_len = 0;
	close_fd(&g_cmd.in_fd);
}

static void reap(void)
{
	char buf[64];
	int st;
	pid_t p;

	while (read(g_sig_r, buf, sizeof(buf)) > 0)
		;
	if (g_cmd.active && !g_cmd.exited) {
		siginfo_t si;
		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, (id_t)g_cmd.pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
		    si.si_pid == g_cmd.pid) {
			/* the zombie still holds the group id: kill the group before reaping */
			kill(-g_cmd.pid, SIGKILL);
			while (waitpid(g_cmd.pid, &st, 0) < 0 && errno == EINTR)
				;
			cmd_exited(st);
		}
	}
	while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
		if (g_cmd.active && !g_cmd.exited && p == g_cmd.pid) {
			kill(-p, SIGKILL);
			cmd_exited(st);
		}
	}
}

/* Kill and reap the running command, drop its state (disconnect, fatal error). */
static void cmd_abort(void)
{
	int st;
	if (!g_cmd.active)
		return;
	kill(-g_cmd.pid, SIGKILL);
	if (!g_cmd.exited) {
		while (waitpid(g_cmd.pid, &st, 0) < 0 && errno == EINTR)
			;
	}
	close_fd(&g_cmd.out_fd);
	close_fd(&g_cmd.err_fd);
	close_fd(&g_cmd.in_fd);
	memset(&g_cmd, 0, sizeof(g_cmd));
	g_cmd.out_fd = g_cmd.err_fd = g_cmd.in_fd = -1;
}

static void flush_acks(void)
{
	if (g_cmd.pending_ack && tx_room(MVM_HDR_LEN + 4)) {
		uint8_t *p = tx_tail_ptr(MVM_HDR_LEN + 4);
		g_txtail += mvm_enc_stdin_ack(p, g_cmd.pending_ack);
		g_cmd.in_acked += g_cmd.pending_ack;
		g_cmd.pending_ack = 0;
	}
}

/* Send EXIT once the main process is reaped and the pipes are drained (or given up on). */
static void cmd_check_finish(int64_t now)
{
	int32_t code;
	uint8_t kind;
	uint8_t *p;

	if (!g_cmd.active || !g_cmd.exited)
		return;
	if ((g_cmd.out_fd >= 0 || g_cmd.err_fd >= 0) && now < g_cmd.drain_idle && now < g_cmd.drain_max)
		return;
	if (!tx_room(CTRL_RESERVE))
		return;
	flush_acks();
	if (g_cmd.pending_ack)
		return;
	close_fd(&g_cmd.out_fd);
	close_fd(&g_cmd.err_fd);
	if (g_cmd.timed_out) {
		kind = MVM_EXIT_TIMEOUT;
		code = SIGKILL;
	} else if (WIFSIGNALED(g_cmd.status)) {
		kind = MVM_EXIT_SIGNALED;
		code = WTERMSIG(g_cmd.status);
	} else {
		kind = MVM_EXIT_EXITED;
		code = WEXITSTATUS(g_cmd.status);
	}
	p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
	g_txtail += mvm_enc_exit(p, kind, code, "", 0);
	memset(&g_cmd, 0, sizeof(g_cmd));
	g_cmd.out_fd = g_cmd.err_fd = g_cmd.in_fd = -1;
}

static void cmd_read_pipe(int *fd, uint8_t type)
{
	uint8_t *p;
	ssize_t n;

	if (*fd < 0 || !tx_room(DATA_ROOM))
		return;
	p = tx_tail_ptr(MVM_HDR_LEN + MVM_MAX_DATA);
	n = read(*fd, p + MVM_HDR_LEN, MVM_MAX_DATA);
	if (n > 0) {
		mvm_enc_data_header(p, type, (uint32_t)n);
		g_txtail += MVM_HDR_LEN + (size_t)n;
		g_cmd.drain_idle = now_ns() + DRAIN_IDLE_NS;
	} else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
		close_fd(fd);
	}
}

static void cmd_write_stdin(void)
{
	while (g_cmd.in_fd >= 0 && g_cmd.in_len > 0) {
		size_t chunk = g_cmd.in_len;
		ssize_t n;
		if (g_cmd.in_head + chunk > MVM_STDIN_WINDOW)
			chunk = MVM_STDIN_WINDOW - g_cmd.in_head;
		n = write(g_cmd.in_fd, g_inbuf + g_cmd.in_head, chunk);
		if (n > 0) {
			g_cmd.in_head = (g_cmd.in_head + (size_t)n) % MVM_STDIN_WINDOW;
			g_cmd.in_len -= (size_t)n;
			g_cmd.pending_ack += (uint32_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		/* EPIPE and friends: the command closed its stdin; discard */
		g_cmd.pending_ack += (uint32_t)g_cmd.in_len;
		g_cmd.in_len = 0;
		close_fd(&g_cmd.in_fd);
	}
	if (g_cmd.in_fd >= 0 && g_cmd.in_len == 0 && g_cmd.stdin_eof)
		close_fd(&g_cmd.in_fd);
}

static void on_stdin(const struct mvm_h2g *m)
{
	uint32_t len = m->u.stdin_data.len;
	size_t pos, first;

	if (!g_cmd.active)
		return; /* races with the command's exit: ignored */
	g_cmd.in_received += len;
	if (g_cmd.in_received - g_cmd.in_acked > MVM_STDIN_WINDOW) {
		tx_ctrl_error(MVM_E_PROTOCOL, 1, "STDIN window exceeded");
		g_closing = 1;
		return;
	}
	if (g_cmd.in_fd < 0 || g_cmd.stdin_eof) {
		g_cmd.pending_ack += len;
		return;
	}
	/* in_len <= received - acked <= window, so this fits */
	pos = (g_cmd.in_head + g_cmd.in_len) % MVM_STDIN_WINDOW;
	first = MVM_STDIN_WINDOW - pos;
	if (first > len)
		first = len;
	memcpy(g_inbuf + pos, m->u.stdin_data.data, first);
	memcpy(g_inbuf, m->u.stdin_data.data + first, len - first);
	g_cmd.in_len += len;
	cmd_write_stdin();
}

static void on_stdin_eof(void)
{
	if (!g_cmd.active)
		return;
	g_cmd.stdin_eof = 1;
	cmd_write_stdin();
}

static void on_signal(const struct mvm_h2g *m)
{
	if (g_cmd.active && !g_cmd.exited)
		kill(-g_cmd.pid, m->u.signal.signo);
}

static int g_child_report = -1;

static void child_fail(int code, const char *what, const uint8_t *name, size_t len, int err)
{
	char buf[MVM_MAX_MSG + 2];
	size_t n;
	buf[0] = (char)code;
	n = mvm_fmt_start_error(buf + 1, sizeof(buf) - 1, what, name, len, err);
	if (write(g_child_report, buf, n + 1) < 0) {
		/* parent gone */
	}
	_exit(code);
}

static char **g_env_all;

static int env_key_cmp(const char *s, const char *t)
{
	size_t ks = strcspn(s, "="), kt = strcspn(t, "=");
	int c = memcmp(s, t, ks < kt ? ks : kt);
	if (c)
		return c;
	return ks == kt ? 0 : ks < kt ? -1 : 1;
}

/* sort entry indexes by key, then by position (a later entry overrides an earlier one) */
static int env_cmp(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;
	int c = env_key_cmp(g_env_all[x], g_env_all[y]);
	if (c)
		return c;
	return x < y ? -1 : (x > y);
}

/* In the child: build argv/env, chdir, redirect, exec. Never returns. */
static void child_exec(const struct mvm_h2g *m, int in_rd, int out_wr, int err_wr)
{
	extern char **environ;
	static const char *base_env[] = {
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
	};
	const uint32_t argc = m->u.exec.argc, envc = m->u.exec.envc;
	const size_t nbase = sizeof(base_env) / sizeof(base_env[0]);
	size_t nenv = nbase + envc, i, j;
	char **argv, **envp, *sb, *sp, *cwd;
	size_t *sorted;
	const uint8_t *cur;
	sigset_t set;
	int sig, fd;

	setpgid(0, 0);
	for (sig = 1; sig < 65; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&set);
	sigprocmask(SIG_SETMASK, &set, NULL);

	/* strings: cwd, base env, argv, env, each NUL terminated */
	sb = malloc(m->u.exec.strbytes + 1 + argc + envc + 256);
	argv = malloc(sizeof(char *) * ((size_t)argc + 1));
	envp = malloc(sizeof(char *) * (nenv + 1));
	sorted = malloc(sizeof(size_t) * (nenv + 1));
	if (!sb || !argv || !envp || !sorted)
		child_fail(126, "exec", m->u.exec.argv + 4, mvm_get_u32(m->u.exec.argv), ENOMEM);
	sp = sb;
	if (m->u.exec.cwd.len == 0) {
		*sp++ = '/';
	} else {
		memcpy(sp, m->u.exec.cwd.p, m->u.exec.cwd.len);
		sp += m->u.exec.cwd.len;
	}
	cwd = sb;
	*sp++ = 0;
	for (i = 0; i < nbase; i++) {
		size_t l = strlen(base_env[i]);
		memcpy(sp, base_env[i], l + 1);
		envp[i] = sp;
		sp += l + 1;
	}
	cur = m->u.exec.argv;
	for (i = 0; i < argc; i++) {
		struct mvm_str s = mvm_str_next(&cur);
		argv[i] = sp;
		memcpy(sp, s.p, s.len);
		sp += s.len;
		*sp++ = 0;
	}
	argv[argc] = NULL;
	cur = m->u.exec.env;
	for (i = 0; i < envc; i++) {
		struct mvm_str s = mvm_str_next(&cur);
		envp[nbase + i] = sp;
		memcpy(sp, s.p, s.len);
		sp += s.len;
		*sp++ = 0;
	}
	/* overlay: of entries with the same key only the last one is kept */
	for (i = 0; i < nenv; i++)
		sorted[i] = i;
	g_env_all = envp;
	qsort(sorted, nenv, sizeof(size_t), env_cmp);
	for (i = 0; i + 1 < nenv; i++)
		if (env_key_cmp(envp[sorted[i]], envp[sorted[i + 1]]) == 0)
			envp[sorted[i]] = NULL;
	for (i = j = 0; i < nenv; i++)
		if (envp[i])
			envp[j++] = envp[i];
	envp[j] = NULL;

	if (m->u.exec.flags & MVM_EXEC_F_MKDIR_CWD) {
		if (mkdir_p(cwd) < 0)
			child_fail(126, "mkdir", (const uint8_t *)cwd, strlen(cwd), errno);
	}
	if (chdir(cwd) < 0)
		child_fail(126, "chdir", (const uint8_t *)cwd, strlen(cwd), errno);

	if (in_rd < 0) {
		in_rd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (in_rd < 0)
			child_fail(126, "open", (const uint8_t *)"/dev/null", 9, errno);
	}
	if (dup2(in_rd, 0) < 0 || dup2(out_wr, 1) < 0 || dup2(err_wr, 2) < 0)
		child_fail(126, "dup2", (const uint8_t *)"stdio", 5, errno);
	/* everything the agent opens is close-on-exec; make sure of it for anything inherited */
	if (syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */) < 0) {
		for (fd = 3; fd < 1024; fd++)
			if (fd != g_child_report)
				fcntl(fd, F_SETFD, FD_CLOEXEC);
	}
	fcntl(g_child_report, F_SETFD, FD_CLOEXEC);

	environ = envp;
	execvp(argv[0], argv);
	child_fail(errno == ENOENT ? 127 : 126, "exec", (const uint8_t *)argv[0], strlen(argv[0]),
		   errno);
}

static void on_exec(const struct mvm_h2g *m)
{
	int rep[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 }, in[2] = { -1, -1 };
	int want_stdin = (m->u.exec.flags & MVM_EXEC_F_STDIN) != 0;
	char buf[MVM_MAX_MSG + 8];
	size_t got = 0;
	pid_t pid;
	uint8_t *p;

	if (g_cmd.active) {
		tx_ctrl_error(MVM_E_BUSY, 0, "a command is already running");
		return;
	}
	if (pipe2(rep, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 ||
	    (want_stdin && pipe2(in, O_CLOEXEC) < 0)) {
		int e = errno;
		close_fd(&rep[0]), close_fd(&rep[1]), close_fd(&out[0]), close_fd(&out[1]);
		close_fd(&err[0]), close_fd(&err[1]), close_fd(&in[0]), close_fd(&in[1]);
		p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
		mvm_fmt_start_error(buf, sizeof(buf), "pipe", (const uint8_t *)"", 0, e);
		g_txtail += mvm_enc_exit(p, MVM_EXIT_NOSTART, 126, buf, strlen(buf));
		return;
	}
	pid = fork();
	if (pid == 0) {
		close(rep[0]);
		g_child_report = rep[1];
		child_exec(m, in[0], out[1], err[1]);
	}
	close_fd(&rep[1]), close_fd(&out[1]), close_fd(&err[1]), close_fd(&in[0]);
	if (pid < 0) {
		int e = errno;
		close_fd(&rep[0]), close_fd(&out[0]), close_fd(&err[0]), close_fd(&in[1]);
		p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
		mvm_fmt_start_error(buf, sizeof(buf), "fork", (const uint8_t *)"", 0, e);
		g_txtail += mvm_enc_exit(p, MVM_EXIT_NOSTART, 126, buf, strlen(buf));
		return;
	}
	setpgid(pid, pid); /* races with the child's own setpgid; either wins */

	/* wait for exec (report pipe closes) or a failure report */
	for (;;) {
		ssize_t n = read(rep[0], buf + got, sizeof(buf) - 1 - got);
		if (n > 0) {
			got += (size_t)n;
			if (got < sizeof(buf) - 1)
				continue;
		} else if (n < 0 && errno == EINTR) {
			continue;
		}
		break;
	}
	close_fd(&rep[0]);
	if (got > 0) {
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
		close_fd(&out[0]), close_fd(&err[0]), close_fd(&in[1]);
		p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
		g_txtail += mvm_enc_exit(p, MVM_EXIT_NOSTART, (uint8_t)buf[0], buf + 1, got - 1);
		return;
	}

	memset(&g_cmd, 0, sizeof(g_cmd));
	g_cmd.active = 1;
	g_cmd.pid = pid;
	g_cmd.out_fd = out[0];
	g_cmd.err_fd = err[0];
	g_cmd.in_fd = in[1];
	set_nonblock(out[0]);
	set_nonblock(err[0]);
	if (in[1] >= 0)
		set_nonblock(in[1]);
	if (m->u.exec.timeout_ms)
		g_cmd.deadline = now_ns() + (int64_t)m->u.exec.timeout_ms * 1000000;
	p = tx_tail_ptr(MVM_HDR_LEN + 4);
	g_txtail += mvm_enc_started(p, (uint32_t)pid);
	/* a child that already exited is picked up through SIGCHLD */
}

#else /* !MVM_DEV_SHELL */

static void reap(void)
{
	char buf[64];
	int st;
	while (read(g_sig_r, buf, sizeof(buf)) > 0)
		;
	while (waitpid(-1, &st, WNOHANG) > 0)
		;
}

#endif

/* ---------------------------------------------------------------- requests */

static void apply_clock_entropy(const struct mvm_h2g *m)
{
	struct timespec ts;
	int fd;

	ts.tv_sec = (time_t)(m->u.hello.host_time_ns / 1000000000ull);
	ts.tv_nsec = (long)(m->u.hello.host_time_ns % 1000000000ull);
	if (m->u.hello.host_time_ns && clock_settime(CLOCK_REALTIME, &ts) < 0)
		logmsg("clock_settime: %s", strerror(errno));
	if (m->u.hello.n == 0)
		return;
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		logmsg("open /dev/urandom: %s", strerror(errno));
		return;
	}
	{
		struct {
			int entropy_count;
			int buf_size;
			uint8_t buf[MVM_MAX_ENTROPY];
		} info;
		info.entropy_count = m->u.hello.n * 8;
		info.buf_size = m->u.hello.n;
		memcpy(info.buf, m->u.hello.entropy, m->u.hello.n);
		if (ioctl(fd, MVM_RNDADDENTROPY, &info) < 0 &&
		    write(fd, m->u.hello.entropy, m->u.hello.n) < 0)
			logmsg("adding entropy: %s", strerror(errno));
		if (ioctl(fd, MVM_RNDRESEEDCRNG) < 0 && errno != ENODATA)
			logmsg("reseeding the CRNG: %s", strerror(errno));
	}
	close(fd);
}

/* copy a protocol string (validated: no NUL inside) as a C string into g_scratch at *off */
static char *scratch_str(struct mvm_str s, size_t *off)
{
	char *r = g_scratch + *off;
	memcpy(r, s.p, s.len);
	r[s.len] = 0;
	*off += s.len + 1;
	return r;
}

/*
 * "serial:ID" names the virtio block device whose /sys/block/NAME/serial is ID: VMMs do not promise
 * the order in which drives become /dev/vdX, but QEMU (serial=) and Firecracker (drive_id) both
 * give each drive an ID. Anything else is used as a path unchanged.
 */
static int resolve_device(const char *dev, char *out, size_t outlen)
{
	static const char prefix[] = "serial:";
	if (strncmp(dev, prefix, sizeof(prefix) - 1) != 0) {
		snprintf(out, outlen, "%s", dev);
		return 0;
	}
	const char *want = dev + sizeof(prefix) - 1;
	DIR *d = opendir("/sys/block");
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while (found < 0 && (e = readdir(d)) != NULL) {
		char path[300], serial[128];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/block/%.200s/serial", e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, serial, sizeof(serial) - 1);
		close(fd);
		if (n <= 0)
			continue;
		while (n > 0 && (serial[n - 1] == '\n' || serial[n - 1] == ' ' || serial[n - 1] == 0))
			n--;
		serial[n] = 0;
		if (strcmp(serial, want) == 0) {
			snprintf(out, outlen, "/dev/%.200s", e->d_name);
			found = 0;
		}
	}
	closedir(d);
	if (found < 0)
		errno = ENODEV;
	return found;
}

static void on_mount(const struct mvm_h2g *m)
{
	size_t off = 0;
	char *dev = scratch_str(m->u.mount.device, &off);
	char *mp = scratch_str(m->u.mount.mountpoint, &off);
	char *fs = scratch_str(m->u.mount.fstype, &off);
	unsigned long fl = (m->u.mount.flags & MVM_MOUNT_F_RDONLY) ? MS_RDONLY : 0;
	char msg[MVM_MAX_MSG];

	if (mkdir_p(mp) < 0) {
		snprintf(msg, sizeof(msg), "mkdir %.1000s: %s", mp, strerror(errno));
		tx_ctrl_error(MVM_E_MOUNT_FAILED, 0, msg);
		return;
	}
	char path[256];
	if (resolve_device(dev, path, sizeof(path)) < 0) {
		snprintf(msg, sizeof(msg), "no block device %.1000s: %s", dev, strerror(errno));
		tx_ctrl_error(MVM_E_MOUNT_FAILED, 0, msg);
		return;
	}
	if (mount(path, mp, fs, fl, NULL) < 0) {
		snprintf(msg, sizeof(msg), "mount %.1000s on %.1000s (%.100s): %s", dev, mp, fs,
			 strerror(errno));
		tx_ctrl_error(MVM_E_MOUNT_FAILED, 0, msg);
		return;
	}
	tx_ok();
}

static void on_unmount(const struct mvm_h2g *m)
{
	size_t off = 0;
	char *mp = scratch_str(m->u.unmount.mountpoint, &off);
	char msg[MVM_MAX_MSG];

	sync();
	if (umount(mp) < 0) {
		snprintf(msg, sizeof(msg), "umount %.1000s: %s", mp, strerror(errno));
		tx_ctrl_error(MVM_E_MOUNT_FAILED, 0, msg);
		return;
	}
	tx_ok();
}

static uint32_t capabilities(void)
{
	uint32_t c = MVM_CAP_MOUNT | MVM_CAP_POWEROFF;
	if (MVM_DEV_SHELL)
		c |= MVM_CAP_EXEC;
	if (g_guest_mode)
		c |= MVM_CAP_TIME_ENTROPY;
	return c;
}

static void handle_frame(uint8_t type, const uint8_t *payload, uint32_t len)
{
	struct mvm_h2g m;
	const char *bad;

	if (type == MVM_H_HELLO && len >= 2 && mvm_get_u16(payload) != MVM_PROTO_VERSION) {
		char msg[128];
		snprintf(msg, sizeof(msg), "protocol version mismatch: host %u, agent %u",
			 (unsigned)mvm_get_u16(payload), (unsigned)MVM_PROTO_VERSION);
		tx_ctrl_error(MVM_E_VERSION, 1, msg);
		g_closing = 1;
		return;
	}
	if (mvm_parse_h2g(type, payload, len, &m) < 0) {
		tx_ctrl_error(MVM_E_PROTOCOL, 1, "malformed frame");
		g_closing = 1;
		return;
	}
	if (type == MVM_H_HELLO) {
#if MVM_DEV_SHELL
		if (g_tkind == T_PORT && g_cmd.active) {
			/* A port has no accept: a host that detached and reattached before we saw the
			 * port read end-of-file (or a restored snapshot) shows up as a HELLO in the old
			 * session. No host sends HELLO while its command runs, so start a fresh session:
			 * the old command is killed and its unsent output dropped. */
			logmsg("HELLO during a command on a port: host reattached, fresh session");
			cmd_abort();
			g_txhead = g_txtail = 0;
		}
#endif
		if (g_guest_mode)
			apply_clock_entropy(&m);
		g_hello_done = 1;
		g_txtail += mvm_enc_hello(tx_tail_ptr(64), MVM_PROTO_VERSION, capabilities(),
					  MVM_AGENT_VERSION);
		return;
	}
	if (!g_hello_done) {
		tx_ctrl_error(MVM_E_NOT_READY, 0, "HELLO first");
		return;
	}
	bad = mvm_validate_h2g(&m);
	if (bad) {
		tx_ctrl_error(MVM_E_BAD_REQUEST, 0, bad);
		return;
	}
	switch (type) {
	case MVM_H_EXEC:
#if MVM_DEV_SHELL
		on_exec(&m);
#else
		tx_ctrl_error(MVM_E_EXEC_UNAVAILABLE, 0, MVM_MSG_EXEC_UNAVAILABLE);
#endif
		break;
#if MVM_DEV_SHELL
	case MVM_H_STDIN:
		on_stdin(&m);
		break;
	case MVM_H_STDIN_EOF:
		on_stdin_eof();
		break;
	case MVM_H_SIGNAL:
		on_signal(&m);
		break;
#else
	case MVM_H_STDIN:
	case MVM_H_STDIN_EOF:
	case MVM_H_SIGNAL:
		break; /* no command can be running */
#endif
	case MVM_H_MOUNT:
		on_mount(&m);
		break;
	case MVM_H_UNMOUNT:
		on_unmount(&m);
		break;
	case MVM_H_SYNC:
		sync();
		tx_ok();
		break;
	case MVM_H_POWEROFF:
		tx_ok();
		g_poweroff = 1;
		break;
	default:
		break;
	}
}

/* ---------------------------------------------------------------- sessions and transports */

static void session_reset(void)
{
	g_session = 0;
	g_hello_done = 0;
	g_closing = 0;
	g_rxlen = 0;
	g_txhead = g_txtail = 0;
}

static const char *busy_reason(const char *why)
{
#if MVM_DEV_SHELL
	if (g_cmd.active)
		return why;
#endif
	(void)why;
	return NULL;
}

/* why: logged only when the session ended abnormally or a command was still running */
static void end_session(const char *why)
{
	if (why)
		logmsg("session ended: %s", why);
#if MVM_DEV_SHELL
	cmd_abort();
#endif
	if (g_tkind == T_PORT) {
		/* a port is never closed: wait for the host to detach and reattach */
	} else if (g_conn >= 0) {
		close(g_conn);
		g_conn = -1;
	}
	session_reset();
}

static void do_poweroff(void)
{
#if MVM_DEV_SHELL
	cmd_abort();
#endif
	tx_flush_linger(FLUSH_LINGER_MS);
	sync();
	if (g_guest_mode) {
		reboot(RB_AUTOBOOT);
		logmsg("reboot: %s", strerror(errno));
		reboot(RB_POWER_OFF);
		logmsg("poweroff: %s", strerror(errno));
		g_poweroff = 0;
		return;
	}
	if (g_conn >= 0)
		close(g_conn);
	if (g_tkind == T_UNIX)
		unlink(g_unix_path);
	exit(0);
}

/* Read host bytes and handle complete frames while there is room for replies.
 * Returns -1 when the host went away. */
static int rx_pump(void)
{
	int frames = 0;

	while (!g_closing && !g_poweroff && frames < 64) {
		size_t want;
		ssize_t n;

		if (g_rxlen >= MVM_HDR_LEN && g_rxlen == MVM_HDR_LEN + g_rx_plen) {
			if (!tx_room(CTRL_RESERVE))
				return 0;
			g_rxlen = 0;
			handle_frame(g_rx_type, g_rx + MVM_HDR_LEN, g_rx_plen);
			frames++;
			continue;
		}
		if (!tx_room(CTRL_RESERVE))
			return 0;
		want = g_rxlen < MVM_HDR_LEN ? MVM_HDR_LEN - g_rxlen : MVM_HDR_LEN + g_rx_plen - g_rxlen;
		n = read(g_conn, g_rx + g_rxlen, want);
		if (n > 0) {
			g_port_nohost = 0;
			if (g_port_discard) {
				g_rxlen = 0;
				continue;
			}
			g_session = 1;
			g_rxlen += (size_t)n;
			if (g_rxlen == MVM_HDR_LEN && mvm_parse_header(g_rx, &g_rx_plen, &g_rx_type) < 0) {
				tx_ctrl_error(MVM_E_PROTOCOL, 1, "bad frame header (unknown type or bad length)");
				g_closing = 1;
				return 0;
			}
			continue;
		}
		if (n == 0) {
			if (g_tkind == T_PORT) {
				g_port_nohost = 1;
				g_port_discard = 0;
			}
			return -1;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			g_port_nohost = 0; /* a port answers EAGAIN only while a host is attached */
			return 0;
		}
		if (g_tkind == T_PORT) {
			g_port_nohost = 1;
		}
		return -1;
	}
	return 0;
}

static int open_port(void)
{
	char path[512], name[300];
	struct dirent *de;
	DIR *d = opendir("/sys/class/virtio-ports");
	int fd = -1;

	if (!d)
		return -1;
	while ((de = readdir(d)) != NULL) {
		int nf;
		ssize_t n;
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", de->d_name);
		nf = open(path, O_RDONLY | O_CLOEXEC);
		if (nf < 0)
			continue;
		n = read(nf, name, sizeof(name) - 1);
		close(nf);
		if (n <= 0)
			continue;
		name[n] = 0;
		if (name[n - 1] == '\n')
			name[n - 1] = 0;
		if (strcmp(name, g_port_name) != 0)
			continue;
		snprintf(path, sizeof(path), "/dev/%s", de->d_name);
		fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
		if (fd < 0)
			logmsg("open %s: %s", path, strerror(errno));
		break;
	}
	closedir(d);
	return fd;
}

static void setup_transport(void)
{
	if (g_tkind == T_PORT) {
		int tries = 0;
		while ((g_conn = open_port()) < 0) {
			if (++tries == 50)
				logmsg("virtio port %s not found yet, still looking", g_port_name);
			usleep(100000);
		}
		logmsg("listening on virtio port %s", g_port_name);
		return;
	}
	if (g_tkind == T_UNIX) {
		struct sockaddr_un sa;
		memset(&sa, 0, sizeof(sa));
		sa.sun_family = AF_UNIX;
		memcpy(sa.sun_path, g_unix_path, strlen(g_unix_path) + 1);
		g_listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (g_listen_fd < 0) {
			logmsg("socket: %s", strerror(errno));
			exit(1);
		}
		unlink(g_unix_path);
		if (bind(g_listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
		    listen(g_listen_fd, 4) < 0) {
			logmsg("listen on unix:%s: %s", g_unix_path, strerror(errno));
			exit(1);
		}
		logmsg("listening on unix:%s", g_unix_path);
		return;
	}
	for (int tries = 0;; tries++) {
		struct mvm_sockaddr_vm sa;
		memset(&sa, 0, sizeof(sa));
		sa.svm_family = AF_VSOCK;
		sa.svm_port = g_vsock_port;
		sa.svm_cid = MVM_VMADDR_CID_ANY;
		g_listen_fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (g_listen_fd >= 0 && bind(g_listen_fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
		    listen(g_listen_fd, 4) == 0)
			break;
		if (tries == 0 || tries == 50)
			logmsg("listen on vsock:%u: %s", g_vsock_port, strerror(errno));
		if (g_listen_fd >= 0)
			close(g_listen_fd);
		g_listen_fd = -1;
		usleep(100000);
	}
	logmsg("listening on vsock:%u", g_vsock_port);
}

static void accept_conn(void)
{
	while (g_conn < 0) {
		struct pollfd p[2] = { { g_listen_fd, POLLIN, 0 }, { g_sig_r, POLLIN, 0 } };
		if (poll(p, 2, -1) < 0)
			continue;
		if (p[1].revents)
			reap();
		if (p[0].revents) {
			g_conn = accept4(g_listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
			if (g_conn < 0 && errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
				logmsg("accept: %s", strerror(errno));
		}
	}
	session_reset();
	g_session = 1;
}

static void serve_once(void)
{
	struct pollfd pfd[5];
	int n = 0, i_conn = -1, timeout = -1;
	int want_rx, rx_ready;
#if MVM_DEV_SHELL
	int i_out = -1, i_err = -1, i_in = -1;
	int64_t now = now_ns();
#endif

	/* a fatal error or POWEROFF reply is the last frame of the session */
	if (g_closing) {
#if MVM_DEV_SHELL
		cmd_abort();
#endif
		tx_flush_linger(FLUSH_LINGER_MS);
		if (g_tkind == T_PORT)
			g_port_discard = 1;
		end_session("protocol error");
		return;
	}
	if (g_poweroff) {
		do_poweroff();
		return;
	}
#if MVM_DEV_SHELL
	if (g_cmd.active && !g_cmd.exited && g_cmd.deadline && now >= g_cmd.deadline &&
	    !g_cmd.timed_out) {
		g_cmd.timed_out = 1;
		kill(-g_cmd.pid, SIGKILL);
	}
	if (g_cmd.active && g_cmd.exited && !tx_room(DATA_ROOM)) {
		/* stalled by the host, not waiting for the pipes: the drain clock does not run */
		g_cmd.drain_idle = now + DRAIN_IDLE_NS;
		if (g_cmd.drain_max < now + DRAIN_IDLE_NS)
			g_cmd.drain_max = now + DRAIN_IDLE_NS;
	}
	flush_acks();
	cmd_check_finish(now);
#endif
	if (tx_flush() < 0) {
		end_session(g_session ? "write failed" : NULL);
		return;
	}

	pfd[n].fd = g_sig_r;
	pfd[n].events = POLLIN;
	n++;
	want_rx = tx_room(CTRL_RESERVE);
	/* a complete frame left waiting for room in the output buffer: handle it without waiting */
	rx_ready = want_rx && g_rxlen >= MVM_HDR_LEN && g_rxlen == MVM_HDR_LEN + g_rx_plen;
	if (rx_ready)
		timeout = 0;
	if (g_tkind == T_PORT && g_port_nohost) {
		timeout = PORT_IDLE_MS;
	} else if (want_rx || tx_used()) {
		i_conn = n;
		pfd[n].fd = g_conn;
		pfd[n].events = (short)((want_rx ? POLLIN : 0) | (tx_used() ? POLLOUT : 0));
		n++;
	}
#if MVM_DEV_SHELL
	if (g_cmd.active) {
		int room = tx_room(DATA_ROOM);
		if (room && g_cmd.out_fd >= 0) {
			i_out = n;
			pfd[n].fd = g_cmd.out_fd;
			pfd[n].events = POLLIN;
			n++;
		}
		if (room && g_cmd.err_fd >= 0) {
			i_err = n;
			pfd[n].fd = g_cmd.err_fd;
			pfd[n].events = POLLIN;
			n++;
		}
		if (g_cmd.in_fd >= 0 && g_cmd.in_len) {
			i_in = n;
			pfd[n].fd = g_cmd.in_fd;
			pfd[n].events = POLLOUT;
			n++;
		}
		{
			int64_t t = -1;
			if (!g_cmd.exited && g_cmd.deadline && !g_cmd.timed_out)
				t = g_cmd.deadline;
			if (g_cmd.exited) {
				int64_t d = g_cmd.drain_idle < g_cmd.drain_max ? g_cmd.drain_idle
									      : g_cmd.drain_max;
				if (t < 0 || d < t)
					t = d;
			}
			if (t >= 0) {
				int64_t ms = (t - now + 999999) / 1000000;
				if (ms < 0)
					ms = 0;
				if (ms > 60000)
					ms = 60000;
				if (timeout < 0 || ms < timeout)
					timeout = (int)ms;
			}
		}
	}
#endif
	if (poll(pfd, (nfds_t)n, timeout) < 0) {
		if (errno != EINTR)
			logmsg("poll: %s", strerror(errno));
		return;
	}
	if (pfd[0].revents)
		reap();
	if (g_tkind == T_PORT && g_port_nohost) {
		/* probe: data means a host attached */
		if (rx_pump() < 0 && g_session)
			end_session(busy_reason("host detached during a command"));
		return;
	}
	if (i_conn >= 0) {
		short re = pfd[i_conn].revents;
		if (re & POLLOUT) {
			if (tx_flush() < 0) {
				end_session("write failed");
				return;
			}
		}
		if (want_rx && (rx_ready || (re & (POLLIN | POLLHUP | POLLERR)))) {
			if (rx_pump() < 0) {
				end_session(busy_reason("host disconnected during a command"));
				return;
			}
		} else if (!want_rx && (re & (POLLHUP | POLLERR))) {
			if (g_tkind == T_PORT)
				g_port_nohost = 1;
			end_session(busy_reason("host disconnected during a command"));
			return;
		}
	}
	if (g_closing || g_poweroff)
		return;
#if MVM_DEV_SHELL
	if (i_out >= 0 && pfd[i_out].revents)
		cmd_read_pipe(&g_cmd.out_fd, MVM_G_STDOUT);
	if (i_err >= 0 && pfd[i_err].revents)
		cmd_read_pipe(&g_cmd.err_fd, MVM_G_STDERR);
	if (i_in >= 0 && pfd[i_in].revents)
		cmd_write_stdin();
#endif
}

static int parse_listen(const char *spec)
{
	if (strncmp(spec, "unix:", 5) == 0 && spec[5]) {
		if (strlen(spec + 5) >= sizeof(g_unix_path)) {
			logmsg("unix socket path too long");
			return -1;
		}
		g_tkind = T_UNIX;
		strcpy(g_unix_path, spec + 5);
	} else if (strcmp(spec, "vsock") == 0 || strncmp(spec, "vsock:", 6) == 0) {
		g_tkind = T_VSOCK;
		if (spec[5] == ':') {
			char *end;
			unsigned long p = strtoul(spec + 6, &end, 10);
			if (*end || !spec[6] || p > 0xffffffffUL) {
				logmsg("bad vsock port: %s", spec + 6);
				return -1;
			}
			g_vsock_port = (unsigned)p;
		}
	} else if (strncmp(spec, "port:", 5) == 0 && spec[5] &&
		   strlen(spec + 5) < sizeof(g_port_name)) {
		g_tkind = T_PORT;
		strcpy(g_port_name, spec + 5);
	} else {
		logmsg("bad listen address: %s (want unix:PATH, vsock[:PORT] or port:NAME)", spec);
		return -1;
	}
	return 0;
}

/* A path is a mount point when it lives on another device than its parent. */
static int is_mountpoint(const char *path)
{
	char parent[256];
	struct stat a, b;
	snprintf(parent, sizeof(parent), "%s/..", path);
	return stat(path, &a) == 0 && stat(parent, &b) == 0 && a.st_dev != b.st_dev;
}

static void mount_missing(const char *src, const char *dir, const char *type, unsigned long flags,
			  const char *data)
{
	if (is_mountpoint(dir))
		return;
	mkdir(dir, 0755);
	if (mount(src, dir, type, flags, data) < 0)
		logmsg("mount %s on %s: %s", type, dir, strerror(errno));
}

static void loopback_up(void)
{
	struct ifreq {
		char name[16];
		short flags;
		char pad[22];
	} ifr;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.name, "lo");
	/* SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP | IFF_RUNNING; spelled out to keep net headers out */
	if (ioctl(fd, 0x8913, &ifr) == 0) {
		ifr.flags |= 0x1 | 0x40;
		if (ioctl(fd, 0x8914, &ifr) < 0)
			logmsg("bringing up lo: %s", strerror(errno));
	}
	close(fd);
}

/*
 * The guest's early user space, done here in a few system calls rather than by an rc script that
 * forks a busybox process per step: under software emulation that saves a visible part of the boot.
 * Everything is skipped when already there (a template's first stage mounts some of it).
 */
static void guest_setup(void)
{
	static char cmdline[4096];
	ssize_t n = -1;
	int fd;
	char *tok, *save = NULL;
	const unsigned long safe = MS_NOSUID | MS_NODEV;

	mount_missing("proc", "/proc", "proc", safe | MS_NOEXEC, NULL);
	mount_missing("sysfs", "/sys", "sysfs", safe | MS_NOEXEC, NULL);
	mount_missing("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount_missing("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666");
	mount_missing("tmpfs", "/dev/shm", "tmpfs", safe, "mode=1777");
	mount_missing("tmpfs", "/tmp", "tmpfs", safe, "mode=1777");
	mount_missing("tmpfs", "/run", "tmpfs", safe, "mode=0755");
	symlink("/proc/self/fd", "/dev/fd");
	symlink("/proc/self/fd/0", "/dev/stdin");
	symlink("/proc/self/fd/1", "/dev/stdout");
	symlink("/proc/self/fd/2", "/dev/stderr");
	if (sethostname("mvm", 3) < 0)
		logmsg("sethostname: %s", strerror(errno));
	loopback_up();

	g_tkind = T_PORT;
	fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, cmdline, sizeof(cmdline) - 1);
		close(fd);
	}
	if (n < 0) {
		logmsg("cannot read /proc/cmdline, using port:%s", g_port_name);
		return;
	}
	cmdline[n] = 0;
	for (tok = strtok_r(cmdline, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(tok, "mvm.agent=", 10) == 0 && parse_listen(tok + 10) < 0) {
			g_tkind = T_PORT;
			strcpy(g_port_name, "org.mvm.agent");
			logmsg("ignoring bad mvm.agent=, using port:%s", g_port_name);
		}
	}
}

int main(int argc, char **argv)
{
	int i, p[2];
	const char *listen_spec = NULL;
	struct sigaction sa;

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--version") == 0) {
			printf("%s\n", MVM_AGENT_VERSION);
			return 0;
		} else if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
			listen_spec = argv[++i];
		} else if (strncmp(argv[i], "--listen=", 9) == 0) {
			listen_spec = argv[i] + 9;
		} else {
			fprintf(stderr,
				"usage: mvm-agent [--listen unix:PATH|vsock[:PORT]|port:NAME] [--version]\n");
			return 2;
		}
	}

	/* fds 0-2 must exist so that pipes never land on them */
	for (i = 0; i < 3; i++) {
		if (fcntl(i, F_GETFD) < 0) {
			int fd = open("/dev/null", O_RDWR);
			if (fd >= 0 && fd != i) {
				dup2(fd, i);
				close(fd);
			}
		}
	}

	signal(SIGPIPE, SIG_IGN);
	if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
		logmsg("pipe: %s", strerror(errno));
		return 1;
	}
	g_sig_r = p[0];
	g_sig_w = p[1];
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigchld;
	sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);

	if (listen_spec) {
		if (parse_listen(listen_spec) < 0)
			return 2;
	} else {
		g_guest_mode = 1;
		guest_setup();
	}
	logmsg("%s%s starting (%s)", MVM_AGENT_VERSION, MVM_DEV_SHELL ? "" : " (no dev shell)",
	       g_guest_mode ? "guest" : "native");
	setup_transport();
	if (g_guest_mode && chdir("/") < 0)
		logmsg("chdir /: %s", strerror(errno));

	for (;;) {
		if (g_tkind != T_PORT && g_conn < 0)
			accept_conn();
		serve_once();
	}
}
