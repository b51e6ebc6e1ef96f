/* Coverage-guided fuzzer of the agent's frame parser (proto.c), for libFuzzer:
 *   make -C guest fuzz-libfuzzer && guest/build/fuzz_proto_libfuzzer CORPUS_DIR
 * The input is a byte stream from the host, cut into frames the way the agent's read loop does
 * (header check first, then the payload). Each payload is copied into a heap buffer of exactly its
 * size, so AddressSanitizer sees any read past it. An accepted message that breaks an invariant
 * the agent relies on aborts, which libFuzzer reports as a crash. */
#include "proto.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(cond)               \
	do {                        \
		if (!(cond))        \
			abort();    \
	} while (0)

/* Walks a string list the way the agent does; every string must lie inside the payload. */
static size_t walk_list(const uint8_t *cur, uint32_t n, const uint8_t *base, size_t plen,
			const uint8_t **end)
{
	size_t total = 0;
	uint32_t i;
	for (i = 0; i < n; i++) {
		struct mvm_str s = mvm_str_next(&cur);
		REQUIRE(s.p >= base && s.p + s.len <= base + plen);
		total += s.len;
	}
	*end = cur;
	return total;
}

static void check_exec(const struct mvm_h2g *m, const uint8_t *base, size_t plen)
{
	const uint8_t *end;
	size_t total = m->u.exec.cwd.len;
	char msg[256];
	struct mvm_str argv0;
	size_t n;

	REQUIRE(m->u.exec.argc > 0);
	total += walk_list(m->u.exec.argv, m->u.exec.argc, base, plen, &end);
	REQUIRE(end + 4 == m->u.exec.env); /* envc lies between the lists */
	total += walk_list(m->u.exec.env, m->u.exec.envc, base, plen, &end);
	REQUIRE(end == base + plen);
	REQUIRE(total == m->u.exec.strbytes);

	/* argv[0] is host input that reaches the "could not start" message: it must always fit. */
	end = m->u.exec.argv;
	argv0 = mvm_str_next(&end);
	n = mvm_fmt_start_error(msg, 1 + argv0.len % sizeof(msg), "exec", argv0.p, argv0.len, ENOENT);
	REQUIRE(n < 1 + argv0.len % sizeof(msg) && msg[n] == 0);
}

static void check_message(const struct mvm_h2g *m, const uint8_t *payload, uint32_t plen)
{
	(void)mvm_validate_h2g(m);
	switch (m->type) {
	case MVM_H_EXEC:
		check_exec(m, payload, plen);
		break;
	case MVM_H_HELLO:
		REQUIRE(m->u.hello.n <= MVM_MAX_ENTROPY);
		break;
	case MVM_H_STDIN:
		REQUIRE(m->u.stdin_data.len >= 1 && m->u.stdin_data.len <= MVM_MAX_DATA);
		REQUIRE(m->u.stdin_data.data == payload && m->u.stdin_data.len == plen);
		break;
	default:
		break;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t off = 0;

	while (size - off >= MVM_HDR_LEN) {
		uint32_t plen;
		uint8_t type;
		uint8_t *payload;
		struct mvm_h2g m;

		/* The agent closes the connection at the first bad header or payload, as it does here. */
		if (mvm_parse_header(data + off, &plen, &type) < 0)
			return 0;
		REQUIRE(plen <= MVM_MAX_PAYLOAD);
		off += MVM_HDR_LEN;
		if (size - off < plen)
			return 0; /* incomplete: the agent would wait for more */
		payload = malloc(plen ? plen : 1);
		REQUIRE(payload != NULL);
		memcpy(payload, data + off, plen);
		off += plen;
		if (mvm_parse_h2g(type, payload, plen, &m) < 0) {
			free(payload);
			return 0;
		}
		REQUIRE(m.type == type);
		check_message(&m, payload, plen);
		free(payload);
	}
	return 0;
}
