import { randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { basename, isAbsolute, join } from 'node:path';
import { writeFileAtomic } from '../fs-atomic.js';
import { stateDir } from '../paths.js';
import { processStartTicks } from '../state/registry.js';

/**
 * Top-level names in HOST that belong to sync-back: its work directory is `HOST/.mvm-sync-<id>`.
 * Such entries are never compared, synced or deleted, and none is ever taken from the image.
 */
export const WORK_DIR_PREFIX = '.mvm-sync-';

/** Whether a top-level name (raw bytes) is one of those. */
export function isReservedName(name: Buffer): boolean {
  return name.toString('latin1').startsWith(WORK_DIR_PREFIX);
}

/** One change to HOST, checkable after a crash (see apply.ts). Paths are relative, latin1-encoded raw bytes. */
export type Step =
  /** HOST/rel (inode `ino`) moved to WORK/backup; done iff WORK/backup exists. */
  | { op: 'aside'; rel: string; ino: string; backup: string }
  /** WORK/staged (inode `ino`) moved to HOST/rel; done iff WORK/staged is gone. */
  | { op: 'in'; rel: string; ino: string; staged: string }
  /** Directory HOST/rel (inode `ino`) gets `mode` and, when given, `mtimeNs`; undone by setting `undoMode`. */
  | { op: 'attrs'; rel: string; ino: string; mode: number; undoMode: number; mtimeNs?: string };

/** A directory's mtime in nanoseconds, as a decimal string: what a rollback puts back exactly. */
export interface DirTime {
  rel: string;
  ino: string;
  mtimeNs: string;
}

/**
 * `preparing`: the work dir is being filled, HOST is untouched. `applying`: the steps may be
 * running; undone on recovery. `committed`: every step is done; recovery only cleans up.
 */
export type JournalState = 'preparing' | 'applying' | 'committed';

export interface Journal {
  /** 2 since an attrs step's time is in nanoseconds; recovery leaves another version's journal alone, with one line. */
  version: 2;
  id: string;
  /** The process applying it; recovery leaves the journal of a live process alone. */
  pid: number;
  startTicks: number | null;
  host: string;
  hostDev: string;
  hostIno: string;
  work: string;
  state: JournalState;
  steps: Step[];
  /** Mtimes of the HOST directories the steps change (the root first), as they were before. */
  dirTimes: DirTime[];
  /** HOST's own mode and mtime once synced, set after the work dir (inside HOST) is gone. */
  root?: { mode: number; mtimeNs: string };
}

/** A step takes about a hundred bytes: room for a few million changed paths, and no more is read. */
const MAX_JOURNAL_BYTES = 512 * 1024 ** 2;
const JOURNAL_NAME = /^([0-9a-f]{16})\.json$/;
/** writeFileAtomic's temp name for a journal: `.<name>.<pid>.<random>.tmp`. */
const JOURNAL_TEMP = /^\.[0-9a-f]{16}\.json\.(\d+)\.[0-9a-f]{8}\.tmp$/;
const WORK_NAME = new RegExp(`^${WORK_DIR_PREFIX.replace(/\./g, '\\.')}[0-9a-f]{16}$`);
const STAGED_NAME = /^(new|old)\/\d+$/;

export function syncsDir(): string {
  return join(stateDir(), 'syncs');
}

export function journalPath(journal: Pick<Journal, 'id'>): string {
  return join(syncsDir(), `${journal.id}.json`);
}

/** A fresh journal for a sync into `host`, owned by this process, with HOST's mtime before anything changed. */
export function newJournal(host: string, hostStat: { dev: bigint; ino: bigint; mtimeNs: bigint }): Journal {
  const id = randomBytes(8).toString('hex');
  return takeOver({
    version: 2,
    id,
    pid: 0,
    startTicks: null,
    host,
    hostDev: String(hostStat.dev),
    hostIno: String(hostStat.ino),
    work: join(host, WORK_DIR_PREFIX + id),
    state: 'preparing',
    steps: [],
    dirTimes: [{ rel: '', ino: String(hostStat.ino), mtimeNs: String(hostStat.mtimeNs) }],
  });
}

/** The journal as this process's own: a process that finds it then keeps out while this one works on it. */
export function takeOver(journal: Journal): Journal {
  return { ...journal, pid: process.pid, startTicks: processStartTicks(process.pid) ?? null };
}

/** Writes the journal durably: once this resolves, a crash cannot lose it (or the state it records). */
export async function writeJournal(journal: Journal): Promise<void> {
  await mkdir(syncsDir(), { recursive: true, mode: 0o700 });
  await writeFileAtomic(journalPath(journal), JSON.stringify(journal) + '\n', 0o600, { durable: true });
}

export async function removeJournal(journal: Journal): Promise<void> {
  await rm(journalPath(journal), { force: true });
}

/** Whether the process that wrote the journal still runs (pid and start time; a recycled pid does not count). */
export function ownerAlive(journal: Journal): boolean {
  return journal.startTicks === null ? pidExists(journal.pid) : processStartTicks(journal.pid) === journal.startTicks;
}

function pidExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface FoundJournal {
  path: string;
  /** Undefined when the file is not a journal this version wrote. */
  journal?: Journal;
}

/**
 * The journals in syncs/, after removing journal temp files whose writer is gone (what a kill during
 * writeJournal leaves). Journals drive renames and removals in HOST, so they are read only when the
 * state dir and syncs/ are directories of ours that no one else can write; otherwise the answer is
 * why not.
 */
export async function listJournals(): Promise<{ found: FoundJournal[] } | { untrusted: string }> {
  const dir = syncsDir();
  let names: string[];
  try {
    for (const path of [stateDir(), dir]) {
      const info = await lstat(path);
      if (!info.isDirectory() || info.uid !== process.getuid!() || info.mode & 0o022) {
        return { untrusted: `${path} is not a directory of yours that only you can write, so the journals in ${dir} are not trusted` };
      }
    }
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { found: [] };
    throw err;
  }
  const found: FoundJournal[] = [];
  for (const name of names.sort()) {
    const path = join(dir, name);
    const temp = JOURNAL_TEMP.exec(name);
    if (temp && !pidExists(Number(temp[1]))) await rm(path, { force: true });
    if (!JOURNAL_NAME.test(name)) continue;
    const info = await lstat(path);
    const text = info.isFile() && info.size <= MAX_JOURNAL_BYTES ? await readFile(path, 'utf8') : '';
    found.push({ path, journal: parseJournal(text, name) });
  }
  return { found };
}

const isDecimal = (v: unknown): v is string => typeof v === 'string' && /^-?\d+$/.test(v);
const isMode = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 0o7777;

/** A relative path with no empty, `.` or `..` component: it cannot leave HOST. */
function isRel(v: unknown): v is string {
  return typeof v === 'string' && (v === '' || v.split('/').every((c) => c !== '' && c !== '.' && c !== '..' && !c.includes('\0')));
}

function isStep(v: unknown): v is Step {
  const s = v as Record<string, unknown>;
  if (typeof s !== 'object' || s === null || !isRel(s.rel) || s.rel === '' || !isDecimal(s.ino)) return false;
  if (s.op === 'aside') return typeof s.backup === 'string' && STAGED_NAME.test(s.backup);
  if (s.op === 'in') return typeof s.staged === 'string' && STAGED_NAME.test(s.staged);
  return s.op === 'attrs' && isMode(s.mode) && isMode(s.undoMode) && (s.mtimeNs === undefined || isDecimal(s.mtimeNs));
}

/**
 * The journal in `text`, checked by hand (as the VM registry checks its records): it must name a
 * work dir that is HOST/.mvm-sync-<its id>, and paths that stay inside HOST and the work dir.
 */
function parseJournal(text: string, fileName: string): Journal | undefined {
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(text) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  const ok =
    typeof j === 'object' &&
    j !== null &&
    j.version === 2 &&
    typeof j.id === 'string' &&
    fileName === `${j.id}.json` &&
    Number.isInteger(j.pid) &&
    (j.startTicks === null || typeof j.startTicks === 'number') &&
    typeof j.host === 'string' &&
    isAbsolute(j.host) &&
    isDecimal(j.hostDev) &&
    isDecimal(j.hostIno) &&
    typeof j.work === 'string' &&
    j.work === join(j.host, WORK_DIR_PREFIX + j.id) &&
    WORK_NAME.test(basename(j.work)) &&
    (j.state === 'preparing' || j.state === 'applying' || j.state === 'committed') &&
    Array.isArray(j.steps) &&
    j.steps.every(isStep) &&
    Array.isArray(j.dirTimes) &&
    j.dirTimes.every((t: DirTime) => typeof t === 'object' && t !== null && isRel(t.rel) && isDecimal(t.ino) && isDecimal(t.mtimeNs)) &&
    (j.root === undefined ? j.state !== 'committed' : isMode((j.root as Journal['root'])?.mode) && isDecimal((j.root as Journal['root'])?.mtimeNs));
  return ok ? (j as unknown as Journal) : undefined;
}
