/* EXEC's TTY flag: the pseudo-terminal a command runs on. The agent keeps the master; the child
 * makes the slave its controlling terminal and its stdin, stdout and stderr. Only in dev-shell
 * builds. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
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

void on_resize(const struct mvm_h2g *m)
{
	/* with no terminal command running it is ignored (it races with the command's exit) */
	if (g_cmd.active && g_cmd.tty_fd >= 0)
		set_size(g_cmd.tty_fd, m->u.resize.rows, m->u.resize.cols);
}
