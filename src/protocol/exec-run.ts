/** One command of a session: its streams, stdin flow control and exit (docs/protocol.md, Session and Flow control). */
import { Readable, Writable } from 'node:stream';
import { EXIT_TIMED_OUT, ExitKind, MAX_DATA, MAX_SIGNAL, STDIN_WINDOW } from './constants.js';
import { encodeFrame } from './encode.js';
import { InvalidRequestError, ProtocolError } from './errors.js';
import type { AgentMessage, HostMessage } from './messages.js';

const noop = (): void => {};

/** How a command ended. `code` is the exit status, the signal number, or 126/127 for spawnFailed. */
export interface ExitStatus {
  kind: 'exited' | 'signaled' | 'timedOut' | 'spawnFailed';
  code: number;
  /** Why a spawn failed (e.g. `exec "foo": No such file or directory`); empty otherwise. */
  message: string;
}

/** The status a shell would report: exited → code, signaled → 128 + signal, timedOut → 124, spawnFailed → 126/127. */
export function exitStatusToCode(status: ExitStatus): number {
  switch (status.kind) {
    case 'exited':
    case 'spawnFailed':
      return status.code;
    case 'signaled':
      return 128 + status.code;
    case 'timedOut':
      return EXIT_TIMED_OUT;
  }
}

const EXIT_KIND_NAMES: Record<ExitKind, ExitStatus['kind']> = {
  [ExitKind.EXITED]: 'exited',
  [ExitKind.SIGNALED]: 'signaled',
  [ExitKind.TIMED_OUT]: 'timedOut',
  [ExitKind.SPAWN_FAILED]: 'spawnFailed',
};


/**
 * A command started by `exec`. Read `stdout` and `stderr` (or `resume()` them): while either is not
 * being read the session stops reading the connection, which in the end stalls the command.
 */
export interface ExecHandle {
  /** Guest pid; null when the command could not start (then `exit` is already settled with spawnFailed). */
  readonly pid: number | null;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Present when `exec` asked for stdin; `end()` closes the command's stdin. Writes after exit are discarded. */
  readonly stdin: Writable | null;
  /** Settles after all output that came before EXIT has been pushed; rejects if the session fails first. */
  readonly exit: Promise<ExitStatus>;
  /** Sends `signo` (1–64) to the command's process group; a no-op once the command has ended. */
  signal(signo: number): void;
  /** Sets the terminal's size (the command gets SIGWINCH); a no-op without a terminal or once the command has ended. */
  resize(rows: number, cols: number): void;
}

/** Readable buffer per output stream; above it the session stops reading the transport. */
const OUTPUT_HIGH_WATER_MARK = 256 * 1024;

/** What a running command needs from its session. */
export interface RunLink {
  send(msg: HostMessage): void;
  /** The consumer of `r` wants more data, or will never read again. */
  unstall(r: Readable): void;
  /** The command is over (EXIT or failure): drop its streams' hold on the transport. */
  settled(run: ExecRun): void;
}

export class ExecRun implements ExecHandle {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly stdin: Writable | null;
  readonly exit: Promise<ExitStatus>;
  private resolveExit!: (status: ExitStatus) => void;
  private rejectExit!: (err: Error) => void;
  private done = false;
  /** STDIN bytes sent and not yet acknowledged; at most STDIN_WINDOW. */
  private unacked = 0;
  /** Continuation of a stdin write blocked on a full window. */
  private waitingForAck: (() => void) | null = null;

  constructor(
    readonly pid: number | null,
    withStdin: boolean,
    private readonly link: RunLink,
    private readonly tty = false,
  ) {
    this.exit = new Promise<ExitStatus>((resolve, reject) => {
      this.resolveExit = resolve;
      this.rejectExit = reject;
    });
    // A caller that only reads the streams must not see an unhandled rejection, nor one that only
    // awaits `exit` an unhandled 'error' event; both still see the error where they do look.
    this.exit.catch(noop);
    this.stdout = this.output();
    this.stderr = this.output();
    this.stdin = withStdin
      ? new Writable({
          highWaterMark: MAX_DATA,
          write: (chunk: Buffer, _encoding, callback) => this.writeStdin(chunk, 0, callback),
          final: (callback) => {
            if (!this.done) this.link.send({ type: 'stdinEof' });
            callback();
          },
        }).on('error', noop)
      : null;
  }

  private output(): Readable {
    const r: Readable = new Readable({ highWaterMark: OUTPUT_HIGH_WATER_MARK, read: () => this.link.unstall(r) });
    return r.on('error', noop).on('close', () => this.link.unstall(r));
  }

  /** Sends `chunk` from `off` in frames of at most MAX_DATA, never exceeding the window. */
  private writeStdin(chunk: Buffer, off: number, callback: () => void): void {
    while (off < chunk.length && !this.done) {
      const room = STDIN_WINDOW - this.unacked;
      if (room === 0) {
        this.waitingForAck = () => this.writeStdin(chunk, off, callback);
        return;
      }
      const n = Math.min(room, MAX_DATA, chunk.length - off);
      this.link.send({ type: 'stdin', data: chunk.subarray(off, off + n) });
      this.unacked += n;
      off += n;
    }
    // Once the command has ended its stdin is gone; what is still written is dropped, as a pipe
    // whose reader exited would, but without failing the writer.
    callback();
  }

  acknowledge(bytes: number): void {
    if (bytes > this.unacked) throw new ProtocolError(`STDIN_ACK of ${bytes} bytes, but only ${this.unacked} are unacknowledged`);
    this.unacked -= bytes;
    this.continueStdin();
  }

  private continueStdin(): void {
    const next = this.waitingForAck;
    this.waitingForAck = null;
    next?.();
  }

  /** Returns false when `r`'s consumer is behind, so the caller should stop reading the transport. */
  deliver(stream: 'stdout' | 'stderr', data: Buffer): boolean {
    const r = this[stream];
    // A consumer that destroyed its stream will never read again: drop its output instead of
    // stalling the transport for good.
    if (r.destroyed) return true;
    return r.push(data);
  }

  signal(signo: number): void {
    if (!Number.isInteger(signo) || signo < 1 || signo > MAX_SIGNAL) {
      throw new InvalidRequestError(`signal must be an integer from 1 to ${MAX_SIGNAL}, got ${signo}`);
    }
    if (!this.done) this.link.send({ type: 'signal', signo });
  }

  resize(rows: number, cols: number): void {
    // Encoding checks the size before anything is sent.
    const message: HostMessage = { type: 'resize', rows, cols };
    encodeFrame(message);
    if (this.tty && !this.done) this.link.send(message);
  }

  finish(status: ExitStatus): void {
    this.done = true;
    this.link.settled(this);
    if (!this.stdout.destroyed) this.stdout.push(null);
    if (!this.stderr.destroyed) this.stderr.push(null);
    this.continueStdin();
    this.resolveExit(status);
  }

  fail(err: Error): void {
    this.done = true;
    this.waitingForAck = null;
    this.link.settled(this);
    this.stdout.destroy(err);
    this.stderr.destroy(err);
    this.stdin?.destroy(err);
    this.rejectExit(err);
  }
}

export function toExitStatus(msg: Extract<AgentMessage, { type: 'exit' }>): ExitStatus {
  return { kind: EXIT_KIND_NAMES[msg.kind], code: msg.code, message: msg.message };
}
