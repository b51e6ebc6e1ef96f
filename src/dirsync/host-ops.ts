import type { BigIntStats } from 'node:fs';
import { closeSync, constants, fstatSync, lstatSync, openSync, renameSync } from 'node:fs';
import { chmod, lstat, readdir, rm } from 'node:fs/promises';
import { MvmError } from '../errors.js';
import { lastLine, runTool } from '../run-tool.js';
import { toolDeadlineMs } from './deadline.js';
import { joinRel, parentsAreRealDirs } from './host-tree.js';

/*
 * The few ways sync-back changes HOST, each checking first that it acts on what it expects: reached
 * through real directories only (never a symlink, whoever made it), and the very inode the journal
 * recorded. HOST is addressed by path (Node has no renameat), so each check is made right before
 * its rename; directories are changed through a descriptor opened with O_NOFOLLOW and checked by
 * inode, which leaves no gap at all.
 */

/** HOST is not what the journal expects at some path: changed by someone else during the sync-back. */
export class HostChangedError extends Error {}

const OPEN_DIR = constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW;
/** Directories changed per touch run: each holds a descriptor open meanwhile, well under any fd limit. */
const TOUCH_BATCH = 256;

export function showRel(rel: Buffer): string {
  return JSON.stringify(rel.toString('utf8'));
}

/** HOST's entry at `rel`, or undefined when there is none; throws when a parent is no real directory. */
export function entryAt(host: string, rel: Buffer, realDirs: Set<string>): BigIntStats | undefined {
  if (!parentsAreRealDirs(host, rel, realDirs)) throw new HostChangedError(`a parent of ${showRel(rel)} is no longer a directory`);
  return lstatOrUndefined(joinRel(host, rel));
}

export function lstatOrUndefined(path: Buffer | string): BigIntStats | undefined {
  try {
    return lstatSync(path, { bigint: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** Moves HOST/rel, which must be inode `ino`, out of HOST to `to` (in the work dir). */
export function moveOut(host: string, rel: Buffer, ino: bigint, to: string, realDirs: Set<string>): void {
  if (entryAt(host, rel, realDirs)?.ino !== ino) throw new HostChangedError(`${showRel(rel)} changed during the sync-back`);
  renameSync(joinRel(host, rel), to);
}

/** Moves `from` (in the work dir) to HOST/rel, which must not exist: rename(2) would replace it unasked. */
export function moveIn(from: string, host: string, rel: Buffer, realDirs: Set<string>): void {
  if (entryAt(host, rel, realDirs)) throw new HostChangedError(`${showRel(rel)} appeared during the sync-back`);
  renameSync(from, joinRel(host, rel));
}

/**
 * A descriptor of directory HOST/rel if it is still inode `ino`, else undefined. The caller closes
 * it. The last component is opened with O_NOFOLLOW, the parents are checked: no symlink is followed.
 */
export function openDir(host: string, rel: Buffer, ino: bigint, realDirs: Set<string>): number | undefined {
  if (!parentsAreRealDirs(host, rel, realDirs)) return undefined;
  let fd: number;
  try {
    fd = openSync(joinRel(host, rel), OPEN_DIR);
  } catch {
    return undefined; // gone, or no longer a directory
  }
  if (fstatSync(fd, { bigint: true }).ino === ino) return fd;
  closeSync(fd);
  return undefined;
}

export interface ExactTime {
  rel: Buffer;
  ino: bigint;
  mtimeNs: bigint;
}

/**
 * Gives each directory (where it is still inode `ino`) exactly `mtimeNs`. Node takes times as float
 * seconds, which cannot carry every nanosecond, so touch(1) sets them, on /proc/PID/fd/N: the very
 * directory opened here, whatever its name, with no path resolved again.
 */
export async function setMtimesExactly(host: string, dirs: readonly ExactTime[]): Promise<void> {
  const realDirs = new Set<string>();
  for (let start = 0; start < dirs.length; start += TOUCH_BATCH) {
    const fds: number[] = [];
    try {
      const byTime = new Map<bigint, string[]>();
      for (const { rel, ino, mtimeNs } of dirs.slice(start, start + TOUCH_BATCH)) {
        const fd = openDir(host, rel, ino, realDirs);
        if (fd === undefined) continue;
        fds.push(fd);
        if (fstatSync(fd, { bigint: true }).mtimeNs === mtimeNs) continue;
        byTime.set(mtimeNs, [...(byTime.get(mtimeNs) ?? []), `/proc/${process.pid}/fd/${fd}`]);
      }
      for (const [mtimeNs, paths] of byTime) {
        const res = await runTool('touch', ['-m', '-d', `@${touchTime(mtimeNs)}`, '--', ...paths], { timeoutMs: toolDeadlineMs(0) });
        if (res.code !== 0) throw new MvmError(`touch could not set directory times in ${host}: ${lastLine(res.stderr)}`);
      }
    } finally {
      for (const fd of fds) closeSync(fd);
    }
  }
}

/**
 * The time argument for which Node's utimes family sets exactly `ns`, cut to the microsecond (the
 * finest Node sets). A plain number of seconds goes through a double and comes out a microsecond
 * short, across a millisecond now and then, about once in 10,000 files; a negative number means
 * "now". A numeric string half a microsecond further from zero has neither problem.
 */
export function utimeArg(ns: bigint): string {
  const sec = ns / 1_000_000_000n - (ns % 1_000_000_000n < 0n ? 1n : 0n);
  const seconds = Number(sec) + Number((ns - sec * 1_000_000_000n) / 1000n) / 1e6;
  return String(seconds + (seconds < 0 ? -5e-7 : 5e-7));
}

/** `S.NNNNNNNNN` with the sign in front: touch reads `@-1.5` as -1.5 s, not -1 s + 0.5 s. */
function touchTime(ns: bigint): string {
  const abs = ns < 0n ? -ns : ns;
  return `${ns < 0n ? '-' : ''}${abs / 1_000_000_000n}.${String(abs % 1_000_000_000n).padStart(9, '0')}`;
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
