import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  chmodSync, closeSync, mkdirSync, openSync, readdirSync, readSync, statSync, truncateSync,
  writeFileSync, writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { MvmError } from '../../src/errors.js';
import { discardStaged, parseAddDirSpec, stageAddDir, syncBack, treeDigest, type StagedDir } from '../../src/dirsync/index.js';
import { scratchTree } from './scratch.js';

// Set before the first sync-back reads it; the expectations below are for this umask.
process.umask(0o022);

const KiB = 1024;
const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
const { base, fresh } = scratchTree('dirsync-modes-');
const state = join(base, 'state');

function hostTree(): string {
  const host = fresh('host');
  chmodSync(host, 0o755);
  writeFileSync(join(host, 'keep.txt'), 'original\n');
  chmodSync(join(host, 'keep.txt'), 0o644);
  writeFileSync(join(host, 'shared.txt'), 'group-writable on purpose\n');
  chmodSync(join(host, 'shared.txt'), 0o664);
  return host;
}

async function stage(dir: string): Promise<StagedDir> {
  return stageAddDir(parseAddDirSpec(`${dir}:/work:rw`, base), state, { rwFreeBytes: 16 * MiB });
}

/** Stages `host`, then replaces its image with one built from `guestFinal` (the guest's work). */
async function guestLeaves(host: string, guestFinal: string): Promise<StagedDir> {
  const staged = await stage(host);
  const final = await stage(guestFinal);
  await discardStaged(staged);
  return { ...staged, imagePath: final.imagePath };
}

function copyOf(host: string): string {
  const guest = fresh('guest');
  execFileSync('cp', ['-a', `${host}/.`, guest]);
  return guest;
}

function debugfsW(image: string, ...cmds: string[]): void {
  execFileSync('debugfs', ['-w', '-f', '-', image], { input: cmds.join('\n'), stdio: ['pipe', 'ignore', 'ignore'] });
}

function readAt(path: string, position: number, length: number): string {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, position);
    return buf.toString('latin1');
  } finally {
    closeSync(fd);
  }
}

const mode = (path: string) => (statSync(path).mode & 0o7777).toString(8);

describe('modes the guest sets', () => {
  it('are masked with the umask, so nothing becomes group- or world-writable; modes HOST already had stay', async () => {
    const host = hostTree();
    const guest = copyOf(host);
    chmodSync(guest, 0o777);
    writeFileSync(join(guest, 'new.txt'), 'made by the guest\n');
    chmodSync(join(guest, 'new.txt'), 0o666);
    chmodSync(join(guest, 'keep.txt'), 0o666);
    mkdirSync(join(guest, 'open'));
    chmodSync(join(guest, 'open'), 0o1777);
    writeFileSync(join(guest, 'private'), 'x');
    chmodSync(join(guest, 'private'), 0o600);
    await syncBack(await guestLeaves(host, guest));
    assert.equal(mode(host), '755');
    assert.equal(mode(join(host, 'new.txt')), '644');
    assert.equal(mode(join(host, 'keep.txt')), '644');
    assert.equal(mode(join(host, 'open')), '1755', 'the sticky bit is no permission to mask');
    assert.equal(mode(join(host, 'private')), '600');
    assert.equal(mode(join(host, 'shared.txt')), '664', 'a mode the user gave HOST is not the guest\'s doing');
  });
});

describe('sparse files', () => {
  it('stay sparse in the staging tree and on HOST, and count by allocated blocks, not apparent size', async () => {
    const host = hostTree();
    const guest = copyOf(host);
    const huge = join(guest, 'huge.bin');
    writeFileSync(huge, '');
    truncateSync(huge, GiB);
    // Eight islands of data: more extents than the inode holds, so the tree gets an index level.
    const islands = Array.from({ length: 8 }, (_, i) => i * (GiB / 8) + 4096 * i);
    const fd = openSync(huge, 'r+');
    for (const [i, at] of islands.entries()) writeSync(fd, `island ${i}`, at, 'latin1');
    closeSync(fd);
    const staged = await guestLeaves(host, guest);
    let stagedAllocated = -1;
    const report = await syncBack(staged, {
      onApplyStep: (index) => {
        if (index > 0) return;
        const work = join(host, readdirSync(host).find((n) => n.startsWith('.mvm-sync-'))!);
        const extracted = readdirSync(join(work, 'store')).map((n) => statSync(join(work, 'store', n)));
        stagedAllocated = extracted.find((st) => st.size === GiB)!.blocks * 512;
      },
    });
    assert.deepEqual(report.warnings, []);
    const synced = join(host, 'huge.bin');
    assert.equal(statSync(synced).size, GiB);
    assert.ok(statSync(synced).blocks * 512 < MiB, `HOST copy allocates ${statSync(synced).blocks * 512} bytes`);
    assert.ok(stagedAllocated >= 0 && stagedAllocated < MiB, `staging copy allocates ${stagedAllocated} bytes`);
    for (const [i, at] of islands.entries()) assert.equal(readAt(synced, at, 8), `island ${i}`);
    assert.equal(readAt(synced, GiB / 16, 4), '\0\0\0\0');
  });

  it('refuse a file whose allocated blocks exceed the bound even when its size is tiny, HOST untouched', async () => {
    const host = hostTree();
    const guest = copyOf(host);
    writeFileSync(join(guest, 'small.txt'), 'hi');
    const staged = await guestLeaves(host, guest);
    // Unwritten blocks past EOF (fallocate --keep-size): size 2 bytes, about 1.2 MB allocated.
    debugfsW(staged.imagePath, 'fallocate small.txt 1 300');
    const before = treeDigest(host);
    await assert.rejects(syncBack(staged, { limits: { maxBytes: BigInt(MiB) } }), (err: unknown) => {
      assert.ok(err instanceof MvmError);
      assert.match(err.message, /guest changes discarded, .*allocated contents exceed 1048576 bytes/);
      return true;
    });
    assert.equal(treeDigest(host), before);
    // The same image within the bound syncs, and the unwritten blocks come back as nothing.
    await syncBack(staged, { limits: { maxBytes: BigInt(2 * MiB) } });
    assert.equal(statSync(join(host, 'small.txt')).size, 2);
    assert.ok(statSync(join(host, 'small.txt')).blocks * 512 <= 8 * KiB);
  });

  it('refuse apparent sizes beyond their own bound, so HOST never gets a file that takes hours to read', async () => {
    const host = hostTree();
    const guest = copyOf(host);
    writeFileSync(join(guest, 'big-hole'), '');
    truncateSync(join(guest, 'big-hole'), GiB);
    const staged = await guestLeaves(host, guest);
    const before = treeDigest(host);
    await assert.rejects(syncBack(staged, { limits: { maxApparentBytes: BigInt(GiB / 2) } }), /file sizes exceed 536870912 bytes/);
    assert.equal(treeDigest(host), before);
  });
});
