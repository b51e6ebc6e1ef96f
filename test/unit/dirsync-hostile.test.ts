import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createServer } from 'node:net';
import {
  chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, renameSync,
  rmSync, statSync, symlinkSync, utimesSync, writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { MvmError } from '../../src/errors.js';
import {
  discardStaged, imageIsClean, parseAddDirSpec, stageAddDir, syncBack, treeDigest, treeManifest, uncleanReason, type StagedDir,
} from '../../src/dirsync/index.js';
import { Ext4Image, type Inode } from '../../src/dirsync/ext4.js';
import { readSymlinkTarget } from '../../src/dirsync/ext4-data.js';
import { scanImage, UntrustedImageError } from '../../src/dirsync/image-tree.js';
import { scratchTree } from './scratch.js';

const MiB = 1024 ** 2;
const { base, fresh } = scratchTree('dirsync-hostile-');
const state = join(base, 'state');

function hostTree(): string {
  const host = fresh('host');
  writeFileSync(join(host, 'keep.txt'), 'original\n');
  mkdirSync(join(host, 'sub'));
  writeFileSync(join(host, 'sub/inner.txt'), 'inner\n');
  return host;
}

async function stage(dir: string): Promise<StagedDir> {
  return stageAddDir(parseAddDirSpec(`${dir}:/work:rw`, base), state, { rwFreeBytes: 16 * MiB });
}

/** Stages `host`, then replaces its image with one built from `guestFinal` (the hostile guest's work). */
async function hostileRun(host: string, guestFinal: string): Promise<StagedDir> {
  const staged = await stage(host);
  const evil = await stage(guestFinal);
  await discardStaged(staged);
  return { ...staged, imagePath: evil.imagePath };
}

function debugfsW(image: string, ...cmds: string[]): void {
  execFileSync('debugfs', ['-w', '-f', '-', image], { input: cmds.join('\n'), stdio: ['pipe', 'ignore', 'ignore'] });
}

/**
 * Puts a `debugfs` first in PATH that appends every command script it is given to `log`, then runs
 * the real one: shows what sync-back hands to debugfs.
 */
function recordDebugfsScripts(log: string): () => void {
  const shim = fresh('shim');
  const real = execFileSync('sh', ['-c', 'command -v debugfs'], { encoding: 'utf8' }).trim();
  writeFileSync(
    join(shim, 'debugfs'),
    `#!/bin/sh\nprev=\nfor a; do [ "$prev" = -f ] && cat "$a" >> '${log}'; prev=$a; done\nexec '${real}' "$@"\n`,
    { mode: 0o755 },
  );
  const path = process.env.PATH;
  process.env.PATH = `${shim}:${path}`;
  return () => {
    process.env.PATH = path;
  };
}

/** Rewrites a name in the image's raw bytes: how a guest with the block device crafts what ext4 forbids. */
function patchName(image: string, from: string, to: string): void {
  assert.equal(Buffer.byteLength(from), Buffer.byteLength(to));
  const data = readFileSync(image);
  const at = data.indexOf(from);
  assert.ok(at >= 0 && data.indexOf(from, at + 1) < 0, `exactly one ${from} in the image`);
  data.write(to, at);
  writeFileSync(image, data);
}

async function assertDiscarded(staged: StagedDir, host: string, pattern: RegExp): Promise<void> {
  const before = treeDigest(host);
  await assert.rejects(syncBack(staged), (err: unknown) => {
    assert.ok(err instanceof MvmError);
    assert.ok(!err.message.includes('\n'));
    assert.match(err.message, /guest changes discarded/);
    assert.match(err.message, pattern);
    return true;
  });
  assert.equal(treeDigest(host), before, 'HOST untouched');
}

const limits = { maxEntries: 1000, maxBytes: 1n << 40n, maxApparentBytes: 1n << 40n, maxPathBytes: 4000 };

describe('hostile images', () => {
  it('drops setuid/setgid bits with a warning and never copies devices, FIFOs or sockets', async () => {
    const host = hostTree();
    writeFileSync(join(host, 'was-a-file'), 'host content\n');
    const guest = fresh('guest');
    execFileSync('cp', ['-a', `${host}/.`, guest]);
    writeFileSync(join(guest, 'suid'), '#!/bin/sh\n');
    execFileSync('chmod', ['4755', join(guest, 'suid')]);
    writeFileSync(join(guest, 'sgid'), '#!/bin/sh\n');
    execFileSync('chmod', ['2711', join(guest, 'sgid')]);
    const sock = createServer().listen(join(guest, 'sock'));
    await new Promise((r) => sock.once('listening', r));
    const staged = await hostileRun(host, guest);
    sock.close();
    rmSync(join(guest, 'sock'), { force: true });
    debugfsW(staged.imagePath, 'mknod null c 1 3', 'mknod disk b 8 0', 'mknod fifo p', 'rm was-a-file', 'mknod was-a-file p');
    const warnings: string[] = [];
    const report = await syncBack(staged, { warn: (l) => warnings.push(l) });
    assert.deepEqual(report.warnings, warnings);
    assert.equal(statSync(join(host, 'suid')).mode & 0o7777, 0o755);
    assert.equal(statSync(join(host, 'sgid')).mode & 0o7777, 0o711);
    for (const name of ['null', 'disk', 'fifo', 'sock']) assert.throws(() => lstatSync(join(host, name)), `${name} not created`);
    assert.equal(readFileSync(join(host, 'was-a-file'), 'utf8'), 'host content\n', 'a special file never replaces a host file');
    assert.equal(warnings.length, 7, warnings.join('\n'));
    for (const w of warnings) assert.ok(!w.includes('\n'));
  });

  it('never follows a symlink out of HOST, even with a crafted file "under" it', async () => {
    const host = hostTree();
    const outside = fresh('outside');
    const guest = fresh('guest');
    symlinkSync(outside, join(guest, 'x'));
    writeFileSync(join(guest, 'x_passwd'), 'root::0:0::/:/bin/sh\n');
    const staged = await hostileRun(host, guest);
    patchName(staged.imagePath, 'x_passwd', 'x/passwd');
    await assert.rejects(scanImage(staged.imagePath, fresh('scan'), limits), UntrustedImageError);
    await assertDiscarded(staged, host, /e2fsck|untrusted/);
    assert.deepEqual(readdirSync(outside), []);
  });

  it('rejects duplicate names (a symlink and a directory both called x)', async () => {
    const host = hostTree();
    const outside = fresh('outside');
    const guest = fresh('guest');
    symlinkSync(outside, join(guest, 'x'));
    mkdirSync(join(guest, 'y'));
    writeFileSync(join(guest, 'y/passwd'), 'evil\n');
    const staged = await hostileRun(host, guest);
    // Directory entries are 4-byte aligned: "x" and "y" sit in identical slots, so only the name changes.
    const data = readFileSync(staged.imagePath);
    const slot = Buffer.from([1, 2, 0x79]); // name_len 1, type dir, "y"
    const at = data.indexOf(slot);
    assert.ok(at >= 0);
    data[at + 2] = 0x78;
    writeFileSync(staged.imagePath, data);
    await assert.rejects(scanImage(staged.imagePath, fresh('scan'), limits), /duplicate name/);
    await assertDiscarded(staged, host, /e2fsck|untrusted/);
    assert.deepEqual(readdirSync(outside), []);
  });

  it('rejects ".." and names with a slash crafted into a directory', async () => {
    const host = hostTree();
    const guest = fresh('guest');
    writeFileSync(join(guest, 'zz'), 'escape\n');
    writeFileSync(join(guest, 'a_b_c_etc_passwd'), 'escape\n');
    const dotdot = await hostileRun(host, guest);
    patchName(dotdot.imagePath, 'zz', '..');
    await assert.rejects(scanImage(dotdot.imagePath, fresh('scan'), limits), /illegal file name/);
    await assertDiscarded(dotdot, host, /e2fsck|untrusted/);
    const slashes = await hostileRun(host, guest);
    patchName(slashes.imagePath, 'a_b_c_etc_passwd', '../../etc/passwd');
    await assert.rejects(scanImage(slashes.imagePath, fresh('scan'), limits), /illegal file name/);
    await assertDiscarded(slashes, host, /e2fsck|untrusted/);
  });

  it('copies symlinks as symlinks: one named like a host path, one replacing a host directory', async () => {
    const host = hostTree();
    const outside = fresh('outside');
    const guest = fresh('guest');
    writeFileSync(join(guest, 'keep.txt'), 'original\n');
    symlinkSync(outside, join(guest, 'sub')); // replaces HOST's directory sub/
    symlinkSync('/etc', join(guest, 'etc'));
    symlinkSync('/etc/passwd', join(guest, 'passwd'));
    const staged = await hostileRun(host, guest);
    const report = await syncBack(staged);
    assert.deepEqual(report.warnings, []);
    assert.equal(readlinkSync(join(host, 'sub')), outside);
    assert.equal(readlinkSync(join(host, 'etc')), '/etc');
    assert.equal(readlinkSync(join(host, 'passwd')), '/etc/passwd');
    assert.deepEqual(readdirSync(outside), [], 'deleting sub/ did not go through the new symlink');
  });

  it('creates guest symlinks itself, as symlinks, whatever their targets, and hands debugfs only inode numbers', async () => {
    const host = hostTree();
    const guest = fresh('guest');
    execFileSync('cp', ['-a', `${host}/.`, guest]);
    const escape = `../../../../tmp/x-${process.pid}`;
    const slowEscape = `${'../'.repeat(30)}tmp/x-${process.pid}`; // >= 60 bytes: kept in a data block, not the inode
    const longest = 'a/'.repeat(2047) + 'b'; // 4095 bytes, the most symlink(2) takes
    symlinkSync(escape, join(guest, 'fast'));
    symlinkSync(slowEscape, join(guest, 'slow'));
    symlinkSync(longest, join(guest, 'sub/longest'));
    const staged = await hostileRun(host, guest);
    const log = join(fresh('log'), 'debugfs.cmds');
    writeFileSync(log, '');
    const restore = recordDebugfsScripts(log);
    try {
      await syncBack(staged);
    } finally {
      restore();
    }
    assert.ok(lstatSync(join(host, 'fast')).isSymbolicLink());
    assert.equal(readlinkSync(join(host, 'fast')), escape);
    assert.equal(readlinkSync(join(host, 'slow')), slowEscape);
    assert.equal(readlinkSync(join(host, 'sub/longest')), longest);
    assert.ok(!existsSync(`/tmp/x-${process.pid}`), 'nothing written where a target points');
    const commands = readFileSync(log, 'utf8').split('\n').filter(Boolean);
    assert.ok(commands.length > 0);
    for (const cmd of commands) assert.match(cmd, /^dump <\d+> [\w./]+$/, 'by inode number into a name sync-back chose');
  });

  it('reads a symlink target as exactly i_size bytes of the inode, refusing NUL, overlong targets and changed inodes', async () => {
    const guest = fresh('guest');
    symlinkSync('abcdef', join(guest, 'link'));
    const staged = await stage(guest);
    const scan = async () => (await scanImage(staged.imagePath, fresh('scan'), limits)).entries.find((e) => e.rel.toString() === 'link')!.inode;
    const target = (scanned: Inode) => () => {
      const img = Ext4Image.open(staged.imagePath);
      try {
        return readSymlinkTarget(img, scanned).toString('latin1');
      } finally {
        img.close();
      }
    };
    const scanned = await scan();
    assert.equal(target(scanned)(), 'abcdef');
    // rdump strcpy()s i_block: it would stop at this NUL and make a different, shorter link.
    debugfsW(staged.imagePath, 'sif link block[0] 0x00636261');
    assert.throws(target(scanned), /NUL/);
    debugfsW(staged.imagePath, 'sif link block[0] 0x64636261', 'sif link size 4');
    assert.throws(target(scanned), /changed since/, 'the inode must still be what the scan saw');
    debugfsW(staged.imagePath, 'sif link size 5000');
    assert.throws(target(await scan()), /longer than 4095/);
    debugfsW(staged.imagePath, 'sif link size 6', 'sif link mode 0100644');
    assert.throws(target(scanned), /no longer a symlink/);
    await discardStaged(staged);
  });

  it('discards the changes when HOST was replaced after staging (by a symlink or another directory)', async () => {
    for (const replace of ['symlink', 'directory'] as const) {
      const host = hostTree();
      const staged = await stage(host);
      const moved = `${host}.moved`;
      renameSync(host, moved);
      const elsewhere = fresh('elsewhere');
      if (replace === 'symlink') symlinkSync(elsewhere, host);
      else mkdirSync(host);
      const before = [treeDigest(moved), treeDigest(elsewhere), treeDigest(host)];
      await assert.rejects(syncBack(staged), (err: unknown) => {
        assert.ok(err instanceof MvmError);
        assert.match(err.message, /guest changes discarded, .* left as it was: .*no longer the directory that was staged/);
        return true;
      });
      assert.deepEqual([treeDigest(moved), treeDigest(elsewhere), treeDigest(host)], before, `${replace}: nothing touched`);
      await discardStaged(staged);
    }
  });

  it('never hard-links a file reached through a symlink in HOST into the result', async () => {
    const host = hostTree();
    const outside = fresh('outside');
    const secret = join(outside, 'id_key');
    writeFileSync(secret, 'outside secret key\n');
    chmodSync(secret, 0o600);
    utimesSync(secret, 1_600_000_000, 1_600_000_000);
    symlinkSync(outside, join(host, 'd'));
    const guest = fresh('guest');
    execFileSync('cp', ['-a', `${host}/.`, guest]);
    rmSync(join(guest, 'd'));
    mkdirSync(join(guest, 'd'));
    // Same size, mode and mtime as the file behind HOST's symlink: what the shortcut compares.
    writeFileSync(join(guest, 'd/id_key'), 'guest-written key!\n');
    chmodSync(join(guest, 'd/id_key'), 0o600);
    utimesSync(join(guest, 'd/id_key'), 1_600_000_000, 1_600_000_000);
    await syncBack(await hostileRun(host, guest));
    assert.ok(lstatSync(join(host, 'd')).isDirectory());
    assert.equal(readFileSync(join(host, 'd/id_key'), 'utf8'), 'guest-written key!\n');
    assert.equal(statSync(secret).nlink, 1, 'the outside file gained no link into HOST');
    assert.equal(readFileSync(secret, 'utf8'), 'outside secret key\n');
  });

  it('replaces a host symlink with the guest directory instead of writing through it', async () => {
    const host = hostTree();
    const outside = fresh('outside');
    symlinkSync(outside, join(host, 'link'));
    const guest = fresh('guest');
    execFileSync('cp', ['-a', `${host}/.`, guest]);
    rmSync(join(guest, 'link'));
    mkdirSync(join(guest, 'link'));
    writeFileSync(join(guest, 'link/passwd'), 'evil\n');
    await syncBack(await hostileRun(host, guest));
    assert.ok(lstatSync(join(host, 'link')).isDirectory());
    assert.deepEqual(readdirSync(outside), []);
  });

  it('enforces limits on entries and bytes', async () => {
    const host = hostTree();
    const guest = fresh('guest');
    for (let i = 0; i < 50; i++) writeFileSync(join(guest, `f${i}`), 'x');
    const staged = await hostileRun(host, guest);
    const before = treeDigest(host);
    await assert.rejects(syncBack(staged, { limits: { maxEntries: 20 } }), /more than 20 entries/);
    await assert.rejects(syncBack(staged, { limits: { maxBytes: 10n } }), /exceed 10 bytes/);
    assert.equal(treeDigest(host), before);
  });

  it('discards an image that was not unmounted cleanly or is damaged', async () => {
    const host = hostTree();
    const cases: [string[], RegExp][] = [
      [['ssv state 0'], /not unmounted cleanly/],
      [['feature needs_recovery'], /needs recovery/],
      [['ssv state 3'], /recorded errors/],
      [['ssv last_orphan 12'], /orphan/],
      [['sif /keep.txt links_count 7'], /e2fsck/],
    ];
    for (const [cmds, pattern] of cases) {
      const staged = await stage(host);
      assert.ok(await imageIsClean(staged.imagePath));
      debugfsW(staged.imagePath, ...cmds);
      if (!/e2fsck/.test(pattern.source)) {
        assert.equal(await imageIsClean(staged.imagePath), false);
        assert.match((await uncleanReason(staged.imagePath))!, pattern);
      }
      await assertDiscarded(staged, host, pattern);
      await discardStaged(staged);
    }
  });

  it('leaves HOST exactly as it was when the sync fails part-way', async () => {
    const host = hostTree();
    const old = Buffer.alloc(MiB, 0x61);
    for (let i = 0; i < 20; i++) writeFileSync(join(host, `big${i}`), old);
    const guest = fresh('guest');
    const updated = Buffer.alloc(MiB + 1, 0x62);
    for (let i = 0; i < 20; i++) writeFileSync(join(guest, `big${i}`), updated);
    const staged = await hostileRun(host, guest);
    const before = treeManifest(host);
    let steps = 0;
    const failHalfWay = (index: number, total: number) => {
      steps = total;
      if (index === Math.floor(total / 2)) throw new Error('injected failure');
    };
    await assert.rejects(syncBack(staged, { onApplyStep: failHalfWay }), (err: unknown) => {
      assert.ok(err instanceof MvmError);
      assert.match(err.message, /left as it was: syncing back failed part-way \(injected failure\), and what had changed was rolled back/);
      return true;
    });
    assert.ok(steps >= 40, `20 files replaced, 2 entries deleted: ${steps} steps`);
    assert.deepEqual(treeManifest(host), before, 'HOST as it was, to the nanosecond');
    assert.deepEqual(readdirSync(host).filter((n) => n.startsWith('.')), [], 'no work dir left');
    assert.deepEqual(readdirSync(join(state, 'mvm/syncs')), [], 'no journal left');
  });
});
