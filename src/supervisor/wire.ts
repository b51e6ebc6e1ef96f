/**
 * The control socket of a long-lived VM (`mvmctl up`): newline-delimited JSON between its
 * supervisor and the `console` and `down` clients, on a unix socket in the VM's private directory.
 * Output bytes travel in base64. Every line is bounded, both ways.
 */
import { join } from 'node:path';
import type { Duplex } from 'node:stream';

export const CONTROL_SOCKET = 'control.sock';
/** A stdout chunk of the agent (≤ 64 KiB) in base64 fits many times over. */
export const MAX_LINE_BYTES = 1 << 20;

export function controlSocketPath(runDir: string): string {
  return join(runDir, CONTROL_SOCKET);
}

/** Client → supervisor. */
export type ClientMessage =
  | { type: 'exec'; argv: string[]; env: Record<string, string>; cwd?: string; user?: string; timeout: number; stdin: boolean; tty?: { rows: number; cols: number } }
  | { type: 'stdin'; data: string }
  | { type: 'resize'; rows: number; cols: number }
  | { type: 'stdin-eof' }
  | { type: 'signal'; signal: number }
  | { type: 'stop' };

/** Supervisor → client. */
export type SupervisorMessage =
  | { type: 'started'; name: string }
  | { type: 'stdout' | 'stderr'; data: string }
  | { type: 'log'; line: string }
  | { type: 'exit'; exitCode: number; signal?: string; timedOut: boolean }
  | { type: 'error'; message: string; exitCode: number; details?: string[] }
  | { type: 'stopped' };

/** Supervisor → `up`, one JSON line each on the supervisor's stdout while the VM starts (its stderr has lines for the user). */
export type StartReport =
  | { progress: string }
  | { alive: true }
  | { ready: string }
  | { error: { message: string; exitCode: number; details?: readonly string[] } };

/** How often the supervisor says `alive` while the VM starts. */
export const HEARTBEAT_MS = 5_000;

export function send(socket: Duplex, message: ClientMessage | SupervisorMessage): boolean {
  return socket.write(JSON.stringify(message) + '\n');
}

/** Calls `onLine` with each line of `stream` (without its newline); a line over `maxBytes` destroys the stream. */
export function onLines(stream: Duplex | NodeJS.ReadableStream, onLine: (line: string) => void, maxBytes = MAX_LINE_BYTES): void {
  let pending = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    pending += chunk;
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      onLine(line);
    }
    if (pending.length > maxBytes) (stream as Duplex).destroy?.(new Error(`a line over ${maxBytes} bytes`));
  });
}

/**
 * Calls `onMessage` with each JSON line from `socket`; a line over MAX_LINE_BYTES or one that is
 * not a JSON object with a type destroys the socket (the other side is broken, or not ours).
 */
export function readMessages(socket: Duplex, onMessage: (message: Record<string, unknown>) => void): void {
  onLines(socket, (line) => {
    if (socket.destroyed) return;
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      socket.destroy(new Error('a control message that is not JSON'));
      return;
    }
    if (typeof message !== 'object' || message === null || typeof (message as { type?: unknown }).type !== 'string') {
      socket.destroy(new Error('a control message without a type'));
      return;
    }
    onMessage(message as Record<string, unknown>);
  });
}
