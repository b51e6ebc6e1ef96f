import type { BigIntStats } from 'node:fs';
import { lstatSync } from 'node:fs';
import { mkdir, mkdtemp } from 'node:fs/promises';
import { MvmError } from '../errors.js';
import { silentProgress, type Progress } from '../progress.js';
import { applySteps, finishCommitted, planSteps, rollBack, setRootAttrs, type ApplyHook } from './apply.js';
import { toolDeadlineMs } from './deadline.js';
import { Ext4FormatError, Ext4Image, uncleanReason } from './ext4.js';
import { HostChangedError, removeTree } from './host-ops.js';
import { scanImage, UntrustedImageError, type ImageEntry, type ScanLimits } from './image-tree.js';
import { newJournal, removeJournal, writeJournal, type Journal } from './journal.js';
import { showSpec } from './spec.js';
import type { StagedDir } from './stage.js';
import { buildReplacements, type StagingResult } from './staging-tree.js';
import { planTree, type Plan } from './sync-plan.js';
import { diffTree, HostLayoutError, type TreeChanges } from './tree-diff.js';
import { lastLine, runTool } from '../run-tool.js';

export interface SyncReport {
  /** Entries found in the guest's final tree. */
  entries: number;
  /** Regular files written into HOST (new or changed), each hard link counted. */
  filesWritten: number;
  /** Entries removed from HOST because the guest removed them; a directory counts once, with all it held. */
  deleted: number;
  bytesWritten: number;
  /** One line per entry the host refused (device nodes, FIFOs, sockets, setuid/setgid bits, reserved names). */
  warnings: string[];
  durationMs: number;
}

export interface SyncOptions {
  progress?: Progress;
  /** Receives each warning line as it happens (also collected in the report). */
  warn?: (line: string) => void;
  signal?: AbortSignal;
  limits?: Partial<ScanLimits>;
  /**
   * Test hook: runs before apply step `index` of `steps` changes HOST, and with index === steps
   * once the journal is committed. Throwing there fails the sync as a failing step would (after
   * the commit: as a failed cleanup); killing the process there leaves the journal to
   * recoverInterruptedSyncs.
   */
  onApplyStep?: ApplyHook;
}

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
/** A sparse VM disk of a few hundred GB fits; beyond that, every later reader of HOST would read hours of holes. */
const MAX_APPARENT_BYTES = 256n * BigInt(GiB);
const LARGE_ENTRIES = 2000;
const LARGE_BYTES = 64 * MiB;
const PATH_MAX = 4096;
/** Guest entries wait as HOST/.mvm-sync-<id>/new/<n>/…: that prefix stands in for at least one byte of their path. */
const WORK_PATH_MARGIN = 64;

type Discard = (why: string) => MvmError;

/**
 * Brings the guest's final tree in a rw image back over HOST with `rsync -aH --delete` semantics,
 * all or nothing. Call it only after the VM has stopped; it re-checks that the image was unmounted
 * cleanly and throws an MvmError (HOST untouched) when it was not, or when the image is not
 * trustworthy.
 *
 * The image is treated as hostile. It is checked with `e2fsck -fn`, walked by inode number with a
 * bounds-checked parser and compared with HOST (tree-diff.ts). Only the paths that differ are built,
 * extracted by inode number, in a work dir inside HOST (so on its file system): directories, regular
 * files and symlinks only, no setuid/setgid bits, modes within the user's umask, owned by the caller.
 * Then a journal lists every rename and chmod that turns HOST into the guest's tree; it is on disk
 * before the first of them, and any failure undoes the done ones, so HOST ends as it was or fully
 * synced, never a mix (apply.ts; a killed process's journal is finished by recoverInterruptedSyncs).
 * HOST itself must still be the directory that was staged (same device and inode, not a symlink),
 * checked before anything is read from it and again just before the apply.
 */
export async function syncBack(staged: StagedDir, options: SyncOptions = {}): Promise<SyncReport> {
  const started = Date.now();
  const progress = options.progress ?? silentProgress;
  const warnings: string[] = [];
  const warn = (line: string) => {
    warnings.push(line);
    options.warn?.(line);
  };
  const host = staged.spec.hostPath;
  const discard: Discard = (why) => new MvmError(`--add-dir '${showSpec(staged.spec.spec)}': guest changes discarded, ${host} left as it was: ${why}`);

  stagedHostStat(staged, discard);
  const unclean = await uncleanReason(staged.imagePath);
  if (unclean) throw discard(unclean);
  // As staged: a restore extends the file to its drive slot, but the file system inside stays this size.
  const imageSize = staged.imageBytes;
  const fsck = await runTool('e2fsck', ['-fn', staged.imagePath], { signal: options.signal, timeoutMs: toolDeadlineMs(imageSize) });
  if (fsck.code !== 0) throw discard(`e2fsck found the filesystem damaged (${lastLine(fsck.stdout + fsck.stderr)})`);

  const limits: ScanLimits = {
    maxEntries: 1_000_000,
    // Extraction writes only allocated blocks; blocks shared between files (xattr blocks) count once
    // per file, hence the margin over the image's own size.
    maxBytes: BigInt(Math.max(4 * imageSize, GiB)),
    maxApparentBytes: MAX_APPARENT_BYTES,
    maxPathBytes: PATH_MAX - Buffer.byteLength(host) - WORK_PATH_MARGIN,
    ...options.limits,
  };
  const { entries, plan, changes } = await compare(staged, limits, warn, discard, options.signal);
  const large = entries.length > LARGE_ENTRIES || plan.apparentBytes > LARGE_BYTES;
  if (large) progress(`reading back ${staged.spec.guestPath}: ${entries.length} entries, ${(plan.apparentBytes / MiB).toFixed(0)} MB`);

  let written: Pick<SyncReport, 'filesWritten' | 'bytesWritten'> = { filesWritten: 0, bytesWritten: 0 };
  if (changes.replacements.length === 0 && changes.dirFixes.length === 0) {
    // Only HOST's own mode or mtime can differ: nothing to stage, and no mix possible.
    await setRootAttrs(host, staged.hostIdentity.ino, changes.root.mode, changes.root.mtimeNs).catch((err: Error) => {
      throw err instanceof HostChangedError ? discard(err.message) : err;
    });
  } else {
    if (large) progress(`syncing ${staged.spec.guestPath} into ${host}`);
    written = await applyChanges(staged, plan, changes, options, warn, discard);
  }
  if (large) progress(`synced ${staged.spec.guestPath} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  const deleted = changes.replacements.filter((r) => r.old && !r.entry).length;
  return { entries: entries.length, ...written, deleted, warnings, durationMs: Date.now() - started };
}

/** HOST's lstat, provided it is still the directory that was staged. */
function stagedHostStat(staged: StagedDir, discard: Discard): BigIntStats {
  const host = staged.spec.hostPath;
  const replaced = (why: string) => discard(`${host} is no longer the directory that was staged (${why})`);
  let st: BigIntStats;
  try {
    st = lstatSync(host, { bigint: true });
  } catch (err) {
    throw replaced(`cannot lstat it: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (st.isSymbolicLink()) throw replaced('it is a symlink now');
  if (!st.isDirectory()) throw replaced('it is not a directory now');
  const { dev, ino } = staged.hostIdentity;
  if (st.dev !== dev || st.ino !== ino) throw replaced('another directory has replaced it');
  return st;
}

/** Scans the image (scratch space beside it, not in HOST), plans what may reach HOST and compares that with HOST. */
async function compare(
  staged: StagedDir,
  limits: ScanLimits,
  warn: (line: string) => void,
  discard: Discard,
  signal?: AbortSignal,
): Promise<{ entries: ImageEntry[]; plan: Plan; changes: TreeChanges }> {
  const host = staged.spec.hostPath;
  const scratch = await mkdtemp(`${staged.imagePath}.sync-`);
  let entries: ImageEntry[];
  try {
    entries = (await scanImage(staged.imagePath, scratch, limits, signal)).entries;
  } catch (err) {
    if (err instanceof UntrustedImageError) throw discard(`untrusted filesystem: ${err.message}`);
    throw err;
  } finally {
    await removeTree(scratch);
  }
  const plan = planTree(entries, host, warn);
  const img = Ext4Image.open(staged.imagePath);
  try {
    return { entries, plan, changes: diffTree(img, host, stagedHostStat(staged, discard), plan) };
  } catch (err) {
    if (err instanceof Ext4FormatError) throw discard(`untrusted filesystem: ${err.message}`);
    if (err instanceof HostLayoutError) throw discard(err.message);
    const { code, path } = err as NodeJS.ErrnoException;
    if (code && path) throw discard(`cannot read ${path}: ${code}`);
    throw err;
  } finally {
    img.close();
  }
}

/**
 * Builds the changed entries in HOST/.mvm-sync-<id>/ and applies them with the journal. The journal
 * exists before the work dir does, so a kill at any point leaves nothing that recovery cannot find.
 */
async function applyChanges(
  staged: StagedDir,
  plan: Plan,
  changes: TreeChanges,
  options: SyncOptions,
  warn: (line: string) => void,
  discard: Discard,
): Promise<Pick<SyncReport, 'filesWritten' | 'bytesWritten'>> {
  const host = staged.spec.hostPath;
  const journal = newJournal(host, changes.root.old);
  try {
    await writeJournal(journal);
  } catch (err) {
    throw discard(`cannot write the sync-back journal: ${(err as Error).message}`);
  }
  let staging: StagingResult;
  try {
    await mkdir(journal.work, { mode: 0o700 });
    staging = await buildReplacements(staged.imagePath, journal.work, plan, changes, options.signal);
    Object.assign(journal, planSteps(changes, staging));
    journal.state = 'applying';
    // Extracting a large image takes a while; HOST must still be the staged directory when the renames start.
    stagedHostStat(staged, discard);
    options.signal?.throwIfAborted();
    await writeJournal(journal);
  } catch (err) {
    await rollBackOrExplain(staged, journal, err);
    if (err instanceof MvmError || options.signal?.aborted) throw err;
    const message = (err as Error).message;
    throw discard(err instanceof Ext4FormatError ? `untrusted filesystem: ${message}` : `preparing the changes in ${journal.work} failed: ${message}`);
  }

  try {
    applySteps(journal, options.onApplyStep);
    journal.state = 'committed';
    await writeJournal(journal);
  } catch (err) {
    await rollBackOrExplain(staged, journal, err);
    throw discard(`syncing back failed part-way (${(err as Error).message}), and what had changed was rolled back`);
  }
  try {
    options.onApplyStep?.(journal.steps.length, journal.steps.length);
    await finishCommitted(journal);
    await removeJournal(journal);
  } catch (err) {
    warn(`${host} has the guest's changes, but cleaning up after them failed (${(err as Error).message}); the next mvmctl exec finishes it`);
  }
  return { filesWritten: staging.filesWritten, bytesWritten: staging.bytesWritten };
}

async function rollBackOrExplain(staged: StagedDir, journal: Journal, cause: unknown): Promise<void> {
  try {
    // A commit mark that failed may still have reached the disk: a crash during the rollback must
    // not leave a journal that tells recovery to complete a half-undone apply.
    if (journal.state === 'committed') {
      journal.state = 'applying';
      await writeJournal(journal);
    }
    await rollBack(journal);
    await removeJournal(journal);
  } catch (err) {
    throw new MvmError(
      `--add-dir '${showSpec(staged.spec.spec)}': syncing back into ${journal.host} failed part-way (${(cause as Error).message}) and rolling back failed too (${(err as Error).message}); what was moved aside is in ${journal.work}, and the next mvmctl exec retries the roll-back`,
    );
  }
}
