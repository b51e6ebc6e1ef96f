import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { Ext4FormatError, Ext4Image, ROOT_INODE, S_IFDIR, S_IFMT, S_IFREG, parseDirBlocks, unsupportedInode, type Inode } from './ext4.js';
import { lastLine, runTool } from '../run-tool.js';
import { debugfsErrors } from './debugfs-errors.js';
import { toolDeadlineMs } from './deadline.js';

export interface ImageEntry {
  /** Path relative to the image root as raw bytes (names need not be UTF-8); empty for the root. */
  rel: Buffer;
  inode: Inode;
}

export interface ScanLimits {
  maxEntries: number;
  /**
   * Bound on what extraction writes: the sizes of all directories plus the blocks allocated to
   * distinct regular files (their holes are never written).
   */
  maxBytes: bigint;
  /** Bound on the apparent sizes of distinct regular files: whatever later reads HOST reads holes as zeros. */
  maxApparentBytes: bigint;
  /** Bound on a relative path in bytes, so every host path stays under PATH_MAX. */
  maxPathBytes: number;
}

const SLASH = Buffer.from('/');
const DOT = Buffer.from('.');
const DOTDOT = Buffer.from('..');

/** Thrown when an image's structure is not something sync-back will trust. */
export class UntrustedImageError extends Error {}

/**
 * Runs one debugfs command script inside `cwd` and fails on any reported error. No script reads or
 * writes more than the image, so its size sets the deadline.
 */
export async function debugfsScript(
  imagePath: string,
  cwd: string,
  commands: readonly string[],
  options: { write?: boolean; signal?: AbortSignal } = {},
): Promise<void> {
  if (commands.length === 0) return;
  const script = join(cwd, `.debugfs-${process.pid}.cmd`);
  await writeFile(script, commands.join('\n') + '\n');
  try {
    const args = options.write ? ['-w', '-f', script, imagePath] : ['-f', script, imagePath];
    const timeoutMs = toolDeadlineMs((await stat(imagePath)).size);
    const res = await runTool('debugfs', args, { cwd, signal: options.signal, timeoutMs });
    const errors = debugfsErrors(res.stderr);
    if (res.code !== 0 || errors.length > 0) throw new MvmError(`debugfs failed on ${imagePath}: ${lastLine(res.stderr)}`);
  } finally {
    await rm(script, { force: true });
  }
}

/**
 * Walks every entry of the image, breadth first: one debugfs run per tree level dumps the raw blocks
 * of that level's directories (by inode number, into `workDir`), which are parsed here. Names with
 * '/' or NUL, '.'/'..' beyond the first two slots, duplicate names, a directory reached twice
 * (hard-linked directories, cycles) and anything beyond the limits reject the whole image.
 */
export async function scanImage(
  imagePath: string,
  workDir: string,
  limits: ScanLimits,
  signal?: AbortSignal,
): Promise<{ blockSize: number; entries: ImageEntry[] }> {
  let img: Ext4Image;
  try {
    img = Ext4Image.open(imagePath);
  } catch (err) {
    throw err instanceof Ext4FormatError ? new UntrustedImageError(err.message) : err;
  }
  try {
    const unsupported = img.unsupportedFeatures();
    if (unsupported) throw new UntrustedImageError(unsupported);
    const { blockSize } = img.sb;
    const dirsDir = join(workDir, '.dirs');
    await mkdir(dirsDir, { recursive: true });

    const root: ImageEntry = { rel: Buffer.alloc(0), inode: img.readInode(ROOT_INODE) };
    if ((root.inode.mode & S_IFMT) !== S_IFDIR) throw new UntrustedImageError('the root inode is not a directory');
    const entries: ImageEntry[] = [root];
    const seenDirs = new Set<number>([ROOT_INODE]);
    const countedFiles = new Set<number>();
    let bytes = root.inode.size;
    let apparentBytes = 0n;
    let level: ImageEntry[] = [root];

    while (level.length > 0) {
      await debugfsScript(
        imagePath,
        workDir,
        level.map((d) => `dump <${d.inode.ino}> .dirs/${d.inode.ino}`),
        { signal },
      );
      const next: ImageEntry[] = [];
      for (const dir of level) {
        const file = join(dirsDir, String(dir.inode.ino));
        const raw = await readFile(file);
        await rm(file);
        const names = new Set<string>();
        const dirents = parseDirBlocks(raw, blockSize);
        for (const [index, { ino, name }] of dirents.entries()) {
          if (index < 2 && (name.equals(DOT) || name.equals(DOTDOT))) continue;
          if (name.length === 0 || name.equals(DOT) || name.equals(DOTDOT) || name.includes(0) || name.includes(SLASH)) {
            throw new UntrustedImageError(`illegal file name ${JSON.stringify(name.toString('latin1'))}`);
          }
          const key = name.toString('latin1');
          if (names.has(key)) throw new UntrustedImageError(`duplicate name ${JSON.stringify(key)} in one directory`);
          names.add(key);
          const rel = dir.rel.length === 0 ? name : Buffer.concat([dir.rel, SLASH, name]);
          if (rel.length > limits.maxPathBytes) throw new UntrustedImageError(`a path is longer than ${limits.maxPathBytes} bytes`);
          const inode = img.readInode(ino);
          if (inode.links === 0 || (inode.mode & S_IFMT) === 0) throw new UntrustedImageError(`entry points at unused inode ${ino}`);
          const unsupported = unsupportedInode(inode);
          if (unsupported) throw new UntrustedImageError(`inode ${ino} uses ${unsupported}`);
          const entry = { rel, inode };
          entries.push(entry);
          if (entries.length > limits.maxEntries) throw new UntrustedImageError(`more than ${limits.maxEntries} entries`);
          if ((inode.mode & S_IFMT) === S_IFDIR) {
            if (seenDirs.has(ino)) throw new UntrustedImageError('a directory appears twice (hard-linked directory or loop)');
            seenDirs.add(ino);
            bytes += inode.size;
            next.push(entry);
          } else if ((inode.mode & S_IFMT) === S_IFREG && !countedFiles.has(ino)) {
            countedFiles.add(ino);
            bytes += inode.allocatedBytes;
            apparentBytes += inode.size;
          }
          if (bytes > limits.maxBytes) throw new UntrustedImageError(`allocated contents exceed ${limits.maxBytes} bytes`);
          if (apparentBytes > limits.maxApparentBytes) {
            throw new UntrustedImageError(`file sizes exceed ${limits.maxApparentBytes} bytes`);
          }
        }
      }
      level = next;
    }
    return { blockSize, entries };
  } catch (err) {
    throw err instanceof Ext4FormatError ? new UntrustedImageError(err.message) : err;
  } finally {
    img.close();
  }
}
