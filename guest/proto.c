/* mvm guest-agent wire protocol v1: see proto.h and docs/protocol.md. */
#include "proto.h"

#include <string.h>

int mvm_parse_header(const uint8_t *hdr, uint32_t *len, uint8_t *type)
{
	uint32_t l = mvm_get_u32(hdr);
	uint8_t t = hdr[4];
	uint32_t min, max;

	if (l > MVM_MAX_PAYLOAD)
		return -1;
	switch (t) {
	case MVM_H_HELLO:
		/* only the leading version is fixed across protocol versions: a HELLO of another
		 * version must reach the version check (ERROR VERSION, not PROTOCOL) */
		min = 2;
		max = MVM_MAX_PAYLOAD;
		break;
	case MVM_H_EXEC:
		min = 20;
		max = MVM_MAX_PAYLOAD;
		break;
	case MVM_H_STDIN:
		min = 1;
		max = MVM_MAX_DATA;
		break;
	case MVM_H_SIGNAL:
		min = max = 1;
		break;
	case MVM_H_RESIZE:
		min = max = 4;
		break;
	case MVM_H_MOUNT:
		min = 16;
		max = MVM_MAX_PAYLOAD;
		break;
	case MVM_H_UNMOUNT:
		min = 4;
		max = MVM_MAX_PAYLOAD;
		break;
	case MVM_H_STDIN_EOF:
	case MVM_H_SYNC:
	case MVM_H_POWEROFF:
		min = max = 0;
		break;
	default:
		return -1;
	}
	if (l < min || l > max)
		return -1;
	*len = l;
	*type = t;
	return 0;
}

struct rd {
	const uint8_t *p;
	size_t left;
};

static int rd_u8(struct rd *r, uint8_t *v)
{
	if (r->left < 1)
		return -1;
	*v = r->p[0];
	r->p += 1;
	r->left -= 1;
	return 0;
}

static int rd_u16(struct rd *r, uint16_t *v)
{
	if (r->left < 2)
		return -1;
	*v = mvm_get_u16(r->p);
	r->p += 2;
	r->left -= 2;
	return 0;
}

static int rd_u32(struct rd *r, uint32_t *v)
{
	if (r->left < 4)
		return -1;
	*v = mvm_get_u32(r->p);
	r->p += 4;
	r->left -= 4;
	return 0;
}

static int rd_u64(struct rd *r, uint64_t *v)
{
	uint32_t hi, lo;
	if (rd_u32(r, &hi) || rd_u32(r, &lo))
		return -1;
	*v = ((uint64_t)hi << 32) | lo;
	return 0;
}

static int rd_bytes(struct rd *r, size_t n, const uint8_t **p)
{
	if (r->left < n)
		return -1;
	*p = r->p;
	r->p += n;
	r->left -= n;
	return 0;
}

static int rd_str(struct rd *r, struct mvm_str *s)
{
	uint32_t n;
	if (rd_u32(r, &n) || rd_bytes(r, n, &s->p))
		return -1;
	s->len = n;
	return 0;
}

/* A list of count strings; the count is checked against what the payload could hold before any
 * walking, so a huge count costs nothing. */
static int rd_str_list(struct rd *r, uint32_t count, const uint8_t **start, size_t *total)
{
	uint32_t i;
	struct mvm_str s;

	if ((uint64_t)count * 4 > r->left)
		return -1;
	*start = r->p;
	for (i = 0; i < count; i++) {
		if (rd_str(r, &s))
			return -1;
		*total += s.len;
	}
	return 0;
}

int mvm_parse_h2g(uint8_t type, const uint8_t *payload, uint32_t len, struct mvm_h2g *m)
{
	struct rd r = { payload, len };

	memset(m, 0, sizeof(*m));
	m->type = type;
	if (len > MVM_MAX_PAYLOAD)
		return -1;
	switch (type) {
	case MVM_H_HELLO:
		if (rd_u16(&r, &m->u.hello.version) || rd_u64(&r, &m->u.hello.host_time_ns) ||
		    rd_u16(&r, &m->u.hello.n) || m->u.hello.n > MVM_MAX_ENTROPY ||
		    rd_bytes(&r, m->u.hello.n, &m->u.hello.entropy))
			return -1;
		break;
	case MVM_H_EXEC: {
		size_t total = 0;
		if (rd_u32(&r, &m->u.exec.timeout_ms) || rd_u32(&r, &m->u.exec.flags) ||
		    rd_str(&r, &m->u.exec.cwd))
			return -1;
		total += m->u.exec.cwd.len;
		if (rd_u32(&r, &m->u.exec.argc) || m->u.exec.argc == 0 ||
		    rd_str_list(&r, m->u.exec.argc, &m->u.exec.argv, &total))
			return -1;
		if (rd_u32(&r, &m->u.exec.envc) ||
		    rd_str_list(&r, m->u.exec.envc, &m->u.exec.env, &total))
			return -1;
		m->u.exec.strbytes = total;
		/* fields a flag appends are present exactly when it is set, in the flags' order; a zero
		 * terminal size is malformed */
		if ((m->u.exec.flags & MVM_EXEC_F_TTY) &&
		    (rd_u16(&r, &m->u.exec.rows) || rd_u16(&r, &m->u.exec.cols) || !m->u.exec.rows ||
		     !m->u.exec.cols))
			return -1;
		if ((m->u.exec.flags & MVM_EXEC_F_USER) &&
		    (rd_u32(&r, &m->u.exec.uid) || rd_u32(&r, &m->u.exec.gid)))
			return -1;
		break;
	}
	case MVM_H_STDIN:
		if (len < 1 || len > MVM_MAX_DATA)
			return -1;
		m->u.stdin_data.data = payload;
		m->u.stdin_data.len = len;
		r.left = 0;
		break;
	case MVM_H_SIGNAL:
		if (rd_u8(&r, &m->u.signal.signo))
			return -1;
		break;
	case MVM_H_RESIZE:
		if (rd_u16(&r, &m->u.resize.rows) || rd_u16(&r, &m->u.resize.cols) ||
		    !m->u.resize.rows || !m->u.resize.cols)
			return -1;
		break;
	case MVM_H_MOUNT:
		if (rd_u32(&r, &m->u.mount.flags) || rd_str(&r, &m->u.mount.device) ||
		    rd_str(&r, &m->u.mount.mountpoint) || rd_str(&r, &m->u.mount.fstype))
			return -1;
		break;
	case MVM_H_UNMOUNT:
		if (rd_str(&r, &m->u.unmount.mountpoint))
			return -1;
		break;
	case MVM_H_STDIN_EOF:
	case MVM_H_SYNC:
	case MVM_H_POWEROFF:
		break;
	default:
		return -1;
	}
	return r.left == 0 ? 0 : -1;
}

static int has_nul(struct mvm_str s)
{
	return s.len && memchr(s.p, 0, s.len) != NULL;
}

static int list_has_nul(const uint8_t *cur, uint32_t n)
{
	uint32_t i;
	for (i = 0; i < n; i++)
		if (has_nul(mvm_str_next(&cur)))
			return 1;
	return 0;
}

const char *mvm_validate_h2g(const struct mvm_h2g *m)
{
	switch (m->type) {
	case MVM_H_EXEC:
		if (m->u.exec.flags & ~(uint32_t)MVM_EXEC_F_ALL)
			return "EXEC: unknown flag bits";
		if (has_nul(m->u.exec.cwd))
			return "EXEC: NUL byte in cwd";
		if (list_has_nul(m->u.exec.argv, m->u.exec.argc))
			return "EXEC: NUL byte in argv";
		if (list_has_nul(m->u.exec.env, m->u.exec.envc))
			return "EXEC: NUL byte in env";
		if ((m->u.exec.flags & MVM_EXEC_F_USER) && m->u.exec.uid == 0xffffffffu)
			return "EXEC: uid 4294967295 is not a user";
		break;
	case MVM_H_SIGNAL:
		if (m->u.signal.signo < 1 || m->u.signal.signo > 64)
			return "SIGNAL: signal number out of range 1-64";
		break;
	case MVM_H_MOUNT:
		if (m->u.mount.flags & ~(uint32_t)MVM_MOUNT_F_ALL)
			return "MOUNT: unknown flag bits";
		if (has_nul(m->u.mount.device) || has_nul(m->u.mount.mountpoint) ||
		    has_nul(m->u.mount.fstype))
			return "MOUNT: NUL byte in a string";
		break;
	case MVM_H_UNMOUNT:
		if (has_nul(m->u.unmount.mountpoint))
			return "UNMOUNT: NUL byte in mountpoint";
		break;
	default:
		break;
	}
	return NULL;
}

static size_t frame(uint8_t *out, uint8_t type, size_t plen)
{
	mvm_put_u32(out, (uint32_t)plen);
	out[4] = type;
	return MVM_HDR_LEN + plen;
}

size_t mvm_enc_hello(uint8_t *out, uint16_t version, uint32_t caps, const char *agent_version)
{
	uint8_t *p = out + MVM_HDR_LEN;
	size_t n = strlen(agent_version);
	mvm_put_u16(p, version);
	mvm_put_u32(p + 2, caps);
	mvm_put_u32(p + 6, (uint32_t)n);
	memcpy(p + 10, agent_version, n);
	return frame(out, MVM_G_HELLO, 10 + n);
}

size_t mvm_enc_started(uint8_t *out, uint32_t pid)
{
	mvm_put_u32(out + MVM_HDR_LEN, pid);
	return frame(out, MVM_G_STARTED, 4);
}

void mvm_enc_data_header(uint8_t *out, uint8_t type, uint32_t len)
{
	frame(out, type, len);
}

size_t mvm_enc_data(uint8_t *out, uint8_t type, const uint8_t *data, uint32_t len)
{
	memmove(out + MVM_HDR_LEN, data, len);
	return frame(out, type, len);
}

size_t mvm_enc_exit(uint8_t *out, uint8_t kind, int32_t code, const char *msg, size_t msglen)
{
	uint8_t *p = out + MVM_HDR_LEN;
	if (msglen > MVM_MAX_MSG)
		msglen = MVM_MAX_MSG;
	p[0] = kind;
	mvm_put_u32(p + 1, (uint32_t)code);
	mvm_put_u32(p + 5, (uint32_t)msglen);
	if (msglen)
		memcpy(p + 9, msg, msglen);
	return frame(out, MVM_G_EXIT, 9 + msglen);
}

size_t mvm_enc_ok(uint8_t *out)
{
	return frame(out, MVM_G_OK, 0);
}

size_t mvm_enc_error(uint8_t *out, uint16_t code, int fatal, const char *msg, size_t msglen)
{
	uint8_t *p = out + MVM_HDR_LEN;
	if (msglen > MVM_MAX_MSG)
		msglen = MVM_MAX_MSG;
	mvm_put_u16(p, code);
	p[2] = fatal ? 1 : 0;
	mvm_put_u32(p + 3, (uint32_t)msglen);
	if (msglen)
		memcpy(p + 7, msg, msglen);
	return frame(out, MVM_G_ERROR, 7 + msglen);
}

size_t mvm_enc_stdin_ack(uint8_t *out, uint32_t bytes)
{
	mvm_put_u32(out + MVM_HDR_LEN, bytes);
	return frame(out, MVM_G_STDIN_ACK, 4);
}

size_t mvm_fmt_start_error(char *buf, size_t cap, const char *what, const uint8_t *name,
			   size_t namelen, int err)
{
	const char *es = strerror(err);
	size_t wl = strlen(what), el = strlen(es), fixed, n = 0;

	if (cap == 0)
		return 0;
	fixed = wl + 2 + 3 + el; /* WHAT "NAME": ERR */
	if (fixed + 1 >= cap) {
		buf[0] = 0;
		return 0;
	}
	memcpy(buf, what, wl);
	n = wl;
	buf[n++] = ' ';
	buf[n++] = '"';
	if (namelen > cap - 1 - fixed) {
		size_t avail = cap - 1 - fixed;
		int dots = avail >= 3;
		namelen = dots ? avail - 3 : avail;
		if (namelen)
			memcpy(buf + n, name, namelen);
		n += namelen;
		if (dots) {
			memcpy(buf + n, "...", 3);
			n += 3;
		}
	} else {
		if (namelen)
			memcpy(buf + n, name, namelen);
		n += namelen;
	}
	buf[n++] = '"';
	buf[n++] = ':';
	buf[n++] = ' ';
	memcpy(buf + n, es, el);
	n += el;
	buf[n] = 0;
	return n;
}
