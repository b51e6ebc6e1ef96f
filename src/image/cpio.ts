/**
 * A writer (and, for tests and `image info`, a reader) for the "newc" cpio format the Linux kernel
 * unpacks as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst). Written in
 * TypeScript so that building the guest image needs no root: device nodes, owners and modes are just
 * header fields here.
 *
 * Output is deterministic: entries are sorted by path, inode numbers are assigned in that order and
 * every mtime is the same fixed value, so equal inputs give byte-identical archives.
 */

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;

export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number; uid?: number; gid?: number }
  | { type: 'file'; path: string; data: Uint8Array; mode?: number; uid?: number; gid?: number }
  | { type: 'symlink'; path: string; target: string; uid?: number; gid?: number }
  | { type: 'char' | 'block'; path: string; major: number; minor: number; mode?: number; uid?: number; gid?: number };

export interface CpioWriteOptions {
  /** mtime written for every entry (seconds since the epoch); default 0. */
  mtime?: number;
}

const MAGIC = '070701';
const HEADER_LEN = 110;
const TRAILER = 'TRAILER!!!';

/** Normalizes an archive path: no leading `/` or `./`, no empty or `.`/`..` components. */
export function normalizeCpioPath(path: string): string {
  const parts = path.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.length === 0) throw new Error(`cpio: empty path ${JSON.stringify(path)}`);
  if (parts.includes('..')) throw new Error(`cpio: path ${JSON.stringify(path)} contains '..'`);
  if (parts.some((p) => p.includes('\0'))) throw new Error(`cpio: path ${JSON.stringify(path)} contains NUL`);
  return parts.join('/');
}

function hex8(value: number): string {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new Error(`cpio: field out of range: ${value}`);
  return value.toString(16).padStart(8, '0');
}

function pad4(length: number): number {
  return (4 - (length % 4)) % 4;
}

interface HeaderFields {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  filesize: number;
  rdevmajor: number;
  rdevminor: number;
  namesize: number;
}

function header(fields: HeaderFields): Buffer {
  const text =
    MAGIC +
    hex8(fields.ino) +
    hex8(fields.mode) +
    hex8(fields.uid) +
    hex8(fields.gid) +
    hex8(fields.nlink) +
    hex8(fields.mtime) +
    hex8(fields.filesize) +
    hex8(0) + // devmajor
    hex8(0) + // devminor
    hex8(fields.rdevmajor) +
    hex8(fields.rdevminor) +
    hex8(fields.namesize) +
    hex8(0); // check (only used by the "070702" crc format)
  return Buffer.from(text, 'ascii');
}

function record(parts: Buffer[], fields: Omit<HeaderFields, 'namesize'> & { name: string; data: Uint8Array }): void {
  const name = Buffer.from(fields.name + '\0', 'utf8');
  parts.push(header({ ...fields, namesize: name.length }), name, Buffer.alloc(pad4(HEADER_LEN + name.length)));
  if (fields.data.length > 0) {
    parts.push(Buffer.from(fields.data.buffer, fields.data.byteOffset, fields.data.byteLength), Buffer.alloc(pad4(fields.data.length)));
  }
}

/**
 * Builds a newc archive from `entries`. Paths are normalized and sorted (so a directory always
 * precedes its contents, as long as it is listed); a path listed twice is an error. Parent
 * directories are not invented: list them.
 */
export function writeCpio(entries: readonly CpioEntry[], options: CpioWriteOptions = {}): Buffer {
  const mtime = options.mtime ?? 0;
  const normalized = entries.map((e) => ({ ...e, path: normalizeCpioPath(e.path) }));
  normalized.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  for (let i = 1; i < normalized.length; i++) {
    if (normalized[i]!.path === normalized[i - 1]!.path) throw new Error(`cpio: duplicate path ${normalized[i]!.path}`);
  }
  const parts: Buffer[] = [];
  let ino = 1;
  for (const e of normalized) {
    const common = { ino: ino++, uid: e.uid ?? 0, gid: e.gid ?? 0, mtime, name: e.path, rdevmajor: 0, rdevminor: 0 };
    switch (e.type) {
      case 'dir':
        record(parts, { ...common, mode: S_IFDIR | ((e.mode ?? 0o755) & 0o7777), nlink: 2, filesize: 0, data: new Uint8Array() });
        break;
      case 'file':
        record(parts, { ...common, mode: S_IFREG | ((e.mode ?? 0o644) & 0o7777), nlink: 1, filesize: e.data.length, data: e.data });
        break;
      case 'symlink': {
        const target = Buffer.from(e.target, 'utf8');
        if (target.length === 0) throw new Error(`cpio: empty symlink target for ${e.path}`);
        record(parts, { ...common, mode: S_IFLNK | 0o777, nlink: 1, filesize: target.length, data: target });
        break;
      }
      case 'char':
      case 'block':
        record(parts, {
          ...common,
          mode: (e.type === 'char' ? S_IFCHR : S_IFBLK) | ((e.mode ?? 0o600) & 0o7777),
          nlink: 1,
          filesize: 0,
          rdevmajor: e.major,
          rdevminor: e.minor,
          data: new Uint8Array(),
        });
        break;
    }
  }
  record(parts, { ino: 0, mode: 0, uid: 0, gid: 0, nlink: 1, mtime: 0, filesize: 0, rdevmajor: 0, rdevminor: 0, name: TRAILER, data: new Uint8Array() });
  return Buffer.concat(parts);
}

/** One entry read back from a newc archive. */
export interface CpioRecord {
  path: string;
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  rdevmajor: number;
  rdevminor: number;
  /** File contents, or the target of a symlink. */
  data: Buffer;
}

/** Parses a newc archive (one member, up to its trailer). Throws on malformed input. */
export function parseCpio(archive: Buffer): CpioRecord[] {
  const out: CpioRecord[] = [];
  let off = 0;
  for (;;) {
    if (off + HEADER_LEN > archive.length) throw new Error(`cpio: truncated header at offset ${off}`);
    const magic = archive.toString('ascii', off, off + 6);
    if (magic !== MAGIC) throw new Error(`cpio: bad magic ${JSON.stringify(magic)} at offset ${off}`);
    const field = (i: number): number => {
      const s = archive.toString('ascii', off + 6 + i * 8, off + 14 + i * 8);
      if (!/^[0-9a-fA-F]{8}$/.test(s)) throw new Error(`cpio: bad header field ${JSON.stringify(s)} at offset ${off}`);
      return parseInt(s, 16);
    };
    const [ino, mode, uid, gid, nlink, mtime, filesize, , , rdevmajor, rdevminor, namesize] = Array.from({ length: 13 }, (_, i) => field(i)) as number[];
    const nameStart = off + HEADER_LEN;
    if (namesize! < 1 || nameStart + namesize! > archive.length) throw new Error(`cpio: bad name size at offset ${off}`);
    const path = archive.toString('utf8', nameStart, nameStart + namesize! - 1);
    const dataStart = nameStart + namesize! + pad4(HEADER_LEN + namesize!);
    if (dataStart + filesize! > archive.length) throw new Error(`cpio: truncated data for ${path}`);
    if (path === TRAILER) return out;
    out.push({
      path,
      ino: ino!,
      mode: mode!,
      uid: uid!,
      gid: gid!,
      nlink: nlink!,
      mtime: mtime!,
      rdevmajor: rdevmajor!,
      rdevminor: rdevminor!,
      data: archive.subarray(dataStart, dataStart + filesize!),
    });
    off = dataStart + filesize! + pad4(filesize!);
  }
}
