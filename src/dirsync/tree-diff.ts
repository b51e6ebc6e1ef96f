import type { BigIntStats } from 'node:fs';
import { readdirSync, readlinkSync } from 'node:fs';
import { S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, type Ext4Image, type Inode } from './ext4.js';
import { readSymlinkTarget } from './ext4-data.js';
import { joinRel, lstatBeneath, relKey } from './host-tree.js';
import { showRel } from './host-ops.js';
import { isReservedName } from './journal.js';
import { childrenByParent, parentOf, type Plan, type PlannedEntry } from './sync-plan.js';

/** What HOST has at a path now, as far as moving it aside and putting it back need to know. */
export interface HostState {
  ino: bigint;
  dev: bigint;
  isDir: boolean;
  /** Permission bits. */
  mode: number;
  mtimeNs: bigint;
}

/** A path whose HOST entry and guest entry differ: HOST's moves aside, the guest's moves in, whole. */
export interface Replacement {
  rel: Buffer;
  /** Undefined when HOST has nothing there (a new entry). */
  old?: HostState;
  /** Undefined when the guest removed the path. */
  entry?: PlannedEntry;
}

/** A directory both sides have, below the root, that ends with the guest's mode and mtime. */
export interface DirFix {
  rel: Buffer;
  old: HostState;
  mode: number;
  mtimeNs: bigint;
  /** Entries move in or out of it: rename(2) needs write permission here. */
  entriesChange: boolean;
}

export interface TreeChanges {
  /** Parents first; none lies inside another. */
  replacements: Replacement[];
  /** Parents first. */
  dirFixes: DirFix[];
  root: { old: HostState; mode: number; mtimeNs: bigint };
}

/** HOST cannot take the guest's tree by renames alone (a mount inside HOST would need copying). */
export class HostLayoutError extends Error {}

const SLASH = Buffer.from('/');

export function inodeMtimeNs(inode: Inode): bigint {
  return inode.mtimeSec * 1_000_000_000n + BigInt(inode.mtimeNsec);
}

function hostState(st: BigIntStats): HostState {
  return { ino: st.ino, dev: st.dev, isDir: st.isDirectory(), mode: Number(st.mode & 0o7777n), mtimeNs: st.mtimeNs };
}

/**
 * Compares the guest's final tree (the plan) with HOST, walking only directories both sides have:
 * whatever lies below a path that differs moves with it, and what is unchanged is not copied at
 * all. A regular file counts as unchanged when HOST has the same size, mtime (to the nanosecond)
 * and mode, with the same hard links; a symlink when target and mtime match. Protected paths (devices, FIFOs, sockets, kept setuid files) and
 * HOST's own `.mvm-sync-*` entries are left as they are. HOST is read through real directories only.
 */
export function diffTree(img: Ext4Image, host: string, hostStat: BigIntStats, plan: Plan): TreeChanges {
  const realDirs = new Set<string>();
  const children = childrenByParent(plan);
  // Every name the guest's tree has, by parent: protected ones too, which HOST keeps as they are.
  const guestNames = new Map<string, Set<string>>();
  for (const rel of [...plan.keep.slice(1).map((e) => e.rel), ...plan.protect]) {
    const parent = relKey(parentOf(rel));
    if (!guestNames.has(parent)) guestNames.set(parent, new Set());
    guestNames.get(parent)!.add(relKey(rel.subarray(rel.lastIndexOf(0x2f) + 1)));
  }

  const unchangedFiles = unchangedFileGroups(host, plan, realDirs);
  const changes: TreeChanges = {
    replacements: [],
    dirFixes: [],
    root: { old: hostState(hostStat), mode: plan.keep[0]!.mode, mtimeNs: inodeMtimeNs(plan.keep[0]!.inode) },
  };
  const replace = (parent: BigIntStats, rel: Buffer, st: BigIntStats | undefined, entry?: PlannedEntry) => {
    for (const [what, dev] of [['its directory', parent.dev], ['it', st?.dev]] as const) {
      if (dev !== undefined && dev !== hostStat.dev) {
        throw new HostLayoutError(`${showRel(rel)} changed, and ${what} is on another file system than HOST (a mount inside HOST)`);
      }
    }
    changes.replacements.push({ rel, old: st && hostState(st), entry });
  };

  const dirs: { entry: PlannedEntry; st: BigIntStats }[] = [{ entry: plan.keep[0]!, st: hostStat }];
  for (const { entry: dir, st: dirSt } of dirs) {
    const before = changes.replacements.length;
    for (const child of children.get(relKey(dir.rel)) ?? []) {
      const st = lstatBeneath(host, child.rel, realDirs);
      const type = child.inode.mode & S_IFMT;
      if (type === S_IFDIR && st?.isDirectory()) dirs.push({ entry: child, st });
      else if (type === S_IFREG ? !unchangedFiles.has(child.inode.ino) : !sameSymlink(img, host, child, st)) replace(dirSt, child.rel, st, child);
    }
    const names = guestNames.get(relKey(dir.rel));
    for (const name of readdirSync(joinRel(host, dir.rel), { encoding: 'buffer' })) {
      if (names?.has(relKey(name)) || (dir.rel.length === 0 && isReservedName(name))) continue;
      const rel = dir.rel.length === 0 ? name : Buffer.concat([dir.rel, SLASH, name]);
      const st = lstatBeneath(host, rel, realDirs);
      if (st) replace(dirSt, rel, st);
    }
    const entriesChange = changes.replacements.length > before;
    const old = hostState(dirSt);
    if (dir.rel.length > 0 && (entriesChange || old.mode !== dir.mode || old.mtimeNs !== inodeMtimeNs(dir.inode))) {
      changes.dirFixes.push({ rel: dir.rel, old, mode: dir.mode, mtimeNs: inodeMtimeNs(dir.inode), entriesChange });
    }
  }
  return changes;
}

function sameSymlink(img: Ext4Image, host: string, entry: PlannedEntry, st: BigIntStats | undefined): boolean {
  if ((entry.inode.mode & S_IFMT) !== S_IFLNK || !st?.isSymbolicLink()) return false;
  if (st.size !== entry.inode.size || st.mtimeNs !== inodeMtimeNs(entry.inode)) return false;
  // lstatBeneath just checked the parents; readlink(2) does not follow the link itself.
  return readlinkSync(joinRel(host, entry.rel), { encoding: 'buffer' }).equals(readSymlinkTarget(img, entry.inode));
}

/**
 * Guest file inodes HOST already has as they are: every path of the inode is, in HOST, one and the
 * same regular file with the guest's size, mtime and mode, and no other guest inode claims that
 * file. Then nothing needs to change for any of those paths; otherwise all of them are replaced,
 * which also gets the guest's hard links right (made or broken).
 */
function unchangedFileGroups(host: string, plan: Plan, realDirs: Set<string>): Set<number> {
  const paths = new Map<number, Buffer[]>();
  for (const { rel, inode } of plan.keep) {
    if ((inode.mode & S_IFMT) !== S_IFREG) continue;
    if (!paths.has(inode.ino)) paths.set(inode.ino, []);
    paths.get(inode.ino)!.push(rel);
  }
  const unchanged = new Set<number>();
  const claimed = new Set<bigint>();
  for (const [ino, rels] of paths) {
    const { inode, mode } = plan.files.get(ino)!;
    let hostIno: bigint | undefined;
    const same = rels.every((rel) => {
      const st = lstatBeneath(host, rel, realDirs);
      const ok =
        st?.isFile() &&
        st.size === inode.size &&
        st.mtimeNs === inodeMtimeNs(inode) &&
        Number(st.mode & 0o7777n) === mode &&
        (hostIno === undefined || st.ino === hostIno);
      hostIno = st?.ino;
      return ok;
    });
    if (!same || claimed.has(hostIno!)) continue;
    claimed.add(hostIno!);
    unchanged.add(ino);
  }
  return unchanged;
}
