import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import {
  chmodSync, linkSync, lstatSync, lutimesSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync,
  rmdirSync, symlinkSync, utimesSync, writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { MvmError } from '../../src/errors.js';
import {
  parseAddDirSpec, recoverInterruptedSyncs, stageAddDir, syncBack, treeDigest, treeManifest, type StagedDir, type SyncOptions,
} from '../../src/dirsync/index.js';
import { joinRel, walkHost } from '../../src/dirsync/host-tree.js';
import { scratchTree } from './scratch.js';

const MiB = 1024 ** 2;
const { base, stateDir, fresh } = scratchTree('dirsync-interrupt-');
const staging = join(base, 'staging');
mkdirSync(staging);
const syncs = join(stateDir, 'syncs');
let counter = 0;

/** HOST before the run: fixed contents and nanosecond mtimes, so every copy of it is identical. */
function pristineTree(): string {
  const root = fresh('pristine');
  writeFileSync(join(root, 'keep.txt'), 'kept\n');
  writeFileSync(join(root, 'change.txt'), 'before\n');
  writeFileSync(join(root, 'gone.txt'), 'removed by the guest\n');
  mkdirSync(join(root, 'gone-dir/inner'), { recursive: true });
  writeFileSync(join(root, 'gone-dir/inner/f'), 'x');
  mkdirSync(join(root, 'dir2file'));
  writeFileSync(join(root, 'dir2file/child'), 'child\n');
  writeFileSync(join(root, 'file2dir'), 'a file before\n');
  symlinkSync('keep.txt', join(root, 'link'));
  mkdirSync(join(root, 'sub'));
  chmodSync(join(root, 'sub'), 0o755);
  writeFileSync(join(root, 'sub/inner.txt'), 'inner before\n');
  writeFileSync(join(root, 'sub/hard-a'), 'linked\n');
  linkSync(join(root, 'sub/hard-a'), join(root, 'hard-b'));
  mkdirSync(join(root, 'ro-gone'));
  writeFileSync(join(root, 'ro-gone/f'), 'x');
  chmodSync(join(root, 'ro-gone'), 0o555);
  execFileSync('mkfifo', [join(root, 'fifo')]);
  let t = 1_600_000_000;
  for (const { rel, stat } of walkHost(root).reverse()) {
    const when = t++ + 0.5;
    (stat.isSymbolicLink() ? lutimesSync : utimesSync)(joinRel(root, rel), when, when);
  }
  execFileSync('touch', ['-d', '@1500000001.111111111', root]);
  return root;
}

/** The guest's final tree: new, changed and deleted files, dir→file and file→dir, a retargeted symlink, hard links made and broken. */
function guestFinal(pristine: string): string {
  const final = join(base, `guest-final${counter++}`);
  execFileSync('cp', ['-a', pristine, final]);
  writeFileSync(join(final, 'change.txt'), 'after, and longer\n');
  rmSync(join(final, 'gone.txt'));
  rmSync(join(final, 'gone-dir'), { recursive: true });
  rmSync(join(final, 'dir2file'), { recursive: true });
  writeFileSync(join(final, 'dir2file'), 'now a file\n');
  rmSync(join(final, 'file2dir'));
  mkdirSync(join(final, 'file2dir'));
  writeFileSync(join(final, 'file2dir/a'), 'in a new directory\n');
  linkSync(join(final, 'file2dir/a'), join(final, 'new-hard'));
  rmSync(join(final, 'link'));
  symlinkSync('change.txt', join(final, 'link'));
  writeFileSync(join(final, 'sub/inner.txt'), 'inner after\n');
  chmodSync(join(final, 'sub'), 0o700);
  linkSync(join(final, 'keep.txt'), join(final, 'sub/keep-link'));
  rmSync(join(final, 'hard-b'));
  writeFileSync(join(final, 'hard-b'), 'no longer linked\n');
  writeFileSync(join(final, 'new.txt'), 'created in the guest\n');
  execFileSync('touch', ['-d', '@1600000000.123456789', join(final, 'new.txt')]);
  mkdirSync(join(final, 'newdir/deep'), { recursive: true });
  writeFileSync(join(final, 'newdir/deep/x'), 'deep\n');
  symlinkSync('newdir', join(final, 'newlink'));
  mkdirSync(join(final, 'ro-new'));
  writeFileSync(join(final, 'ro-new/f'), 'in a read-only directory\n');
  chmodSync(join(final, 'ro-new'), 0o555);
  chmodSync(join(final, 'ro-gone'), 0o755);
  rmSync(join(final, 'ro-gone'), { recursive: true });
  return final;
}

const jsonWithBigints = (value: unknown) => JSON.stringify(value, (_, v: unknown) => (typeof v === 'bigint' ? String(v) : v));

let pristine: string;
let guestImage: StagedDir;
let beforeState: string[];
let syncedState: string[];
let totalSteps = 0;

/** A fresh copy of the pristine HOST, staged with the guest's image (the image is only read, so all runs share it). */
function freshRun(): { host: string; staged: StagedDir } {
  const host = join(base, `run-host${counter++}`);
  execFileSync('cp', ['-a', pristine, host]);
  const st = lstatSync(host, { bigint: true });
  const staged = { ...guestImage, spec: parseAddDirSpec(`${host}:/work:rw`, base), hostIdentity: { dev: st.dev, ino: st.ino } };
  return { host, staged };
}

/** Runs syncBack in a child process that SIGKILLs itself right before apply step `step`: a real kill, at a chosen point. */
function syncKilledAt(staged: StagedDir, step: number): void {
  const child = `
    const [moduleUrl, stagedJson, step] = process.argv.slice(1);
    const { syncBack } = await import(moduleUrl);
    const staged = JSON.parse(stagedJson, (key, v) => (key === 'dev' || key === 'ino' ? BigInt(v) : v));
    await syncBack(staged, { onApplyStep: (index) => { if (index === Number(step)) process.kill(process.pid, 'SIGKILL'); } });
  `;
  const moduleUrl = new URL('../../src/dirsync/index.js', import.meta.url).href;
  const res = spawnSync(process.execPath, ['--input-type=module', '-e', child, moduleUrl, jsonWithBigints(staged), String(step)], {
    encoding: 'utf8',
  });
  assert.equal(res.signal, 'SIGKILL', `killed at step ${step}: ${res.stderr}`);
}

async function recover(): Promise<string[]> {
  const lines: string[] = [];
  await recoverInterruptedSyncs((line) => lines.push(line));
  return lines;
}

function assertNoLeftovers(host: string): void {
  assert.deepEqual(readdirSync(host).filter((n) => n.startsWith('.mvm-sync-')), [], 'no work dir left in HOST');
  assert.deepEqual(readdirSync(syncs), [], 'no journal left');
}

describe('a sync-back interrupted part-way', () => {
  before(async () => {
    pristine = pristineTree();
    const final = guestFinal(pristine);
    guestImage = await stageAddDir(parseAddDirSpec(`${final}:/work:rw`, base), staging, { rwFreeBytes: 16 * MiB });
    beforeState = treeManifest(pristine);

    // The reference: one uninterrupted sync, which also shows the journal is on disk before the first step.
    const { host, staged } = freshRun();
    assert.deepEqual(treeManifest(host), beforeState, 'a copy of HOST is identical to it');
    const onApplyStep: SyncOptions['onApplyStep'] = (index, steps) => {
      totalSteps = steps;
      if (index > 0) return;
      const [name, ...others] = readdirSync(syncs);
      assert.deepEqual(others, []);
      const journal = JSON.parse(readFileSync(join(syncs, name!), 'utf8'));
      assert.equal(journal.state, 'applying');
      assert.equal(journal.host, host);
      assert.equal(journal.hostIno, String(staged.hostIdentity.ino));
      assert.equal(journal.steps.length, steps);
      assert.equal(readFileSync(join(host, 'change.txt'), 'utf8'), 'before\n', 'nothing renamed yet');
    };
    const report = await syncBack(staged, { onApplyStep });
    syncedState = treeManifest(host);
    assert.deepEqual(treeManifest(host, { mtime: 'us' }), treeManifest(final, { mtime: 'us' }), 'the guest tree, fifo kept');
    assert.equal(lstatSync(join(host, 'keep.txt')).ino, lstatSync(join(host, 'sub/keep-link')).ino, 'hard link made');
    assert.equal(lstatSync(join(host, 'file2dir/a')).ino, lstatSync(join(host, 'new-hard')).ino, 'hard link across a new directory');
    assert.notEqual(lstatSync(join(host, 'sub/hard-a')).ino, lstatSync(join(host, 'hard-b')).ino, 'hard link broken');
    assert.equal(report.deleted, 3, 'gone.txt, gone-dir and ro-gone');
    assert.ok(totalSteps >= 25, `${totalSteps} steps`);
    assertNoLeftovers(host);
  });

  it('is rolled back in-process when any step fails: HOST exactly as before, for every step', async () => {
    for (let k = 0; k < totalSteps; k++) {
      const { host, staged } = freshRun();
      const failAt = (index: number) => {
        if (index === k) throw new Error(`injected failure at step ${k}`);
      };
      await assert.rejects(syncBack(staged, { onApplyStep: failAt }), (err: unknown) => {
        assert.ok(err instanceof MvmError);
        assert.match(err.message, new RegExp(`guest changes discarded, ${host} left as it was: .*injected failure at step ${k}.*rolled back`));
        return true;
      });
      assert.deepEqual(treeManifest(host), beforeState, `failed at step ${k}`);
      assertNoLeftovers(host);
    }
  });

  it('is rolled back, or completed once committed, by the next run after a SIGKILL at any step', async () => {
    for (let k = 0; k <= totalSteps; k++) {
      const { host, staged } = freshRun();
      syncKilledAt(staged, k);
      assert.equal(readdirSync(syncs).length, 1, 'the killed run left its journal');
      const lines = await recover();
      const committed = k === totalSteps;
      assert.deepEqual(
        lines,
        [
          committed
            ? `--add-dir: an interrupted sync-back into ${host} was completed`
            : `--add-dir: an interrupted sync-back into ${host} was rolled back; ${host} is as it was before that run`,
        ],
        `killed at step ${k}`,
      );
      assert.deepEqual(treeManifest(host), committed ? syncedState : beforeState, `killed at step ${k}`);
      assertNoLeftovers(host);
      assert.deepEqual(await recover(), [], 'recovered once: the next run has nothing to say');
    }
  });

  it('cleans up a run killed while it was still extracting, before any step', async () => {
    const { host, staged } = freshRun();
    syncKilledAt(staged, 0);
    // At step 0 nothing is renamed yet: as a journal of the extraction phase it names only the work dir.
    const [name] = readdirSync(syncs);
    const journal = JSON.parse(readFileSync(join(syncs, name!), 'utf8'));
    writeFileSync(join(syncs, name!), JSON.stringify({ ...journal, state: 'preparing', steps: [], dirTimes: journal.dirTimes.slice(0, 1) }));
    assert.equal(readdirSync(host).filter((n) => n.startsWith('.mvm-sync-')).length, 1);
    assert.match((await recover()).join('\n'), /was rolled back/);
    assert.deepEqual(treeManifest(host), beforeState);
    assertNoLeftovers(host);
  });

  it('leaves a journal alone while its process lives, and when its HOST has been replaced', async () => {
    const { host, staged } = freshRun();
    syncKilledAt(staged, Math.floor(totalSteps / 2));
    const [name] = readdirSync(syncs);
    const journalPath = join(syncs, name!);
    const journal = readFileSync(journalPath, 'utf8');

    const startTicks = Number(readFileSync(`/proc/${process.pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[19]);
    writeFileSync(journalPath, JSON.stringify({ ...JSON.parse(journal), pid: process.pid, startTicks }));
    assert.deepEqual(await recover(), [], 'a live owner is still at work');
    writeFileSync(journalPath, journal);

    const moved = `${host}.moved`;
    renameSync(host, moved);
    mkdirSync(host);
    const untouched = [treeDigest(moved), treeDigest(host)];
    assert.deepEqual(await recover(), [
      `--add-dir: an interrupted sync-back into ${host} was left alone: ${host} is no longer the directory it was syncing into; its journal ${journalPath} is kept`,
    ]);
    assert.deepEqual([treeDigest(moved), treeDigest(host)], untouched, 'neither directory touched');
    assert.equal(readFileSync(journalPath, 'utf8'), journal);

    rmdirSync(host);
    renameSync(moved, host);
    assert.match((await recover()).join('\n'), /was rolled back/);
    assert.deepEqual(treeManifest(host), beforeState);
    assertNoLeftovers(host);
  });

  it('never takes a top-level .mvm-sync-* entry from the image, nor touches HOST\'s own', async () => {
    const host = fresh('host');
    writeFileSync(join(host, '.mvm-sync-mine'), 'the user\'s own file\n');
    writeFileSync(join(host, 'a.txt'), 'before\n');
    const final = fresh('final');
    execFileSync('cp', ['-a', `${host}/.`, final]);
    writeFileSync(join(final, '.mvm-sync-mine'), 'changed by the guest\n');
    mkdirSync(join(final, '.mvm-sync-x'));
    writeFileSync(join(final, '.mvm-sync-x/passwd'), 'planted\n');
    writeFileSync(join(final, '.mvm-sync-0123456789abcdef'), 'a work dir name\n');
    writeFileSync(join(final, 'a.txt'), 'after\n');
    const image = await stageAddDir(parseAddDirSpec(`${final}:/work:rw`, base), staging, { rwFreeBytes: 16 * MiB });
    const st = lstatSync(host, { bigint: true });
    const staged = { ...image, spec: parseAddDirSpec(`${host}:/work:rw`, base), hostIdentity: { dev: st.dev, ino: st.ino } };
    let workDirs: string[] = [];
    const report = await syncBack(staged, {
      onApplyStep: (index) => {
        if (index === 0) workDirs = readdirSync(host).filter((n) => n.startsWith('.mvm-sync-') && n !== '.mvm-sync-mine');
      },
    });
    assert.equal(workDirs.length, 1);
    assert.match(workDirs[0]!, /^\.mvm-sync-[0-9a-f]{16}$/);
    assert.ok(!['.mvm-sync-x', '.mvm-sync-0123456789abcdef'].includes(workDirs[0]!));
    assert.deepEqual([...report.warnings].sort(), [
      '".mvm-sync-0123456789abcdef": name reserved for sync-back\'s work directory, not copied to the host',
      '".mvm-sync-x": name reserved for sync-back\'s work directory, not copied to the host',
    ]);
    assert.deepEqual(readdirSync(host).sort(), ['.mvm-sync-mine', 'a.txt']);
    assert.equal(readFileSync(join(host, '.mvm-sync-mine'), 'utf8'), 'the user\'s own file\n');
    assert.equal(readFileSync(join(host, 'a.txt'), 'utf8'), 'after\n');
    assert.deepEqual(readdirSync(syncs), []);
  });
});
