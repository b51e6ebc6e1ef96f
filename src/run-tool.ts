import { spawn } from 'node:child_process';
import { MvmError } from './errors.js';

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface ToolOptions {
  cwd?: string;
  /** Default: the host environment with LC_ALL=C, so tools print what we parse. */
  env?: NodeJS.ProcessEnv;
  signal?: AbortSignal;
  /** The tool is killed (SIGKILL) and the call fails when it runs longer. Default 10 minutes. */
  timeoutMs?: number;
  onStart?: (pid: number) => void;
  /** Receives each line of stdout and stderr as it comes (progress of long builds). */
  onLine?: (line: string) => void;
  /** Signal sent when `signal` aborts: SIGTERM lets make pass it on to its compilers. Default SIGKILL. */
  abortSignal?: NodeJS.Signals;
}

/** Debian packages of the tools mvmctl runs, for the "not found" line. */
const PACKAGE_OF: Record<string, string> = {
  mke2fs: 'e2fsprogs',
  debugfs: 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  rsync: 'rsync',
  'qemu-img': 'qemu-utils',
  setpriv: 'util-linux',
  'qemu-system-x86_64': 'qemu-system-x86',
};

const DEFAULT_TIMEOUT_MS = 10 * 60_000;

/**
 * The one way mvmctl runs a host tool: output collected, a deadline, an abort. A missing tool becomes
 * a one-line MvmError naming its package; a tool past its deadline is killed and reported. A non-zero
 * exit is returned, not thrown, because e2fsck and rsync give meaning to their codes.
 */
export function runTool(cmd: string, args: readonly string[], options: ToolOptions = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    if (options.signal?.aborted) return reject(options.signal.reason);
    const child = spawn(cmd, args, {
      cwd: options.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: options.env ?? { ...process.env, LC_ALL: 'C' },
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const lineFeeder = () => {
      let pending = '';
      return (chunk: Buffer) => {
        if (!options.onLine) return;
        const lines = (pending + chunk.toString('utf8')).split('\n');
        pending = lines.pop()!;
        for (const line of lines) options.onLine(line);
      };
    };
    const feedOut = lineFeeder();
    const feedErr = lineFeeder();
    child.stdout.on('data', (chunk: Buffer) => {
      out.push(chunk);
      feedOut(chunk);
    });
    child.stderr.on('data', (chunk: Buffer) => {
      err.push(chunk);
      feedErr(chunk);
    });
    if (child.pid !== undefined) options.onStart?.(child.pid);
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    let failure: unknown;
    const timer = setTimeout(() => {
      failure = new MvmError(`${cmd} did not finish within ${Math.round(timeoutMs / 1000)} s and was killed`);
      child.kill('SIGKILL');
    }, timeoutMs);
    const onAbort = () => {
      failure ??= options.signal!.reason;
      child.kill(options.abortSignal ?? 'SIGKILL');
    };
    options.signal?.addEventListener('abort', onAbort, { once: true });
    const done = () => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      done();
      reject(e.code === 'ENOENT' ? new MvmError(`${cmd} not found; install ${PACKAGE_OF[cmd] ?? cmd}`) : e);
    });
    child.on('close', (code, signal) => {
      done();
      if (failure !== undefined) return reject(failure);
      resolve({
        code: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
  });
}

/** The last meaningful stderr line of a tool, for a one-line error message. */
export function lastLine(text: string): string {
  const lines = text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !/^debugfs \d/.test(l) && !/^e2fsck \d/.test(l));
  return lines.at(-1) ?? 'no error output';
}
