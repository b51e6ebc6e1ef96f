/** The protocol's messages as the host sees them (docs/protocol.md); encode.ts and decode.ts turn them into frames and back. */

import type { ExitKind } from './constants.js';

/** Protocol strings are bytes (argv and env need not be UTF-8); a JS string is sent as UTF-8. */
export type Bytes = string | Uint8Array;

/** Host to agent. Decoded string fields are Buffers, so arbitrary bytes round-trip. */
export type HostMessage =
  | { type: 'hello'; version: number; hostTimeNs: bigint; entropy: Uint8Array }
  | {
      type: 'exec';
      timeoutMs: number;
      flags: number;
      cwd: Bytes;
      argv: readonly Bytes[];
      env: readonly Bytes[];
      /** Run on a pseudo-terminal of this size. The encoder sets the TTY flag from its presence; the decoder fills it when the flag is set. */
      tty?: TtySize;
      /** Sent, with the USER flag set, when present. */
      user?: ExecUser;
    }
  | { type: 'stdin'; data: Uint8Array }
  | { type: 'stdinEof' }
  | { type: 'signal'; signo: number }
  | { type: 'mount'; flags: number; device: Bytes; mountpoint: Bytes; fstype: Bytes }
  | { type: 'unmount'; mountpoint: Bytes }
  | { type: 'sync' }
  | { type: 'poweroff' }
  | ({ type: 'resize' } & TtySize);

/** A terminal's size; each is 1 to 65535. */
export interface TtySize {
  rows: number;
  cols: number;
}

/** Who an EXEC runs as; `gid` may be GID_OF_USER. */
export interface ExecUser {
  uid: number;
  gid: number;
}

/** Agent to host. The agent's strings are human text and are decoded as UTF-8. */
export type AgentMessage =
  | { type: 'hello'; version: number; capabilities: number; agentVersion: string }
  | { type: 'started'; pid: number }
  | { type: 'stdout'; data: Buffer }
  | { type: 'stderr'; data: Buffer }
  | { type: 'exit'; kind: ExitKind; code: number; message: string }
  | { type: 'ok' }
  | { type: 'error'; code: number; fatal: boolean; message: string }
  | { type: 'stdinAck'; bytes: number };
