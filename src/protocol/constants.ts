/** Wire constants of the guest-agent protocol (docs/protocol.md); the single place the host takes them from. */

export const PROTOCOL_VERSION = 1;

/** Frame header: u32 BE payload length + u8 type. */
export const HEADER_SIZE = 5;
export const MAX_PAYLOAD = 1_048_576;
/** Largest STDIN/STDOUT/STDERR data frame. */
export const MAX_DATA = 65_536;
/** Bytes of STDIN the host may have sent but not yet had acknowledged. */
export const STDIN_WINDOW = 262_144;
export const MAX_ENTROPY = 256;
export const MAX_SIGNAL = 64;

export const AGENT_VSOCK_PORT = 5252;
export const AGENT_PORT_NAME = 'org.mvm.agent';

/** How often the host repeats HELLO until the agent answers (a virtio port drops bytes sent before the guest opens it). */
export const HELLO_REPEAT_MS = 50;

export const HostType = {
  HELLO: 0x01,
  EXEC: 0x02,
  STDIN: 0x03,
  STDIN_EOF: 0x04,
  SIGNAL: 0x05,
  MOUNT: 0x06,
  UNMOUNT: 0x07,
  SYNC: 0x08,
  POWEROFF: 0x09,
  RESIZE: 0x0a,
} as const;

export const AgentType = {
  HELLO: 0x81,
  STARTED: 0x82,
  STDOUT: 0x83,
  STDERR: 0x84,
  EXIT: 0x85,
  OK: 0x86,
  ERROR: 0x87,
  STDIN_ACK: 0x88,
} as const;

export const Capability = {
  EXEC: 1 << 0,
  MOUNT: 1 << 1,
  POWEROFF: 1 << 2,
  TIME_ENTROPY: 1 << 3,
  TTY: 1 << 4,
  USER: 1 << 5,
} as const;

export const ExecFlag = {
  STDIN: 1 << 0,
  MKDIR_CWD: 1 << 1,
  TTY: 1 << 2,
  USER: 1 << 3,
} as const;

/** EXEC's `gid` that asks for the uid's primary group from the guest's /etc/passwd (the uid itself without an entry). */
export const GID_OF_USER = 0xffff_ffff;

export const MountFlag = {
  READ_ONLY: 1 << 0,
} as const;

export const ExitKind = {
  EXITED: 0,
  SIGNALED: 1,
  TIMED_OUT: 2,
  SPAWN_FAILED: 3,
} as const;
export type ExitKind = (typeof ExitKind)[keyof typeof ExitKind];

export const ErrorCode = {
  PROTOCOL: 1,
  VERSION: 2,
  EXEC_UNAVAILABLE: 3,
  BUSY: 4,
  NOT_READY: 5,
  BAD_REQUEST: 6,
  MOUNT_FAILED: 7,
} as const;

/** Exit status the host reports for a command killed at its deadline, as timeout(1) does. */
export const EXIT_TIMED_OUT = 124;
