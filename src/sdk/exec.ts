/**
 * `exec(argv, options)`: one command in a fresh microVM, as a handle with live output streams, in
 * the manner of E2B's `commands.run` and Vercel Sandbox's `runCommand`. The CLI's `mvmctl exec` is
 * this function with flags parsed and the streams piped to the terminal.
 */
import { constants } from 'node:os';
import { PassThrough, Readable, Writable } from 'node:stream';
import { execInMicroVm, type ExecIo } from '../exec/run.js';
import { silentProgress } from '../progress.js';
import { exitStatusToCode, MAX_SIGNAL, type ExecHandle as AgentExecHandle, type ExitStatus, type TtySize } from '../protocol/index.js';
import { qemuProvider, resolveExec, ttySize, type ExecOptions, type VmProvider } from './options.js';

export interface ExecResult {
  /** As `mvmctl exec` exits: the command's own code, 128+N for signal N, 124 on timeout, 126/127 when it could not start. */
  exitCode: number;
  /** The signal that killed the command, when one did and it has a name. */
  signal?: NodeJS.Signals;
  /** The `timeout` expired and the command's process group was killed. */
  timedOut: boolean;
}

/** What `options.onStarted` is told once the command has started in the guest. */
export interface ExecStarted {
  /** The VM's name, as `mvmctl ls` shows it. */
  name: string;
  /** Milliseconds (fractional) since exec() or vm.exec() was called. */
  timings: {
    /** exec() only: the VM was up (booted or restored, its directories mounted). */
    vmReadyMs?: number;
    /** The command started; for vm.exec() this includes waiting for the commands before it. */
    commandStartedMs: number;
  };
}

export interface ExecHandle {
  /**
   * The command's output. Read both streams (iterate, pipe, or `resume()` the one you do not need):
   * as with a child process's pipes, output nobody reads stalls the command once buffers are full.
   */
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** The command's stdin, with `options.stdin`; `end()` it to send EOF. Writes after the command ended are dropped. */
  readonly stdin?: Writable;
  /**
   * Settles once the VM is gone (and rw directories are synced back). Rejects with an MvmError when
   * mvmctl itself fails (bad options, before any VM starts; a failed boot; `error.exitCode` says
   * which, as the CLI would exit), or with `options.signal`'s reason when that aborts.
   */
  readonly exited: Promise<ExecResult>;
  /**
   * Sends `signal` (default SIGKILL) to the command's process group in the guest; `exited` then gives
   * 128+N if it dies of it. Before the command has started, the signal waits and is sent as it starts.
   */
  kill(signal?: NodeJS.Signals | number): void;
  /**
   * With `options.tty`: sets the guest terminal's size (its programs get SIGWINCH). Before the
   * command has started the last size given waits and is set as it starts; without a tty a no-op.
   */
  resize(rows: number, cols: number): void;
}

/** exec() over a given VmProvider (tests pass a scripted guest; the API uses QEMU). */
export function createExec(provider: VmProvider): (argv: readonly string[], options?: ExecOptions) => ExecHandle {
  return (argv, options = {}) => commandHandle(options.stdin ?? false, (streams) => run(argv, options, provider, streams));
}

/**
 * The handle of a command `work` runs with these streams: `exited` is `work`'s result, after which
 * the output streams end and stdin is drained.
 */
export function commandHandle(wantStdin: boolean, work: (streams: RunStreams) => Promise<ExecResult>): ExecHandle {
  const stdout = outputChannel();
  const stderr = outputChannel();
  const stdin = wantStdin ? new PassThrough() : undefined;
  const command = new PendingSignals();
  const exited = work({ stdout: stdout.sink, stderr: stderr.sink, stdin, command }).finally(() => {
    command.close();
    stdout.sink.end();
    stderr.sink.end();
    // Nothing reads the stdin stream any more: let further writes drain away instead of piling up.
    stdin?.resume();
  });
  return {
    stdout: stdout.source,
    stderr: stderr.source,
    ...(stdin ? { stdin } : {}),
    exited,
    kill: (signal = 'SIGKILL') => command.send(signalNumber(signal)),
    resize: (rows, cols) => command.resize(ttySize({ rows, cols }, 'resize')),
  };
}

const qemuExec = createExec(qemuProvider);

/**
 * Runs `argv` in a fresh microVM and tears the VM down whatever happens. Options are checked before
 * any VM starts; a bad one never throws here but rejects `exited` with an MvmError (exit code 125).
 */
export function exec(argv: readonly string[], options: ExecOptions = {}): ExecHandle {
  return qemuExec(argv, options);
}

/**
 * The lifecycle writes one of the command's streams into `sink`; the caller reads `source`. Unlike a
 * PassThrough, a source its reader destroyed (a `break` out of `for await`) drops what follows
 * instead of stalling the command, as the agent session does for its own streams.
 */
function outputChannel(): { sink: Writable; source: Readable } {
  let blockedWrite: (() => void) | undefined;
  const unblock = () => {
    const next = blockedWrite;
    blockedWrite = undefined;
    next?.();
  };
  const source = new Readable({ read: unblock }).on('close', unblock);
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      if (source.destroyed || source.push(chunk)) callback();
      else blockedWrite = callback;
    },
    final(callback) {
      if (!source.destroyed) source.push(null);
      callback();
    },
  });
  return { sink, source };
}

export interface RunStreams {
  stdout: Writable;
  stderr: Writable;
  stdin: Readable | undefined;
  command: PendingSignals;
}

/** The command's streams as the lifecycle takes them; `onStarted` is called once the command has started (not when it could not). */
export function commandIo(streams: RunStreams, log: (line: string) => void, onStarted: () => void) {
  return {
    stdin: streams.stdin ?? Readable.from([]),
    stdout: streams.stdout,
    stderr: streams.stderr,
    log,
    onCommandStarted: (started: Pick<AgentExecHandle, 'signal' | 'pid' | 'resize'>) => {
      streams.command.start(started);
      if (started.pid !== null) onStarted();
    },
  };
}

/** The result of a command as the API reports it. */
export function execResult(status: ExitStatus): ExecResult {
  const name = status.kind === 'signaled' ? SIGNAL_NAMES.get(status.code) : undefined;
  return { exitCode: exitStatusToCode(status), ...(name ? { signal: name } : {}), timedOut: status.kind === 'timedOut' };
}

async function run(argv: readonly string[], options: ExecOptions, provider: VmProvider, streams: RunStreams): Promise<ExecResult> {
  const calledAt = performance.now();
  const signal = options.signal ?? new AbortController().signal;
  signal.throwIfAborted();
  const log = options.onWarning ?? (() => {});
  const { request, deps } = await resolveExec(argv, options, provider, log);
  // Resolving read files and templates; an abort meanwhile must not start a VM.
  signal.throwIfAborted();
  // Set as the VM is up, which is before the command can start.
  let vm: { name: string; readyMs: number } | undefined;
  const onStarted = () => options.onStarted?.({ name: vm!.name, timings: { vmReadyMs: vm!.readyMs, commandStartedMs: performance.now() - calledAt } });
  const io: ExecIo = {
    ...commandIo(streams, log, onStarted),
    onVmReady: (name) => (vm = { name, readyMs: performance.now() - calledAt }),
    verbose: options.verbose ?? false,
    progress: options.onProgress ?? silentProgress,
  };
  const { status } = await execInMicroVm(request, io, deps, signal);
  return execResult(status);
}

/** Signals asked for before the command started wait here, and go out in order as it starts; so does the last resize. */
export class PendingSignals {
  private command: Pick<AgentExecHandle, 'signal' | 'resize'> | undefined;
  private readonly waiting: number[] = [];
  private size: TtySize | undefined;
  private closed = false;

  start(command: Pick<AgentExecHandle, 'signal' | 'resize'>): void {
    this.command = command;
    if (this.size) command.resize(this.size.rows, this.size.cols);
    for (const signo of this.waiting.splice(0)) command.signal(signo);
  }

  resize(size: TtySize): void {
    if (this.closed) return;
    if (this.command) this.command.resize(size.rows, size.cols);
    else this.size = size;
  }

  send(signo: number): void {
    if (this.closed) return;
    if (this.command) this.command.signal(signo);
    else this.waiting.push(signo);
  }

  close(): void {
    this.closed = true;
  }
}

/** Names by number; the guest is Linux, like the host whose numbering node:os reports. */
const SIGNAL_NAMES = new Map<number, NodeJS.Signals>();
for (const [name, number] of Object.entries(constants.signals) as [NodeJS.Signals, number][]) {
  // Aliases (SIGIOT for SIGABRT) come after the usual name; keep the first.
  if (!SIGNAL_NAMES.has(number)) SIGNAL_NAMES.set(number, name);
}

function signalNumber(signal: NodeJS.Signals | number): number {
  if (typeof signal === 'number') {
    if (Number.isInteger(signal) && signal >= 1 && signal <= MAX_SIGNAL) return signal;
    throw new TypeError(`kill: signal must be a name such as 'SIGTERM' or a number from 1 to ${MAX_SIGNAL}, got ${signal}`);
  }
  const number = (constants.signals as Record<string, number | undefined>)[signal];
  if (number === undefined) throw new TypeError(`kill: unknown signal ${JSON.stringify(signal)}`);
  return number;
}
