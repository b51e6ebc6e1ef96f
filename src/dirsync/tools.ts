import { spawn } from 'node:child_process';
import { MvmError } from '../errors.js';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

const PACKAGE_OF: Record<string, string> = {
  mke2fs: 'e2fsprogs',
  debugfs: 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  rsync: 'rsync',
};

/**
 * Runs a host tool and collects its output; a missing tool becomes a one-line MvmError naming the
 * package. A non-zero exit is returned, not thrown, because e2fsck and rsync give meaning to codes.
 */
export function runTool(
  cmd: string,
  args: readonly string[],
  options: { cwd?: string; signal?: AbortSignal; onStart?: (pid: number) => void } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: options.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
      signal: options.signal,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk));
    if (child.pid !== undefined) options.onStart?.(child.pid);
    child.stderr.on('data', (chunk: Buffer) => err.push(chunk));
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') {
        reject(new MvmError(`${cmd} not found; install ${PACKAGE_OF[cmd] ?? cmd} (needed for --add-dir)`));
      } else {
        reject(e);
      }
    });
    child.on('close', (code, signal) => {
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

/**
 * debugfs exits 0 even when a command fails, so failures are read from stderr: everything except
 * its version banner is an error.
 */
export function debugfsErrors(stderr: string): string[] {
  return stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !/^debugfs \d+\.\d+/.test(l));
}
