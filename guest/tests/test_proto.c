/* Unit tests of guest/proto.c: the shared vectors (docs/protocol-vectors/vectors.txt, test_vectors.c),
 * checks of single functions (test_units.c) and a fixed-seed mutation fuzz loop over the parser
 * (test_fuzz.c). Built with gcc -fsanitize=address,undefined.
 * usage: test_proto VECTORS_FILE [FUZZ_ITERATIONS] */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_proto.h"

int g_pass, g_fail;

void check(int ok, const char *fmt, ...)
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

struct vec g_vecs[MAX_VECTORS];
int g_nvec;

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

int load_vectors(const char *path)
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
int process(const uint8_t *bytes, size_t len, struct mvm_h2g *m, uint8_t **copy)
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
