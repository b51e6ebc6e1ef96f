import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { MvmError } from '../errors.js';
import { writeFileAtomic } from '../fs-atomic.js';
import { stateDir } from '../paths.js';

/** What `ls` shows and `down` and the reaper act on; one `state.json` per VM directory. */
export interface VmRecord {
  name: string;
  backend: string;
  command: string[];
  startedAt: string;
  /** The mvmctl process that owns the VM and tears it down. */
  ownerPid: number;
  ownerStartTicks: number;
  vmmPid?: number;
  vmmStartTicks?: number;
  runDir: string;
}

export interface VmStatus extends VmRecord {
  vmmRunning: boolean;
}

const RECORD_FILE = 'state.json';

export function vmsDir(): string {
  return join(stateDir(), 'vms');
}

/** `exec-<pid-hex>-<random>`: the pid makes a VM easy to match to its mvmctl, the random part unique. */
export function newVmName(pid = process.pid): string {
  return `exec-${pid.toString(16)}-${randomBytes(3).toString('hex')}`;
}

/**
 * The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): together with
 * the pid it identifies a process, so a recycled pid is never mistaken for the VM's owner or VMM.
 */
export function processStartTicks(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[19]);
  } catch {
    return undefined;
  }
}

function isSameProcess(pid: number | undefined, startTicks: number | undefined): boolean {
  return pid !== undefined && startTicks !== undefined && processStartTicks(pid) === startTicks;
}

/** The record of a VM this process owns, before its VMM has started. */
export function ownVmRecord(fields: Pick<VmRecord, 'name' | 'backend' | 'command' | 'runDir'>): VmRecord {
  return {
    ...fields,
    startedAt: new Date().toISOString(),
    ownerPid: process.pid,
    ownerStartTicks: processStartTicks(process.pid) ?? 0,
  };
}

/** Records the VMM's pid as soon as it exists, so `ls`/`down` and the reaper can find it. */
export async function recordVmm(record: VmRecord, vmmPid: number): Promise<void> {
  await writeVmRecord({ ...record, vmmPid, vmmStartTicks: processStartTicks(vmmPid) });
}

export async function createVmDir(name: string): Promise<string> {
  await mkdir(vmsDir(), { recursive: true, mode: 0o700 });
  const runDir = join(vmsDir(), name);
  await mkdir(runDir, { mode: 0o700 });
  return runDir;
}

export async function writeVmRecord(record: VmRecord): Promise<void> {
  await writeFileAtomic(join(record.runDir, RECORD_FILE), JSON.stringify(record, null, 2) + '\n', 0o600);
}

export async function removeVmDir(runDir: string): Promise<void> {
  await rm(runDir, { recursive: true, force: true });
}

async function readRecord(name: string): Promise<VmRecord | undefined> {
  try {
    return JSON.parse(await readFile(join(vmsDir(), name, RECORD_FILE), 'utf8')) as VmRecord;
  } catch {
    return undefined;
  }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

/** Kills a dead owner's VMM (if that process still exists) and removes the VM's directory. */
async function reap(record: VmRecord): Promise<void> {
  if (isSameProcess(record.vmmPid, record.vmmStartTicks)) killQuietly(record.vmmPid!, 'SIGKILL');
  await removeVmDir(record.runDir);
}

/**
 * Running VMs. Directories left by an mvmctl that was killed (SIGKILL, a crash) are reaped on
 * the way: their VMM is killed if it somehow survived, and their state and staging files removed.
 */
export async function listVms(): Promise<VmStatus[]> {
  let names: string[];
  try {
    names = await readdir(vmsDir());
  } catch {
    return [];
  }
  const running: VmStatus[] = [];
  for (const name of names.sort()) {
    const record = await readRecord(name);
    if (!record) {
      await reapUnrecorded(name);
      continue;
    }
    if (!isSameProcess(record.ownerPid, record.ownerStartTicks)) {
      await reap(record);
      continue;
    }
    running.push({ ...record, vmmRunning: isSameProcess(record.vmmPid, record.vmmStartTicks) });
  }
  return running;
}

/**
 * A directory without a readable record is either being created right now or was left by a run
 * killed before it wrote one; the pid in the name tells which.
 */
async function reapUnrecorded(name: string): Promise<void> {
  const match = /^exec-([0-9a-f]+)-[0-9a-f]+$/.exec(name);
  if (match && processStartTicks(parseInt(match[1], 16)) !== undefined) return;
  await removeVmDir(join(vmsDir(), name));
}

/**
 * Stops a VM: asks its owning mvmctl to tear down (SIGTERM, the same path as Ctrl-C) and waits for
 * it; if the owner does not finish in time, kills the VMM and removes the state itself.
 */
export async function stopVm(name: string, timeoutMs = 10_000): Promise<void> {
  const record = await readRecord(name);
  if (!record) {
    const known = (await listVms()).map((vm) => vm.name);
    throw new MvmError(
      `no VM named '${name}'` + (known.length ? ` (running: ${known.join(', ')})` : ' (none is running)'),
      1,
    );
  }
  if (isSameProcess(record.ownerPid, record.ownerStartTicks)) {
    killQuietly(record.ownerPid, 'SIGTERM');
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline && isSameProcess(record.ownerPid, record.ownerStartTicks)) await sleep(50);
  }
  await reap(record);
}
