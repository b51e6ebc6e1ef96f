/* mvm-agent: the in-guest agent of mvmctl. Protocol: docs/protocol.md.
 *
 * One single-threaded poll() loop serves one connection at a time and runs at most one command
 * per connection. Built twice: with -DMVM_DEV_SHELL=1 (EXEC available) and without (no exec code
 * compiled in at all). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

/* With no host attached a port only says so by reading 0; its SIGIO (armed while detached) says
 * when one attaches. This poll is the fallback should a kernel not send it. */
#define PORT_ATTACH_POLL_MS 200
#define FLUSH_LINGER_MS 2000

int g_guest_mode;
int g_session;
int g_hello_done;
int g_closing;
int g_poweroff;

static int g_sig_r = -1, g_sig_w = -1;

void logmsg(const char *fmt, ...)
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

int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The start of a small file (procfs, sysfs) as a string of at most size - 1 bytes; its length, or -1. */
ssize_t read_text(const char *path, char *buf, size_t size)
{
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	return n;
}

/* SIGCHLD (a child changed state) and SIGIO (a host attached to the port) wake the poll loop. */
static void on_wakeup_signal(int sig)
{
	int e = errno;
	char c = 0;
	(void)sig;
	if (write(g_sig_w, &c, 1) < 0) {
		/* pipe full: a wakeup is already pending */
	}
	errno = e;
}

void reap(void)
{
	char buf[64];
	while (read(g_sig_r, buf, sizeof(buf)) > 0)
		;
#if MVM_DEV_SHELL
	cmd_reap();
#else
	int st;
	while (waitpid(-1, &st, WNOHANG) > 0)
		;
#endif
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
	transport_close();
	exit(0);
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
		cmd_kill();
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
	rx_ready = want_rx && rx_frame_ready();
	if (rx_ready)
		timeout = 0;
	if (g_tkind == T_PORT && !g_port_nohost)
		port_notify_attach(0);
	if (g_tkind == T_PORT && g_port_nohost) {
		/* armed just now: a host that attached a moment before is seen only by probing at once */
		timeout = port_notify_attach(1) ? 0 : PORT_ATTACH_POLL_MS;
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
	/* Output just read goes out now rather than after another poll(): a round of poll() per
	 * frame is a large part of streaming's cost under emulation. */
	if (tx_used() && g_conn >= 0 && tx_flush() < 0)
		end_session("write failed");
#endif
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
	sa.sa_handler = on_wakeup_signal;
	sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);
	sigaction(SIGIO, &sa, NULL);

	if (listen_spec) {
		if (parse_listen(listen_spec) < 0)
			return 2;
	} else {
		g_guest_mode = 1;
		guest_setup();
		listen_from_cmdline(); /* needs the /proc that guest_setup mounts */
	}
	logmsg("%s%s starting (%s)", MVM_AGENT_VERSION, MVM_DEV_SHELL ? "" : " (no dev shell)",
	       g_guest_mode ? "guest" : "native");
	setup_transport();
	if (g_guest_mode && chdir("/") < 0)
		logmsg("chdir /: %s", strerror(errno));

	for (;;) {
		if (g_tkind != T_PORT && g_conn < 0)
			accept_conn(g_sig_r);
		serve_once();
	}
}
