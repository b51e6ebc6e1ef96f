import { randomBytes } from 'node:crypto';
import { constants, readFileSync, type Stats } from 'node:fs';
import { lstat, mkdir, open, readdir, rm, type FileHandle } from 'node:fs/promises';
import { basename, join } from 'node:path';
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

const isPid = (value: unknown): value is number => Number.isInteger(value) && (value as number) > 0;
const isOptional = (value: unknown, check: (v: unknown) => boolean) => value === undefined || check(value);

/**
 * Anything that can write vms/ could plant a record, so a record is only ever a claim: checked
 * before use, and never the source of a path to remove (see `reap`). Checked by hand rather than
 * with the schema library: every exec reads the registry, and that library costs start-up time.
 */
function asRecord(value: unknown): VmRecord | undefined {
  const r = value as Partial<VmRecord> | null;
  const ok =
    typeof r === 'object' &&
    r !== null &&
    typeof r.name === 'string' &&
    typeof r.backend === 'string' &&
    Array.isArray(r.command) &&
    r.command.every((arg) => typeof arg === 'string') &&
    typeof r.startedAt === 'string' &&
    isPid(r.ownerPid) &&
    typeof r.ownerStartTicks === 'number' &&
    isOptional(r.vmmPid, isPid) &&
    isOptional(r.vmmStartTicks, (v) => typeof v === 'number') &&
    typeof r.runDir === 'string';
  return ok ? (r as VmRecord) : undefined;
}

const RECORD_FILE = 'state.json';
/** Records are a few hundred bytes; anything much bigger was not written by us. */
const MAX_RECORD_BYTES = 64 * 1024;

export function vmsDir(): string {
  return join(stateDir(), 'vms');
}

/** What `newVmName` makes: the pid of the process that made it is in the name. */
const GENERATED_NAME = /^exec-([0-9a-f]+)-[0-9a-f]+$/;
/** A name the user gives (`up --name`): one path component, no leading dot. */
const USER_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** The only entries of vms/ the registry reads or removes. */
const isVmName = (name: string) => GENERATED_NAME.test(name) || USER_NAME.test(name);
/** How long a directory without a record may be left as it is when its name does not say who made it. */
const UNRECORDED_GRACE_MS = 60_000;

/** `exec-<pid-hex>-<random>`: the pid makes a VM easy to match to its mvmctl, the random part unique. */
export function newVmName(pid = process.pid): string {
  return `exec-${pid.toString(16)}-${randomBytes(3).toString('hex')}`;
}

/** The directory of the VM `name`, or undefined when `name` is no VM name (it could lead outside vms/). */
export function vmRunDir(name: string): string | undefined {
  return isVmName(name) ? vmDir(name) : undefined;
}

/** Checks a name the user gives a VM; generated names are left to newVmName. */
export function checkVmName(name: string): string {
  if (!USER_NAME.test(name) || GENERATED_NAME.test(name)) {
    throw new MvmError(`'${name}' cannot name a VM: use letters, digits and . _ - (at most 63, not starting with . or -, and not of the form exec-HEX-HEX)`);
  }
  return name;
}

function vmDir(name: string): string {
  return join(vmsDir(), name);
}

function ownUid(): number {
  return process.getuid!();
}

/**
 * The reaper kills processes and removes directories on the word of the records, so they are only
 * trusted where no one else can write them: the state dir and vms/ must be real directories of
 * ours that group and others cannot write. False when vms/ does not exist yet.
 */
async function checkStateDirs(): Promise<boolean> {
  for (const path of [stateDir(), vmsDir()]) {
    const info = await lstat(path).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return undefined;
      throw error;
    });
    if (!info) return false;
    refuseUnlessPrivate(path, info);
  }
  return true;
}

function refuseUnlessPrivate(path: string, info: Stats): void {
  const untrusted = `${path} could hold VM records planted by someone else`;
  const useOwn = 'set MVM_STATE_DIR to a directory of your own';
  if (info.isSymbolicLink()) throw new MvmError(`${untrusted}: it is a symlink; ${useOwn}`);
  if (!info.isDirectory()) throw new MvmError(`${path} is not a directory: ${useOwn}`);
  if (info.uid !== ownUid()) throw new MvmError(`${untrusted}: it belongs to uid ${info.uid}, not to you; ${useOwn}`);
  if (info.mode & 0o022) throw new MvmError(`${untrusted}: group or others can write it; run 'chmod go-w ${path}'`);
}

/**
 * The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): together with
 * the pid it identifies a process, so a recycled pid is never mistaken for the VM's owner or VMM.
 * Undefined when there is no such process, or it has exited.
 */
export function processStartTicks(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // A zombie has exited: an orphan whose reaper (the PID 1 of a container, say) never waits for it stays one.
    if (fields[0] === 'Z' || fields[0] === 'X') return undefined;
    return Number(fields[19]);
  } catch {
    return undefined;
  }
}

function isSameProcess(pid: number | undefined, startTicks: number | undefined): boolean {
  return pid !== undefined && startTicks !== undefined && processStartTicks(pid) === startTicks;
}

function commandLine(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0$/, '').split('\0');
  } catch {
    return [];
  }
}

/**
 * Whether the recorded VMM is alive and is the VMM a backend starts for this VM: named by
 * `-name NAME` (QEMU) or `--id NAME` (Firecracker), with its sockets under vms/NAME/. Pid and start
 * time only say the process exists; a planted record could give those of any process.
 */
function isVmmOf(name: string, record: VmRecord): boolean {
  if (!isSameProcess(record.vmmPid, record.vmmStartTicks)) return false;
  const args = commandLine(record.vmmPid!);
  const named = args.some((arg, index) => (arg === '-name' || arg === '--id') && args[index + 1] === name);
  // QEMU writes a comma in an option value twice.
  const ownDir = vmDir(name) + '/';
  return named && args.some((arg) => arg.includes(ownDir) || arg.includes(ownDir.replaceAll(',', ',,')));
}

/** Whether `pid` is node running mvmctl (bin/mvmctl, or its entry point directly). */
function isMvmctl(pid: number): boolean {
  const [program = '', ...args] = commandLine(pid);
  return /^node/.test(basename(program)) && args.some((arg) => basename(arg) === 'mvmctl' || arg.endsWith('dist/src/cli/main.js'));
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
  // A recursive mkdir gives every directory it creates this mode, so a fresh state dir passes the check.
  await mkdir(vmsDir(), { recursive: true, mode: 0o700 });
  await checkStateDirs();
  const runDir = vmDir(name);
  await mkdir(runDir, { mode: 0o700 }).catch((error: NodeJS.ErrnoException) => {
    throw error.code === 'EEXIST' ? new MvmError(`a VM named '${name}' is already running (see mvmctl ls)`) : error;
  });
  return runDir;
}

export async function writeVmRecord(record: VmRecord): Promise<void> {
  await writeFileAtomic(join(record.runDir, RECORD_FILE), JSON.stringify(record, null, 2) + '\n', 0o600);
}

/** Like `rm -rf`: a symlink, at the top or inside, is removed itself, never followed. */
export async function removeVmDir(runDir: string): Promise<void> {
  await rm(runDir, { recursive: true, force: true });
}

/** The record in vms/<name> if it is one of ours: a regular file we own, of a sane size, that parses. */
async function readRecord(name: string): Promise<VmRecord | undefined> {
  // Through a symlink in vms/ we would read (and then act on) whatever it points to.
  if (!(await lstat(vmDir(name)).catch(() => undefined))?.isDirectory()) return undefined;
  let file: FileHandle;
  try {
    // O_NONBLOCK: opening a FIFO planted as the record would otherwise wait for a writer forever.
    file = await open(join(vmDir(name), RECORD_FILE), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const info = await file.stat();
    if (!info.isFile() || info.uid !== ownUid() || info.size > MAX_RECORD_BYTES) return undefined;
    const buffer = Buffer.alloc(MAX_RECORD_BYTES);
    const { bytesRead } = await file.read(buffer, 0, buffer.length, 0);
    const record = asRecord(JSON.parse(buffer.toString('utf8', 0, bytesRead)));
    return record?.name === name ? record : undefined;
  } catch {
    return undefined;
  } finally {
    await file.close();
  }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

/**
 * Kills a dead owner's VMM (if that process is still this VM's QEMU) and removes vms/<name>: the
 * directory the entry is, never the runDir the record names.
 */
async function reap(name: string, record: VmRecord): Promise<void> {
  if (isVmmOf(name, record)) killQuietly(record.vmmPid!, 'SIGKILL');
  await removeVmDir(vmDir(name));
}

/**
 * Running VMs. Directories left by an mvmctl that was killed (SIGKILL, a crash) are reaped on
 * the way: their VMM is killed if it somehow survived, and their state and staging files removed.
 */
export async function listVms(): Promise<VmStatus[]> {
  if (!(await checkStateDirs())) return [];
  const running: VmStatus[] = [];
  for (const name of (await readdir(vmsDir())).sort()) {
    // We made none of the others: someone else put them there, so they are left alone.
    if (!isVmName(name)) continue;
    const record = await readRecord(name);
    if (!record) {
      await reapUnrecorded(name);
      continue;
    }
    if (!isSameProcess(record.ownerPid, record.ownerStartTicks)) {
      await reap(name, record);
      continue;
    }
    running.push({ ...record, runDir: vmDir(name), vmmRunning: isVmmOf(name, record) });
  }
  return running;
}

/**
 * A directory without a readable record is either being created right now or was left by a run
 * killed before it wrote one; the pid in the name tells which.
 */
async function reapUnrecorded(name: string): Promise<void> {
  const generated = GENERATED_NAME.exec(name);
  if (generated) {
    if (processStartTicks(parseInt(generated[1]!, 16)) !== undefined) return;
  } else {
    // A user's name says nothing of its maker: only a directory left unrecorded for a while is stale.
    const info = await lstat(vmDir(name)).catch(() => undefined);
    if (!info || Date.now() - info.mtimeMs < UNRECORDED_GRACE_MS) return;
  }
  await removeVmDir(vmDir(name));
}

/**
 * Stops a VM: asks its owning mvmctl to tear down (SIGTERM, the same path as Ctrl-C) and waits for
 * it; if the owner does not finish in time, kills the VMM and removes the state itself.
 */
export async function stopVm(name: string, timeoutMs = 10_000): Promise<void> {
  // The name is the user's: one that is not a VM name could lead outside vms/ ('../..').
  const record = isVmName(name) && (await checkStateDirs()) ? await readRecord(name) : undefined;
  if (!record) {
    const known = (await listVms()).map((vm) => vm.name);
    throw new MvmError(
      `no VM named '${name}'` + (known.length ? ` (running: ${known.join(', ')})` : ' (none is running)'),
      1,
    );
  }
  // Only an mvmctl is asked: a planted record could name any process as the owner.
  if (isSameProcess(record.ownerPid, record.ownerStartTicks) && isMvmctl(record.ownerPid)) {
    killQuietly(record.ownerPid, 'SIGTERM');
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline && isSameProcess(record.ownerPid, record.ownerStartTicks)) await sleep(50);
  }
  await reap(name, record);
}
