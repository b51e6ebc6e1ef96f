/* The running command: its pipes and stdin window, reaping, and the EXIT report once its output
 * is drained. Only in dev-shell builds. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

struct command g_cmd = { .out_fd = -1, .err_fd = -1, .in_fd = -1, .tty_fd = -1 };
static uint8_t g_inbuf[MVM_STDIN_WINDOW];

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

/* SIGKILL to the command's process group and, with a tty, to all of its session: a job-control
 * shell puts background jobs in groups of their own, which would otherwise keep the terminal
 * open, and their output coming, until the drain limit. */
void cmd_kill(void)
{
	kill(-g_cmd.pid, SIGKILL);
	if (g_cmd.tty_fd >= 0)
		tty_kill_session(g_cmd.pid);
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

void cmd_reap(void)
{
	int st;
	pid_t p;

	if (g_cmd.active && !g_cmd.exited) {
		siginfo_t si;
		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, (id_t)g_cmd.pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
		    si.si_pid == g_cmd.pid) {
			/* the zombie still holds the group id: kill the group before reaping */
			cmd_kill();
			while (waitpid(g_cmd.pid, &st, 0) < 0 && errno == EINTR)
				;
			cmd_exited(st);
		}
	}
	while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
		if (g_cmd.active && !g_cmd.exited && p == g_cmd.pid) {
			cmd_kill();
			cmd_exited(st);
		}
	}
}

/* Kill and reap the running command, drop its state (disconnect, fatal error). */
void cmd_abort(void)
{
	int st;
	if (!g_cmd.active)
		return;
	cmd_kill();
	if (!g_cmd.exited) {
		while (waitpid(g_cmd.pid, &st, 0) < 0 && errno == EINTR)
			;
	}
	close_fd(&g_cmd.out_fd);
	close_fd(&g_cmd.err_fd);
	close_fd(&g_cmd.in_fd);
	close_fd(&g_cmd.tty_fd);
	memset(&g_cmd, 0, sizeof(g_cmd));
	g_cmd.out_fd = g_cmd.err_fd = g_cmd.in_fd = g_cmd.tty_fd = -1;
}

void flush_acks(void)
{
	if (g_cmd.pending_ack && tx_room(MVM_HDR_LEN + 4)) {
		uint8_t *p = tx_tail_ptr(MVM_HDR_LEN + 4);
		tx_commit(mvm_enc_stdin_ack(p, g_cmd.pending_ack));
		g_cmd.in_acked += g_cmd.pending_ack;
		g_cmd.pending_ack = 0;
	}
}

/* Send EXIT once the main process is reaped and the pipes are drained (or given up on). */
void cmd_check_finish(int64_t now)
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
	close_fd(&g_cmd.tty_fd);
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
	tx_commit(mvm_enc_exit(p, kind, code, "", 0));
	memset(&g_cmd, 0, sizeof(g_cmd));
	g_cmd.out_fd = g_cmd.err_fd = g_cmd.in_fd = g_cmd.tty_fd = -1;
}

void cmd_read_pipe(int *fd, uint8_t type)
{
	uint8_t *p;
	ssize_t n;

	/* whole frames while there is room: a full read means more is likely waiting */
	do {
		if (*fd < 0 || !tx_room(DATA_ROOM))
			return;
		p = tx_tail_ptr(MVM_HDR_LEN + MVM_MAX_DATA);
		n = read(*fd, p + MVM_HDR_LEN, MVM_MAX_DATA);
		if (n > 0) {
			mvm_enc_data_header(p, type, (uint32_t)n);
			tx_commit(MVM_HDR_LEN + (size_t)n);
			g_cmd.drain_idle = now_ns() + DRAIN_IDLE_NS;
		} else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
			/* a pty master reads EIO once the last slave fd is closed: that is its end of file */
			close_fd(fd);
		}
	} while (n == (ssize_t)MVM_MAX_DATA);
}

void cmd_write_stdin(void)
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
	if (g_cmd.in_fd >= 0 && g_cmd.in_len == 0 && g_cmd.stdin_eof) {
		if (g_cmd.tty_fd >= 0)
			tty_write_eof(g_cmd.in_fd);
		close_fd(&g_cmd.in_fd);
	}
}

void on_stdin(const struct mvm_h2g *m)
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

void on_stdin_eof(void)
{
	if (!g_cmd.active)
		return;
	g_cmd.stdin_eof = 1;
	cmd_write_stdin();
}

void on_signal(const struct mvm_h2g *m)
{
	if (g_cmd.active && !g_cmd.exited)
		kill(-g_cmd.pid, m->u.signal.signo);
}

void on_exec(const struct mvm_h2g *m)
{
	int rep[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 }, in[2] = { -1, -1 };
	int want_stdin = (m->u.exec.flags & MVM_EXEC_F_STDIN) != 0;
	int want_tty = (m->u.exec.flags & MVM_EXEC_F_TTY) != 0;
	int tty = -1;
	char buf[MVM_MAX_MSG + 8];
	size_t got = 0;
	pid_t pid;
	uint8_t *p;

	if (g_cmd.active) {
		tx_ctrl_error(MVM_E_BUSY, 0, "a command is already running");
		return;
	}
	/* With a tty the slave is the command's stdin, stdout and stderr; the agent reads and writes
	 * the master through dups of it, so that closing one direction leaves the others. */
	if (pipe2(rep, O_CLOEXEC) < 0 ||
	    (want_tty ? tty_open(m->u.exec.rows, m->u.exec.cols, &tty, &out[1]) < 0 ||
				(out[0] = fcntl(tty, F_DUPFD_CLOEXEC, 0)) < 0 ||
				(want_stdin && (in[1] = fcntl(tty, F_DUPFD_CLOEXEC, 0)) < 0)
		      : pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 ||
				(want_stdin && pipe2(in, O_CLOEXEC) < 0))) {
		int e = errno;
		close_fd(&rep[0]), close_fd(&rep[1]), close_fd(&out[0]), close_fd(&out[1]);
		close_fd(&err[0]), close_fd(&err[1]), close_fd(&in[0]), close_fd(&in[1]);
		close_fd(&tty);
		p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
		mvm_fmt_start_error(buf, sizeof(buf), want_tty ? "pty" : "pipe", (const uint8_t *)"", 0, e);
		tx_commit(mvm_enc_exit(p, MVM_EXIT_NOSTART, 126, buf, strlen(buf)));
		return;
	}
	pid = fork();
	if (pid == 0) {
		close(rep[0]);
		if (want_tty)
			child_exec(m, rep[1], out[1], out[1], out[1]);
		child_exec(m, rep[1], in[0], out[1], err[1]);
	}
	close_fd(&rep[1]), close_fd(&out[1]), close_fd(&err[1]), close_fd(&in[0]);
	if (pid < 0) {
		int e = errno;
		close_fd(&rep[0]), close_fd(&out[0]), close_fd(&err[0]), close_fd(&in[1]);
		close_fd(&tty);
		p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
		mvm_fmt_start_error(buf, sizeof(buf), "fork", (const uint8_t *)"", 0, e);
		tx_commit(mvm_enc_exit(p, MVM_EXIT_NOSTART, 126, buf, strlen(buf)));
		return;
	}
	/* races with the child's own setpgid; either wins. Not with a tty: the child's setsid makes
	 * the group, and would fail were it already a group leader. */
	if (!want_tty)
		setpgid(pid, pid);

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
		close_fd(&tty);
		p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
		tx_commit(mvm_enc_exit(p, MVM_EXIT_NOSTART, (uint8_t)buf[0], buf + 1, got - 1));
		return;
	}

	memset(&g_cmd, 0, sizeof(g_cmd));
	g_cmd.active = 1;
	g_cmd.pid = pid;
	g_cmd.out_fd = out[0];
	g_cmd.err_fd = err[0];
	g_cmd.in_fd = in[1];
	g_cmd.tty_fd = tty;
	/* A command that writes faster than the host reads fills a 64 KiB pipe at once; a larger one
	 * lets each wakeup of the agent move several frames (on a pty it fails and changes nothing) */
	fcntl(out[0], F_SETPIPE_SZ, OUTPUT_PIPE_SIZE);
	set_nonblock(out[0]);
	if (err[0] >= 0)
		set_nonblock(err[0]);
	if (in[1] >= 0)
		set_nonblock(in[1]);
	if (m->u.exec.timeout_ms)
		g_cmd.deadline = now_ns() + (int64_t)m->u.exec.timeout_ms * 1000000;
	p = tx_tail_ptr(MVM_HDR_LEN + 4);
	tx_commit(mvm_enc_started(p, (uint32_t)pid));
	/* a child that already exited is picked up through SIGCHLD */
}
