import { chmodSync, linkSync, lstatSync, lutimesSync, mkdirSync, symlinkSync, utimesSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Ext4FormatError, Ext4Image, S_IFDIR, S_IFLNK, S_IFMT, type Inode } from './ext4.js';
import { fileDataRuns, readSymlinkTarget } from './ext4-data.js';
import { utimeArg } from './host-ops.js';
import { relKey } from './host-tree.js';
import { childrenByParent, type Plan, type PlannedEntry } from './sync-plan.js';
import { inodeMtimeNs, type TreeChanges } from './tree-diff.js';

const mtimeOf = (inode: Inode): string => utimeArg(inodeMtimeNs(inode));

/** Owner write: rename(2) needs it on a directory that moves to another parent (to update its `..`). */
export const OWNER_WRITE = 0o200;

/** Bytes copied per read: large enough to stream, small enough to keep memory flat. */
const COPY_CHUNK = 1024 ** 2;

export interface StagedEntry {
  /** Where it waits, relative to the work dir: `new/<index of its replacement>`. */
  staged: string;
  ino: bigint;
  /** Mode the entry gets once in HOST when it waits with another one (a directory without owner write). */
  finalMode?: number;
}

export interface StagingResult {
  /** By index into changes.replacements, for those with a guest entry. */
  staged: Map<number, StagedEntry>;
  filesWritten: number;
  bytesWritten: number;
}

/**
 * Builds the guest's version of every replaced path in the work dir (on HOST's file system, so each
 * can be renamed into place): `new/<i>` is the entry for replacement i, a directory complete with
 * everything below it. Regular files are extracted once per inode into `store/` and hard-linked from
 * there to each of their paths; symlinks are made with symlink(2), which never resolves its target.
 * Contents and targets are read from the image by inode number (ext4-data.ts), so no tool ever sees
 * a name or target from the image; files keep their holes. Synchronous fs calls as in walkHost:
 * thousands of tiny operations; file data goes through async reads and writes, so an abort is seen
 * between chunks. Throws Ext4FormatError for an image whose data or links cannot be trusted.
 */
export async function buildReplacements(imagePath: string, work: string, plan: Plan, changes: TreeChanges, signal?: AbortSignal): Promise<StagingResult> {
  const store = join(work, 'store');
  mkdirSync(store);
  mkdirSync(join(work, 'new'));
  mkdirSync(join(work, 'old'));
  const children = childrenByParent(plan);

  const dirs: { path: Buffer; entry: PlannedEntry; top?: number }[] = [];
  const others: { path: Buffer; entry: PlannedEntry }[] = [];
  const tops: number[] = [];
  for (const [index, { rel, entry }] of changes.replacements.entries()) {
    if (!entry) continue;
    tops.push(index);
    const top = Buffer.from(join(work, stagedName(index)));
    // Breadth first below the top, so every directory exists before what goes into it.
    const subtree = [entry];
    for (let i = 0; i < subtree.length; i++) {
      const item = subtree[i]!;
      const path = Buffer.concat([top, item.rel.subarray(rel.length)]);
      if ((item.inode.mode & S_IFMT) !== S_IFDIR) {
        others.push({ path, entry: item });
        continue;
      }
      mkdirSync(path, { mode: 0o700 });
      dirs.push({ path, entry: item, top: i === 0 ? index : undefined });
      subtree.push(...(children.get(relKey(item.rel)) ?? []));
    }
  }

  const img = Ext4Image.open(imagePath);
  const image = await open(imagePath, 'r');
  const result: StagingResult = { staged: new Map(), filesWritten: 0, bytesWritten: 0 };
  try {
    const buffer = Buffer.alloc(COPY_CHUNK);
    const extracted = new Set<number>();
    for (const { path, entry } of others) {
      const { inode } = entry;
      if ((inode.mode & S_IFMT) === S_IFLNK) {
        symlinkSync(readSymlinkTarget(img, inode), path);
        lutimesSync(path, mtimeOf(inode), mtimeOf(inode));
        continue;
      }
      const file = join(store, String(inode.ino));
      if (!extracted.has(inode.ino)) {
        extracted.add(inode.ino);
        await copyFileData(img, image, inode, file, buffer, signal);
        chmodSync(file, plan.files.get(inode.ino)!.mode);
        utimesSync(file, mtimeOf(inode), mtimeOf(inode));
        result.bytesWritten += Number(inode.size);
      }
      linkSync(file, path);
      result.filesWritten++;
    }
  } finally {
    img.close();
    await image.close();
  }
  // Directory modes and times last and deepest first: adding entries changes a directory's mtime,
  // and a read-only directory could not be filled.
  const finalModes = new Map<number, number>();
  for (const { path, entry, top } of dirs.reverse()) {
    let mode = entry.mode;
    if (top !== undefined && !(mode & OWNER_WRITE)) {
      finalModes.set(top, mode);
      mode |= OWNER_WRITE;
    }
    chmodSync(path, mode);
    utimesSync(path, mtimeOf(entry.inode), mtimeOf(entry.inode));
  }
  for (const index of tops) {
    const staged = stagedName(index);
    result.staged.set(index, { staged, ino: lstatSync(join(work, staged), { bigint: true }).ino, finalMode: finalModes.get(index) });
  }
  return result;
}

function stagedName(index: number): string {
  return `new/${index}`;
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
