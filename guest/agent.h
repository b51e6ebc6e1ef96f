/* Shared by the agent's source files (README.md says which does what). The wire format is
 * proto.h. */
#ifndef MVM_AGENT_H
#define MVM_AGENT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto.h"

#ifndef MVM_DEV_SHELL
#define MVM_DEV_SHELL 0
#endif

#define CTRL_RESERVE 8192u
#define DATA_ROOM (MVM_HDR_LEN + MVM_MAX_DATA + CTRL_RESERVE)
/* the command's stdout pipe: the guest kernel's default pipe-max-size */
#define OUTPUT_PIPE_SIZE (1 << 20)
#define DRAIN_IDLE_NS (100 * 1000000LL)
#define DRAIN_MAX_NS (2000 * 1000000LL)

/* agent.c */
extern int g_guest_mode;
extern int g_session;    /* a session is in progress (bytes seen on a port / accepted socket) */
extern int g_hello_done; /* HELLO accepted */
extern int g_closing;    /* a fatal error was queued: flush, then end the session */
extern int g_poweroff;   /* POWEROFF: flush, then power off / exit */

void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int64_t now_ns(void);
ssize_t read_text(const char *path, char *buf, size_t size);
void reap(void);

/* listen.c */
enum transport { T_UNIX, T_VSOCK, T_PORT };
extern enum transport g_tkind;
int parse_listen(const char *spec);
void listen_from_cmdline(void);
void setup_transport(void);
void accept_conn(int sig_fd);
void transport_close(void);
int port_notify_attach(int on);

/* transport.c */
extern int g_conn;         /* the session's transport fd (for a port: the port, kept open) */
extern int g_port_nohost;  /* port read 0: no host attached, until one attaches */
extern int g_port_discard; /* after a fatal error on a port: drop bytes until the host detaches */

void session_reset(void);
void end_session(const char *why);
int rx_pump(void);
int rx_frame_ready(void);

size_t tx_used(void);
int tx_room(size_t n);
uint8_t *tx_tail_ptr(size_t n);
void tx_commit(size_t n);
void tx_discard(void);
void tx_ctrl_error(uint16_t code, int fatal, const char *msg);
void tx_ok(void);
int tx_flush(void);
void tx_flush_linger(int ms);

/* requests.c */
void handle_frame(uint8_t type, const uint8_t *payload, uint32_t len);
int mkdir_p(char *path);

/* setup.c */
void guest_setup(void);
void apply_clock_entropy(const struct mvm_h2g *m);

#if MVM_DEV_SHELL
/* command.c */
struct command {
	int active; /* between STARTED and EXIT */
	pid_t pid;  /* also the process group id */
	int exited; /* main process reaped */
	int status;
	int timed_out;
	int64_t deadline; /* monotonic ns, 0 = none */
	int64_t drain_idle, drain_max;
	int out_fd, err_fd, in_fd;
	int tty_fd; /* with TTY: the pty master, kept for RESIZE; out_fd and in_fd are dups of it */
	int stdin_eof;
	uint64_t in_received, in_acked;
	uint32_t pending_ack;
	size_t in_head, in_len;
};
extern struct command g_cmd;

void cmd_reap(void);
void cmd_abort(void);
void cmd_kill(void);
void flush_acks(void);
void cmd_check_finish(int64_t now);
void cmd_read_pipe(int *fd, uint8_t type);
void cmd_write_stdin(void);
void on_exec(const struct mvm_h2g *m);
void on_stdin(const struct mvm_h2g *m);
void on_stdin_eof(void);
void on_signal(const struct mvm_h2g *m);

/* tty.c */
int tty_open(uint16_t rows, uint16_t cols, int *master, int *slave);
int tty_attach(int slave);
void tty_write_eof(int master);
void tty_kill_session(pid_t sid);
void on_resize(const struct mvm_h2g *m);

/* child.c: in the forked child, never returns */
void child_exec(const struct mvm_h2g *m, int report_fd, int in_rd, int out_wr, int err_wr);
#endif

#endif
