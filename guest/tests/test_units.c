/* Checks of single functions of proto.c: headers, caps, encoders. */
#include <errno.h>
#include <string.h>

#include "test_proto.h"

void test_units(void)
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
