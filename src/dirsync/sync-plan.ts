import { readFileSync } from 'node:fs';
import { S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, type Inode } from './ext4.js';
import { lstatBeneath, relKey } from './host-tree.js';
import type { ImageEntry } from './image-tree.js';
import { isReservedName } from './journal.js';

export interface PlannedEntry extends ImageEntry {
  /** Permission bits the entry gets on HOST (directories and regular files; symlinks have none). */
  mode: number;
}

export interface Plan {
  /** Entries to materialize in the staging tree, parents first. */
  keep: PlannedEntry[];
  /** Paths where HOST keeps whatever it has (relative, raw bytes). */
  protect: Buffer[];
  /** Distinct regular-file inodes to extract, with the mode they will get. */
  files: Map<number, { inode: Inode; mode: number; paths: number }>;
  /** Sum of the apparent sizes of those files, holes included. */
  apparentBytes: number;
}

const SUID_SGID = 0o6000;

const KIND: Record<number, string> = {
  0o010000: 'FIFO',
  0o020000: 'character device',
  0o060000: 'block device',
  0o140000: 'socket',
};

let umask: number | undefined;

/**
 * The process umask, read once from /proc/self/status. Not process.umask(): reading it that way
 * means setting it (to 0) and back, and a file another thread creates in between, such as a
 * libuv worker finishing an async write, would get mode 0666. Without the Umask line (Linux before
 * 4.7) the strictest mask stands in, which can cost group or world read but never grants write.
 */
function userUmask(): number {
  if (umask === undefined) {
    let status = '';
    try {
      status = readFileSync('/proc/self/status', 'utf8');
    } catch {
      // no /proc: the fallback below
    }
    const field = /^Umask:\s*([0-7]+)$/m.exec(status)?.[1];
    umask = field === undefined ? 0o077 : Number.parseInt(field, 8);
  }
  return umask;
}

/**
 * The permission bits for an entry of `type` the guest left with `wanted`: masked with the user's
 * umask, so the guest can make nothing group- or world-writable that the umask would not, except
 * where HOST already has exactly those bits on that kind of entry there. Those are the user's own
 * choice (a group-writable file under umask 022 the guest left alone), and masking them would turn
 * every sync into a chmod.
 */
function hostMode(host: string, entry: ImageEntry, type: number, wanted: number, realDirs: Set<string>): number {
  const masked = wanted & ~userUmask();
  if (masked === wanted) return wanted;
  const st = lstatBeneath(host, entry.rel, realDirs);
  const hostHasIt = st && Number(st.mode & BigInt(S_IFMT)) === type && Number(st.mode & 0o7777n) === wanted;
  return hostHasIt ? wanted : masked;
}

/**
 * Decides what reaches the host. Device nodes, FIFOs and sockets never do: HOST keeps whatever it
 * has at that path, and there is a warning unless HOST already had the same kind of entry there
 * (which is how they got into the image). setuid/setgid files arrive with those bits cleared and a
 * warning, except a file that HOST already has with the same bits, size and mtime, which is left
 * alone: the guest cannot make a privileged file this way, and an untouched one survives. HOST is
 * only ever looked at through real directories (lstatBeneath): a symlink in HOST says nothing about
 * what is in the guest's tree. Top-level `.mvm-sync-*` entries are skipped with all they hold: those
 * names are sync-back's own in HOST (journal.ts). The warning says so unless HOST has the name too
 * (then the image only has HOST's copy of it).
 */
export function planTree(entries: readonly ImageEntry[], host: string, warn: (line: string) => void): Plan {
  const plan: Plan = { keep: [], protect: [], files: new Map(), apparentBytes: 0 };
  const realDirs = new Set<string>();
  const shown = (rel: Buffer) => JSON.stringify(rel.toString('utf8'));
  for (const entry of entries) {
    const { rel, inode } = entry;
    const cut = rel.indexOf(0x2f);
    if (isReservedName(cut < 0 ? rel : rel.subarray(0, cut))) {
      if (cut < 0 && !lstatBeneath(host, rel, realDirs)) warn(`${shown(rel)}: name reserved for sync-back's work directory, not copied to the host`);
      continue;
    }
    const type = inode.mode & S_IFMT;
    if (type === S_IFDIR) {
      // setgid on a directory would hand its group to everything created in it later: dropped silently.
      plan.keep.push({ ...entry, mode: hostMode(host, entry, type, inode.mode & 0o1777, realDirs) });
    } else if (type === S_IFLNK) {
      plan.keep.push({ ...entry, mode: 0o777 });
    } else if (type === S_IFREG) {
      // Hard links share one inode, so one mode: the first path decides it.
      const known = plan.files.get(inode.ino);
      if (known) {
        known.paths++;
        plan.keep.push({ ...entry, mode: known.mode });
        continue;
      }
      let mode = inode.mode & 0o7777;
      if (mode & SUID_SGID) {
        const st = lstatBeneath(host, rel, realDirs);
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
      mode = hostMode(host, entry, type, mode, realDirs);
      plan.keep.push({ ...entry, mode });
      plan.files.set(inode.ino, { inode, mode, paths: 1 });
      plan.apparentBytes += Number(inode.size);
    } else {
      const st = lstatBeneath(host, rel, realDirs);
      plan.protect.push(rel);
      const sameKind = st && Number(st.mode & BigInt(S_IFMT)) === type;
      if (!sameKind) warn(`${shown(rel)}: ${KIND[type] ?? `file type 0${type.toString(8)}`} not copied to the host`);
    }
  }
  return plan;
}

/** The kept entries below the root by their parent's relKey, in plan order. */
export function childrenByParent(plan: Plan): Map<string, PlannedEntry[]> {
  const children = new Map<string, PlannedEntry[]>();
  for (const entry of plan.keep.slice(1)) {
    const parent = relKey(parentOf(entry.rel));
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent)!.push(entry);
  }
  return children;
}

export function parentOf(rel: Buffer): Buffer {
  const cut = rel.lastIndexOf(0x2f);
  return cut < 0 ? Buffer.alloc(0) : rel.subarray(0, cut);
}
