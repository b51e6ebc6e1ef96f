/**
 * `mvmctl doctor`: one check per part of the host that `mvmctl exec` and its options rely on. A
 * check never throws and never prints; it says `fail` only when exec itself cannot work, so that
 * the exit status answers one question: can this host run `mvmctl exec`?
 */
import { lastLine, runTool } from '../run-tool.js';
import { cacheDir, dataDir, stateDir } from '../paths.js';
import { findExecutable } from '../which.js';
import { checkDirectory } from './dirs.js';
import { checkAccelerator, checkBackend, checkVhostDeviceVsock } from './host.js';
import { checkDefaultImage } from './image.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface Check {
  name: string;
  status: CheckStatus;
  summary: string;
  /** What to do about it; only where there is something to do. */
  fix?: string;
}

export interface DoctorReport {
  /** False when some check failed: `mvmctl exec` cannot work here. Warnings leave it true. */
  ok: boolean;
  checks: Check[];
}

/** Probes of host tools are answered at once or not at all: a hung tool must not hang doctor. */
export const PROBE_TIMEOUT_MS = 5000;

export function doctorReport(checks: Check[]): DoctorReport {
  return { ok: checks.every((check) => check.status !== 'fail'), checks };
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** A check that throws (a bug, an unexpected host) still yields its row rather than ending doctor. */
async function guarded(name: string, check: () => Promise<Check> | Check): Promise<Check> {
  try {
    return await check();
  } catch (error) {
    return { name, status: 'fail', summary: `the check itself failed: ${errorText(error)}` };
  }
}

export async function checkQemu(env: NodeJS.ProcessEnv = process.env): Promise<Check> {
  const name = 'qemu';
  const wanted = env.MVM_QEMU || 'qemu-system-x86_64';
  const qemu = findExecutable(wanted);
  const fix = 'apt-get install qemu-system-x86, or set MVM_QEMU';
  if (!qemu) return { name, status: 'fail', summary: `${wanted} not found${env.MVM_QEMU ? ' (from MVM_QEMU)' : ''}`, fix };
  let version: string;
  let machines: string;
  try {
    const [versionRun, machinesRun] = await Promise.all([
      runTool(qemu, ['--version'], { timeoutMs: PROBE_TIMEOUT_MS }),
      runTool(qemu, ['-M', 'help'], { timeoutMs: PROBE_TIMEOUT_MS }),
    ]);
    if (versionRun.code !== 0) return { name, status: 'fail', summary: `${qemu} --version failed: ${lastLine(versionRun.stderr)}`, fix };
    version = versionRun.stdout.split('\n')[0]!.trim();
    machines = machinesRun.stdout;
  } catch (error) {
    return { name, status: 'fail', summary: `${qemu} does not run: ${errorText(error)}`, fix };
  }
  if (!/^microvm\b/m.test(machines)) {
    return {
      name,
      status: 'fail',
      summary: `${qemu} (${version}) has no microvm machine type`,
      fix: 'use a QEMU built with microvm (4.2 or later, e.g. Debian qemu-system-x86), or set MVM_QEMU',
    };
  }
  return { name, status: 'ok', summary: `${qemu} (${version}), microvm machine available` };
}

export async function checkSetpriv(): Promise<Check> {
  const name = 'setpriv';
  const fix = 'apt-get install util-linux';
  const setpriv = findExecutable('setpriv');
  if (!setpriv) return { name, status: 'fail', summary: 'setpriv not found: the VMM runs under setpriv --pdeathsig KILL', fix };
  // --pdeathsig came with util-linux 2.33; an older setpriv would refuse every VM start.
  const help = await runTool(setpriv, ['--help'], { timeoutMs: PROBE_TIMEOUT_MS }).catch(() => undefined);
  if (!help || !help.stdout.includes('--pdeathsig')) {
    return { name, status: 'fail', summary: `${setpriv} has no --pdeathsig option (util-linux 2.33 or later needed)`, fix };
  }
  return { name, status: 'ok', summary: setpriv };
}

/** A package exec needs only for some options: missing is a warning naming what stops working. */
export function checkOptionalTools(name: string, tools: readonly string[], pkg: string, neededFor: string): Check {
  const found = tools.map((tool) => ({ tool, path: findExecutable(tool) }));
  const missing = found.filter((entry) => !entry.path).map((entry) => entry.tool);
  if (missing.length > 0) {
    return { name, status: 'warn', summary: `${missing.join(', ')} not found: needed for ${neededFor}`, fix: `apt-get install ${pkg}` };
  }
  return { name, status: 'ok', summary: found.map((entry) => entry.path).join(', ') };
}

export async function runDoctor(): Promise<DoctorReport> {
  const checks = await Promise.all([
    guarded('qemu', () => checkQemu()),
    guarded('accelerator', () => checkAccelerator()),
    guarded('backend', () => checkBackend()),
    guarded('vsock device', () => checkVhostDeviceVsock()),
    guarded('setpriv', () => checkSetpriv()),
    guarded('default image', () => checkDefaultImage()),
    guarded('state dir', () => checkDirectory('state dir', stateDir(), { envVar: 'MVM_STATE_DIR', neededByExec: true })),
    guarded('cache dir', () => checkDirectory('cache dir', cacheDir(), { envVar: 'MVM_CACHE_DIR', neededByExec: true })),
    guarded('data dir', () => checkDirectory('data dir', dataDir(), { envVar: 'MVM_DATA_DIR', neededByExec: false })),
    guarded('e2fsprogs', () => checkOptionalTools('e2fsprogs', ['mke2fs', 'debugfs', 'e2fsck'], 'e2fsprogs', '--add-dir')),
    guarded('qemu-img', () => checkOptionalTools('qemu-img', ['qemu-img'], 'qemu-utils', 'template snapshots with QEMU')),
    guarded('network', () => ({ name: 'network', status: 'ok', summary: 'exec gives the guest no NIC unless asked (--net user, --allow-host, -p; QEMU user-mode networking)' })),
    guarded('socat', () => checkOptionalTools('socat', ['socat'], 'socat', '--allow-host')),
    guarded('nix', () => checkOptionalTools('nix', ['nix'], 'nix-bin nix-setup-systemd', '--flake (templates need no Nix)')),
  ]);
  return doctorReport(checks);
}
