import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  chmodSync, linkSync, mkdirSync, readFileSync, renameSync, rmSync, statSync,
  symlinkSync, truncateSync, unlinkSync, utimesSync, writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import {
  discardStaged, imageIsClean, parseAddDirSpec, stageAddDir, syncBack, treeManifest, type StagedDir,
} from '../../src/dirsync/index.js';
import { Ext4Image } from '../../src/dirsync/ext4.js';
import { utimeArg } from '../../src/dirsync/host-ops.js';
import { joinRel, walkHost } from '../../src/dirsync/host-tree.js';
import { scratchTree } from './scratch.js';

const MiB = 1024 ** 2;
const { base } = scratchTree('dirsync-rt-');
const state = join(base, 'state');
let counter = 0;
/** A host tree with every kind of thing the guest must see, with nanosecond mtimes. */
function hostTree(): string {
  const root = join(base, `host${counter++}`);
  mkdirSync(join(root, 'empty dir'), { recursive: true });
  mkdirSync(join(root, 'deep/a/b/c/d/e'), { recursive: true });
  writeFileSync(join(root, 'deep/a/b/c/d/e/leaf.txt'), 'leaf\n');
  writeFileSync(join(root, 'plain.txt'), 'hello\n');
  writeFileSync(join(root, 'exec.sh'), '#!/bin/sh\necho hi\n');
  chmodSync(join(root, 'exec.sh'), 0o751);
  writeFileSync(join(root, 'ünï cødé 名前.txt'), 'unicode\n');
  writeFileSync(Buffer.concat([Buffer.from(join(root, 'bad-')), Buffer.from([0xff, 0xfe])]), 'not utf-8 name\n');
  linkSync(join(root, 'plain.txt'), join(root, 'deep/hardlink.txt'));
  symlinkSync('plain.txt', join(root, 'rel-link'));
  symlinkSync('/etc/hostname', join(root, 'abs-link'));
  symlinkSync('does/not/exist', join(root, 'dangling'));
  writeFileSync(join(root, 'sparse.bin'), '');
  truncateSync(join(root, 'sparse.bin'), 64 * MiB);
  writeFileSync(join(root, 'setuid-tool'), 'pretend binary');
  chmodSync(join(root, 'setuid-tool'), 0o4755);
  writeFileSync(join(root, 'private'), 'secret');
  chmodSync(join(root, 'private'), 0o600);
  chmodSync(join(root, 'deep/a'), 0o750);
  execFileSync('mkfifo', [join(root, 'fifo')]);
  let t = 1_600_000_000;
  for (const { rel, stat } of walkHost(root)) {
    if (stat.isSymbolicLink()) continue;
    const when = t++ + 0.123456;
    utimesSync(joinRel(root, rel), when, when);
  }
  execFileSync('touch', ['-h', '-d', '@1500000000.987654321', join(root, 'rel-link')]);
  execFileSync('touch', ['-d', '@1500000001.111111111', root]);
  return root;
}

async function stage(host: string, mode: 'ro' | 'rw', rwFreeBytes = 64 * MiB): Promise<StagedDir> {
  return stageAddDir(parseAddDirSpec(`${host}:/work:${mode}`, base), state, { rwFreeBytes });
}

/** The guest's final state as an image: built from a directory, as if the guest had edited HOST into it. */
async function guestLeaves(staged: StagedDir, finalTree: string): Promise<StagedDir> {
  const final = await stage(finalTree, 'rw');
  return { ...staged, imagePath: final.imagePath };
}

function allocated(path: string): number {
  return statSync(path).blocks * 512;
}

describe('stageAddDir', () => {
  it('copies files, modes, ns mtimes, links, empty dirs, sparse files and odd names into the image', async () => {
    const host = hostTree();
    const staged = await stage(host, 'ro');
    assert.equal(staged.readOnly, true);
    assert.ok(await imageIsClean(staged.imagePath));
    // What the guest would see, read back independently with debugfs rdump.
    const out = join(base, 'rdump');
    mkdirSync(out);
    execFileSync('debugfs', ['-R', `rdump / ${out}`, staged.imagePath], { stdio: 'ignore' });
    const listing = execFileSync('debugfs', ['-R', 'ls -p /', staged.imagePath], { encoding: 'latin1', stdio: ['ignore', 'pipe', 'ignore'] });
    assert.ok(!listing.includes('lost+found'), 'no lost+found the host never had');
    assert.match(listing, /\/010644\/\d+\/\d+\/fifo\//, 'FIFO present');
    const stat = execFileSync('debugfs', ['-R', 'stat /plain.txt', staged.imagePath], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    assert.match(stat, /Links: 2/);
    const ns = Number(BigInt(statSync(join(host, 'plain.txt'), { bigint: true }).mtimeNs % 1_000_000_000n));
    const extra = Number.parseInt(/ mtime: 0x[0-9a-f]+:([0-9a-f]+)/.exec(stat)![1]!, 16);
    assert.equal(extra >>> 2, ns, 'nanoseconds of mtime kept');
    const root = execFileSync('debugfs', ['-R', 'stat /', staged.imagePath], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    assert.match(root, / mtime: 0x59682f01:/, 'root mtime comes from HOST');
    assert.equal(readFileSync(join(out, 'ünï cødé 名前.txt'), 'utf8'), 'unicode\n');
    assert.equal(statSync(join(out, 'sparse.bin')).size, 64 * MiB);
    await discardStaged(staged);
  });

  it('makes rw images sparse with at least rwFreeBytes free', async () => {
    const host = hostTree();
    const staged = await stage(host, 'rw', 1024 * MiB);
    assert.equal(staged.readOnly, false);
    const img = Ext4Image.open(staged.imagePath);
    const free = Number(img.sb.freeBlocks) * img.sb.blockSize;
    img.close();
    assert.ok(free >= 1024 * MiB, `free ${free}`);
    assert.ok(staged.imageBytes > 1024 * MiB);
    assert.ok(allocated(staged.imagePath) < staged.imageBytes / 50, `allocated ${allocated(staged.imagePath)} of ${staged.imageBytes}`);
    await discardStaged(staged);
  });
});

describe('utimeArg', () => {
  it('makes Node set exactly the time given, to the microsecond, before 1970 too', () => {
    const file = join(base, 'times');
    writeFileSync(file, '');
    const samples = [0n, 999n, 1000n, -1n, -1001n, -1_000_000_000n, 1_796_297_567_372_000_050n, 4_102_444_800_999_999_999n];
    for (let i = 0; i < 2000; i++) samples.push(BigInt(Math.floor(Math.random() * 4e9) - 1e9) * 1_000_000_000n + BigInt(Math.floor(Math.random() * 1e9)));
    for (const ns of samples) {
      utimesSync(file, utimeArg(ns), utimeArg(ns));
      const micros = ns / 1000n - (ns % 1000n < 0n ? 1n : 0n);
      assert.equal(statSync(file, { bigint: true }).mtimeNs, micros * 1000n, `${ns} ns`);
    }
  });
});

describe('syncBack', () => {
  it('leaves HOST byte-identical when the guest changed nothing', async () => {
    const host = hostTree();
    const before = treeManifest(host);
    const staged = await stage(host, 'rw');
    const report = await syncBack(staged);
    assert.deepEqual(treeManifest(host), before);
    assert.deepEqual(report.warnings, []);
    assert.equal(report.filesWritten, 0);
    assert.equal(report.deleted, 0);
    await discardStaged(staged);
  });

  it('brings back create, modify, delete, rename, chmod, symlink, hardlink, deep trees, 1000 files and a 100 MB file', async () => {
    const host = hostTree();
    const staged = await stage(host, 'rw');
    const final = join(base, `final${counter++}`);
    execFileSync('cp', ['-a', host, final]);
    writeFileSync(join(final, 'new.txt'), 'created in guest\n');
    writeFileSync(join(final, 'plain.txt'), 'modified (the hard link sees it too)\n');
    unlinkSync(join(final, 'private'));
    renameSync(join(final, 'exec.sh'), join(final, 'renamed.sh'));
    chmodSync(join(final, 'renamed.sh'), 0o700);
    symlinkSync('../new.txt', join(final, 'empty dir/new-link'));
    linkSync(join(final, 'new.txt'), join(final, 'new-hardlink.txt'));
    rmSync(join(final, 'deep/a/b'), { recursive: true });
    mkdirSync(join(final, 'tree/1/2/3/4/5/6/7/8/9'), { recursive: true });
    writeFileSync(join(final, 'tree/1/2/3/4/5/6/7/8/9/bottom'), 'deep');
    for (let i = 0; i < 1000; i++) {
      mkdirSync(join(final, 'many', `d${i % 10}`), { recursive: true });
      writeFileSync(join(final, 'many', `d${i % 10}`, `f${i}`), `file ${i}\n`);
    }
    const big = Buffer.alloc(100 * MiB);
    for (let i = 0; i < big.length; i += 4096) big.writeUInt32LE(i, i);
    writeFileSync(join(final, 'big.bin'), big);
    writeFileSync(join(final, 'guest-sparse.bin'), 'x');
    truncateSync(join(final, 'guest-sparse.bin'), 32 * MiB);
    rmSync(join(final, 'fifo'));

    const synced = await guestLeaves(staged, final);
    const report = await syncBack(synced);
    // Mtimes compare to the µs: Node sets file times no finer.
    assert.deepEqual(treeManifest(host, { mtime: 'us' }), treeManifest(final, { mtime: 'us' }));
    assert.equal(statSync(join(host, 'plain.txt')).ino, statSync(join(host, 'deep/hardlink.txt')).ino);
    assert.equal(statSync(join(host, 'new.txt')).ino, statSync(join(host, 'new-hardlink.txt')).ino);
    assert.ok(allocated(join(host, 'guest-sparse.bin')) < MiB, 'a sparse file stays sparse');
    assert.ok(report.filesWritten >= 1003);
    assert.ok(report.deleted >= 2);
    await discardStaged(staged);
    await discardStaged({ ...staged, imagePath: synced.imagePath });
  });

  it('brings back changes made with debugfs -w, the way a guest kernel would leave them', async () => {
    const host = hostTree();
    const staged = await stage(host, 'rw');
    const src = join(base, 'payload');
    writeFileSync(src, 'written by the guest\n');
    const cmds = [
      `write ${src} fresh.txt`,
      'mkdir newdir',
      'symlink newdir/link ../fresh.txt',
      'rm plain.txt',
      'sif exec.sh mode 0100600',
      'sif fresh.txt uid 4242',
      'sif fresh.txt mtime @1234567890',
      `write ${src} old.txt`,
      'sif old.txt mtime @-100000',
      'sif old.txt mtime_extra 4000',
    ];
    execFileSync('debugfs', ['-w', '-f', '-', staged.imagePath], { input: cmds.join('\n'), stdio: ['pipe', 'ignore', 'ignore'] });
    await syncBack(staged);
    assert.equal(readFileSync(join(host, 'fresh.txt'), 'utf8'), 'written by the guest\n');
    assert.equal(statSync(join(host, 'fresh.txt')).uid, process.getuid!(), 'owned by the invoking user, not the guest uid');
    assert.equal(statSync(join(host, 'fresh.txt')).mtimeMs, 1234567890_000);
    assert.equal(statSync(join(host, 'old.txt'), { bigint: true }).mtimeNs, -100_000_000_000_000n + 1000n, 'a time before 1970 kept');
    assert.equal(statSync(join(host, 'exec.sh')).mode & 0o7777, 0o600);
    assert.equal(execFileSync('readlink', [join(host, 'newdir/link')], { encoding: 'utf8' }).trim(), '../fresh.txt');
    assert.equal(readFileSync(join(host, 'deep/hardlink.txt'), 'utf8'), 'hello\n', 'the other name of a removed hard link stays');
    assert.throws(() => statSync(join(host, 'plain.txt')));
    await discardStaged(staged);
  });
});
