/* The guest's system state: early mounts, loopback, hostname, and HELLO's clock and entropy. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

/* <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]) */
#define MVM_RNDADDENTROPY 0x40085203
/* <linux/random.h>: RNDRESEEDCRNG = _IO('R', 0x07). Since Linux 5.18 added entropy only reaches
 * the CRNG at its next scheduled reseed (up to a minute): clones of one snapshot would keep producing
 * the same /dev/urandom bytes until then, so the agent forces the reseed. */
#define MVM_RNDRESEEDCRNG 0x5207

void apply_clock_entropy(const struct mvm_h2g *m)
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
void guest_setup(void)
{
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
}
