import { mkdtemp, rm, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { MvmError } from '../errors.js';
import { silentProgress, type Progress } from '../progress.js';
import { Ext4Image, ROOT_INODE } from './ext4.js';
import { relKey, walkHost, type HostEntry } from './host-tree.js';
import { debugfsScript, scanImage } from './image-tree.js';
import { showSpec, type AddDirSpec } from './spec.js';
import { lastLine, runTool } from '../run-tool.js';
import { toolDeadlineMs } from './deadline.js';

export interface StagedDir {
  spec: AddDirSpec;
  /** The ext4 image to attach (read-only at the block layer when `readOnly`). */
  imagePath: string;
  readOnly: boolean;
  /**
   * HOST's device and inode (lstat) when it was staged. Sync-back writes only into this very
   * directory: a HOST path that has become a symlink or another directory since is left alone.
   */
  hostIdentity: { dev: bigint; ino: bigint };
  /** Apparent size of the image file; the host allocates only what is written. */
  imageBytes: number;
  /** Entries under HOST (files, directories, links, ...) copied into the image. */
  entries: number;
  /** Bytes of regular-file data copied into the image. */
  contentBytes: number;
}

export interface StageOptions {
  /** Free space a rw image offers the guest beyond HOST's contents. Default 1 GiB. */
  rwFreeBytes?: number;
  progress?: Progress;
  signal?: AbortSignal;
}

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const BLOCK = 4096;
const INODE_SIZE = 256;
/** Directories larger than this many entries or bytes get a progress line. */
const LARGE_ENTRIES = 2000;
const LARGE_BYTES = 64 * MiB;

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;

interface Estimate {
  entries: number;
  contentBytes: number;
  fsBytes: number;
}

function estimate(entries: readonly HostEntry[]): Estimate {
  let contentBytes = 0;
  let fsBytes = 0;
  for (const { rel, stat: st } of entries) {
    const size = Number(st.size);
    // A directory entry costs 8 bytes plus the name padded to 4 in its parent's blocks.
    fsBytes += 8 + roundUp(rel.length - rel.lastIndexOf(0x2f) - 1, 4);
    if (st.isFile()) {
      contentBytes += size;
      // mke2fs -d keeps holes (and turns zero blocks into holes), so sparse files cost what they allocate.
      const allocated = Math.min(size, Number(st.blocks) * 512);
      fsBytes += roundUp(allocated, BLOCK) + Math.ceil(size / (128 * MiB)) * BLOCK;
    } else if (st.isDirectory()) {
      fsBytes += BLOCK;
    } else if (st.isSymbolicLink() && size >= 60) {
      fsBytes += BLOCK;
    }
  }
  return { entries: entries.length, contentBytes, fsBytes };
}

/**
 * Builds the ext4 image for one --add-dir with `mke2fs -d` (no root, no loop mount), then patches
 * in what mke2fs -d drops: nanoseconds of every mtime and the root directory's mode, owner and
 * mtime. The image has no journal: the guest uses it once, an unclean unmount is still visible in
 * the superblock (valid bit cleared while mounted), and nothing is synced back from such an image.
 */
export async function stageAddDir(spec: AddDirSpec, stagingDir: string, options: StageOptions = {}): Promise<StagedDir> {
  const progress = options.progress ?? silentProgress;
  const rwFreeBytes = options.rwFreeBytes ?? GiB;
  const started = Date.now();
  let hostEntries: HostEntry[];
  try {
    hostEntries = walkHost(spec.hostPath);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new MvmError(`--add-dir '${showSpec(spec.spec)}': cannot read ${err.path ?? spec.hostPath}: ${err.code ?? err.message}`);
  }
  const hostStat = hostEntries[0]!.stat;
  if (!hostStat.isDirectory()) {
    throw new MvmError(`--add-dir '${showSpec(spec.spec)}': ${spec.hostPath} is no longer a directory (replaced since the flag was checked)`);
  }
  const est = estimate(hostEntries);
  const large = est.entries > LARGE_ENTRIES || est.contentBytes > LARGE_BYTES;
  if (large) {
    progress(`building image for ${spec.hostPath}: ${est.entries} entries, ${(est.contentBytes / MiB).toFixed(0)} MB`);
  }

  const inodes = est.entries + 64 + (spec.readOnly ? 0 : Math.ceil(rwFreeBytes / 16384));
  const metadata = inodes * INODE_SIZE + 4 * MiB;
  const sizeBytes = roundUp(est.fsBytes * 1.05 + metadata + (spec.readOnly ? 0 : rwFreeBytes), 4 * MiB);

  const imagePath = join(await mkdtemp(join(stagingDir, 'adddir-')), 'disk.ext4');
  const workDir = dirname(imagePath);
  try {
    await buildImage(spec, imagePath, sizeBytes, inodes, rwFreeBytes, options.signal);
    await patchMetadata(imagePath, workDir, hostEntries, options.signal);
  } catch (err) {
    await rm(workDir, { recursive: true, force: true });
    throw err;
  }
  if (large) progress(`built image for ${spec.hostPath} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return {
    spec,
    imagePath,
    readOnly: spec.readOnly,
    hostIdentity: { dev: hostStat.dev, ino: hostStat.ino },
    imageBytes: (await stat(imagePath)).size,
    entries: est.entries,
    contentBytes: est.contentBytes,
  };
}

async function buildImage(
  spec: AddDirSpec,
  imagePath: string,
  initialBytes: number,
  inodes: number,
  rwFreeBytes: number,
  signal?: AbortSignal,
): Promise<void> {
  let sizeBytes = initialBytes;
  // The estimate is generous, but filesystem overhead is not exactly predictable: grow and retry.
  for (let attempt = 0; ; attempt++) {
    await rm(imagePath, { force: true });
    const res = await runTool(
      'mke2fs',
      [
        '-q', '-F', '-t', 'ext4', '-b', String(BLOCK), '-I', String(INODE_SIZE), '-m', '0',
        '-N', String(inodes), '-O', '^has_journal,^resize_inode', '-L', 'mvm-add-dir',
        '-d', spec.hostPath, imagePath, `${sizeBytes / 1024}k`,
      ],
      { signal, timeoutMs: toolDeadlineMs(sizeBytes) },
    );
    const freeBytes = res.code === 0 ? imageFreeBytes(imagePath) : -1;
    if (res.code === 0 && (spec.readOnly || freeBytes >= rwFreeBytes)) return;
    const noSpace = res.code !== 0 && /allocate|space|inode/i.test(res.stderr);
    if ((res.code !== 0 && !noSpace) || attempt >= 3) {
      throw new MvmError(`--add-dir '${showSpec(spec.spec)}': building the image failed: ${lastLine(res.stderr)}`);
    }
    sizeBytes = roundUp(sizeBytes * 1.5 + Math.max(0, rwFreeBytes - freeBytes), 4 * MiB);
  }
}

/** Removes a staged image and its private directory; safe to call more than once. */
export async function discardStaged(staged: StagedDir): Promise<void> {
  await rm(dirname(staged.imagePath), { recursive: true, force: true });
}

/**
 * Free space as a writer in the guest sees it: Linux's ext4 keeps back 2 % of the blocks or 4096
 * of them, whichever is fewer, for delayed allocation (ext4_calculate_resv_clusters), so the
 * superblock's free count overstates what `df` and a write get by up to 16 MiB.
 */
function imageFreeBytes(imagePath: string): number {
  const img = Ext4Image.open(imagePath);
  try {
    const reserved = Math.min(Math.floor(img.sb.blocksCount / 50), 4096);
    return (Number(img.sb.freeBlocks) - reserved) * img.sb.blockSize;
  } finally {
    img.close();
  }
}

async function patchMetadata(
  imagePath: string,
  workDir: string,
  hostEntries: readonly HostEntry[],
  signal?: AbortSignal,
): Promise<void> {
  const host = new Map(hostEntries.map((e) => [relKey(e.rel), e.stat]));
  const { entries } = await scanImage(
    imagePath,
    workDir,
    {
      maxEntries: hostEntries.length + 16,
      maxBytes: BigInt(Number.MAX_SAFE_INTEGER),
      maxApparentBytes: BigInt(Number.MAX_SAFE_INTEGER),
      maxPathBytes: 1 << 20,
    },
    signal,
  );
  const commands: string[] = [];
  const done = new Set<number>();
  for (const { rel, inode } of entries) {
    const st = host.get(relKey(rel));
    if (!st || done.has(inode.ino)) continue;
    done.add(inode.ino);
    const wantSec = st.mtimeNs / 1_000_000_000n;
    const wantNsec = Number(st.mtimeNs % 1_000_000_000n);
    // mke2fs -d creates the root from scratch (mode 0755, the caller's ids, the current time), and
    // removing lost+found below may touch its mtime again, so the root is always rewritten.
    const isRoot = inode.ino === ROOT_INODE;
    if (isRoot) {
      commands.push(
        `sif <${ROOT_INODE}> mode 0${Number(st.mode).toString(8)}`,
        `sif <${ROOT_INODE}> uid ${st.uid}`,
        `sif <${ROOT_INODE}> gid ${st.gid}`,
      );
    }
    if ((isRoot || wantSec !== inode.mtimeSec) && wantSec >= 0n && wantSec < 2n ** 31n) {
      commands.push(`sif <${inode.ino}> mtime @${wantSec}`);
    }
    if (inode.hasMtimeExtra && (isRoot || wantNsec !== inode.mtimeNsec)) {
      commands.push(`sif <${inode.ino}> mtime_extra ${((wantNsec << 2) | (inode.mtimeExtra & 3)) >>> 0}`);
    }
  }
  // lost+found is mke2fs's, not HOST's: the guest should see HOST's tree and nothing else.
  if (!host.has('lost+found')) commands.unshift('rmdir /lost+found');
  await debugfsScript(imagePath, workDir, commands, { write: true, signal });
}
