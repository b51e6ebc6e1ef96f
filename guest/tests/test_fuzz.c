/* A fixed-seed mutation fuzz loop over the frame parser, seeded with the shared vectors: no
 * crash or sanitizer report, and every accepted frame's fields are consistent with its bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_proto.h"

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

void test_fuzz(long iters)
{
	enum { CAP = 4096 };
	uint8_t *buf = malloc(CAP);
	const struct vec *seeds[MAX_VECTORS];
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
