/* A session with the host: its start and end, the output queue and the framing of what the host
 * sends. Where the agent listens is listen.c's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define TX_CAP (256u * 1024u)

int g_conn = -1;
int g_port_nohost;
int g_port_discard;

static uint8_t g_rx[MVM_HDR_LEN + MVM_MAX_PAYLOAD];
static size_t g_rxlen;
static uint32_t g_rx_plen;
static uint8_t g_rx_type;

static uint8_t g_tx[TX_CAP];
static size_t g_txhead, g_txtail;

size_t tx_used(void)
{
	return g_txtail - g_txhead;
}

int tx_room(size_t n)
{
	return TX_CAP - tx_used() >= n;
}

/* Contiguous space for n bytes at the tail (caller checked tx_room). */
uint8_t *tx_tail_ptr(size_t n)
{
	if (g_txhead == g_txtail)
		g_txhead = g_txtail = 0;
	if (TX_CAP - g_txtail < n) {
		memmove(g_tx, g_tx + g_txhead, tx_used());
		g_txtail -= g_txhead;
		g_txhead = 0;
	}
	return g_tx + g_txtail;
}

/* n bytes were encoded at tx_tail_ptr() */
void tx_commit(size_t n)
{
	g_txtail += n;
}

void tx_discard(void)
{
	g_txhead = g_txtail = 0;
}

void tx_ctrl_error(uint16_t code, int fatal, const char *msg)
{
	uint8_t *p = tx_tail_ptr(MVM_MAX_CTRL_FRAME);
	tx_commit(mvm_enc_error(p, code, fatal, msg, strlen(msg)));
}

void tx_ok(void)
{
	uint8_t *p = tx_tail_ptr(MVM_HDR_LEN);
	tx_commit(mvm_enc_ok(p));
}

/* Write what we can. Returns -1 if the connection failed. */
int tx_flush(void)
{
	while (g_txhead < g_txtail) {
		ssize_t n = write(g_conn, g_tx + g_txhead, g_txtail - g_txhead);
		if (n > 0) {
			g_txhead += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		return -1;
	}
	g_txhead = g_txtail = 0;
	return 0;
}

/* Block (up to ms) until the output buffer is written. */
void tx_flush_linger(int ms)
{
	int64_t end = now_ns() + (int64_t)ms * 1000000;
	while (g_txhead < g_txtail) {
		struct pollfd p = { g_conn, POLLOUT, 0 };
		int64_t left = end - now_ns();
		if (left <= 0 || tx_flush() < 0)
			return;
		if (g_txhead >= g_txtail)
			return;
		if (poll(&p, 1, (int)(left / 1000000) + 1) < 0 && errno != EINTR)
			return;
		if (p.revents & (POLLERR | POLLHUP))
			return;
	}
}

void session_reset(void)
{
	g_session = 0;
	g_hello_done = 0;
	g_closing = 0;
	g_rxlen = 0;
	g_txhead = g_txtail = 0;
}

/* why: logged only when the session ended abnormally or a command was still running */
void end_session(const char *why)
{
	if (why)
		logmsg("session ended: %s", why);
#if MVM_DEV_SHELL
	cmd_abort();
#endif
	if (g_tkind == T_PORT) {
		/* a port is never closed: wait for the host to detach and reattach */
	} else if (g_conn >= 0) {
		close(g_conn);
		g_conn = -1;
	}
	session_reset();
}

/* a whole frame is buffered and not handled yet (it waits for room for its reply) */
int rx_frame_ready(void)
{
	return g_rxlen >= MVM_HDR_LEN && g_rxlen == MVM_HDR_LEN + g_rx_plen;
}

/* Read host bytes and handle complete frames while there is room for replies.
 * Returns -1 when the host went away. */
int rx_pump(void)
{
	int frames = 0;

	while (!g_closing && !g_poweroff && frames < 64) {
		size_t want;
		ssize_t n;

		if (rx_frame_ready()) {
			if (!tx_room(CTRL_RESERVE))
				return 0;
			g_rxlen = 0;
			handle_frame(g_rx_type, g_rx + MVM_HDR_LEN, g_rx_plen);
			frames++;
			continue;
		}
		if (!tx_room(CTRL_RESERVE))
			return 0;
		want = g_rxlen < MVM_HDR_LEN ? MVM_HDR_LEN - g_rxlen : MVM_HDR_LEN + g_rx_plen - g_rxlen;
		n = read(g_conn, g_rx + g_rxlen, want);
		if (n > 0) {
			g_port_nohost = 0;
			if (g_port_discard) {
				g_rxlen = 0;
				continue;
			}
			g_session = 1;
			g_rxlen += (size_t)n;
			if (g_rxlen == MVM_HDR_LEN && mvm_parse_header(g_rx, &g_rx_plen, &g_rx_type) < 0) {
				tx_ctrl_error(MVM_E_PROTOCOL, 1, "bad frame header (unknown type or bad length)");
				g_closing = 1;
				return 0;
			}
			continue;
		}
		if (n == 0) {
			if (g_tkind == T_PORT) {
				g_port_nohost = 1;
				g_port_discard = 0;
			}
			return -1;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			g_port_nohost = 0; /* a port answers EAGAIN only while a host is attached */
			return 0;
		}
		if (g_tkind == T_PORT) {
			g_port_nohost = 1;
		}
		return -1;
	}
	return 0;
}

