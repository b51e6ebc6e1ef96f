import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: compiled tests live in dist/test/e2e/. */
export const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));
export const mvmctlBin = join(repoRoot, 'bin', 'mvmctl');

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
  /** Wall seconds from spawn to exit. */
  seconds: number;
}

/**
 * Each test file gets its own state dir, so `ls`/`down` and the leftover checks see only its VMs.
 * The image cache is shared (building it is the expensive part, done once by `mvmctl image build`).
 */
export function isolatedEnv(): { env: NodeJS.ProcessEnv; stateDir: string; cleanup: () => void } {
  const stateDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-state-'));
  return {
    env: { ...process.env, MVM_STATE_DIR: stateDir, MVM_NO_TCG_WARNING: '1' },
    stateDir,
    cleanup: () => rmSync(stateDir, { recursive: true, force: true }),
  };
}

/** Makes numbered directories under `root`, each holding `files` (relative path to content). */
export function dirMaker(root: string): (files?: Record<string, string>) => string {
  let counter = 0;
  return (files = {}) => {
    const dir = join(root, `d${counter++}`);
    mkdirSync(dir);
    for (const [name, content] of Object.entries(files)) {
      mkdirSync(join(dir, name, '..'), { recursive: true });
      writeFileSync(join(dir, name), content);
    }
    return dir;
  };
}

export function startMvmctl(args: string[], env: NodeJS.ProcessEnv, stdin: 'ignore' | 'pipe' = 'ignore'): ChildProcess {
  return spawn(mvmctlBin, args, { env, stdio: [stdin, 'pipe', 'pipe'] });
}

export function collect(child: ChildProcess, input?: Buffer | string): Promise<RunResult> {
  const started = performance.now();
  const stdout: Buffer[] = [];
  const stderr: Buffer[] = [];
  child.stdout!.on('data', (chunk: Buffer) => stdout.push(chunk));
  child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk));
  if (input !== undefined) child.stdin!.end(input);
  return new Promise((resolve) => {
    child.on('close', (code, signal) =>
      resolve({
        code,
        signal,
        stdout: Buffer.concat(stdout),
        stderr: Buffer.concat(stderr).toString('utf8'),
        seconds: (performance.now() - started) / 1000,
      }),
    );
  });
}

export function mvmctl(args: string[], env: NodeJS.ProcessEnv, input?: Buffer | string): Promise<RunResult> {
  return collect(startMvmctl(args, env, input === undefined ? 'ignore' : 'pipe'), input);
}

/** Resolves when `text` has appeared on the child's stdout. */
export function waitForOutput(child: ChildProcess, text: string, timeoutMs = 120_000): Promise<void> {
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${JSON.stringify(text)}; saw ${JSON.stringify(seen)}`)), timeoutMs);
    child.stdout!.on('data', (chunk: Buffer) => {
      seen += chunk.toString('utf8');
      if (seen.includes(text)) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

/**
 * Programs a VM runs on the host: the VMM (QEMU, Firecracker or its test double), QEMU's vsock
 * device, and the socat QEMU starts per guest connection to the allowlist proxy.
 */
const VM_PROCESS = /qemu-system|firecracker|vhost-device-vsock|socat/;

/** PID and parent PID of every VM process whose command line mentions `marker` (a VM's state dir, say). */
function vmProcesses(marker: string): Map<number, { parent: number; cmdline: string }> {
  const found = new Map<number, { parent: number; cmdline: string }>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (!VM_PROCESS.test(cmdline) || !cmdline.includes(marker)) continue;
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      found.set(Number(entry), { parent: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]), cmdline });
    } catch {
      // exited while we looked
    }
  }
  return found;
}

/** Every VM process mentioning `marker`: none may outlive its run. */
export function vmProcessesMentioning(marker: string): number[] {
  return [...vmProcesses(marker).keys()];
}

/**
 * VMMs mentioning `marker`, one per VM: the QEMU a Firecracker test double runs counts with its
 * double, and vsock devices are not VMMs.
 */
export function vmmPidsMentioning(marker: string): number[] {
  const found = vmProcesses(marker);
  return [...found].filter(([, process]) => !found.has(process.parent) && !/vhost-device-vsock|socat/.test(process.cmdline)).map(([pid]) => pid);
}

export async function assertNoVmLeft(stateDir: string): Promise<void> {
  for (let i = 0; i < 50 && vmProcessesMentioning(stateDir).length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(vmProcessesMentioning(stateDir), [], 'no VMM, vsock device or proxy helper may outlive its run');
  const vms = join(stateDir, 'vms');
  assert.deepEqual(existsSync(vms) ? readdirSync(vms) : [], [], 'no state dir may outlive its run');
}
