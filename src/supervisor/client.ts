/**
 * The other end of a long-lived VM's control socket: `up` starts the supervisor and waits for it to
 * say the VM is ready; `console` runs a command through it; `down` asks it to stop.
 */
import { spawn } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { MvmError } from '../errors.js';
import type { ExecResult } from '../sdk/exec.js';
import { listVms, vmRunDir } from '../state/registry.js';
import type { SupervisedOptions } from './serve.js';
import { controlSocketPath, HEARTBEAT_MS, onLines, readMessages, send, type StartReport } from './wire.js';

/**
 * How long the supervisor may go without a word (it says it is alive every HEARTBEAT_MS while the
 * VM starts) before `up` takes it for hung. The start itself can take many minutes the first time
 * (building the kernel, the image or a flake); each of its steps has its own deadline, and the
 * boot has the boot timeout.
 */
const UP_QUIET_TIMEOUT_MS = 12 * HEARTBEAT_MS;
/** How long a stop (unmounts, power-off, sync-back of rw directories) may take. */
const STOP_TIMEOUT_MS = 600_000;

export interface SupervisedStart {
  /** The supervisor's lines for the user until the VM is up (warnings, -v). */
  onLine(line: string): void;
  /** Its progress lines (image and flake builds). */
  onProgress(line: string): void;
  signal: AbortSignal;
  /** Replaces UP_QUIET_TIMEOUT_MS (tests). */
  quietTimeoutMs?: number;
}

/**
 * Starts a supervisor (`mvmctl __supervise`, detached in its own session, so a Ctrl-C at the
 * terminal does not reach it) and resolves with the VM's name once it is up.
 */
export function startSupervised(mvmctl: string, options: SupervisedOptions, start: SupervisedStart): Promise<string> {
  const { signal, quietTimeoutMs = UP_QUIET_TIMEOUT_MS } = start;
  const child = spawn(process.execPath, [mvmctl, '__supervise'], { detached: true, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin!.end(JSON.stringify(options));
  return new Promise<string>((resolve, reject) => {
    // Interrupted while the VM boots: the supervisor stops it (its own start is aborted) and exits.
    const onAbort = () => {
      child.kill('SIGTERM');
      finish(signal.reason as Error);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    let timer: NodeJS.Timeout | undefined;
    let settled = false;
    const heard = () => {
      // Lines read in the same chunk as the last report come after it: no new clock for them.
      if (settled) return;
      clearTimeout(timer);
      timer = setTimeout(() => {
        // Its event loop no longer runs, so a SIGTERM would wait too; its VMM dies with it.
        child.kill('SIGKILL');
        finish(new MvmError(`the VM's supervisor stopped answering while the VM started (nothing for ${quietTimeoutMs / 1000} s), and was killed`));
      }, quietTimeoutMs);
    };
    heard();
    const finish = (result: string | Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      // The supervisor lives on; its pipes to us do not.
      child.stdout!.destroy();
      child.stderr!.destroy();
      child.unref();
      if (typeof result === 'string') resolve(result);
      else reject(result);
    };
    onLines(child.stderr!, (line) => {
      heard();
      start.onLine(line);
    });
    onLines(child.stdout!, (line) => {
      heard();
      const report = JSON.parse(line) as StartReport;
      if ('progress' in report) start.onProgress(report.progress);
      else if ('ready' in report) finish(report.ready);
      else if ('error' in report) finish(new MvmError(report.error.message, report.error.exitCode, report.error.details));
    });
    child.once('exit', (code, signal) => finish(new MvmError(`the VM's supervisor exited before the VM was up (${signal ?? `status ${code}`})`)));
  });
}

/** Connects to the VM's control socket; a VM that is not up (or not one `up` started) is exit 1. */
async function connectControl(name: string): Promise<Socket> {
  const runDir = vmRunDir(name);
  const notUp = async () => {
    const up = (await listVms()).map((vm) => vm.name);
    return new MvmError(`no VM named '${name}' is up` + (up.length ? ` (running: ${up.join(', ')})` : ' (none is running)'), 1);
  };
  if (!runDir) throw await notUp();
  const socket = connect(controlSocketPath(runDir));
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ECONNREFUSED') throw await notUp();
    throw new MvmError(`cannot reach ${name}'s supervisor: ${(error as Error).message}`);
  }
  return socket;
}

export interface ConsoleRequest {
  argv: string[];
  env: Record<string, string>;
  cwd?: string;
  /** `UID[:GID]`, as `-u` takes it. */
  user?: string;
  timeout: number;
  interactive: boolean;
  /** A terminal of this size in the guest. */
  tty?: { rows: number; cols: number };
}

export interface ConsoleIo {
  stdin: Readable;
  stdout: Writable;
  stderr: Writable;
  log: (line: string) => void;
  /** The command has started in the guest (not called for one that could not be executed). */
  onStarted?: (name: string) => void;
}

export interface ConsoleRun {
  /** How the command ended, as `exec` gives it. */
  exited: Promise<ExecResult>;
  /** Sends a signal to the command's process group. */
  signal(signo: number): void;
  /** Sets the guest terminal's size, with `tty`. */
  resize(rows: number, cols: number): void;
  /** Leaves: the supervisor kills the command. */
  detach(): void;
}

/** Runs a command in the VM `name` through its supervisor, streaming as `exec` does. */
export async function consoleRun(name: string, request: ConsoleRequest, io: ConsoleIo): Promise<ConsoleRun> {
  const socket = await connectControl(name);
  send(socket, { type: 'exec', argv: request.argv, env: request.env, ...(request.cwd ? { cwd: request.cwd } : {}), ...(request.user !== undefined ? { user: request.user } : {}), timeout: request.timeout, stdin: request.interactive, ...(request.tty ? { tty: request.tty } : {}) });
  if (request.interactive) {
    io.stdin.on('data', (chunk: Buffer) => {
      if (!send(socket, { type: 'stdin', data: chunk.toString('base64') })) {
        io.stdin.pause();
        socket.once('drain', () => io.stdin.resume());
      }
    });
    io.stdin.once('end', () => send(socket, { type: 'stdin-eof' }));
  }
  const exited = new Promise<ExecResult>((resolve, reject) => {
    let done = false;
    readMessages(socket, (message) => {
      if (message.type === 'started') io.onStarted?.(String(message.name));
      else if (message.type === 'stdout' || message.type === 'stderr') {
        const out = message.type === 'stdout' ? io.stdout : io.stderr;
        // A slow reader of our output holds the guest back, through the supervisor.
        if (!out.write(Buffer.from(String(message.data), 'base64'))) {
          socket.pause();
          out.once('drain', () => socket.resume());
        }
      } else if (message.type === 'log') io.log(String(message.line));
      else if (message.type === 'exit') {
        done = true;
        resolve({
          exitCode: Number(message.exitCode),
          ...(typeof message.signal === 'string' ? { signal: message.signal as NodeJS.Signals } : {}),
          timedOut: message.timedOut === true,
        });
      } else if (message.type === 'error') {
        done = true;
        reject(new MvmError(String(message.message), Number(message.exitCode), Array.isArray(message.details) ? message.details.map(String) : []));
      }
    });
    socket.once('close', () => {
      if (!done) reject(new MvmError(`${name} went away before the command finished`));
      io.stdin.pause();
    });
    socket.on('error', () => {});
  });
  return {
    exited,
    signal: (signo) => void send(socket, { type: 'signal', signal: signo }),
    resize: (rows, cols) => void send(socket, { type: 'resize', rows, cols }),
    detach: () => socket.destroy(),
  };
}

/**
 * Stops an `up` VM through its supervisor (a clean stop: rw directories synced back), with its
 * lines to `log`. False when the VM has no supervisor to ask (an exec's VM): the caller stops it
 * the other way.
 */
export async function stopSupervised(name: string, log: (line: string) => void): Promise<boolean> {
  let socket: Socket;
  try {
    socket = await connectControl(name);
  } catch {
    return false;
  }
  send(socket, { type: 'stop' });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new MvmError(`${name} did not stop within ${STOP_TIMEOUT_MS / 1000} s`));
    }, STOP_TIMEOUT_MS);
    readMessages(socket, (message) => {
      if (message.type === 'log') log(String(message.line));
    });
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.on('error', () => {});
  });
  return true;
}
