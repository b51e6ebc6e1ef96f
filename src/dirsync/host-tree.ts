import type { BigIntStats } from 'node:fs';
import { lstatSync, readdirSync } from 'node:fs';

export interface HostEntry {
  /** Path relative to the walked root as raw bytes; empty for the root. */
  rel: Buffer;
  stat: BigIntStats;
}

const SLASH = Buffer.from('/');
const SLASH_BYTE = 0x2f;

export function joinRel(root: string, rel: Buffer): Buffer {
  return rel.length === 0 ? Buffer.from(root) : Buffer.concat([Buffer.from(root), SLASH, rel]);
}

/** Map key for a raw relative path: latin1 keeps every byte distinct, unlike utf8. */
export function relKey(rel: Buffer): string {
  return rel.toString('latin1');
}

/**
 * Every entry under `root` with lstat (never following symlinks), names as raw bytes so that
 * non-UTF-8 names survive. Parents come before their children. Synchronous on purpose: a lstat
 * through the thread pool costs ~0.4 ms, a direct one a few microseconds, and nothing else runs
 * while an image is being staged.
 */
export function walkHost(root: string): HostEntry[] {
  const entries: HostEntry[] = [{ rel: Buffer.alloc(0), stat: lstatSync(root, { bigint: true }) }];
  for (let i = 0; i < entries.length; i++) {
    const dir = entries[i]!;
    if (!dir.stat.isDirectory()) continue;
    const names = readdirSync(joinRel(root, dir.rel), { encoding: 'buffer' });
    for (const name of names) {
      const rel = dir.rel.length === 0 ? name : Buffer.concat([dir.rel, SLASH, name]);
      entries.push({ rel, stat: lstatSync(joinRel(root, rel), { bigint: true }) });
    }
  }
  return entries;
}

function lstatOrUndefined(path: Buffer): BigIntStats | undefined {
  try {
    return lstatSync(path, { bigint: true });
  } catch {
    return undefined; // missing, or a parent is not a directory
  }
}

/**
 * Whether every parent of `rel` under `root` is a real directory, checked with lstat one component
 * at a time, so nothing reached through `rel` is reached through a symlink. `realDirs` remembers the
 * parents already checked (by relKey), so a walk over many entries lstats each directory once.
 */
export function parentsAreRealDirs(root: string, rel: Buffer, realDirs: Set<string>): boolean {
  for (let cut = rel.indexOf(SLASH_BYTE); cut >= 0; cut = rel.indexOf(SLASH_BYTE, cut + 1)) {
    const parent = rel.subarray(0, cut);
    const key = relKey(parent);
    if (realDirs.has(key)) continue;
    if (!lstatOrUndefined(joinRel(root, parent))?.isDirectory()) return false;
    realDirs.add(key);
  }
  return true;
}

/**
 * lstat of `root/rel` that never looks through a symlink on the way there (parentsAreRealDirs);
 * otherwise the answer is undefined, as for a path that does not exist.
 */
export function lstatBeneath(root: string, rel: Buffer, realDirs: Set<string>): BigIntStats | undefined {
  return parentsAreRealDirs(root, rel, realDirs) ? lstatOrUndefined(joinRel(root, rel)) : undefined;
}
