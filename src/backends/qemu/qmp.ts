import type { Socket } from 'node:net';
import { MvmError } from '../../errors.js';
import { connectWhenListening } from '../unix-socket.js';

/** A reply or an event QEMU sends is one JSON line; a longer one is not QEMU talking. */
const MAX_LINE_BYTES = 1 << 20;
const COMMAND_TIMEOUT_MS = 30_000;

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

/**
 * A QMP client: commands matched to replies by id (so the event watcher and a snapshot can both
 * talk), each with a deadline; events go to `onEvent`.
 */
export class Qmp {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closedError?: Error;
  private greeted?: () => void;

  private constructor(
    private readonly socket: Socket,
    private readonly onEvent: (event: string) => void,
  ) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    const onGone = (error?: Error) => {
      this.closedError ??= new MvmError(`QEMU's monitor connection closed${error ? ` (${error.message})` : ''}`);
      for (const [id, pending] of this.pending) {
        clearTimeout(pending.timer);
        pending.reject(this.closedError);
        this.pending.delete(id);
      }
    };
    socket.on('error', onGone);
    socket.on('close', () => onGone());
  }

  /**
   * Connects once QEMU has created its monitor socket (it does so while starting up). `onEvent` is
   * in place before capabilities are negotiated, so no event after that is missed.
   */
  static async connect(path: string, exited: () => boolean, signal: AbortSignal, onEvent: (event: string) => void): Promise<Qmp> {
    const socket = await connectWhenListening(path, {
      signal,
      gone: exited,
      goneError: () => new MvmError('QEMU exited before its monitor socket opened'),
      retryMs: 2,
    });
    const qmp = new Qmp(socket, onEvent);
    await qmp.greeting(signal);
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  private greeting(signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new MvmError('QEMU sent no monitor greeting')), COMMAND_TIMEOUT_MS);
      const onAbort = () => reject(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      this.greeted = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        resolve();
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    if (this.buffer.length > MAX_LINE_BYTES && !this.buffer.includes('\n')) {
      this.socket.destroy(new Error('monitor line too long'));
      return;
    }
    for (let newline = this.buffer.indexOf('\n'); newline >= 0; newline = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (!line) continue;
      let message: { QMP?: unknown; event?: string; id?: number; return?: unknown; error?: { desc?: string } };
      try {
        message = JSON.parse(line) as typeof message;
      } catch {
        continue;
      }
      if (message.QMP !== undefined) this.greeted?.();
      else if (typeof message.event === 'string') this.onEvent(message.event);
      else if (typeof message.id === 'number') this.settle(message.id, message);
    }
  }

  private settle(id: number, reply: { return?: unknown; error?: { desc?: string } }): void {
    const pending = this.pending.get(id);
    if (!pending) return;
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if (reply.error) pending.reject(new MvmError(`QEMU ${pending.command}: ${reply.error.desc ?? 'error'}`));
    else pending.resolve(reply.return);
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new MvmError(`QEMU did not answer ${command} within ${COMMAND_TIMEOUT_MS / 1000} s`));
      }, COMMAND_TIMEOUT_MS);
      this.pending.set(id, { command, resolve, reject, timer });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  close(): void {
    this.socket.destroy();
  }
}
