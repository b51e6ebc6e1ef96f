// Signals at chosen moments of a real `mvmctl exec --add-dir HOST:/work:rw`, and what each leaves
// behind: VMM processes, helper tools, state directories, and a HOST that must be either untouched
// or fully synced, never a mix.
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, watch } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  CHANGED_MARKER, CHANGING_MARKER, classifyHost, diskManifest, fixtureTree, GUEST_CHANGES, syncedTree, treeManifest, writeTree, type HostVerdict,
} from './host-tree.js';
import type { LaunchMvmctl } from './launch.js';
import { hasExited, isVmm, processesMentioning, waitUntil } from './procs.js';
import { below, type Random } from './random.js';

export type SignalCase = 'SIGINT' | 'SIGTERM' | 'SIGKILL' | 'SIGKILL-VMM';
export const SIGNAL_CASES: readonly SignalCase[] = ['SIGINT', 'SIGTERM', 'SIGKILL', 'SIGKILL-VMM'];

/**
 * When to signal: `delayMs` after an event. vm-dir: mvmctl created the VM's state dir (staging,
 * then boot); vmm-started: QEMU runs (boot); changing: the command printed that it is changing HOST
 * (it then sleeps); vmm-exited: the command exited and QEMU has exited, so mvmctl is syncing back
 * (checking the image first); host-written: sync-back has begun writing into HOST.
 */
export interface Moment {
  after: 'vm-dir' | 'vmm-started' | 'changing' | 'vmm-exited' | 'host-written';
  delayMs: number;
}

export function describeMoment(moment: Moment): string {
  return moment.delayMs ? `${moment.after} +${moment.delayMs} ms` : moment.after;
}

/** One moment per phase, each signalled the instant its event is seen: no timing luck. */
export function phaseMoments(signal: SignalCase): Moment[] {
  if (signal === 'SIGKILL-VMM') return [0, 200, 500].map((delayMs) => ({ after: 'changing', delayMs }));
  return (['vmm-started', 'changing', 'host-written'] as const).map((after) => ({ after, delayMs: 0 }));
}

/** `runs` random moments spread over the phases, each somewhere inside its phase. */
export function randomMoments(rand: Random, signal: SignalCase, runs: number): Moment[] {
  return Array.from({ length: runs }, (): Moment => {
    const phase = signal === 'SIGKILL-VMM' ? 1 : below(rand, 3);
    if (phase === 0) return { after: 'vm-dir', delayMs: below(rand, 1500) };
    if (phase === 1) return { after: 'changing', delayMs: below(rand, 1000) };
    // Half anywhere in sync-back (mostly checking the image), half while HOST is being written.
    return rand() < 0.5 ? { after: 'vmm-exited', delayMs: below(rand, 300) } : { after: 'host-written', delayMs: below(rand, 50) };
  });
}

export interface RunOutcome {
  moment: Moment;
  /** False when mvmctl had exited before the moment came. */
  delivered: boolean;
  exit: string;
  exitOk: boolean;
  vmmLeft: number;
  toolsLeft: number;
  stateDirsLeft: number;
  host: HostVerdict;
  /** What was wrong with this run; empty when nothing was. */
  problems: string[];
}

export interface SignalBatchReport {
  signal: SignalCase;
  runs: RunOutcome[];
  ok: boolean;
}

export interface SignalBatchOptions {
  launch: LaunchMvmctl;
  signal: SignalCase;
  moments: readonly Moment[];
  /** Has MVM_STATE_DIR = stateDir; the batch's VMs are found by that path. */
  env: NodeJS.ProcessEnv;
  stateDir: string;
  /** Files under HOST/d that the command changes (default 300). */
  files?: number;
}

const LEFTOVER_GRACE_MS = 5000;
const RUN_LIMIT_MS = 180_000;
const EXIT_CODE: Record<'SIGINT' | 'SIGTERM', number> = { SIGINT: 130, SIGTERM: 143 };

/** A child's stdout as text so far, and its end. */
function observe(child: ChildProcess): { stdout: () => string; stderr: () => string; exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> } {
  let out = '';
  let err = '';
  child.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString('utf8')));
  child.stderr!.on('data', (chunk: Buffer) => (err += chunk.toString('utf8')));
  return {
    stdout: () => out,
    stderr: () => err,
    exited: new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal }))),
  };
}

function vmDirs(stateDir: string): string[] {
  const vms = join(stateDir, 'vms');
  return existsSync(vms) ? readdirSync(vms) : [];
}

/** Waits until the moment's event has happened; false when mvmctl exited first. */
async function reach(moment: Moment, stateDir: string, host: string, stdout: () => string, running: () => boolean): Promise<boolean> {
  const vmm = () => processesMentioning([stateDir]).find(isVmm);
  // A /proc scan costs a few ms of a shared CPU: every 10 ms is enough to catch a boot of ~1 s.
  const seen = (event: () => boolean, intervalMs = 5) => waitUntil(() => event() || !running(), RUN_LIMIT_MS, intervalMs);
  switch (moment.after) {
    case 'vm-dir':
      await seen(() => vmDirs(stateDir).length > 0);
      break;
    case 'vmm-started':
      await seen(() => vmm() !== undefined, 10);
      break;
    case 'changing':
      await seen(() => stdout().includes(CHANGING_MARKER));
      break;
    case 'vmm-exited': {
      await seen(() => stdout().includes(CHANGED_MARKER));
      const pid = vmm()?.pid;
      if (pid !== undefined) await seen(() => hasExited(pid));
      break;
    }
    case 'host-written': {
      // The guest writes its image, never HOST: the first change in HOST's top directory is
      // sync-back at work (deleting gone-*, adding new.txt), with most of the tree still to do.
      let written = false;
      const watcher = watch(host, () => (written = true));
      await seen(() => written, 1).finally(() => watcher.close());
    }
  }
  if (moment.delayMs > 0) await sleep(moment.delayMs);
  return running();
}

/** Waits up to LEFTOVER_GRACE_MS for `matching` processes to end, then kills (by pid) and counts those that did not. */
async function leftovers(matching: () => { pid: number }[]): Promise<number> {
  await waitUntil(() => matching().length === 0, LEFTOVER_GRACE_MS, 50);
  const left = matching();
  for (const { pid } of left) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // it ended in the meantime
    }
  }
  return left.length;
}

async function signalRun(options: SignalBatchOptions, moment: Moment, host: string): Promise<RunOutcome> {
  const { signal, stateDir, env, launch } = options;
  const fixture = fixtureTree(options.files ?? 300);
  writeTree(host, fixture);
  const before = diskManifest(host);
  const synced = treeManifest(syncedTree(fixture));
  const problems: string[] = [];
  if (before.join('\n') !== treeManifest(fixture).join('\n')) problems.push('the fixture was not written as modelled');

  // Where the moment is while the command runs, it sleeps, so the signal finds it still running.
  const syncing = moment.after === 'vmm-exited' || moment.after === 'host-written';
  const script = syncing ? GUEST_CHANGES : `${GUEST_CHANGES}\nsleep 30`;
  const child = launch(['exec', '--add-dir', `${host}:/work:rw`, '--', 'sh', '-c', script], env);
  const io = observe(child);
  let running = true;
  void io.exited.then(() => (running = false));
  const limit = setTimeout(() => child.kill('SIGKILL'), RUN_LIMIT_MS);
  let delivered = await reach(moment, stateDir, host, io.stdout, () => running);
  if (delivered) {
    if (signal === 'SIGKILL-VMM') {
      const vmm = processesMentioning([stateDir]).find(isVmm);
      if (vmm) process.kill(vmm.pid, 'SIGKILL');
      delivered = vmm !== undefined;
    } else child.kill(signal);
  }
  const exit = await io.exited;
  clearTimeout(limit);

  const vmmLeft = await leftovers(() => processesMentioning([stateDir]).filter(isVmm));
  // rsync, e2fsck, debugfs: a SIGKILL of mvmctl orphans them, and HOST is judged once they are done.
  const toolsLeft = await leftovers(() => processesMentioning([stateDir, host]));
  if (signal === 'SIGKILL') await observe(launch(['ls'], env)).exited;
  const stateDirsLeft = vmDirs(stateDir).length;
  const { verdict, detail } = classifyHost(host, before, synced);

  const exitText = exit.signal ? `killed by ${exit.signal}` : `exit ${exit.code}`;
  const commandFinished = syncing || !delivered;
  const expected = expectedExit(signal, delivered, commandFinished, exit, verdict);
  if (!expected.ok) problems.push(`${exitText}, expected ${expected.want}${exit.signal ? '' : `: ${lastLines(io.stderr())}`}`);
  if (verdict === 'mixed') problems.push(`HOST mixed: ${detail}`);
  if (verdict === 'synced' && !commandFinished) problems.push('HOST synced although the command was interrupted');
  if (vmmLeft) problems.push(`${vmmLeft} VMM process(es) outlived the run by ${LEFTOVER_GRACE_MS / 1000} s`);
  if (toolsLeft) problems.push(`${toolsLeft} helper process(es) outlived the run by ${LEFTOVER_GRACE_MS / 1000} s`);
  if (stateDirsLeft) problems.push(`${stateDirsLeft} state dir(s) left${signal === 'SIGKILL' ? ' after mvmctl ls' : ''}`);
  return { moment, delivered, exit: exitText, exitOk: expected.ok, vmmLeft, toolsLeft, stateDirsLeft, host: verdict, problems };
}

/**
 * SIGINT/SIGTERM: 128+N, or the command's own 0 when mvmctl had already brought HOST back; SIGKILL:
 * death by it; a killed VMM: 125 (mvmctl failed) with HOST untouched. A signal that came too late
 * leaves an ordinary run, which exits 0.
 */
function expectedExit(
  signal: SignalCase,
  delivered: boolean,
  commandFinished: boolean,
  exit: { code: number | null; signal: NodeJS.Signals | null },
  verdict: HostVerdict,
): { ok: boolean; want: string } {
  const ownExitOk = commandFinished && exit.code === 0 && verdict === 'synced';
  if (!delivered) return { ok: ownExitOk, want: 'exit 0 with HOST synced (the signal came after the run)' };
  switch (signal) {
    case 'SIGKILL':
      return { ok: exit.signal === 'SIGKILL', want: 'death by SIGKILL' };
    case 'SIGKILL-VMM':
      return { ok: exit.code === 125 && verdict === 'identical', want: 'exit 125 with HOST untouched' };
    default: {
      const code = EXIT_CODE[signal];
      return { ok: exit.code === code || ownExitOk, want: `exit ${code}${commandFinished ? ', or 0 with HOST synced' : ''}` };
    }
  }
}

function lastLines(text: string): string {
  return text.trim().split('\n').slice(-2).join(' | ') || 'no stderr';
}

/** Runs one signal case at each of `moments`, one run after another, each on a fresh HOST. */
export async function signalBatch(options: SignalBatchOptions): Promise<SignalBatchReport> {
  const work = mkdtempSync(join(tmpdir(), 'mvm-soak-hosts-'));
  const runs: RunOutcome[] = [];
  try {
    for (const [i, moment] of options.moments.entries()) {
      const host = join(work, `host-${i}`);
      runs.push(await signalRun(options, moment, host));
      rmSync(host, { recursive: true, force: true });
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return { signal: options.signal, runs, ok: runs.every((r) => r.problems.length === 0) };
}

const sum = (runs: RunOutcome[], f: (r: RunOutcome) => number) => runs.reduce((n, r) => n + f(r), 0);

/** e.g. `signals SIGTERM: 50 runs, 0 VMM left, 0 tools left, 0 state dirs left, HOST mixed 0 (identical 31, synced 19), 0 unexpected exits, 2 signals too late` */
export function formatSignalBatch(report: SignalBatchReport): string {
  const { runs } = report;
  const count = (verdict: HostVerdict) => runs.filter((r) => r.host === verdict).length;
  const unexpected = runs.filter((r) => !r.exitOk).length;
  return (
    `signals ${report.signal}: ${runs.length} runs, ${sum(runs, (r) => r.vmmLeft)} VMM left, ${sum(runs, (r) => r.toolsLeft)} tools left, ` +
    `${sum(runs, (r) => r.stateDirsLeft)} state dirs left, HOST mixed ${count('mixed')} (identical ${count('identical')}, synced ${count('synced')}), ` +
    `${unexpected} unexpected exits, ${runs.filter((r) => !r.delivered).length} signals too late`
  );
}

/** One line per run that had a problem, to print under the summary. */
export function signalProblems(report: SignalBatchReport): string[] {
  return report.runs.flatMap((r, i) =>
    r.problems.length ? [`  run ${i} (${describeMoment(r.moment)}): ${r.problems.join('; ')}`] : [],
  );
}
