import { closeSync, fstatSync, openSync, readSync } from 'node:fs';

/*
 * Just enough of the on-disk ext4 format to read superblock state, inodes and directory blocks of an
 * image the guest may have crafted. Parsing it here (bounds-checked, in a memory-safe language) means
 * no name, mode or time from the image ever passes through debugfs's text output, which prints names
 * and symlink targets raw (a name containing "\n" could forge lines). debugfs still reads directory
 * blocks, addressed by inode number only; file contents and symlink targets are read here
 * (ext4-data.ts).
 */

const SUPERBLOCK_OFFSET = 1024;
const EXT4_MAGIC = 0xef53;

const STATE_VALID = 0x1;
const STATE_ERROR = 0x2;
const INCOMPAT_RECOVER = 0x4;
const RO_COMPAT_HUGE_FILE = 0x8;
const RO_COMPAT_ORPHAN_PRESENT = 0x10000;

/*
 * Incompat features this reader and the sync-back understand. Anything else (inline_data,
 * encrypt, casefold, meta_bg, compression, journal_dev, dirdata) changes where names or data live
 * and is refused rather than half-understood; the image mvmctl builds never has them.
 */
const INCOMPAT_FILETYPE = 0x2;
const INCOMPAT_EXTENTS = 0x40;
const INCOMPAT_64BIT = 0x80;
const INCOMPAT_FLEX_BG = 0x200;
const INCOMPAT_EA_INODE = 0x400;
const INCOMPAT_CSUM_SEED = 0x2000;
const INCOMPAT_LARGEDIR = 0x4000;
const INCOMPAT_KNOWN =
  INCOMPAT_FILETYPE |
  INCOMPAT_RECOVER |
  INCOMPAT_EXTENTS |
  INCOMPAT_64BIT |
  INCOMPAT_FLEX_BG |
  INCOMPAT_EA_INODE |
  INCOMPAT_CSUM_SEED |
  INCOMPAT_LARGEDIR;

const INODE_FLAG_ENCRYPT = 0x800;
/** With huge_file, i_blocks counts filesystem blocks instead of 512-byte sectors. */
const INODE_FLAG_HUGE_FILE = 0x40000;
const INODE_FLAG_INLINE_DATA = 0x10000000;

export const ROOT_INODE = 2;

/** Where i_block (block map, extent tree root or fast symlink target) sits in an inode, and its size. */
const I_BLOCK_OFFSET = 0x28;
export const I_BLOCK_BYTES = 60;

export interface Superblock {
  blockSize: number;
  inodesCount: number;
  inodesPerGroup: number;
  inodeSize: number;
  descSize: number;
  firstDataBlock: number;
  blocksCount: number;
  freeBlocks: bigint;
  state: number;
  featureIncompat: number;
  featureRoCompat: number;
  lastOrphan: number;
}

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;

export interface Inode {
  ino: number;
  /** Type and permission bits as stored (type in S_IFMT). */
  mode: number;
  uid: number;
  gid: number;
  size: bigint;
  /** Bytes of blocks the inode has allocated (i_blocks): data, unwritten extents, extent tree and xattr block. */
  allocatedBytes: bigint;
  links: number;
  /** Seconds since the epoch, with ext4's extra epoch bits applied. */
  mtimeSec: bigint;
  mtimeNsec: number;
  /** The raw `i_mtime_extra` word (nanoseconds << 2 | epoch bits), so callers can rewrite just the ns part. */
  mtimeExtra: number;
  hasMtimeExtra: boolean;
  flags: number;
}

export class Ext4FormatError extends Error {}

export class Ext4Image {
  private constructor(
    private readonly fd: number,
    readonly sb: Superblock,
    readonly fileSize: number,
  ) {}

  /**
   * Reads are synchronous: a walk issues one small read per inode, and a thread-pool round trip
   * each would cost more than the read itself.
   */
  static open(path: string): Ext4Image {
    const fd = openSync(path, 'r');
    try {
      const { size } = fstatSync(fd);
      const buf = Buffer.alloc(1024);
      if (readSync(fd, buf, 0, 1024, SUPERBLOCK_OFFSET) < 1024) {
        throw new Ext4FormatError('image is too small to hold an ext4 superblock');
      }
      return new Ext4Image(fd, parseSuperblock(buf), size);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
  }

  close(): void {
    closeSync(this.fd);
  }

  /** Features outside what sync-back understands, as a message, or undefined. */
  unsupportedFeatures(): string | undefined {
    const unknown = this.sb.featureIncompat & ~INCOMPAT_KNOWN;
    if (unknown !== 0) return `unsupported ext4 incompat features 0x${unknown.toString(16)}`;
    if (this.sb.descSize < 32 || this.sb.descSize > 1024) return `bad group descriptor size ${this.sb.descSize}`;
    return undefined;
  }

  /** Bytes of the image, refusing any range that does not lie inside it. */
  readAt(length: number, position: number): Buffer {
    if (position < 0 || position + length > this.fileSize) {
      throw new Ext4FormatError(`metadata at byte ${position} lies outside the image`);
    }
    const buf = Buffer.alloc(length);
    if (readSync(this.fd, buf, 0, length, position) !== length) throw new Ext4FormatError(`short read at byte ${position}`);
    return buf;
  }

  private inodeTableCache = new Map<number, number>();

  private inodeTableBlock(group: number): number {
    const cached = this.inodeTableCache.get(group);
    if (cached !== undefined) return cached;
    const { blockSize, firstDataBlock, descSize, featureIncompat } = this.sb;
    const gdtStart = (firstDataBlock + 1) * blockSize;
    const desc = this.readAt(descSize, gdtStart + group * descSize);
    let block = desc.readUInt32LE(8);
    if (featureIncompat & INCOMPAT_64BIT && descSize >= 64) block += desc.readUInt32LE(0x28) * 2 ** 32;
    this.inodeTableCache.set(group, block);
    return block;
  }

  private readRawInode(ino: number): Buffer {
    const { inodesCount, inodesPerGroup, inodeSize, blockSize } = this.sb;
    if (!Number.isInteger(ino) || ino < 1 || ino > inodesCount) throw new Ext4FormatError(`inode number ${ino} out of range`);
    const group = Math.floor((ino - 1) / inodesPerGroup);
    const index = (ino - 1) % inodesPerGroup;
    const table = this.inodeTableBlock(group);
    return this.readAt(inodeSize, table * blockSize + index * inodeSize);
  }

  readInode(ino: number): Inode {
    return parseInode(ino, this.readRawInode(ino), this.sb);
  }

  /**
   * The inode's 60-byte i_block, read afresh. Not part of Inode: a scan holds an Inode per entry,
   * and only extraction needs these bytes.
   */
  inodeBlockArea(ino: number): Buffer {
    return this.readRawInode(ino).subarray(I_BLOCK_OFFSET, I_BLOCK_OFFSET + I_BLOCK_BYTES);
  }
}

function parseSuperblock(b: Buffer): Superblock {
  if (b.readUInt16LE(0x38) !== EXT4_MAGIC) throw new Ext4FormatError('not an ext2/3/4 filesystem (bad magic)');
  const logBlockSize = b.readUInt32LE(0x18);
  if (logBlockSize > 6) throw new Ext4FormatError(`bad block size exponent ${logBlockSize}`);
  const featureIncompat = b.readUInt32LE(0x60);
  const is64 = (featureIncompat & INCOMPAT_64BIT) !== 0;
  const inodeSize = b.readUInt16LE(0x58);
  const inodesPerGroup = b.readUInt32LE(0x28);
  if (inodeSize < 128 || inodeSize > 1024 || (inodeSize & (inodeSize - 1)) !== 0) {
    throw new Ext4FormatError(`bad inode size ${inodeSize}`);
  }
  if (inodesPerGroup === 0) throw new Ext4FormatError('zero inodes per group');
  const hi = (off: number) => (is64 ? BigInt(b.readUInt32LE(off)) << 32n : 0n);
  return {
    blockSize: 1024 << logBlockSize,
    inodesCount: b.readUInt32LE(0x0),
    inodesPerGroup,
    inodeSize,
    descSize: is64 ? b.readUInt16LE(0xfe) : 32,
    firstDataBlock: b.readUInt32LE(0x14),
    blocksCount: Number(BigInt(b.readUInt32LE(0x4)) + hi(0x150)),
    freeBlocks: BigInt(b.readUInt32LE(0xc)) + hi(0x158),
    state: b.readUInt16LE(0x3a),
    featureIncompat,
    featureRoCompat: b.readUInt32LE(0x64),
    lastOrphan: b.readUInt32LE(0xe8),
  };
}

function parseInode(ino: number, r: Buffer, sb: Superblock): Inode {
  const { inodeSize } = sb;
  const extraIsize = inodeSize > 128 ? r.readUInt16LE(0x80) : 0;
  // i_mtime_extra sits at 0x88, so it exists when the extra area reaches past 0x8c.
  const hasMtimeExtra = extraIsize >= 0x8c - 0x80 && 0x80 + extraIsize <= inodeSize;
  const mtimeExtra = hasMtimeExtra ? r.readUInt32LE(0x88) : 0;
  const flags = r.readUInt32LE(0x20);
  const hugeFile = (sb.featureRoCompat & RO_COMPAT_HUGE_FILE) !== 0;
  const blocks = BigInt(r.readUInt32LE(0x1c)) + (hugeFile ? BigInt(r.readUInt16LE(0x74)) << 32n : 0n);
  return {
    ino,
    mode: r.readUInt16LE(0x0),
    uid: r.readUInt16LE(0x2) | (r.readUInt16LE(0x78) << 16),
    gid: r.readUInt16LE(0x18) | (r.readUInt16LE(0x7a) << 16),
    size: BigInt(r.readUInt32LE(0x4)) + (BigInt(r.readUInt32LE(0x6c)) << 32n),
    allocatedBytes: blocks * (hugeFile && flags & INODE_FLAG_HUGE_FILE ? BigInt(sb.blockSize) : 512n),
    links: r.readUInt16LE(0x1a),
    mtimeSec: BigInt(r.readInt32LE(0x10)) + (BigInt(mtimeExtra & 3) << 32n),
    mtimeNsec: mtimeExtra >>> 2,
    mtimeExtra,
    hasMtimeExtra,
    flags,
  };
}

/** Why an inode's contents cannot be read the way sync-back reads them, or undefined. */
export function unsupportedInode(inode: Inode): string | undefined {
  if (inode.flags & INODE_FLAG_ENCRYPT) return 'encrypted';
  if (inode.flags & INODE_FLAG_INLINE_DATA) return 'inline data';
  return undefined;
}

export interface DirEntry {
  ino: number;
  name: Buffer;
}

/**
 * Entries of a directory from its raw blocks (as `debugfs dump <ino>` writes them). Linear parsing
 * also covers htree directories: their index blocks look like one empty entry spanning the block.
 * Any entry that breaks the format is an error; the caller treats the whole image as untrusted junk.
 */
export function parseDirBlocks(data: Buffer, blockSize: number): DirEntry[] {
  if (data.length % blockSize !== 0) throw new Ext4FormatError('directory size is not a whole number of blocks');
  const entries: DirEntry[] = [];
  for (let block = 0; block < data.length; block += blockSize) {
    let off = block;
    const end = block + blockSize;
    while (off < end) {
      if (off + 8 > end) throw new Ext4FormatError('directory entry crosses a block boundary');
      const ino = data.readUInt32LE(off);
      const recLen = data.readUInt16LE(off + 4);
      const nameLen = data[off + 6]!;
      // rec_len 0 encodes 65536 for large blocks; anything else must be aligned and in bounds.
      const len = recLen === 0 && blockSize === 65536 ? 65536 : recLen;
      if (len < 8 || len % 4 !== 0 || off + len > end || 8 + nameLen > len) {
        throw new Ext4FormatError('malformed directory entry');
      }
      if (ino !== 0) entries.push({ ino, name: Buffer.from(data.subarray(off + 8, off + 8 + nameLen)) });
      off += len;
    }
  }
  return entries;
}

/**
 * Why the image was not left cleanly unmounted, or undefined when it was. A clean unmount sets the
 * superblock's valid bit (ext4 without a journal clears it while mounted) and leaves no recovery flag,
 * error flag or orphan list, so a crashed, killed or still-mounted guest is always caught here.
 */
export async function uncleanReason(imagePath: string): Promise<string | undefined> {
  let img: Ext4Image;
  try {
    img = Ext4Image.open(imagePath);
  } catch (err) {
    return err instanceof Ext4FormatError ? err.message : `cannot read image: ${(err as Error).message}`;
  }
  try {
    const { state, featureIncompat, featureRoCompat, lastOrphan } = img.sb;
    if (state & STATE_ERROR) return 'the filesystem recorded errors';
    if (!(state & STATE_VALID)) return 'the filesystem was not unmounted cleanly';
    if (featureIncompat & INCOMPAT_RECOVER) return 'the journal needs recovery (not unmounted cleanly)';
    if (featureRoCompat & RO_COMPAT_ORPHAN_PRESENT || lastOrphan !== 0) return 'the filesystem has pending orphan inodes';
    return img.unsupportedFeatures();
  } finally {
    img.close();
  }
}

export async function imageIsClean(imagePath: string): Promise<boolean> {
  return (await uncleanReason(imagePath)) === undefined;
}
