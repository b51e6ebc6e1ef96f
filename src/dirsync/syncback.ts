import type { BigIntStats } from 'node:fs';
import { chmodSync, lstatSync, readdirSync, unlinkSync } from 'node:fs';
import { chmod, lstat, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { silentProgress, type Progress } from '../progress.js';
import { toolDeadlineMs } from './deadline.js';
import { Ext4FormatError, S_IFDIR, S_IFMT, S_IFREG, uncleanReason } from './ext4.js';
import { joinRel, lstatBeneath } from './host-tree.js';
import { scanImage, UntrustedImageError, type ImageEntry, type ScanLimits } from './image-tree.js';
import { showSpec } from './spec.js';
import type { StagedDir } from './stage.js';
import { buildStagingTree, OWNER_READ, OWNER_READ_SEARCH } from './staging-tree.js';
import { planTree, type Plan } from './sync-plan.js';
import { lastLine, runTool } from '../run-tool.js';

export interface SyncReport {
  /** Entries found in the guest's final tree. */
  entries: number;
  /** Regular files rsync had to write (new or changed). */
  filesWritten: number;
  /** Files, links and directories removed from HOST because the guest removed them. */
  deleted: number;
  bytesWritten: number;
  /** One line per entry the host refused (device nodes, FIFOs, sockets, setuid/setgid bits). */
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
   * Test hook: runs after the staging tree is complete, before anything in HOST changes, with the
   * rsync child's pid once it runs. Lets tests inject a failure part-way.
   */
  onRsyncStart?: (pid: number) => void;
}

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
/** A sparse VM disk of a few hundred GB fits; rsync reads holes as zeros, so a hostile image costs minutes, not hours. */
const MAX_APPARENT_BYTES = 256n * BigInt(GiB);
const LARGE_ENTRIES = 2000;
const LARGE_BYTES = 64 * MiB;
const PATH_MAX = 4096;
/** rsync writes `.NAME.XXXXXX` beside each file; its own bookkeeping needs some path room too. */
const RSYNC_PATH_MARGIN = 64;

/**
 * Brings the guest's final tree in a rw image back over HOST with `rsync -aH --delete` semantics.
 * Call it only after the VM has stopped; it re-checks that the image was unmounted cleanly and
 * throws an MvmError (HOST untouched) when it was not, or when the image is not trustworthy.
 *
 * The image is treated as hostile. It is checked with `e2fsck -fn`, walked by inode number with
 * a bounds-checked parser, and extracted by inode number into a private staging tree that holds
 * only directories, regular files and symlinks with no setuid/setgid bits and modes within the
 * user's umask, owned by the caller. Only then does rsync merge it into HOST, copying symlinks as
 * symlinks (no -L/-K: a host directory symlink is replaced, never written through), with no -o/-g,
 * no devices or specials, and its usual write-aside-then-rename so no half-written file is ever
 * visible in HOST. HOST itself must still be the directory that was staged (same device and inode,
 * not a symlink), checked before anything is read from it and again just before rsync writes.
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
  const discard = (why: string) => new MvmError(`--add-dir '${showSpec(staged.spec.spec)}': guest changes discarded, ${host} left as it was: ${why}`);
  const checkHostIsStaged = () => {
    const replaced = hostReplaced(staged);
    if (replaced) throw discard(`${host} is no longer the directory that was staged (${replaced})`);
  };

  checkHostIsStaged();
  const unclean = await uncleanReason(staged.imagePath);
  if (unclean) throw discard(unclean);
  const imageSize = (await stat(staged.imagePath)).size;
  const fsck = await runTool('e2fsck', ['-fn', staged.imagePath], { signal: options.signal, timeoutMs: toolDeadlineMs(imageSize) });
  if (fsck.code !== 0) throw discard(`e2fsck found the filesystem damaged (${lastLine(fsck.stdout + fsck.stderr)})`);

  const limits: ScanLimits = {
    maxEntries: 1_000_000,
    // Extraction writes only allocated blocks; blocks shared between files (xattr blocks) count once
    // per file, hence the margin over the image's own size.
    maxBytes: BigInt(Math.max(4 * imageSize, GiB)),
    maxApparentBytes: MAX_APPARENT_BYTES,
    maxPathBytes: PATH_MAX - Buffer.byteLength(host) - RSYNC_PATH_MARGIN,
    ...options.limits,
  };

  const work = await mkdtemp(`${staged.imagePath}.sync-`);
  try {
    let entries: ImageEntry[];
    try {
      entries = (await scanImage(staged.imagePath, work, limits, options.signal)).entries;
    } catch (err) {
      if (err instanceof UntrustedImageError) throw discard(`untrusted filesystem: ${err.message}`);
      throw err;
    }
    const plan = planTree(entries, host, warn);
    const large = entries.length > LARGE_ENTRIES || plan.apparentBytes > LARGE_BYTES;
    if (large) progress(`reading back ${staged.spec.guestPath}: ${entries.length} entries, ${(plan.apparentBytes / MiB).toFixed(0)} MB`);

    try {
      await buildStagingTree(staged.imagePath, host, work, plan, options.signal);
    } catch (err) {
      if (err instanceof Ext4FormatError) throw discard(`untrusted filesystem: ${err.message}`);
      throw err;
    }
    await writeFile(
      join(work, 'protect.rules'),
      Buffer.concat(plan.protect.flatMap((rel) => [Buffer.from('P /'), rsyncLiteral(rel), Buffer.from([0])])),
    );

    if (large) progress(`syncing ${staged.spec.guestPath} into ${host}`);
    // Extracting a large image takes a while; HOST must still be the staged directory when rsync writes.
    checkHostIsStaged();
    const before = listFileDirs(host, plan);
    const rsyncDeadlineMs = toolDeadlineMs(imageSize + plan.apparentBytes);
    const res = await runRsync(work, host, rsyncDeadlineMs, options).catch((err: unknown) => {
      removeRsyncLeftovers(host, plan, before);
      throw err;
    });
    if (res.code !== 0) {
      removeRsyncLeftovers(host, plan, before);
      throw new MvmError(
        `--add-dir '${showSpec(staged.spec.spec)}': syncing back into ${host} failed part-way (files already synced stay, none is half-written): ${lastLine(res.stderr)}`,
      );
    }
    restoreModes(host, plan);
    const stats = parseStats(res.stdout);
    if (large) progress(`synced ${staged.spec.guestPath} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return { entries: entries.length, ...stats, warnings, durationMs: Date.now() - started };
  } finally {
    await removeTree(work);
  }
}

/** Why HOST is not the directory that was staged any more, or undefined when it is. */
function hostReplaced(staged: StagedDir): string | undefined {
  let st: BigIntStats;
  try {
    st = lstatSync(staged.spec.hostPath, { bigint: true });
  } catch (err) {
    return `cannot lstat it: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`;
  }
  if (st.isSymbolicLink()) return 'it is a symlink now';
  if (!st.isDirectory()) return 'it is not a directory now';
  const { dev, ino } = staged.hostIdentity;
  return st.dev === dev && st.ino === ino ? undefined : 'another directory has replaced it';
}

function runRsync(work: string, host: string, timeoutMs: number, options: SyncOptions) {
  return runTool(
    'rsync',
    [
      '-rlptH', '--sparse', '--delete', '--no-specials', '--no-devices', '--stats',
      '--from0', '--filter=. protect.rules',
      'tree/', `${host}/`,
    ],
    { cwd: work, signal: options.signal, onStart: options.onRsyncStart, timeoutMs },
  );
}

const SLASH = 0x2f;
/** rsync's temp name for NAME is `.NAME.` plus six random characters (NAME shortened if too long). */
const RSYNC_TEMP = /^\..*\.[A-Za-z0-9]{6}$/s;

/**
 * Names present now in every directory that will receive a regular file, keyed by the directory's
 * relative path, so a failed sync can tell rsync's temp files from the user's own files. Like
 * everything after rsync, this looks at HOST only through real directories: a symlink in HOST
 * leads somewhere else, and rsync replaces it with the guest's directory.
 */
function listFileDirs(host: string, plan: Plan): Map<string, Set<string>> {
  const listing = new Map<string, Set<string>>();
  const realDirs = new Set<string>();
  for (const { rel, inode } of plan.keep) {
    if ((inode.mode & S_IFMT) !== S_IFREG) continue;
    const cut = rel.lastIndexOf(SLASH);
    const dir = cut < 0 ? Buffer.alloc(0) : rel.subarray(0, cut);
    const key = dir.toString('latin1');
    if (listing.has(key)) continue;
    // Not a real directory yet: rsync will create it, so everything in it afterwards came from this sync.
    const names = lstatBeneath(host, dir, realDirs)?.isDirectory() ? namesIn(joinRel(host, dir)) : [];
    listing.set(key, new Set(names.map((n) => n.toString('latin1'))));
  }
  return listing;
}

function namesIn(dir: Buffer): Buffer[] {
  try {
    return readdirSync(dir, { encoding: 'buffer' });
  } catch {
    return []; // unreadable or gone: nothing of ours can be in it
  }
}

/**
 * rsync removes its temp file when it fails or gets SIGTERM, but not when it is SIGKILLed. Such a
 * leftover is a half-written file in HOST, so after any failure, new temp-named regular files that
 * are not part of the guest's tree are removed.
 */
function removeRsyncLeftovers(host: string, plan: Plan, before: Map<string, Set<string>>): void {
  const wanted = new Set(plan.keep.map((e) => e.rel.toString('latin1')));
  const realDirs = new Set<string>();
  for (const [dirKey, existed] of before) {
    const dir = Buffer.from(dirKey, 'latin1');
    if (!lstatBeneath(host, dir, realDirs)?.isDirectory()) continue;
    for (const name of namesIn(joinRel(host, dir))) {
      const key = name.toString('latin1');
      const rel = dir.length === 0 ? name : Buffer.concat([dir, Buffer.from('/'), name]);
      if (existed.has(key) || wanted.has(rel.toString('latin1')) || !RSYNC_TEMP.test(key)) continue;
      const path = joinRel(host, rel);
      try {
        if (lstatSync(path).isFile()) unlinkSync(path);
      } catch {
        // gone already
      }
    }
  }
}

function restoreModes(host: string, plan: Plan): void {
  const realDirs = new Set<string>();
  for (const { rel, inode, mode } of plan.keep) {
    const type = inode.mode & S_IFMT;
    if (type !== S_IFDIR && type !== S_IFREG) continue;
    const needed = type === S_IFDIR ? OWNER_READ_SEARCH : OWNER_READ;
    if ((mode & needed) === needed) continue;
    const st = lstatBeneath(host, rel, realDirs);
    // rsync made this entry moments ago; anything else there now is not ours to chmod.
    if (st && (type === S_IFDIR ? st.isDirectory() : st.isFile())) chmodSync(joinRel(host, rel), mode);
  }
}

/** An rsync filter pattern matching exactly `rel`: wildcards only act when present, so only then escape. */
function rsyncLiteral(rel: Buffer): Buffer {
  const special = (b: number) => b === 0x2a || b === 0x3f || b === 0x5b; // * ? [
  if (!rel.some(special)) return rel;
  const out: number[] = [];
  for (const b of rel) {
    if (special(b) || b === 0x5c) out.push(0x5c);
    out.push(b);
  }
  return Buffer.from(out);
}

function parseStats(stdout: string): Pick<SyncReport, 'filesWritten' | 'deleted' | 'bytesWritten'> {
  const num = (label: RegExp) => Number((stdout.match(label)?.[1] ?? '0').replace(/,/g, ''));
  return {
    filesWritten: num(/Number of regular files transferred: ([\d,]+)/),
    deleted: num(/Number of deleted files: ([\d,]+)/),
    bytesWritten: num(/Total transferred file size: ([\d,]+)/),
  };
}

/** rm -rf that also works for a non-root caller when the guest left directories without write permission. */
export async function removeTree(path: string): Promise<void> {
  try {
    await rm(path, { recursive: true, force: true });
  } catch {
    await makeWritable(path);
    await rm(path, { recursive: true, force: true });
  }
}

async function makeWritable(dir: Buffer | string): Promise<void> {
  await chmod(dir, 0o700).catch(() => {});
  const names = await readdir(dir, { encoding: 'buffer' }).catch(() => []);
  for (const name of names) {
    const path = Buffer.concat([Buffer.from(dir), Buffer.from('/'), name]);
    if ((await lstat(path)).isDirectory()) await makeWritable(path);
  }
}
