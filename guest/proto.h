/* mvm guest-agent wire protocol v1 (docs/protocol.md): frame parsing and encoding.
 * Pure functions, no I/O and no allocation, so they can be unit tested and fuzzed. */
#ifndef MVM_PROTO_H
#define MVM_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define MVM_PROTO_VERSION 1
#define MVM_AGENT_VERSION "mvm-agent 0.2.0"
#define MVM_AGENT_VSOCK_PORT 5252

#define MVM_HDR_LEN 5u
#define MVM_MAX_PAYLOAD 1048576u
#define MVM_MAX_DATA 65536u
#define MVM_STDIN_WINDOW 262144u
#define MVM_MAX_ENTROPY 256u

/* host to agent */
enum {
	MVM_H_HELLO = 0x01,
	MVM_H_EXEC = 0x02,
	MVM_H_STDIN = 0x03,
	MVM_H_STDIN_EOF = 0x04,
	MVM_H_SIGNAL = 0x05,
	MVM_H_MOUNT = 0x06,
	MVM_H_UNMOUNT = 0x07,
	MVM_H_SYNC = 0x08,
	MVM_H_POWEROFF = 0x09,
	MVM_H_RESIZE = 0x0a,
};

/* agent to host */
enum {
	MVM_G_HELLO = 0x81,
	MVM_G_STARTED = 0x82,
	MVM_G_STDOUT = 0x83,
	MVM_G_STDERR = 0x84,
	MVM_G_EXIT = 0x85,
	MVM_G_OK = 0x86,
	MVM_G_ERROR = 0x87,
	MVM_G_STDIN_ACK = 0x88,
};

enum {
	MVM_CAP_EXEC = 1u << 0,
	MVM_CAP_MOUNT = 1u << 1,
	MVM_CAP_POWEROFF = 1u << 2,
	MVM_CAP_TIME_ENTROPY = 1u << 3,
	MVM_CAP_TTY = 1u << 4,
	MVM_CAP_USER = 1u << 5,
};

enum {
	MVM_EXEC_F_STDIN = 1u << 0,
	MVM_EXEC_F_MKDIR_CWD = 1u << 1,
	MVM_EXEC_F_TTY = 1u << 2, /* appends u16 rows, u16 cols after env */
	MVM_EXEC_F_USER = 1u << 3, /* appends u32 uid, u32 gid after those */
	MVM_EXEC_F_ALL = MVM_EXEC_F_STDIN | MVM_EXEC_F_MKDIR_CWD | MVM_EXEC_F_TTY | MVM_EXEC_F_USER,
};

/* EXEC's gid asking for the uid's primary group from /etc/passwd (the uid itself without an entry) */
#define MVM_GID_OF_USER 0xffffffffu

enum {
	MVM_MOUNT_F_RDONLY = 1u << 0,
	MVM_MOUNT_F_ALL = MVM_MOUNT_F_RDONLY,
};

enum {
	MVM_EXIT_EXITED = 0,
	MVM_EXIT_SIGNALED = 1,
	MVM_EXIT_TIMEOUT = 2,
	MVM_EXIT_NOSTART = 3,
};

enum {
	MVM_E_PROTOCOL = 1,
	MVM_E_VERSION = 2,
	MVM_E_EXEC_UNAVAILABLE = 3,
	MVM_E_BUSY = 4,
	MVM_E_NOT_READY = 5,
	MVM_E_BAD_REQUEST = 6,
	MVM_E_MOUNT_FAILED = 7,
};

#define MVM_MSG_EXEC_UNAVAILABLE "exec is not available in this image (agent built without dev shell)"

/* A string field: points into the frame payload, not NUL terminated. */
struct mvm_str {
	const uint8_t *p;
	uint32_t len;
};

/* A parsed host-to-agent message. Pointers refer to the payload passed to mvm_parse_h2g. */
struct mvm_h2g {
	uint8_t type;
	union {
		struct {
			uint16_t version;
			uint64_t host_time_ns;
			uint16_t n;
			const uint8_t *entropy;
		} hello;
		struct {
			uint32_t timeout_ms;
			uint32_t flags;
			struct mvm_str cwd;
			uint32_t argc;
			const uint8_t *argv; /* argc encoded strings, walk with mvm_str_next */
			uint32_t envc;
			const uint8_t *env; /* envc encoded strings */
			size_t strbytes;    /* sum of cwd/argv/env string lengths */
			uint16_t rows, cols; /* with MVM_EXEC_F_TTY only, each >= 1 */
			uint32_t uid, gid;  /* with MVM_EXEC_F_USER */
		} exec;
		struct {
			const uint8_t *data;
			uint32_t len;
		} stdin_data;
		struct {
			uint8_t signo;
		} signal;
		struct {
			uint16_t rows, cols; /* each >= 1 */
		} resize;
		struct {
			uint32_t flags;
			struct mvm_str device, mountpoint, fstype;
		} mount;
		struct {
			struct mvm_str mountpoint;
		} unmount;
	} u;
};

static inline uint32_t mvm_get_u32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint16_t mvm_get_u16(const uint8_t *p)
{
	return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
}
static inline void mvm_put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}
static inline void mvm_put_u16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

/* Check a 5-byte frame header from the host. Returns 0 and fills *len and *type if the type is a known
 * host-to-agent type and the length is acceptable for it (<= MVM_MAX_PAYLOAD and within the
 * type's bounds), -1 otherwise (protocol error, detected before the payload is read). */
int mvm_parse_header(const uint8_t *hdr, uint32_t *len, uint8_t *type);

/* Parse a complete payload of a host-to-agent frame. 0 on success, -1 on a protocol error. */
int mvm_parse_h2g(uint8_t type, const uint8_t *payload, uint32_t len, struct mvm_h2g *m);

/* Values a well-formed message may carry that the agent refuses (BAD_REQUEST).
 * Returns NULL if acceptable, otherwise a static message. */
const char *mvm_validate_h2g(const struct mvm_h2g *m);

/* Walk an encoded string list (already validated by mvm_parse_h2g). */
static inline struct mvm_str mvm_str_next(const uint8_t **cursor)
{
	struct mvm_str s;
	s.len = mvm_get_u32(*cursor);
	s.p = *cursor + 4;
	*cursor += 4 + (size_t)s.len;
	return s;
}

/* Encoders: write a whole frame to out (caller provides room) and return its size. */
size_t mvm_enc_hello(uint8_t *out, uint16_t version, uint32_t caps, const char *agent_version);
size_t mvm_enc_started(uint8_t *out, uint32_t pid);
void mvm_enc_data_header(uint8_t *out, uint8_t type, uint32_t len); /* STDOUT/STDERR: header only */
size_t mvm_enc_data(uint8_t *out, uint8_t type, const uint8_t *data, uint32_t len);
size_t mvm_enc_exit(uint8_t *out, uint8_t kind, int32_t code, const char *msg, size_t msglen);
size_t mvm_enc_ok(uint8_t *out);
size_t mvm_enc_error(uint8_t *out, uint16_t code, int fatal, const char *msg, size_t msglen);
size_t mvm_enc_stdin_ack(uint8_t *out, uint32_t bytes);

/* Largest control frame the agent sends: messages are capped at MVM_MAX_MSG bytes. */
#define MVM_MAX_MSG 3072u
#define MVM_MAX_CTRL_FRAME (MVM_HDR_LEN + 2 + 1 + 4 + MVM_MAX_MSG + 16)

/* Format the "could not start" message: `WHAT "NAME": strerror(err)`, NAME shortened to fit.
 * Writes at most cap-1 bytes plus a NUL, returns the length. */
size_t mvm_fmt_start_error(char *buf, size_t cap, const char *what, const uint8_t *name,
			   size_t namelen, int err);

#endif
