/* Frame dispatch: what each request from the host does, once transport.c has framed it. MOUNT and
 * UNMOUNT are answered here; a command's requests go to command.c. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

static char g_scratch[MVM_MAX_PAYLOAD + 8];

/* mkdir -p; returns 0 or -1 with errno */
int mkdir_p(char *path)
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
		c |= MVM_CAP_EXEC | MVM_CAP_TTY | MVM_CAP_USER;
	if (g_guest_mode)
		c |= MVM_CAP_TIME_ENTROPY;
	return c;
}

void handle_frame(uint8_t type, const uint8_t *payload, uint32_t len)
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
			tx_discard();
		}
#endif
		if (g_guest_mode)
			apply_clock_entropy(&m);
		g_hello_done = 1;
		tx_commit(mvm_enc_hello(tx_tail_ptr(64), MVM_PROTO_VERSION, capabilities(),
					MVM_AGENT_VERSION));
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
	case MVM_H_RESIZE:
		on_resize(&m);
		break;
#else
	case MVM_H_STDIN:
	case MVM_H_STDIN_EOF:
	case MVM_H_SIGNAL:
	case MVM_H_RESIZE:
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
