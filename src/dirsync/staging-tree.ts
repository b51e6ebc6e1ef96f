import { chmodSync, linkSync, lutimesSync, mkdirSync, symlinkSync, utimesSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Ext4FormatError, Ext4Image, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, type Inode } from './ext4.js';
import { fileDataRuns, readSymlinkTarget } from './ext4-data.js';
import { joinRel, lstatBeneath } from './host-tree.js';
import type { Plan, PlannedEntry } from './sync-plan.js';

/*
 * rsync running as a normal user cannot read a mode-000 file or list a mode-000 directory in the
 * staging tree, so staging copies get owner read (and search) and the real modes are put back on
 * HOST after rsync (syncback.ts, restoreModes).
 */
export const OWNER_READ = 0o400;
export const OWNER_READ_SEARCH = 0o500;

/** Bytes copied per read: large enough to stream, small enough to keep memory flat. */
const COPY_CHUNK = 1024 ** 2;

/**
 * Assembles the staging tree under `work/tree`: directories, regular files and symlinks only.
 * Contents and symlink targets are read from the image by inode number (ext4-data.ts), so no
 * tool ever sees a name or target from the image; files keep their holes, and symlinks are made
 * with symlink(2), which never resolves its target. A file the guest evidently left alone (single
 * link, same size, mtime and mode as HOST's file) is hard-linked from HOST instead of extracted:
 * rsync's quick check then skips it, and should HOST change it meanwhile, rsync still sees HOST's
 * own bytes rather than a stale copy. Synchronous fs calls for the same reason as walkHost:
 * thousands of tiny operations; file data goes through async reads and writes, so an abort is
 * seen between chunks. Throws Ext4FormatError for an image whose data or links cannot be trusted.
 */
export async function buildStagingTree(imagePath: string, host: string, work: string, plan: Plan, signal?: AbortSignal): Promise<void> {
  const store = join(work, 'store');
  const tree = join(work, 'tree');
  mkdirSync(store);

  const dirs: PlannedEntry[] = [];
  const fromImage: PlannedEntry[] = [];
  const toCopy = new Set<number>();
  const realDirs = new Set<string>();
  for (const entry of plan.keep) {
    const path = joinRel(tree, entry.rel);
    const { inode } = entry;
    const type = inode.mode & S_IFMT;
    if (type === S_IFDIR) {
      mkdirSync(path, { mode: 0o700 });
      dirs.push(entry);
    } else if (type === S_IFREG && !toCopy.has(inode.ino) && linkUnchanged(host, entry, plan, path, realDirs)) {
      continue;
    } else {
      if (type === S_IFREG) toCopy.add(inode.ino);
      fromImage.push(entry);
    }
  }

  const img = Ext4Image.open(imagePath);
  const image = await open(imagePath, 'r');
  try {
    const buffer = Buffer.alloc(COPY_CHUNK);
    for (const ino of toCopy) {
      const { inode, mode } = plan.files.get(ino)!;
      const file = join(store, String(ino));
      await copyFileData(img, image, inode, file, buffer, signal);
      chmodSync(file, mode | OWNER_READ);
      setMtime(file, inode, utimesSync);
    }
    for (const { rel, inode } of fromImage) {
      const path = joinRel(tree, rel);
      if ((inode.mode & S_IFMT) === S_IFLNK) {
        symlinkSync(readSymlinkTarget(img, inode), path);
        setMtime(path, inode, lutimesSync);
      } else {
        linkSync(join(store, String(inode.ino)), path);
      }
    }
  } finally {
    img.close();
    await image.close();
  }
  // Directory modes and times last and deepest first: adding entries changes a directory's mtime,
  // and a read-only directory could not be filled.
  for (const { rel, inode, mode } of dirs.reverse()) {
    const path = joinRel(tree, rel);
    chmodSync(path, mode | OWNER_READ_SEARCH);
    setMtime(path, inode, utimesSync);
  }
}

/** Writes only the file's written extents at their offsets, then sets its size: holes stay holes. */
async function copyFileData(
  img: Ext4Image,
  image: FileHandle,
  inode: Inode,
  dest: string,
  buffer: Buffer,
  signal?: AbortSignal,
): Promise<void> {
  const runs = fileDataRuns(img, inode);
  const out = await open(dest, 'wx', 0o600);
  try {
    for (const run of runs) {
      for (let done = 0; done < run.length; ) {
        signal?.throwIfAborted();
        const length = Math.min(buffer.length, run.length - done);
        const { bytesRead } = await image.read(buffer, 0, length, run.imageOffset + done);
        if (bytesRead !== length) throw new Ext4FormatError(`inode ${inode.ino}: short read at image byte ${run.imageOffset + done}`);
        for (let written = 0; written < length; ) {
          written += (await out.write(buffer, written, length - written, run.fileOffset + done + written)).bytesWritten;
        }
        done += length;
      }
    }
    await out.truncate(Number(inode.size));
  } finally {
    await out.close();
  }
}

/**
 * HOST's file is linked only when it is reached through real directories (never a symlink in
 * HOST, which could point anywhere) and is itself a regular file.
 */
function linkUnchanged(host: string, { rel, inode }: PlannedEntry, plan: Plan, path: Buffer, realDirs: Set<string>): boolean {
  const file = plan.files.get(inode.ino)!;
  if (inode.links !== 1 || file.paths !== 1 || file.mode !== (inode.mode & 0o7777)) return false;
  const st = lstatBeneath(host, rel, realDirs);
  const same =
    st?.isFile() &&
    st.size === inode.size &&
    st.mtimeNs / 1_000_000_000n === inode.mtimeSec &&
    Number(st.mode & 0o7777n) === file.mode;
  if (!same) return false;
  try {
    // link(2) does not follow a symlink that might have replaced the file since the lstat: at worst
    // the staging tree holds that symlink, which rsync copies as a symlink.
    linkSync(joinRel(host, rel), path);
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
