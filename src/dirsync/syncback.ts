import type { BigIntStats } from 'node:fs';
import {
  chmodSync, linkSync, lstatSync, lutimesSync, mkdirSync, readdirSync, readlinkSync, statSync, symlinkSync, unlinkSync, utimesSync,
} from 'node:fs';
import { chmod, lstat, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { silentProgress, type Progress } from '../progress.js';
import { S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, uncleanReason, type Inode } from './ext4.js';
import { joinRel } from './host-tree.js';
import { debugfsScript, scanImage, UntrustedImageError, type ImageEntry, type ScanLimits } from './image-tree.js';
import { showSpec } from './spec.js';
import type { StagedDir } from './stage.js';
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
const LARGE_ENTRIES = 2000;
const LARGE_BYTES = 64 * MiB;
const PATH_MAX = 4096;
/** rsync writes `.NAME.XXXXXX` beside each file; its own bookkeeping needs some path room too. */
const RSYNC_PATH_MARGIN = 64;

const SUID_SGID = 0o6000;
/*
 * rsync running as a normal user cannot read a mode-000 file or list a mode-000 directory in the
 * staging tree, so staging copies get owner read (and search) and the real modes are put back on
 * HOST after rsync (`restoreModes`).
 */
const OWNER_READ = 0o400;
const OWNER_READ_SEARCH = 0o500;

/**
 * Brings the guest's final tree in a rw image back over HOST with `rsync -aH --delete` semantics.
 * Call it only after the VM has stopped; it re-checks that the image was unmounted cleanly and
 * throws an MvmError (HOST untouched) when it was not, or when the image is not trustworthy.
 *
 * The image is treated as hostile. It is checked with `e2fsck -fn`, walked by inode number with
 * a bounds-checked parser, and extracted by inode number into a private staging tree that holds
 * only directories, regular files and symlinks with no setuid/setgid bits, owned by the caller.
 * Only then does rsync merge it into HOST, copying symlinks as symlinks (no -L/-K: a host
 * directory symlink is replaced, never written through), with no -o/-g, no devices or specials,
 * and its usual write-aside-then-rename so no half-written file is ever visible in HOST.
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

  const unclean = await uncleanReason(staged.imagePath);
  if (unclean) throw discard(unclean);
  const fsck = await runTool('e2fsck', ['-fn', staged.imagePath], { signal: options.signal });
  if (fsck.code !== 0) throw discard(`e2fsck found the filesystem damaged (${lastLine(fsck.stdout + fsck.stderr)})`);

  const imageSize = (await stat(staged.imagePath)).size;
  const limits: ScanLimits = {
    maxEntries: 1_000_000,
    // Extraction writes holes as zeros, so this bounds the staging disk a sparse-file bomb could fill.
    maxBytes: BigInt(Math.max(4 * imageSize, GiB)),
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
    const plan = await planTree(entries, host, warn);
    const large = entries.length > LARGE_ENTRIES || plan.bytes > LARGE_BYTES;
    if (large) progress(`reading back ${staged.spec.guestPath}: ${entries.length} entries, ${(plan.bytes / MiB).toFixed(0)} MB`);

    await extract(staged.imagePath, host, work, plan, options.signal);
    await writeFile(
      join(work, 'protect.rules'),
      Buffer.concat(plan.protect.flatMap((rel) => [Buffer.from('P /'), rsyncLiteral(rel), Buffer.from([0])])),
    );

    if (large) progress(`syncing ${staged.spec.guestPath} into ${host}`);
    const before = listFileDirs(host, plan);
    const res = await runRsync(work, host, options).catch((err: unknown) => {
      removeRsyncLeftovers(host, plan, before);
      throw err;
    });
    if (res.code !== 0) {
      removeRsyncLeftovers(host, plan, before);
      throw new MvmError(
        `--add-dir '${showSpec(staged.spec.spec)}': syncing back into ${host} failed part-way (files already synced stay, none is half-written): ${lastLine(res.stderr)}`,
      );
    }
    await restoreModes(host, plan);
    const stats = parseStats(res.stdout);
    if (large) progress(`synced ${staged.spec.guestPath} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return { entries: entries.length, ...stats, warnings, durationMs: Date.now() - started };
  } finally {
    await removeTree(work);
  }
}

interface Plan {
  /** Entries to materialize in the staging tree, parents first. */
  keep: ImageEntry[];
  /** Paths rsync must leave alone on the host (relative, raw bytes). */
  protect: Buffer[];
  /** Distinct regular-file inodes to extract, with the mode they will get. */
  files: Map<number, { inode: Inode; mode: number; paths: number }>;
  symlinks: Map<number, Inode>;
  bytes: number;
}

const KIND: Record<number, string> = {
  0o010000: 'FIFO',
  0o020000: 'character device',
  0o060000: 'block device',
  0o140000: 'socket',
};

async function hostStat(host: string, rel: Buffer): Promise<BigIntStats | undefined> {
  return lstat(joinRel(host, rel), { bigint: true }).catch(() => undefined);
}

/**
 * Decides what reaches the host. Device nodes, FIFOs and sockets never do: HOST keeps whatever it
 * has at that path, and there is a warning unless HOST already had the same kind of entry there
 * (which is how they got into the image). setuid/setgid files arrive with those bits cleared and a
 * warning, except a file that HOST already has with the same bits, size and mtime, which is left
 * alone: the guest cannot make a privileged file this way, and an untouched one survives.
 */
async function planTree(entries: readonly ImageEntry[], host: string, warn: (line: string) => void): Promise<Plan> {
  const plan: Plan = { keep: [], protect: [], files: new Map(), symlinks: new Map(), bytes: 0 };
  const shown = (rel: Buffer) => JSON.stringify(rel.toString('utf8'));
  for (const entry of entries) {
    const { rel, inode } = entry;
    const type = inode.mode & S_IFMT;
    if (type === S_IFDIR) {
      plan.keep.push(entry);
    } else if (type === S_IFLNK) {
      plan.keep.push(entry);
      plan.symlinks.set(inode.ino, inode);
    } else if (type === S_IFREG) {
      let mode = inode.mode & 0o7777;
      if (mode & SUID_SGID) {
        const st = await hostStat(host, rel);
        const unchanged =
          st?.isFile() &&
          Number(st.mode & 0o7777n) === mode &&
          st.size === inode.size &&
          st.mtimeNs / 1_000_000_000n === inode.mtimeSec;
        if (unchanged) {
          plan.protect.push(rel);
          continue;
        }
        warn(`${shown(rel)}: setuid/setgid bits dropped (mode ${(mode & ~SUID_SGID).toString(8)})`);
        mode &= ~SUID_SGID;
      }
      plan.keep.push(entry);
      const known = plan.files.get(inode.ino);
      if (known) {
        known.paths++;
      } else {
        plan.files.set(inode.ino, { inode, mode, paths: 1 });
        plan.bytes += Number(inode.size);
      }
    } else {
      const st = await hostStat(host, rel);
      plan.protect.push(rel);
      const sameKind = st && Number(st.mode & BigInt(S_IFMT)) === type;
      if (!sameKind) warn(`${shown(rel)}: ${KIND[type] ?? `file type 0${type.toString(8)}`} not copied to the host`);
    }
  }
  return plan;
}

/**
 * Assembles the staging tree. Contents and symlink targets come from debugfs by inode number only,
 * so debugfs never builds a host path from a name in the image. A file the guest evidently left
 * alone (single link, same size, mtime and mode as HOST's file) is hard-linked from HOST instead of
 * extracted: rsync's quick check then skips it, and should HOST change it meanwhile, rsync still
 * sees HOST's own bytes rather than a stale copy. Synchronous fs calls for the same reason as
 * walkHost: thousands of tiny operations.
 */
async function extract(imagePath: string, host: string, work: string, plan: Plan, signal?: AbortSignal): Promise<void> {
  const store = join(work, 'store');
  const links = join(work, 'links');
  const tree = join(work, 'tree');
  mkdirSync(store);
  mkdirSync(links);

  const dirs: ImageEntry[] = [];
  const fromImage: ImageEntry[] = [];
  const toDump = new Set<number>();
  for (const entry of plan.keep) {
    const path = joinRel(tree, entry.rel);
    const { inode } = entry;
    const type = inode.mode & S_IFMT;
    if (type === S_IFDIR) {
      mkdirSync(path, { mode: 0o700 });
      dirs.push(entry);
    } else if (type === S_IFREG && !toDump.has(inode.ino) && linkUnchanged(host, entry, plan, path)) {
      continue;
    } else {
      if (type === S_IFREG) toDump.add(inode.ino);
      fromImage.push(entry);
    }
  }

  await debugfsScript(
    imagePath,
    work,
    [
      ...[...toDump].map((ino) => `dump <${ino}> store/${ino}`),
      ...[...plan.symlinks.keys()].map((ino) => `rdump <${ino}> links`),
    ],
    { signal },
  );
  for (const ino of toDump) {
    const { inode, mode } = plan.files.get(ino)!;
    const file = join(store, String(ino));
    const { size } = statSync(file);
    if (BigInt(size) !== inode.size) throw new MvmError(`reading file inode ${ino} from ${imagePath} gave ${size} bytes, expected ${inode.size}`);
    chmodSync(file, mode | OWNER_READ);
    setMtime(file, inode, utimesSync);
  }
  for (const { rel, inode } of fromImage) {
    const path = joinRel(tree, rel);
    if ((inode.mode & S_IFMT) === S_IFLNK) {
      symlinkSync(readlinkSync(join(links, `<${inode.ino}>`), { encoding: 'buffer' }), path);
      setMtime(path, inode, lutimesSync);
    } else {
      linkSync(join(store, String(inode.ino)), path);
    }
  }
  // Directory modes and times last and deepest first: adding entries changes a directory's mtime,
  // and a read-only directory could not be filled.
  for (const { rel, inode } of dirs.reverse()) {
    const path = joinRel(tree, rel);
    chmodSync(path, (inode.mode & 0o1777) | OWNER_READ_SEARCH);
    setMtime(path, inode, utimesSync);
  }
}

function linkUnchanged(host: string, { rel, inode }: ImageEntry, plan: Plan, path: Buffer): boolean {
  const file = plan.files.get(inode.ino)!;
  if (inode.links !== 1 || file.paths !== 1 || file.mode !== (inode.mode & 0o7777)) return false;
  const source = joinRel(host, rel);
  let st: BigIntStats;
  try {
    st = lstatSync(source, { bigint: true });
  } catch {
    return false;
  }
  const same =
    st.isFile() &&
    st.size === inode.size &&
    st.mtimeNs / 1_000_000_000n === inode.mtimeSec &&
    Number(st.mode & 0o7777n) === file.mode;
  if (!same) return false;
  try {
    // link(2) does not follow a symlink that might have replaced the file since the lstat: at worst
    // the staging tree holds that symlink, which rsync copies as a symlink.
    linkSync(source, path);
    return true;
  } catch {
    return false; // another filesystem, protected_hardlinks, ...: extract it instead
  }
}

/**
 * Node takes times as float seconds, which cannot carry every nanosecond; rsync compares whole
 * seconds by default, so the seconds are what matter and they are exact here.
 */
function setMtime(path: Buffer | string, inode: Inode, set: (p: Buffer | string, atime: number, mtime: number) => void): void {
  const t = Number(inode.mtimeSec) + inode.mtimeNsec / 1e9;
  set(path, t, t);
}

function runRsync(work: string, host: string, options: SyncOptions) {
  return runTool(
    'rsync',
    [
      '-rlptH', '--sparse', '--delete', '--no-specials', '--no-devices', '--stats',
      '--from0', '--filter=. protect.rules',
      'tree/', `${host}/`,
    ],
    { cwd: work, signal: options.signal, onStart: options.onRsyncStart },
  );
}

const SLASH = 0x2f;
/** rsync's temp name for NAME is `.NAME.` plus six random characters (NAME shortened if too long). */
const RSYNC_TEMP = /^\..*\.[A-Za-z0-9]{6}$/s;

/**
 * Names present now in every directory that will receive a regular file, keyed by the directory's
 * relative path, so a failed sync can tell rsync's temp files from the user's own files.
 */
function listFileDirs(host: string, plan: Plan): Map<string, Set<string>> {
  const listing = new Map<string, Set<string>>();
  for (const { rel, inode } of plan.keep) {
    if ((inode.mode & S_IFMT) !== S_IFREG) continue;
    const cut = rel.lastIndexOf(SLASH);
    const dir = cut < 0 ? Buffer.alloc(0) : rel.subarray(0, cut);
    const key = dir.toString('latin1');
    if (listing.has(key)) continue;
    let names: Buffer[] = [];
    try {
      names = readdirSync(joinRel(host, dir), { encoding: 'buffer' });
    } catch {
      // not there yet: rsync will create it, so everything in it afterwards came from this sync
    }
    listing.set(key, new Set(names.map((n) => n.toString('latin1'))));
  }
  return listing;
}

/**
 * rsync removes its temp file when it fails or gets SIGTERM, but not when it is SIGKILLed. Such a
 * leftover is a half-written file in HOST, so after any failure, new temp-named regular files that
 * are not part of the guest's tree are removed.
 */
function removeRsyncLeftovers(host: string, plan: Plan, before: Map<string, Set<string>>): void {
  const wanted = new Set(plan.keep.map((e) => e.rel.toString('latin1')));
  for (const [dirKey, existed] of before) {
    const dir = Buffer.from(dirKey, 'latin1');
    let names: Buffer[];
    try {
      names = readdirSync(joinRel(host, dir), { encoding: 'buffer' });
    } catch {
      continue;
    }
    for (const name of names) {
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

async function restoreModes(host: string, plan: Plan): Promise<void> {
  for (const { rel, inode } of plan.keep) {
    const type = inode.mode & S_IFMT;
    const mode = type === S_IFDIR ? inode.mode & 0o1777 : type === S_IFREG ? plan.files.get(inode.ino)!.mode : undefined;
    const needed = type === S_IFDIR ? OWNER_READ_SEARCH : OWNER_READ;
    if (mode === undefined || (mode & needed) === needed) continue;
    const path = joinRel(host, rel);
    const st = await lstat(path).catch(() => undefined);
    // rsync made this entry moments ago; anything else there now is not ours to chmod.
    if (st && (type === S_IFDIR ? st.isDirectory() : st.isFile())) await chmod(path, mode);
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
