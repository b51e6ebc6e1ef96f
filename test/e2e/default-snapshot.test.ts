// End to end: the default image's snapshot. `image build` takes it, exec restores it by default,
// every clone gets its own entropy and the host's clock, and a snapshot that no longer fits is
// retaken or skipped, never trusted.
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ensureDefaultImage } from '../../src/image/index.js';
import { assertNoVmLeft, isolatedEnv, mvmctl } from './helpers.js';

const isolated = isolatedEnv();
const cacheDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-snap-cache-'));
let env: NodeJS.ProcessEnv = {};
let imageDir = '';

after(() => {
  isolated.cleanup();
  rmSync(cacheDir, { recursive: true, force: true });
});

const restored = (stderr: string) => /\[timing\] restored from snapshot/.test(stderr);
const snapshotTarget = () => readlinkSync(join(imageDir, 'snapshot'));

describe('the default image snapshot', () => {
  before(async () => {
    // A private cache with the default kernel: only the initramfs and the snapshot are made here.
    const image = await ensureDefaultImage({});
    env = { ...isolated.env, MVM_CACHE_DIR: cacheDir, MVM_KERNEL: image.kernel };
    const built = await mvmctl(['image', 'build'], env);
    assert.equal(built.code, 0, built.stderr);
    imageDir = /^directory:\s+(\S+)$/m.exec(built.stdout.toString())![1]!;
    assert.match(built.stdout.toString(), /^snapshot:\s+taken .* under (TCG|KVM), 2 CPUs, 512 MiB/m);
  });

  test('exec restores it by default; --no-snapshot and other sizes boot cold, saying why with -v', async () => {
    const warm = await mvmctl(['exec', '-v', '--', 'sh', '-c', 'echo hi; exit 3'], env);
    assert.equal(warm.code, 3, warm.stderr);
    assert.equal(warm.stdout.toString(), 'hi\n');
    assert.ok(restored(warm.stderr), warm.stderr);
    const cold = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'true'], env);
    assert.equal(cold.code, 0);
    assert.ok(!restored(cold.stderr));
    assert.match(cold.stderr, /snapshot not used: --no-snapshot/);
    const small = await mvmctl(['exec', '-v', '--cpus', '1', '--', 'nproc'], env);
    assert.equal(small.stdout.toString(), '1\n');
    assert.match(small.stderr, /snapshot not used: it was taken with 2 CPUs and 512 MiB, this run asks for 1 and 512 MiB/);
    await assertNoVmLeft(isolated.stateDir);
  });

  test('concurrent clones each get their own random bytes and the host clock', async () => {
    const runs = await Promise.all(
      [0, 1, 2, 3].map(() => mvmctl(['exec', '-v', '--', 'sh', '-c', 'head -c 16 /dev/urandom | od -An -tx1; date +%s'], env)),
    );
    for (const run of runs) assert.ok(restored(run.stderr), run.stderr);
    const outputs = runs.map((run) => run.stdout.toString().trim().split('\n'));
    assert.equal(new Set(outputs.map((lines) => lines[0])).size, 4, 'no two clones share random bytes');
    for (const lines of outputs) assert.ok(Math.abs(Number(lines.at(-1)) - Date.now() / 1000) < 120, `guest clock ${lines.at(-1)} is the host's`);
    await assertNoVmLeft(isolated.stateDir);
  });

  test('--add-dir restores too: the images take drive slots, ro stays ro at the host, rw syncs back', async () => {
    const ro = mkdtempSync(join(tmpdir(), 'mvm-e2e-slot-ro-'));
    const rw = mkdtempSync(join(tmpdir(), 'mvm-e2e-slot-rw-'));
    try {
      writeFileSync(join(ro, 'keep.txt'), 'original\n');
      writeFileSync(join(rw, 'old.txt'), 'old\n');
      const script = [
        'cat /data/keep.txt',
        'echo x > /data/keep.txt && echo WROTE',
        'mount -o remount,rw /data && echo REMOUNTED',
        'echo y > /data/new && sync && echo WROTE2',
        'echo made > /work/new.txt',
        'rm /work/old.txt',
      ].join('; ');
      const result = await mvmctl(['exec', '-v', '--add-dir', `${ro}:/data:ro`, '--add-dir', `${rw}:/work:rw`, '--', 'sh', '-c', script], env);
      assert.equal(result.code, 0, result.stderr);
      assert.ok(restored(result.stderr), result.stderr);
      assert.equal(result.stdout.toString(), 'original\n', 'no write to the ro directory succeeded, as root, even after a remount');
      assert.deepEqual(readdirSync(ro), ['keep.txt']);
      assert.equal(readFileSync(join(ro, 'keep.txt'), 'utf8'), 'original\n');
      assert.deepEqual(readdirSync(rw), ['new.txt']);
      assert.equal(readFileSync(join(rw, 'new.txt'), 'utf8'), 'made\n');
    } finally {
      rmSync(ro, { recursive: true, force: true });
      rmSync(rw, { recursive: true, force: true });
    }
    const small = mkdtempSync(join(tmpdir(), 'mvm-e2e-slot-small-'));
    const tooMany = ['a', 'b', 'c', 'd', 'e'].map((name) => ['--add-dir', `${small}:/m/${name}:ro`]).flat();
    const cold = await mvmctl(['exec', '-v', ...tooMany, '--', 'true'], env);
    rmSync(small, { recursive: true, force: true });
    assert.equal(cold.code, 0, cold.stderr);
    assert.match(cold.stderr, /snapshot not used: it has 4 drive slots for --add-dir, this run needs 5/);
    await assertNoVmLeft(isolated.stateDir);
  });

  test('a damaged snapshot is never restored: exec takes a new one and runs the command', async () => {
    const before = snapshotTarget();
    truncateSync(join(imageDir, before, 'state'), 100);
    const result = await mvmctl(['exec', '-v', '--', 'echo', 'still works'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'still works\n');
    assert.ok(restored(result.stderr), 'restored from the new snapshot');
    assert.notEqual(snapshotTarget(), before);
    assert.deepEqual(readdirSync(imageDir).filter((entry) => entry.startsWith('snap-')), [snapshotTarget()], 'the old snapshot is gone');
    await assertNoVmLeft(isolated.stateDir);
  });

  test('image build --force rebuilds the initramfs and retakes the snapshot', async () => {
    const before = snapshotTarget();
    const rebuilt = await mvmctl(['image', 'build', '--force'], env);
    assert.equal(rebuilt.code, 0, rebuilt.stderr);
    assert.notEqual(snapshotTarget(), before);
    const result = await mvmctl(['exec', '-v', '--', 'true'], env);
    assert.ok(restored(result.stderr), result.stderr);
  });
});
