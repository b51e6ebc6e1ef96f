/* What the three parts of test_proto share: the check counter, the shared vectors as loaded, and
 * the agent's view of one frame. */
#ifndef TEST_PROTO_H
#define TEST_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#define MAX_VECTORS 256

struct vec {
	char name[64];
	char dir[8];
	char expect[8];
	uint8_t *bytes;
	size_t len;
};

extern struct vec g_vecs[MAX_VECTORS];
extern int g_nvec;
extern int g_pass, g_fail;

void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int load_vectors(const char *path);
int process(const uint8_t *bytes, size_t len, struct mvm_h2g *m, uint8_t **copy);

void test_vectors(void);
void test_units(void);
void test_fuzz(long iters);

#endif
