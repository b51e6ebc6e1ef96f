/* The shared vectors: every h2g frame is accepted or rejected as the file says, with the fields
 * it names; every g2h frame is what the agent's encoder writes. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_proto.h"

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

void test_vectors(void)
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
