/* Where the agent listens and how a host reaches it: a unix socket (native tests), vsock, or a
 * virtio port, which is never accepted on: a host attaches to it and detaches. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"

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

enum transport g_tkind;
static char g_unix_path[108];
static unsigned g_vsock_port = MVM_AGENT_VSOCK_PORT;
static char g_port_name[256] = "org.mvm.agent";

static int g_listen_fd = -1;

/* SIGIO on the port while no host is attached: the kernel sends it when one attaches (and on
 * data), so the agent need not poll for the host. Off while attached, where data would raise it
 * for nothing. Returns 1 when it was armed by this call. */
int port_notify_attach(int on)
{
	static int armed;
	int fl;

	if (on == armed)
		return 0;
	armed = on;
	fl = fcntl(g_conn, F_GETFL);
	if (on && fcntl(g_conn, F_SETOWN, getpid()) < 0)
		logmsg("F_SETOWN on the port: %s", strerror(errno));
	if (fl < 0 || fcntl(g_conn, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC) < 0)
		logmsg("O_ASYNC on the port: %s", strerror(errno));
	return on;
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
		ssize_t n;
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", de->d_name);
		n = read_text(path, name, sizeof(name));
		if (n <= 0)
			continue;
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

void setup_transport(void)
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

/* sig_fd: readable when a child changed state, handled by reap() */
void accept_conn(int sig_fd)
{
	while (g_conn < 0) {
		struct pollfd p[2] = { { g_listen_fd, POLLIN, 0 }, { sig_fd, POLLIN, 0 } };
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

int parse_listen(const char *spec)
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

/* In the guest the kernel command line names the transport: mvm.agent=vsock[:PORT] or port:NAME. */
void listen_from_cmdline(void)
{
	static char cmdline[4096];
	char *tok, *save = NULL;

	g_tkind = T_PORT;
	if (read_text("/proc/cmdline", cmdline, sizeof(cmdline)) < 0) {
		logmsg("cannot read /proc/cmdline, using port:%s", g_port_name);
		return;
	}
	for (tok = strtok_r(cmdline, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(tok, "mvm.agent=", 10) == 0 && parse_listen(tok + 10) < 0) {
			g_tkind = T_PORT;
			strcpy(g_port_name, "org.mvm.agent");
			logmsg("ignoring bad mvm.agent=, using port:%s", g_port_name);
		}
	}
}

/* native POWEROFF: leave no socket file behind */
void transport_close(void)
{
	if (g_conn >= 0)
		close(g_conn);
	if (g_tkind == T_UNIX)
		unlink(g_unix_path);
}
