/* Unit tests of guest/proto.c: the shared vectors (docs/protocol-vectors/vectors.txt) and a fixed-seed
 * mutation fuzz loop over the parser. Built with gcc -fsanitize=address,undefined.
 * usage: test_proto VECTORS_FILE [FUZZ_ITERATIONS] */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

static int g_pass, g_fail;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
	va_list ap;
	if (ok) {
		g_pass++;
		return;
	}
	g_fail++;
	printf("FAIL ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

/* ------------------------------------------------------------------ vectors */

struct vec {
	char name[64];
	char dir[8];
	char expect[8];
	uint8_t *bytes;
	size_t len;
};

static struct vec g_vecs[256];
static int g_nvec;

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int load_vectors(const char *path)
{
	FILE *f = fopen(path, "r");
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;

	if (!f) {
		printf("FAIL cannot open %s: %s\n", path, strerror(errno));
		return -1;
	}
	while ((n = getline(&line, &cap, f)) >= 0) {
		char *hex, *end;
		struct vec *v;
		size_t i, hl;
		if (line[0] == '#' || line[0] == '\n' || line[0] == 0)
			continue;
		if (g_nvec == (int)(sizeof(g_vecs) / sizeof(g_vecs[0])))
			break;
		v = &g_vecs[g_nvec];
		if (sscanf(line, "%63s %7s %7s", v->name, v->dir, v->expect) != 3) {
			printf("FAIL bad vector line: %.60s\n", line);
			g_fail++;
			continue;
		}
		/* the fourth space-separated field */
		hex = line;
		for (i = 0; i < 3; i++) {
			hex = strchr(hex, ' ');
			if (!hex)
				break;
			hex++;
		}
		if (!hex) {
			printf("FAIL bad vector line: %.60s\n", line);
			g_fail++;
			continue;
		}
		end = hex;
		while (hexval(*end) >= 0)
			end++;
		hl = (size_t)(end - hex);
		if (hl % 2) {
			printf("FAIL odd hex length in %s\n", v->name);
			g_fail++;
			continue;
		}
		v->len = hl / 2;
		v->bytes = malloc(v->len ? v->len : 1);
		for (i = 0; i < v->len; i++)
			v->bytes[i] = (uint8_t)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
		g_nvec++;
	}
	free(line);
	fclose(f);
	return 0;
}

/* Agent-side processing of raw bytes as one frame: 1 = accepted (fills m), 0 = rejected as a
 * protocol error, -1 = incomplete (the agent would wait for more bytes). The buffer is parsed in
 * an exact-size heap copy so that ASan sees any over-read. */
static int process(const uint8_t *bytes, size_t len, struct mvm_h2g *m, uint8_t **copy)
{
	uint32_t plen;
	uint8_t type;
	uint8_t *c;

	*copy = NULL;
	if (len < MVM_HDR_LEN)
		return -1;
	if (mvm_parse_header(bytes, &plen, &type) < 0)
		return 0;
	if (len - MVM_HDR_LEN < plen)
		return -1;
	c = malloc(plen ? plen : 1);
	memcpy(c, bytes + MVM_HDR_LEN, plen);
	*copy = c;
	if (mvm_parse_h2g(type, c, plen, m) < 0)
		return 0;
	return 1;
}

static int str_eq(struct mvm_str s, const char *lit)
{
	return s.len == strlen(lit) && memcmp(s.p, lit, s.len) == 0;
}

static int list_eq(const uint8_t *cur, uint32_t n, const char *const *want, uint32_t wn)
{
	uint32_t i;
	if (n != wn)
		return 0;
	for (i = 0; i < n; i++)
		if (!str_eq(mvm_str_next(&cur), want[i]))
			return 0;
	return 1;
}

static void check_h2g_fields(const struct vec *v, const struct mvm_h2g *m)
{
	const char *nm = v->name;
	if (!strcmp(nm, "hello_host")) {
		static const uint8_t ent[4] = { 1, 2, 3, 4 };
		check(m->type == MVM_H_HELLO && m->u.hello.version == 1 &&
			      m->u.hello.host_time_ns == 1764455919123456789ull && m->u.hello.n == 4 &&
			      memcmp(m->u.hello.entropy, ent, 4) == 0,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_simple")) {
		static const char *const argv[] = { "true" };
		check(m->type == MVM_H_EXEC && m->u.exec.timeout_ms == 0 && m->u.exec.flags == 0 &&
			      m->u.exec.cwd.len == 0 && list_eq(m->u.exec.argv, m->u.exec.argc, argv, 1) &&
			      m->u.exec.envc == 0,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_full")) {
		static const char *const argv[] = { "sh", "-c", "echo \"$X\" \xc3\xa9" };
		static const char *const env[] = { "X=1", "EMPTY=" };
		check(m->type == MVM_H_EXEC && m->u.exec.timeout_ms == 3000 &&
			      m->u.exec.flags == (MVM_EXEC_F_STDIN | MVM_EXEC_F_MKDIR_CWD) &&
			      str_eq(m->u.exec.cwd, "/app") &&
			      list_eq(m->u.exec.argv, m->u.exec.argc, argv, 3) &&
			      list_eq(m->u.exec.env, m->u.exec.envc, env, 2),
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_empty_arg")) {
		static const char *const argv[] = { "printf", "" };
		check(m->type == MVM_H_EXEC && list_eq(m->u.exec.argv, m->u.exec.argc, argv, 2) &&
			      m->u.exec.envc == 0,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_user")) {
		check(m->type == MVM_H_EXEC && m->u.exec.flags == MVM_EXEC_F_USER &&
			      str_eq(m->u.exec.cwd, "/tmp") && m->u.exec.uid == 1000 && m->u.exec.gid == 100,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_user_primary_gid")) {
		check(m->type == MVM_H_EXEC && m->u.exec.uid == 65534 && m->u.exec.gid == MVM_GID_OF_USER,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_tty_user")) {
		check(m->type == MVM_H_EXEC && m->u.exec.flags == (MVM_EXEC_F_TTY | MVM_EXEC_F_USER) &&
			      m->u.exec.rows == 30 && m->u.exec.cols == 100 && m->u.exec.uid == 1000 &&
			      m->u.exec.gid == 1000,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "exec_tty")) {
		static const char *const argv[] = { "sh" };
		check(m->type == MVM_H_EXEC && m->u.exec.flags == MVM_EXEC_F_TTY &&
			      list_eq(m->u.exec.argv, m->u.exec.argc, argv, 1) && m->u.exec.envc == 0 &&
			      m->u.exec.rows == 30 && m->u.exec.cols == 100,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "resize")) {
		check(m->type == MVM_H_RESIZE && m->u.resize.rows == 40 && m->u.resize.cols == 120,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "stdin")) {
		check(m->type == MVM_H_STDIN && m->u.stdin_data.len == 4 &&
			      memcmp(m->u.stdin_data.data, "abc\n", 4) == 0,
		      "%s: fields", nm);
	} else if (!strcmp(nm, "signal_term")) {
		check(m->type == MVM_H_SIGNAL && m->u.signal.signo == 15, "%s: fields", nm);
	} else if (!strcmp(nm, "mount_ro")) {
		check(m->type == MVM_H_MOUNT && m->u.mount.flags == 1 &&
			      str_eq(m->u.mount.device, "/dev/vdb") &&
			      str_eq(m->u.mount.mountpoint, "/host") && str_eq(m->u.mount.fstype, "ext4"),
		      "%s: fields", nm);
	} else if (!strcmp(nm, "unmount")) {
		check(m->type == MVM_H_UNMOUNT && str_eq(m->u.unmount.mountpoint, "/work"),
		      "%s: fields", nm);
	}
}

/* Encode the message a g2h vector describes; returns the length, 0 if the name is unknown. */
static size_t encode_named(const char *nm, uint8_t *out)
{
	char msg[256];
	size_t n;
	if (!strcmp(nm, "hello_agent"))
		return mvm_enc_hello(out, 1, 0xf, "mvm-agent 0.1.0" /* the vector's example, not this build's version */);
	if (!strcmp(nm, "started"))
		return mvm_enc_started(out, 42);
	if (!strcmp(nm, "stdout"))
		return mvm_enc_data(out, MVM_G_STDOUT, (const uint8_t *)"hello\n", 6);
	if (!strcmp(nm, "stderr_binary"))
		return mvm_enc_data(out, MVM_G_STDERR, (const uint8_t *)"\x00\xff\x0a\x0d", 4);
	if (!strcmp(nm, "exit_code7"))
		return mvm_enc_exit(out, MVM_EXIT_EXITED, 7, "", 0);
	if (!strcmp(nm, "exit_signal9"))
		return mvm_enc_exit(out, MVM_EXIT_SIGNALED, 9, "", 0);
	if (!strcmp(nm, "exit_timeout"))
		return mvm_enc_exit(out, MVM_EXIT_TIMEOUT, 9, "", 0);
	if (!strcmp(nm, "exit_notfound")) {
		n = mvm_fmt_start_error(msg, sizeof(msg), "exec", (const uint8_t *)"nope", 4, ENOENT);
		return mvm_enc_exit(out, MVM_EXIT_NOSTART, 127, msg, n);
	}
	if (!strcmp(nm, "ok"))
		return mvm_enc_ok(out);
	if (!strcmp(nm, "error_exec_unavailable"))
		return mvm_enc_error(out, MVM_E_EXEC_UNAVAILABLE, 0, MVM_MSG_EXEC_UNAVAILABLE,
				     strlen(MVM_MSG_EXEC_UNAVAILABLE));
	if (!strcmp(nm, "stdin_ack"))
		return mvm_enc_stdin_ack(out, 4);
	return 0;
}

static void test_vectors(void)
{
	static uint8_t out[MVM_HDR_LEN + MVM_MAX_PAYLOAD];
	int i, nh2g_ok = 0, nh2g_err = 0, ng2h_ok = 0;

	for (i = 0; i < g_nvec; i++) {
		struct vec *v = &g_vecs[i];
		struct mvm_h2g m;
		uint8_t *copy;
		int r;

		if (!strcmp(v->dir, "h2g")) {
			r = process(v->bytes, v->len, &m, &copy);
			if (!strcmp(v->expect, "ok")) {
				nh2g_ok++;
				check(r == 1 && v->len == MVM_HDR_LEN + mvm_get_u32(v->bytes),
				      "%s: h2g ok vector not accepted (r=%d)", v->name, r);
				if (r == 1) {
					check(mvm_validate_h2g(&m) == NULL, "%s: refused by validation",
					      v->name);
					check_h2g_fields(v, &m);
				}
			} else {
				nh2g_err++;
				check(r == 0, "%s: h2g error vector not rejected (r=%d)", v->name, r);
			}
			free(copy);
		} else if (!strcmp(v->dir, "g2h") && !strcmp(v->expect, "ok")) {
			size_t n = encode_named(v->name, out);
			ng2h_ok++;
			check(n == v->len && memcmp(out, v->bytes, n) == 0,
			      "%s: encoder output differs from the vector", v->name);
		}
		/* g2h error vectors exercise the host's decoder; the agent never decodes g2h frames */
	}
	check(nh2g_ok >= 11 && nh2g_err >= 12 && ng2h_ok >= 11,
	      "vector file looks incomplete (%d h2g ok, %d h2g error, %d g2h ok)", nh2g_ok, nh2g_err,
	      ng2h_ok);
}

/* ------------------------------------------------------------------ unit checks */

static void test_units(void)
{
	uint8_t hdr[5], buf[64];
	uint32_t len;
	uint8_t type;
	int t, ok = 1;
	struct mvm_h2g m;
	char msg[64];
	size_t n;

	/* every type outside 0x01-0x09 is rejected from the header alone */
	for (t = 0; t < 256; t++) {
		mvm_put_u32(hdr, 0);
		hdr[4] = (uint8_t)t;
		int want = t == MVM_H_STDIN_EOF || t == MVM_H_SYNC || t == MVM_H_POWEROFF;
		if ((mvm_parse_header(hdr, &len, &type) == 0) != want)
			ok = 0;
	}
	check(ok, "header type acceptance");
	mvm_put_u32(hdr, MVM_MAX_PAYLOAD);
	hdr[4] = MVM_H_EXEC;
	check(mvm_parse_header(hdr, &len, &type) == 0 && len == MVM_MAX_PAYLOAD, "max payload ok");
	mvm_put_u32(hdr, MVM_MAX_PAYLOAD + 1);
	check(mvm_parse_header(hdr, &len, &type) < 0, "max payload + 1 rejected");
	mvm_put_u32(hdr, MVM_MAX_DATA);
	hdr[4] = MVM_H_STDIN;
	check(mvm_parse_header(hdr, &len, &type) == 0, "STDIN 65536 ok");

	/* validation */
	buf[0] = 0;
	check(mvm_parse_h2g(MVM_H_SIGNAL, buf, 1, &m) == 0 && mvm_validate_h2g(&m) != NULL,
	      "signal 0 refused");
	buf[0] = 64;
	check(mvm_parse_h2g(MVM_H_SIGNAL, buf, 1, &m) == 0 && mvm_validate_h2g(&m) == NULL,
	      "signal 64 ok");
	buf[0] = 65;
	check(mvm_parse_h2g(MVM_H_SIGNAL, buf, 1, &m) == 0 && mvm_validate_h2g(&m) != NULL,
	      "signal 65 refused");
	/* EXEC with a flag bit no version defines */
	memset(buf, 0, sizeof(buf));
	mvm_put_u32(buf + 4, 0x80000000u);
	mvm_put_u32(buf + 12, 1);
	mvm_put_u32(buf + 16, 1);
	buf[20] = 'x';
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 25, &m) == 0 && mvm_validate_h2g(&m) != NULL,
	      "exec unknown flags refused");
	mvm_put_u32(buf + 4, 0);
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 25, &m) == 0 && mvm_validate_h2g(&m) == NULL,
	      "exec ok");
	buf[20] = 0;
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 25, &m) == 0 && mvm_validate_h2g(&m) != NULL,
	      "exec NUL in argv refused");
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 24, &m) < 0, "exec truncated rejected");
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 26, &m) < 0, "exec trailing rejected");
	/* USER with uid (uid_t)-1, which setuid would take as "leave unchanged" */
	buf[20] = 'x';
	mvm_put_u32(buf + 4, MVM_EXEC_F_USER);
	mvm_put_u32(buf + 25, 0xffffffffu);
	mvm_put_u32(buf + 29, 0);
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 33, &m) == 0 && mvm_validate_h2g(&m) != NULL,
	      "exec uid -1 refused");
	mvm_put_u32(buf + 25, 1000);
	check(mvm_parse_h2g(MVM_H_EXEC, buf, 33, &m) == 0 && mvm_validate_h2g(&m) == NULL,
	      "exec uid 1000 ok");

	/* message formatting and truncation */
	n = mvm_fmt_start_error(msg, sizeof(msg), "exec", (const uint8_t *)"nope", 4, ENOENT);
	check(n == strlen(msg) && !strcmp(msg, "exec \"nope\": No such file or directory"),
	      "fmt: %s", msg);
	{
		static uint8_t longname[5000];
		char big[MVM_MAX_MSG];
		memset(longname, 'a', sizeof(longname));
		n = mvm_fmt_start_error(big, sizeof(big), "exec", longname, sizeof(longname), EACCES);
		check(n == strlen(big) && n < sizeof(big) && strstr(big, "...\": ") != NULL,
		      "fmt truncation");
		for (size_t cap = 1; cap < 60; cap++) {
			n = mvm_fmt_start_error(msg, cap, "exec", longname, 100, ENOENT);
			if (n >= cap || strlen(msg) != n)
				ok = 0;
		}
		check(ok, "fmt small buffers");
	}
	/* long messages are capped */
	{
		static uint8_t out[MVM_MAX_CTRL_FRAME + 100];
		static char longmsg[MVM_MAX_MSG * 2];
		memset(longmsg, 'm', sizeof(longmsg));
		n = mvm_enc_error(out, 1, 1, longmsg, sizeof(longmsg));
		check(n <= MVM_MAX_CTRL_FRAME && mvm_get_u32(out) == n - MVM_HDR_LEN, "error capped");
		n = mvm_enc_exit(out, 3, 126, longmsg, sizeof(longmsg));
		check(n <= MVM_MAX_CTRL_FRAME && mvm_get_u32(out) == n - MVM_HDR_LEN, "exit capped");
	}
}

/* ------------------------------------------------------------------ fuzz */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
	/* xorshift64* */
	g_rng ^= g_rng >> 12;
	g_rng ^= g_rng << 25;
	g_rng ^= g_rng >> 27;
	return (uint32_t)((g_rng * 0x2545f4914f6cdd1dull) >> 32);
}

static uint32_t rnd_below(uint32_t n)
{
	return n ? rnd() % n : 0;
}

static const uint32_t interesting[] = { 0,	    1,		2,	    3,		4,
					 0x7f,	    0x80,	0xff,	    0x100,	0xffff,
					 0x10000,   0x10001,	0x40000,    0x100000,	0x100001,
					 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff };

/* mutate buf (len bytes, capacity cap) in place; returns the new length */
static size_t mutate(uint8_t *buf, size_t len, size_t cap)
{
	int ops = 1 + (int)rnd_below(6), i;
	for (i = 0; i < ops; i++) {
		uint32_t pos = len ? rnd_below((uint32_t)len) : 0;
		switch (rnd_below(9)) {
		case 0: /* bit flip */
			if (len)
				buf[pos] ^= (uint8_t)(1u << rnd_below(8));
			break;
		case 1: /* random byte */
			if (len)
				buf[pos] = (uint8_t)rnd();
			break;
		case 2: /* interesting u32 */
			if (len >= 4) {
				pos = rnd_below((uint32_t)len - 3);
				mvm_put_u32(buf + pos,
					    interesting[rnd_below(sizeof(interesting) / sizeof(interesting[0]))]);
			}
			break;
		case 3: /* truncate */
			len = rnd_below((uint32_t)len + 1);
			break;
		case 4: { /* insert random bytes */
			uint32_t k = 1 + rnd_below(16), j;
			if (len + k > cap)
				break;
			memmove(buf + pos + k, buf + pos, len - pos);
			for (j = 0; j < k; j++)
				buf[pos + j] = (uint8_t)rnd();
			len += k;
			break;
		}
		case 5: { /* delete a range */
			uint32_t k = 1 + rnd_below(8);
			if (pos + k > len)
				k = (uint32_t)(len - pos);
			memmove(buf + pos, buf + pos + k, len - pos - k);
			len -= k;
			break;
		}
		case 6: /* random type */
			if (len >= 5)
				buf[4] = (uint8_t)rnd_below(16);
			break;
		case 7: /* fix the frame length to what is there (reaches the payload parser) */
			if (len >= 5)
				mvm_put_u32(buf, (uint32_t)(len - 5));
			break;
		case 8: /* append a string-ish field */
			if (len + 8 <= cap) {
				uint32_t k = rnd_below(4);
				mvm_put_u32(buf + len, k);
				len += 4;
				while (k-- && len < cap)
					buf[len++] = (uint8_t)rnd();
			}
			break;
		}
	}
	return len;
}

static int walk_ok(const struct mvm_h2g *m, const uint8_t *base, size_t plen)
{
	const uint8_t *cur;
	size_t total = m->u.exec.cwd.len;
	uint32_t i;
	if (m->u.exec.argc == 0)
		return 0;
	cur = m->u.exec.argv;
	for (i = 0; i < m->u.exec.argc; i++) {
		struct mvm_str s = mvm_str_next(&cur);
		if (s.p < base || s.p + s.len > base + plen)
			return 0;
		total += s.len;
	}
	cur = m->u.exec.env;
	for (i = 0; i < m->u.exec.envc; i++) {
		struct mvm_str s = mvm_str_next(&cur);
		if (s.p < base || s.p + s.len > base + plen)
			return 0;
		total += s.len;
	}
	/* the fields flags append follow the strings */
	if (m->u.exec.flags & MVM_EXEC_F_TTY) {
		if (!m->u.exec.rows || !m->u.exec.cols)
			return 0;
		cur += 4;
	}
	if (m->u.exec.flags & MVM_EXEC_F_USER)
		cur += 8;
	return total == m->u.exec.strbytes && cur == base + plen;
}

static void test_fuzz(long iters)
{
	enum { CAP = 4096 };
	uint8_t *buf = malloc(CAP);
	const struct vec *seeds[256];
	int nseeds = 0, i, bad = 0;
	long it, accepted = 0, rejected = 0, incomplete = 0;

	for (i = 0; i < g_nvec; i++)
		if (!strcmp(g_vecs[i].dir, "h2g") && g_vecs[i].len <= CAP)
			seeds[nseeds++] = &g_vecs[i];
	for (it = 0; it < iters; it++) {
		size_t len;
		struct mvm_h2g m;
		uint8_t *copy;
		int r;

		if (nseeds && rnd_below(8) != 0) {
			const struct vec *v = seeds[rnd_below((uint32_t)nseeds)];
			memcpy(buf, v->bytes, v->len);
			len = mutate(buf, v->len, CAP);
		} else {
			uint32_t j;
			len = rnd_below(64);
			for (j = 0; j < len; j++)
				buf[j] = (uint8_t)rnd();
			if (len >= 5) {
				buf[4] = (uint8_t)rnd_below(12);
				if (rnd_below(2))
					mvm_put_u32(buf, (uint32_t)(len - 5));
			}
		}
		r = process(buf, len, &m, &copy);
		if (r == 1) {
			uint32_t plen = mvm_get_u32(buf);
			accepted++;
			(void)mvm_validate_h2g(&m);
			if (m.type == MVM_H_EXEC && !walk_ok(&m, copy, plen)) {
				if (!bad++)
					printf("FAIL fuzz: inconsistent EXEC parse at iteration %ld\n", it);
			}
			if (m.type == MVM_H_RESIZE && (!m.u.resize.rows || !m.u.resize.cols))
				bad++;
			if (m.type == MVM_H_HELLO && m.u.hello.n > MVM_MAX_ENTROPY)
				bad++;
			if (m.type == MVM_H_STDIN &&
			    (m.u.stdin_data.len < 1 || m.u.stdin_data.len > MVM_MAX_DATA))
				bad++;
		} else if (r == 0) {
			rejected++;
		} else {
			incomplete++;
		}
		free(copy);
	}
	free(buf);
	printf("fuzz: %ld iterations: %ld accepted, %ld rejected, %ld incomplete\n", iters, accepted,
	       rejected, incomplete);
	check(bad == 0 && accepted > 0 && rejected > 0, "fuzz invariants (%d bad)", bad);
}

int main(int argc, char **argv)
{
	long iters = 200000;
	int i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		fprintf(stderr, "usage: test_proto VECTORS_FILE [FUZZ_ITERATIONS]\n");
		return 2;
	}
	if (argc > 2)
		iters = atol(argv[2]);
	if (load_vectors(argv[1]) < 0)
		g_fail++;
	test_vectors();
	test_units();
	test_fuzz(iters);
	for (i = 0; i < g_nvec; i++)
		free(g_vecs[i].bytes);
	printf("%d passed, %d failed\n", g_pass, g_fail);
	return g_fail ? 1 : 0;
}
