import { randomBytes } from 'node:crypto';
import type { Duplex, Readable } from 'node:stream';
import {
  Capability,
  ErrorCode,
  ExitKind,
  HELLO_REPEAT_MS,
  MountFlag,
  PROTOCOL_VERSION,
} from './constants.js';
import { FrameDecoder } from './decode.js';
import { encodeExecRequest, type ExecOptions } from './exec-request.js';
import { ExecRun, toExitStatus, type ExecHandle, type ExitStatus, type RunLink } from './exec-run.js';
import { encodeFrame } from './encode.js';
import type { AgentMessage, HostMessage } from './messages.js';
import {
  AgentConnectionError,
  AgentTimeoutError,
  AgentRequestError,
  AgentVersionError,
  ExecUnavailableError,
  InvalidRequestError,
  ProtocolError,
  SessionAbortedError,
  TtyUnavailableError,
} from './errors.js';

export interface ConnectOptions {
  /** Aborting it at any time ends the whole session (the agent then kills a running command). */
  signal?: AbortSignal;
  /** Give up when the agent has not answered HELLO by then; default: wait (HELLO is repeated meanwhile). */
  helloTimeoutMs?: number;
  /**
   * How long the agent may take to answer any other request (MOUNT, UNMOUNT, SYNC, POWEROFF, and
   * EXEC until STARTED). Past it the session ends: replies come in order, so a late one could only
   * be mistaken for the answer to a later request. Default REQUEST_TIMEOUT_MS.
   */
  requestTimeoutMs?: number;
}

/** Generous for an UNMOUNT that syncs a large rw directory under software emulation. */
export const REQUEST_TIMEOUT_MS = 60_000;

const noop = (): void => {};

type AgentHello = Extract<AgentMessage, { type: 'hello' }>;

/** A request awaiting its reply; the agent answers requests in the order it received them. */
type Pending =
  | { kind: 'hello'; resolve(msg: AgentHello): void; reject(err: Error): void }
  | { kind: 'exec'; started(pid: number): void; spawnFailed(status: ExitStatus): void; reject(err: Error): void }
  | { kind: 'ok'; resolve(): void; reject(err: Error): void };

/**
 * One connection to a guest agent over any byte stream (unix socket, vsock-over-unix, virtio port).
 * Create it with `AgentSession.connect`. Any protocol violation, transport failure or abort ends the
 * session: every pending operation and a running command's `exit` reject with a typed error, and the
 * stream is destroyed.
 */
export class AgentSession {
  private readonly decoder = new FrameDecoder();
  private readonly pending: Pending[] = [];
  private hello: AgentHello | null = null;
  /** The command between STARTED and EXIT. */
  private current: ExecRun | null = null;
  /** An EXEC has been sent or is running: the agent runs one command at a time. */
  private execBusy = false;
  /** Output streams whose consumer is behind; the transport is paused while any is. */
  private readonly stalled = new Set<Readable>();
  private transportPaused = false;
  private failure: Error | null = null;
  /** Removes the abort listeners still registered. */
  private readonly cleanups = new Set<() => void>();

  private constructor(
    private readonly stream: Duplex,
    private readonly requestTimeoutMs: number,
  ) {
    if (stream.destroyed || stream.readableEnded) this.fail(new AgentConnectionError('the connection to the guest agent is already closed'));
    stream.on('data', (chunk: Buffer) => this.onData(chunk));
    // A transport may come paused, its first bytes buffered (the hybrid vsock handshake does so).
    stream.resume();
    stream.on('end', () => this.fail(new AgentConnectionError('the guest agent closed the connection')));
    stream.on('close', () => this.fail(new AgentConnectionError('the connection to the guest agent closed')));
    stream.on('error', (err: Error) =>
      this.fail(new AgentConnectionError(`the connection to the guest agent failed: ${err.message}`, { cause: err })),
    );
  }

  /** Sends HELLO (repeated every 250 ms until answered) and resolves once the agent has answered it. */
  static async connect(stream: Duplex, options: ConnectOptions = {}): Promise<AgentSession> {
    const session = new AgentSession(stream, options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS);
    if (options.signal) session.abortOn(options.signal);
    await session.greet(options.helloTimeoutMs);
    return session;
  }

  /** The agent's self-description from its HELLO, e.g. `mvm-agent 0.2.0`. */
  get agentVersion(): string {
    return this.hello!.agentVersion;
  }

  get capabilities(): number {
    return this.hello!.capabilities;
  }

  /** `bit` is one of `Capability`. */
  hasCapability(bit: number): boolean {
    return (this.capabilities & bit) === bit;
  }

  /**
   * Starts a command. Resolves once the agent has answered: with a running command after STARTED,
   * or, when the command could not start, with a handle whose `exit` is already settled
   * (spawnFailed, 126/127). Rejects with ExecUnavailableError when the image's agent has no dev shell.
   */
  async exec(options: ExecOptions): Promise<ExecHandle> {
    this.checkOpen();
    if (this.execBusy) throw new InvalidRequestError('a command is already running in this guest agent session');
    // An older agent would answer the TTY flag with a BAD_REQUEST that says less.
    if (options.tty && !this.hasCapability(Capability.TTY)) throw new TtyUnavailableError(this.agentVersion);
    if (options.user && !this.hasCapability(Capability.USER)) {
      throw new InvalidRequestError(`this image's agent (${this.agentVersion}) cannot run a command as another user; rebuild the image or template`);
    }
    const frame = encodeExecRequest(options);
    const stopAbort = options.signal ? this.abortOn(options.signal) : noop;
    this.checkOpen();
    this.execBusy = true;
    const link: RunLink = {
      send: (msg) => this.send(encodeFrame(msg)),
      unstall: (r) => this.unstall(r),
      settled: (run) => {
        stopAbort();
        this.execBusy = false;
        if (this.current === run) this.current = null;
        this.unstall(run.stdout);
        this.unstall(run.stderr);
      },
    };
    return new Promise<ExecHandle>((resolve, reject) => {
      const answered = this.deadline('EXEC');
      this.pending.push({
        kind: 'exec',
        started: (pid) => {
          answered();
          this.current = new ExecRun(pid, options.stdin === true, link, options.tty !== undefined);
          resolve(this.current);
        },
        spawnFailed: (status) => {
          answered();
          const run = new ExecRun(null, options.stdin === true, link);
          run.finish(status);
          resolve(run);
        },
        reject: (err) => {
          answered();
          stopAbort();
          this.execBusy = false;
          reject(err);
        },
      });
      this.send(frame);
    });
  }

  /** Mounts `device` (a path, or `serial:ID`) on `mountpoint`, which the agent creates. */
  mount(device: string, mountpoint: string, fstype: string, readOnly = false): Promise<void> {
    return this.request({ type: 'mount', flags: readOnly ? MountFlag.READ_ONLY : 0, device, mountpoint, fstype });
  }

  /** Syncs, then unmounts. */
  unmount(mountpoint: string): Promise<void> {
    return this.request({ type: 'unmount', mountpoint });
  }

  sync(): Promise<void> {
    return this.request({ type: 'sync' });
  }

  /**
   * Asks the agent to sync and end the VM; resolves on its OK and closes the session. Refused while a
   * command runs: output still in flight would be lost.
   */
  async poweroff(): Promise<void> {
    if (this.execBusy) throw new InvalidRequestError('cannot power off while a command is running; wait for its exit first');
    await this.request({ type: 'poweroff' });
    this.fail(new AgentConnectionError('the guest agent has powered off'));
  }

  /** Ends the session; a running command's `exit` rejects and the agent kills it. Idempotent. */
  close(): void {
    this.fail(new AgentConnectionError('the guest agent session was closed'));
  }

  private async request(msg: HostMessage): Promise<void> {
    const frame = encodeFrame(msg);
    this.checkOpen();
    return new Promise<void>((resolve, reject) => {
      const answered = this.deadline(msg.type.toUpperCase());
      this.pending.push({
        kind: 'ok',
        resolve: () => {
          answered();
          resolve();
        },
        reject: (err) => {
          answered();
          reject(err);
        },
      });
      this.send(frame);
    });
  }

  /** Ends the session unless the request `what` is answered in time; returns the function that stops the clock. */
  private deadline(what: string): () => void {
    const seconds = Number((this.requestTimeoutMs / 1000).toFixed(1));
    const timer = setTimeout(() => this.fail(new AgentTimeoutError(`the guest agent did not answer ${what} within ${seconds} s`)), this.requestTimeoutMs);
    return () => clearTimeout(timer);
  }

  private greet(timeoutMs: number | undefined): Promise<void> {
    this.checkOpen();
    return new Promise<void>((resolve, reject) => {
      const sendHello = (): void =>
        this.send(
          encodeFrame({
            type: 'hello',
            version: PROTOCOL_VERSION,
            hostTimeNs: BigInt(Date.now()) * 1_000_000n,
            entropy: randomBytes(32),
          }),
        );
      const repeat = setInterval(sendHello, HELLO_REPEAT_MS);
      const deadline =
        timeoutMs === undefined
          ? undefined
          : setTimeout(
              () => this.fail(new AgentConnectionError(`the guest agent did not answer HELLO within ${timeoutMs} ms`)),
              timeoutMs,
            );
      const stop = (): void => {
        clearInterval(repeat);
        clearTimeout(deadline);
      };
      this.pending.push({
        kind: 'hello',
        resolve: (msg) => {
          stop();
          if (msg.version !== PROTOCOL_VERSION) {
            const err = new AgentVersionError(
              `the guest agent speaks protocol version ${msg.version} but this mvmctl speaks version ${PROTOCOL_VERSION}; use an image built for this mvmctl`,
            );
            this.fail(err);
            reject(err);
            return;
          }
          this.hello = msg;
          resolve();
        },
        reject: (err) => {
          stop();
          // The caller gets no session to close when HELLO fails, so it must not outlive this.
          this.fail(err);
          reject(err);
        },
      });
      sendHello();
    });
  }

  /** Ends the session when `signal` aborts; returns the function that stops listening. */
  private abortOn(signal: AbortSignal): () => void {
    const onAbort = (): void => this.fail(new SessionAbortedError(signal.reason));
    if (signal.aborted) {
      onAbort();
      return noop;
    }
    signal.addEventListener('abort', onAbort, { once: true });
    const stop = (): void => {
      signal.removeEventListener('abort', onAbort);
      this.cleanups.delete(stop);
    };
    this.cleanups.add(stop);
    return stop;
  }

  private checkOpen(): void {
    if (this.failure) throw this.failure;
  }

  private send(frame: Buffer): void {
    if (!this.failure) this.stream.write(frame);
  }

  private onData(chunk: Buffer): void {
    if (this.failure) return;
    try {
      for (const msg of this.decoder.push(chunk)) {
        this.dispatch(msg);
        if (this.failure) return;
      }
    } catch (err) {
      // Anything else was thrown by a consumer's synchronous 'data' handler and is theirs.
      if (!(err instanceof ProtocolError)) throw err;
      this.fail(err);
    }
  }

  private expect<K extends Pending['kind']>(kind: K, what: string): Extract<Pending, { kind: K }> {
    const head = this.pending[0];
    if (head?.kind !== kind) throw new ProtocolError(`unexpected ${what}`);
    this.pending.shift();
    return head as Extract<Pending, { kind: K }>;
  }

  private dispatch(msg: AgentMessage): void {
    switch (msg.type) {
      case 'hello':
        // Answers to repeated HELLOs arrive after the first answer; they carry nothing new.
        if (this.hello) return;
        this.expect('hello', 'HELLO').resolve(msg);
        return;
      case 'started':
        this.expect('exec', 'STARTED').started(msg.pid);
        return;
      case 'stdout':
      case 'stderr': {
        if (!this.current) throw new ProtocolError(`${msg.type.toUpperCase()} with no command running`);
        const r = this.current[msg.type];
        if (!this.current.deliver(msg.type, msg.data)) this.stall(r);
        return;
      }
      case 'exit':
        if (this.current) {
          if (msg.kind === ExitKind.SPAWN_FAILED) throw new ProtocolError('EXIT kind 3 (could not start) after STARTED');
          this.current.finish(toExitStatus(msg));
        } else {
          if (msg.kind !== ExitKind.SPAWN_FAILED) throw new ProtocolError(`EXIT kind ${msg.kind} with no command running`);
          this.expect('exec', 'EXIT').spawnFailed(toExitStatus(msg));
        }
        return;
      case 'ok':
        this.expect('ok', 'OK').resolve();
        return;
      case 'error': {
        const err =
          msg.code === ErrorCode.EXEC_UNAVAILABLE
            ? new ExecUnavailableError(msg.message)
            : new AgentRequestError(msg.code, msg.fatal, msg.message);
        if (msg.fatal) {
          this.fail(
            msg.code === ErrorCode.VERSION
              ? new AgentVersionError(`the guest agent refused protocol version ${PROTOCOL_VERSION}: ${msg.message}`)
              : err,
          );
          return;
        }
        const head = this.pending.shift();
        if (!head) throw new ProtocolError(`unsolicited ERROR ${msg.code}: ${msg.message}`);
        head.reject(err);
        return;
      }
      case 'stdinAck':
        if (!this.current) throw new ProtocolError('STDIN_ACK with no command running');
        this.current.acknowledge(msg.bytes);
        return;
    }
  }

  private stall(r: Readable): void {
    this.stalled.add(r);
    if (!this.transportPaused) {
      this.transportPaused = true;
      this.stream.pause();
    }
  }

  private unstall(r: Readable): void {
    if (this.stalled.delete(r) && this.stalled.size === 0 && this.transportPaused && !this.failure) {
      this.transportPaused = false;
      this.stream.resume();
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const p of this.pending.splice(0)) p.reject(err);
    this.current?.fail(err);
    this.current = null;
    for (const stop of this.cleanups) stop();
    this.stream.destroy();
  }
}
