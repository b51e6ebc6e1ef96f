import { closeSync, fchmodSync, fstatSync, futimesSync } from 'node:fs';
import { join } from 'node:path';
import { relKey } from './host-tree.js';
import {
  entryAt, HostChangedError, lstatOrUndefined, moveIn, moveOut, openDir, removeTree, setMtimesExactly, showRel, utimeArg, type ExactTime,
} from './host-ops.js';
import { listJournals, ownerAlive, removeJournal, takeOver, writeJournal, type DirTime, type Journal, type Step } from './journal.js';
import { OWNER_WRITE, type StagingResult } from './staging-tree.js';
import type { HostState, TreeChanges } from './tree-diff.js';

/*
 * The apply is a list of renames and chmods, written to the journal before the first of them, each
 * of which a later process can tell done or not from the file system alone (journal.ts, Step).
 * Undoing the done ones in reverse order puts HOST back as it was; once the journal says committed,
 * only the cleanup is left, and it can be repeated.
 */

/** Test hook: runs before step `index`, and with index === steps once the journal is committed. */
export type ApplyHook = (index: number, steps: number) => void;

const ROOT = Buffer.alloc(0);
const fromKey = (rel: string) => Buffer.from(rel, 'latin1');

function dirTime(rel: Buffer, old: HostState): DirTime {
  return { rel: relKey(rel), ino: String(old.ino), mtimeNs: String(old.mtimeNs) };
}

function attrs(rel: Buffer, ino: bigint, mode: number, undoMode: number, mtimeNs?: bigint): Step {
  return { op: 'attrs', rel: relKey(rel), ino: String(ino), mode, undoMode, ...(mtimeNs === undefined ? {} : { mtimeNs: String(mtimeNs) }) };
}

/**
 * The steps that turn HOST into the guest's tree: directories made writable where rename(2) needs
 * it (both parents, and a directory that moves to another parent), every replaced path moved aside
 * and its new version moved in, then the guest's modes and mtimes on the directories that stay.
 * Also the mtimes a rollback restores: the root's, and those of every directory that is changed or
 * moved aside.
 */
export function planSteps(changes: TreeChanges, staging: StagingResult): Pick<Journal, 'steps' | 'dirTimes' | 'root'> {
  const steps: Step[] = [];
  const dirTimes = [dirTime(ROOT, changes.root.old)];
  for (const { rel, old, entriesChange } of changes.dirFixes) {
    dirTimes.push(dirTime(rel, old));
    if (entriesChange && !(old.mode & OWNER_WRITE)) steps.push(attrs(rel, old.ino, old.mode | OWNER_WRITE, old.mode));
  }
  for (const { rel, old } of changes.replacements) {
    if (!old?.isDir) continue;
    dirTimes.push(dirTime(rel, old));
    if (!(old.mode & OWNER_WRITE)) steps.push(attrs(rel, old.ino, old.mode | OWNER_WRITE, old.mode));
  }
  for (const [index, { rel, old }] of changes.replacements.entries()) {
    if (old) steps.push({ op: 'aside', rel: relKey(rel), ino: String(old.ino), backup: `old/${index}` });
    const staged = staging.staged.get(index);
    if (staged) steps.push({ op: 'in', rel: relKey(rel), ino: String(staged.ino), staged: staged.staged });
  }
  for (const [index, { rel }] of changes.replacements.entries()) {
    const staged = staging.staged.get(index);
    if (staged?.finalMode !== undefined) steps.push(attrs(rel, staged.ino, staged.finalMode, staged.finalMode | OWNER_WRITE));
  }
  for (const fix of [...changes.dirFixes].reverse()) steps.push(attrs(fix.rel, fix.old.ino, fix.mode, fix.old.mode, fix.mtimeNs));
  return { steps, dirTimes, root: { mode: changes.root.mode, mtimeNs: String(changes.root.mtimeNs) } };
}

/** Performs the journal's steps in order; throws at the first that fails (then call rollBack). */
export function applySteps(journal: Journal, onStep?: ApplyHook): void {
  const realDirs = new Set<string>();
  for (const [index, step] of journal.steps.entries()) {
    onStep?.(index, journal.steps.length);
    const rel = fromKey(step.rel);
    const ino = BigInt(step.ino);
    if (step.op === 'aside') moveOut(journal.host, rel, ino, join(journal.work, step.backup), realDirs);
    else if (step.op === 'in') moveIn(join(journal.work, step.staged), journal.host, rel, realDirs);
    else if (!withDir(journal.host, rel, ino, realDirs, (fd) => setAttrs(fd, step.mode, step.mtimeNs))) {
      throw new HostChangedError(`directory ${showRel(rel)} changed during the sync-back`);
    }
  }
}

/**
 * Undoes the steps that are done, last first, then removes the work dir and gives the directories
 * their mtimes back to the nanosecond. Safe to repeat, and after a crash at any point: a step
 * counts as done only when the file system shows it (an aside's backup exists; HOST has an in
 * step's inode and its staged name is gone). Throws when HOST is not what a step left there.
 */
export async function rollBack(journal: Journal): Promise<void> {
  const { host, work } = journal;
  const realDirs = new Set<string>();
  for (const step of [...journal.steps].reverse()) {
    const rel = fromKey(step.rel);
    const ino = BigInt(step.ino);
    if (step.op === 'aside') {
      const backup = join(work, step.backup);
      const moved = lstatOrUndefined(backup);
      if (!moved) continue;
      if (moved.ino !== ino) throw new HostChangedError(`${backup} is not what was moved aside from ${showRel(rel)}`);
      moveIn(backup, host, rel, realDirs);
    } else if (step.op === 'in') {
      const staged = join(work, step.staged);
      if (!lstatOrUndefined(staged) && entryAt(host, rel, realDirs)?.ino === ino) moveOut(host, rel, ino, staged, realDirs);
    } else {
      withDir(host, rel, ino, realDirs, (fd) => fchmodSync(fd, step.undoMode));
    }
  }
  await removeWorkDir(journal);
  const times: ExactTime[] = journal.dirTimes.map((t) => ({ rel: fromKey(t.rel), ino: BigInt(t.ino), mtimeNs: BigInt(t.mtimeNs) }));
  await setMtimesExactly(host, times);
}

/** After the commit: removes the work dir (backups included), then gives HOST itself the guest's mode and mtime. */
export async function finishCommitted(journal: Journal): Promise<void> {
  await removeWorkDir(journal);
  await setRootAttrs(journal.host, BigInt(journal.hostIno), journal.root!.mode, BigInt(journal.root!.mtimeNs));
}

/**
 * HOST's own mode and mtime. Last of all: the work dir inside HOST changes its mtime while it
 * exists, and a read-only mode would keep it from being removed.
 */
export async function setRootAttrs(host: string, ino: bigint, mode: number, mtimeNs: bigint): Promise<void> {
  const changed = withDir(host, ROOT, ino, new Set(), (fd) => {
    if (Number(fstatSync(fd, { bigint: true }).mode & 0o7777n) !== mode) fchmodSync(fd, mode);
  });
  if (!changed) throw new HostChangedError(`${host} is no longer the directory that was synced into`);
  await setMtimesExactly(host, [{ rel: ROOT, ino, mtimeNs }]);
}

async function removeWorkDir({ work }: Journal): Promise<void> {
  const st = lstatOrUndefined(work);
  if (!st) return;
  if (!st.isDirectory()) throw new HostChangedError(`${work} is no longer sync-back's work directory`);
  await removeTree(work);
}

function setAttrs(fd: number, mode: number, mtimeNs: string | undefined): void {
  fchmodSync(fd, mode);
  if (mtimeNs === undefined) return;
  const time = utimeArg(BigInt(mtimeNs));
  futimesSync(fd, time, time);
}

/** Runs `fn` on directory HOST/rel if it is still inode `ino`; false when it is not there. */
function withDir(host: string, rel: Buffer, ino: bigint, realDirs: Set<string>, fn: (fd: number) => void): boolean {
  const fd = openDir(host, rel, ino, realDirs);
  if (fd === undefined) return false;
  try {
    fn(fd);
    return true;
  } finally {
    closeSync(fd);
  }
}

/**
 * Finishes what sync-backs killed part-way left (call it before starting VMs, next to the reaper):
 * for each journal whose process is gone, completes a committed one and rolls back any other, and
 * logs one line per journal saying which. A journal whose HOST is no longer the same directory (by
 * device and inode) is left alone, with a line saying so: it never acts on a different directory.
 */
export async function recoverInterruptedSyncs(log: (line: string) => void): Promise<void> {
  const listing = await listJournals();
  if ('untrusted' in listing) {
    log(`--add-dir: interrupted sync-backs were not looked at: ${listing.untrusted}`);
    return;
  }
  for (const { path, journal } of listing.found) {
    if (!journal) {
      log(`--add-dir: ${path} is not a sync-back journal this mvmctl can read; left alone (remove it once you have checked the directory it names)`);
      continue;
    }
    if (ownerAlive(journal)) continue;
    const { host } = journal;
    try {
      const st = lstatOrUndefined(host);
      if (!st?.isDirectory() || String(st.dev) !== journal.hostDev || String(st.ino) !== journal.hostIno) {
        log(`--add-dir: an interrupted sync-back into ${host} was left alone: ${host} is no longer the directory it was syncing into; its journal ${path} is kept`);
        continue;
      }
      // Taken over: a second mvmctl recovering at the same time sees a live owner and keeps out.
      const taken = takeOver(journal);
      await writeJournal(taken);
      if (journal.state === 'committed') {
        await finishCommitted(taken);
        await removeJournal(taken);
        log(`--add-dir: an interrupted sync-back into ${host} was completed`);
      } else {
        await rollBack(taken);
        await removeJournal(taken);
        log(`--add-dir: an interrupted sync-back into ${host} was rolled back; ${host} is as it was before that run`);
      }
    } catch (err) {
      log(`--add-dir: an interrupted sync-back into ${host} could not be recovered (${(err as Error).message}); its journal ${path} is kept for the next run`);
    }
  }
}
