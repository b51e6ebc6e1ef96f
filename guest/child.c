/* The forked child of EXEC, between fork() and exec(): argv and environment, cwd, stdio. A failure
 * is reported to the agent through report_fd as the exit code byte and the message. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent.h"

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

/* HOME=... for the EXEC's user: the home /etc/passwd gives uid, or / without an entry. */
static const char *user_home_entry(uint32_t uid, gid_t *primary_gid)
{
	struct passwd *pw = getpwuid((uid_t)uid);
	const char *dir = pw && pw->pw_dir && pw->pw_dir[0] ? pw->pw_dir : "/";
	size_t l = strlen(dir);
	char *entry = malloc(l + 6);

	*primary_gid = pw ? pw->pw_gid : (gid_t)uid;
	if (!entry)
		child_fail(126, "user", (const uint8_t *)"HOME", 4, ENOMEM);
	memcpy(entry, "HOME=", 5);
	memcpy(entry + 5, dir, l + 1);
	return entry;
}

/* Supplementary groups first: once the uid is dropped nothing can be changed any more. */
static void become_user(uint32_t uid, gid_t gid)
{
	char ids[32];
	int n = snprintf(ids, sizeof(ids), "%u:%u", (unsigned)uid, (unsigned)gid);
	if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid((uid_t)uid) < 0)
		child_fail(126, "user", (const uint8_t *)ids, (size_t)n, errno);
}

/* In the child: build argv/env, chdir, redirect, exec. Never returns. */
void child_exec(const struct mvm_h2g *m, int report_fd, int in_rd, int out_wr, int err_wr)
{
	extern char **environ;
	const char *base_env[] = {
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
	};
	const int as_user = (m->u.exec.flags & MVM_EXEC_F_USER) != 0;
	gid_t gid = (gid_t)m->u.exec.gid, primary_gid = 0;
	const uint32_t argc = m->u.exec.argc, envc = m->u.exec.envc;
	const size_t nbase = sizeof(base_env) / sizeof(base_env[0]);
	size_t nenv = nbase + envc, i, j;
	char **argv, **envp, *sb, *sp, *cwd;
	size_t *sorted;
	const uint8_t *cur;
	sigset_t set;
	int sig, fd;

	g_child_report = report_fd;
	if (!(m->u.exec.flags & MVM_EXEC_F_TTY))
		setpgid(0, 0);
	else if (tty_attach(out_wr) < 0) /* with a tty, out_wr is its slave */
		child_fail(126, "tty", (const uint8_t *)"", 0, errno);
	for (sig = 1; sig < 65; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&set);
	sigprocmask(SIG_SETMASK, &set, NULL);

	if (as_user) {
		base_env[1] = user_home_entry(m->u.exec.uid, &primary_gid);
		if (m->u.exec.gid == MVM_GID_OF_USER)
			gid = primary_gid;
	}
	/* strings: cwd, base env, argv, env, each NUL terminated */
	sb = malloc(m->u.exec.strbytes + 1 + argc + envc + 256 + strlen(base_env[1]));
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
	/* after mkdir, which runs as root as a container's WORKDIR does; before chdir, so a cwd the
	 * user may not enter fails here rather than leaving the command inside it */
	if (as_user)
		become_user(m->u.exec.uid, gid);
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
