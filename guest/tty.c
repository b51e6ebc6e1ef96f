/* EXEC's TTY flag: the pseudo-terminal a command runs on. The agent keeps the master; the child
 * makes the slave its controlling terminal and its stdin, stdout and stderr. Only in dev-shell
 * builds. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

static void set_size(int fd, uint16_t rows, uint16_t cols)
{
	struct winsize ws = { .ws_row = rows, .ws_col = cols };
	ioctl(fd, TIOCSWINSZ, &ws);
}

/* A fresh pty of the given size. 0 with both fds open (close-on-exec, so the child keeps only
 * what it dup2s), or -1 with errno set and nothing open. */
int tty_open(uint16_t rows, uint16_t cols, int *master, int *slave)
{
	const char *name;
	int m, s, e;

	m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (m < 0)
		return -1;
	if (grantpt(m) < 0 || unlockpt(m) < 0 || !(name = ptsname(m)))
		goto fail;
	s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (s < 0)
		goto fail;
	set_size(m, rows, cols);
	*master = m;
	*slave = s;
	return 0;
fail:
	e = errno;
	close(m);
	errno = e;
	return -1;
}

/* In the child: a new session (so the process group id is the pid, as without a tty) with the
 * slave as its controlling terminal. Returns -1 with errno set on failure. */
int tty_attach(int slave)
{
	if (setsid() < 0)
		return -1;
	return ioctl(slave, TIOCSCTTY, 0);
}

/* STDIN_EOF on a terminal: what typing the end-of-file character does (^D unless the command
 * changed it). A terminal cannot be half-closed, so closing the master would hang up the
 * command instead. */
void tty_write_eof(int master)
{
	struct termios t;
	unsigned char c = 4;
	if (tcgetattr(master, &t) == 0 && t.c_cc[VEOF] != _POSIX_VDISABLE)
		c = t.c_cc[VEOF];
	while (write(master, &c, 1) < 0 && errno == EINTR)
		;
}

/* SIGKILL to every process of session `sid`, found by the session field of /proc/PID/stat. Passes
 * repeat while one finds somebody (a process may fork while we look), at most a few times. */
void tty_kill_session(pid_t sid)
{
	int pass, found = 1;

	for (pass = 0; pass < 8 && found; pass++) {
		DIR *d = opendir("/proc");
		struct dirent *e;

		if (!d)
			return;
		found = 0;
		while ((e = readdir(d))) {
			char path[64], stat[256], state;
			const char *close_paren;
			int ppid, pgrp, session;
			long pid = strtol(e->d_name, NULL, 10);

			if (pid <= 0)
				continue;
			snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
			if (read_text(path, stat, sizeof(stat)) <= 0)
				continue;
			/* the command name in parentheses may itself hold ") " */
			close_paren = strrchr(stat, ')');
			if (close_paren &&
			    sscanf(close_paren + 1, " %c %d %d %d", &state, &ppid, &pgrp, &session) == 4 &&
			    session == sid && state != 'Z' && kill((pid_t)pid, SIGKILL) == 0)
				found = 1;
		}
		closedir(d);
	}
}

void on_resize(const struct mvm_h2g *m)
{
	/* with no terminal command running it is ignored (it races with the command's exit) */
	if (g_cmd.active && g_cmd.tty_fd >= 0)
		set_size(g_cmd.tty_fd, m->u.resize.rows, m->u.resize.cols);
}
