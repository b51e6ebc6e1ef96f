import { Ext4FormatError, I_BLOCK_BYTES, S_IFLNK, S_IFMT, S_IFREG, type Ext4Image, type Inode } from './ext4.js';

/*
 * File contents and symlink targets of a hostile image, read by inode number through the extent
 * tree with every field checked. Doing this here rather than with debugfs means no tool ever acts on
 * a target or name from the image (debugfs `rdump` recurses into whatever the inode turns out to be
 * and builds host paths from its names), and holes stay holes (debugfs `dump` writes them out).
 */

const INODE_FLAG_EXTENTS = 0x80000;
const EXTENT_MAGIC = 0xf30a;
const EXTENT_HEADER_BYTES = 12;
const EXTENT_ENTRY_BYTES = 12;
/** The kernel's own bound on extent tree depth. */
const MAX_EXTENT_DEPTH = 5;
/** A leaf extent longer than this is unwritten (allocated, reads as zeros), its length biased by it. */
const MAX_WRITTEN_EXTENT_BLOCKS = 32768;
/** What symlink(2) takes: PATH_MAX less the terminating NUL. */
const MAX_SYMLINK_TARGET = 4095;

/** One written stretch of a file: `length` bytes at `fileOffset` come from `imageOffset` in the image. */
export interface DataRun {
  fileOffset: number;
  imageOffset: number;
  length: number;
}

/**
 * The written parts of a regular file, in file order and clipped to its size. Holes and unwritten
 * (fallocated) extents are left out, so writing just these runs into a file truncated to the size
 * reproduces it with the same holes. The inode is read again and must still be the file the scan
 * saw. Files that map blocks without extents are refused: the kernel never makes them on an
 * extent-enabled filesystem, so only a crafted image has them.
 */
export function fileDataRuns(img: Ext4Image, scanned: Inode): DataRun[] {
  return dataRuns(img, unchangedSince(img, scanned, S_IFREG, 'regular file'));
}

/**
 * A symlink's target, exactly i_size bytes with no NUL and at most 4095 of them, for symlink(2).
 * Under 60 bytes and without extents it lives in i_block ("fast" symlink, as the kernel reads it);
 * otherwise in the blocks its extent tree maps.
 */
export function readSymlinkTarget(img: Ext4Image, scanned: Inode): Buffer {
  const inode = unchangedSince(img, scanned, S_IFLNK, 'symlink');
  if (inode.size === 0n) throw new Ext4FormatError(`symlink inode ${inode.ino} has an empty target`);
  if (inode.size > BigInt(MAX_SYMLINK_TARGET)) {
    throw new Ext4FormatError(`symlink inode ${inode.ino} has a ${inode.size}-byte target, longer than ${MAX_SYMLINK_TARGET}`);
  }
  const size = Number(inode.size);
  let target: Buffer;
  if (!(inode.flags & INODE_FLAG_EXTENTS) && size < I_BLOCK_BYTES) {
    target = Buffer.from(img.inodeBlockArea(inode.ino).subarray(0, size));
  } else {
    // A hole reads as zeros, so the NUL check below also refuses a target its extents do not cover.
    target = Buffer.alloc(size);
    for (const run of dataRuns(img, inode)) img.readAt(run.length, run.imageOffset).copy(target, run.fileOffset);
  }
  if (target.includes(0)) throw new Ext4FormatError(`symlink inode ${inode.ino} has a NUL byte in its target`);
  return target;
}

function unchangedSince(img: Ext4Image, scanned: Inode, type: number, what: string): Inode {
  const inode = img.readInode(scanned.ino);
  if ((inode.mode & S_IFMT) !== type) throw new Ext4FormatError(`inode ${inode.ino} is no longer a ${what}`);
  if (inode.size !== scanned.size || inode.allocatedBytes !== scanned.allocatedBytes || inode.flags !== scanned.flags) {
    throw new Ext4FormatError(`inode ${inode.ino} changed since the image was scanned`);
  }
  return inode;
}

interface Walk {
  inode: Inode;
  size: number;
  runs: DataRun[];
  /** First logical block the next extent may start at: extents come sorted and never overlap. */
  nextLogical: number;
  /** Blocks still allowed by i_blocks, spent on tree blocks and extents alike, so a walk costs at most what the scan counted. */
  blocksLeft: number;
}

function dataRuns(img: Ext4Image, inode: Inode): DataRun[] {
  const area = img.inodeBlockArea(inode.ino);
  if (!(inode.flags & INODE_FLAG_EXTENTS)) {
    // A block map of all zeros maps nothing: the whole file is a hole (how tools create empty files).
    if (area.some((b) => b !== 0)) throw new Ext4FormatError(`inode ${inode.ino} maps its blocks without extents`);
    return [];
  }
  const walk: Walk = {
    inode,
    size: Number(inode.size),
    runs: [],
    nextLogical: 0,
    blocksLeft: Number(inode.allocatedBytes / BigInt(img.sb.blockSize)),
  };
  walkExtentNode(img, area, undefined, walk);
  return walk.runs;
}

function walkExtentNode(img: Ext4Image, node: Buffer, expectedDepth: number | undefined, walk: Walk): void {
  const { ino } = walk.inode;
  const bad = (what: string) => new Ext4FormatError(`inode ${ino}: ${what}`);
  if (node.readUInt16LE(0) !== EXTENT_MAGIC) throw bad('bad extent tree header');
  const entries = node.readUInt16LE(2);
  const capacity = node.readUInt16LE(4);
  const depth = node.readUInt16LE(6);
  if (entries > capacity || EXTENT_HEADER_BYTES + capacity * EXTENT_ENTRY_BYTES > node.length) throw bad('extent node overflows');
  if (depth > MAX_EXTENT_DEPTH || (expectedDepth !== undefined && depth !== expectedDepth)) throw bad(`bad extent tree depth ${depth}`);
  const { blockSize } = img.sb;
  for (let i = 0; i < entries; i++) {
    const at = EXTENT_HEADER_BYTES + i * EXTENT_ENTRY_BYTES;
    if (depth > 0) {
      const child = node.readUInt16LE(at + 8) * 2 ** 32 + node.readUInt32LE(at + 4);
      spendBlocks(img, walk, child, 1);
      walkExtentNode(img, img.readAt(blockSize, child * blockSize), depth - 1, walk);
      continue;
    }
    const logical = node.readUInt32LE(at);
    const rawLength = node.readUInt16LE(at + 4);
    const physical = node.readUInt16LE(at + 6) * 2 ** 32 + node.readUInt32LE(at + 8);
    const unwritten = rawLength > MAX_WRITTEN_EXTENT_BLOCKS;
    const blocks = unwritten ? rawLength - MAX_WRITTEN_EXTENT_BLOCKS : rawLength;
    if (blocks === 0 || logical < walk.nextLogical || logical + blocks > 2 ** 32) throw bad('extents overlap or are out of order');
    walk.nextLogical = logical + blocks;
    spendBlocks(img, walk, physical, blocks);
    const fileOffset = logical * blockSize;
    if (unwritten || fileOffset >= walk.size) continue;
    walk.runs.push({ fileOffset, imageOffset: physical * blockSize, length: Math.min(blocks * blockSize, walk.size - fileOffset) });
  }
}

function spendBlocks(img: Ext4Image, walk: Walk, first: number, count: number): void {
  const { firstDataBlock, blocksCount, blockSize } = img.sb;
  if (first < Math.max(firstDataBlock, 1) || first + count > blocksCount || (first + count) * blockSize > img.fileSize) {
    throw new Ext4FormatError(`inode ${walk.inode.ino} maps blocks outside the filesystem`);
  }
  walk.blocksLeft -= count;
  if (walk.blocksLeft < 0) throw new Ext4FormatError(`inode ${walk.inode.ino} maps more blocks than it has allocated`);
}
