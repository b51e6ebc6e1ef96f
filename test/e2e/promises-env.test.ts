// End to end: README promises about the default image's cache and the lines mvmctl prints while it
// builds (on a terminal, with -v, quiet otherwise), and a rw --add-dir that is not synced back after
// SIGTERM or an unclean unmount. Each test fails when its promise breaks. Templates' defaults,
// rebuilds and killed builds are in promises-templates.test.ts.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { treeDigest } from '../../src/dirsync/index.js';
import { ensureDefaultImage } from '../../src/image/index.js';
import { findExecutable } from '../../src/which.js';
import { assertNoVmLeft, collect, isolatedEnv, mvmctl, mvmctlBin, startMvmctl, waitForOutput, type RunResult } from './helpers.js';

const isolated = isolatedEnv();
const { stateDir } = isolated;
// A private, empty cache: the first exec builds the image here. The kernel is the shared cache's
// (MVM_KERNEL), so no kernel build ever runs; only the initramfs and the snapshot are made here.
const cacheDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-env-cache-'));
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-env-'));
let env: NodeJS.ProcessEnv = {};

after(() => {
  isolated.cleanup();
  rmSync(cacheDir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

before(async () => {
  const image = await ensureDefaultImage({});
  // The QEMU backend under whatever accelerator auto picks; the TCG warning stays hidden (isolatedEnv).
  env = { ...isolated.env, MVM_CACHE_DIR: cacheDir, MVM_KERNEL: image.kernel };
  for (const name of ['MVM_BACKEND', 'MVM_ACCEL', 'MVM_KVM_PRECHECK', 'MVM_FIRECRACKER', 'MVM_QEMU', 'MVM_BOOT_TIMEOUT', 'MVM_QEMU_VSOCK']) delete env[name];
});

const lines = (text: string | Buffer) => text.toString().split('\n').filter((line) => line !== '');
const restored = (stderr: string) => /\[timing\] restored from snapshot/.test(stderr);
const imageRoot = () => join(cacheDir, 'default-microvm');

/** The image directory the cache's manifest names, and its initramfs and snapshot. */
function currentImage(): { dir: string; initramfs: { ino: number; mtimeMs: number }; snapshot: string | undefined } {
  const ids = readdirSync(imageRoot()).filter((entry) => /^[0-9a-f]{64}$/.test(entry));
  assert.equal(ids.length, 1, `one image directory in ${imageRoot()}: ${ids.join(', ')}`);
  const dir = join(imageRoot(), ids[0]!);
  const { ino, mtimeMs } = statSync(join(dir, 'initramfs.cpio'));
  return { dir, initramfs: { ino, mtimeMs }, snapshot: existsSync(join(dir, 'snapshot')) ? readlinkSync(join(dir, 'snapshot')) : undefined };
}

let imageBuilt: Promise<void> | undefined;
/** The image and its snapshot in the private cache (made by the first-use test when it ran first). */
function imageReady(): Promise<void> {
  imageBuilt ??= mvmctl(['image', 'build'], env).then((built) => assert.equal(built.code, 0, built.stderr));
  return imageBuilt;
}

const shellQuote = (word: string) => `'${word.replace(/'/g, `'\\''`)}'`;

/** Runs mvmctl with a pseudo-terminal as its stdin, stdout and stderr (util-linux `script`); the terminal's lines, CRs removed. */
function onTerminal(args: string[]): Promise<{ code: number | null; lines: string[] }> {
  const command = [mvmctlBin, ...args].map(shellQuote).join(' ');
  const child = spawn('script', ['-q', '-e', '-c', command, '/dev/null'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  return collect(child).then((result: RunResult) => ({
    code: result.code,
    lines: lines(result.stdout.toString().replace(/\r/g, '') + result.stderr),
  }));
}

describe('the default image: built on first use, rebuilt by --force, progress lines only where someone watches', () => {
  // Must run before anything else builds in the private cache.
  test('exec in an empty MVM_CACHE_DIR builds the image and its snapshot there, printing progress lines on a terminal', {
    skip: findExecutable('script') ? false : 'util-linux script (to give mvmctl a terminal) is not installed',
  }, async () => {
    assert.deepEqual(readdirSync(cacheDir), [], 'the cache starts empty');
    const run = await onTerminal(['exec', '--', 'echo', 'first use']);
    assert.equal(run.code, 0, run.lines.join('\n'));
    const image = currentImage();
    assert.ok(image.dir.startsWith(`${cacheDir}/`), 'the image is in MVM_CACHE_DIR');
    assert.ok(image.snapshot, 'the first exec took the snapshot');
    assert.ok(!existsSync(join(cacheDir, 'kernels')), 'no kernel was built: MVM_KERNEL was used');
    const progress = run.lines.filter((line) => line.startsWith('mvmctl: '));
    assert.deepEqual(progress.slice(0, 3), [
      'mvmctl: building the default-microvm initramfs (not built yet)',
      `mvmctl: default-microvm image ready: ${image.dir} (initramfs ${(statSync(join(image.dir, 'initramfs.cpio')).size / 1048576).toFixed(1)} MiB)`,
      'mvmctl: the default image: booting it to take a snapshot',
    ]);
    assert.ok(progress.some((line) => /^mvmctl: the default image: agent ready after [\d.]+ s; saving the snapshot$/.test(line)), progress.join('\n'));
    assert.deepEqual(run.lines.filter((line) => !line.startsWith('mvmctl: ')), ['first use'], 'the command’s output, nothing else');
    // The image is there now: a second exec builds nothing and says nothing, even on a terminal.
    const again = await onTerminal(['exec', '--', 'echo', 'again']);
    assert.equal(again.code, 0, again.lines.join('\n'));
    assert.deepEqual(again.lines, ['again']);
    assert.deepEqual(currentImage(), image, 'nothing was rebuilt or retaken');
    await assertNoVmLeft(stateDir);
  });

  test('image build --force rebuilds the initramfs (a new file) and retakes the snapshot; piped without -v it prints no progress', async () => {
    await imageReady();
    const before = currentImage();
    assert.ok(before.snapshot);
    const rebuilt = await mvmctl(['image', 'build', '--force'], env);
    assert.equal(rebuilt.code, 0, rebuilt.stderr);
    assert.equal(rebuilt.stderr, '', 'no progress lines when stderr is not a terminal');
    const after = currentImage();
    assert.equal(after.dir, before.dir, 'the same inputs: the same image id');
    assert.notDeepEqual(after.initramfs, before.initramfs, 'the initramfs was written again (another inode or mtime)');
    assert.ok(after.snapshot && after.snapshot !== before.snapshot, 'a new snapshot');
    assert.match(rebuilt.stdout.toString(), new RegExp(`^directory: +${after.dir}$`, 'm'));
    const warm = await mvmctl(['exec', '-v', '--', 'echo', 'ok'], env);
    assert.equal(warm.stdout.toString(), 'ok\n', warm.stderr);
    assert.ok(restored(warm.stderr), warm.stderr);
    await assertNoVmLeft(stateDir);
  });

  test('piped, -v shows the progress lines of image build and of the snapshot an exec takes; without -v exec says nothing', async () => {
    await imageReady();
    // --no-snapshot: the initramfs is rebuilt and the image is left without a snapshot.
    const verbose = await mvmctl(['image', 'build', '--force', '--no-snapshot', '-v'], env);
    assert.equal(verbose.code, 0, verbose.stderr);
    assert.deepEqual(lines(verbose.stderr), [
      'mvmctl: building the default-microvm initramfs (rebuild forced)',
      `mvmctl: default-microvm image ready: ${currentImage().dir} (initramfs ${(statSync(join(currentImage().dir, 'initramfs.cpio')).size / 1048576).toFixed(1)} MiB)`,
    ]);
    assert.equal(currentImage().snapshot, undefined);
    const takes = await mvmctl(['exec', '-v', '--', 'echo', 'ok'], env);
    assert.equal(takes.code, 0, takes.stderr);
    assert.equal(takes.stdout.toString(), 'ok\n');
    const progress = lines(takes.stderr).filter((line) => line.startsWith('mvmctl: the default image: '));
    assert.equal(progress[0], 'mvmctl: the default image: booting it to take a snapshot', takes.stderr);
    assert.ok(currentImage().snapshot, 'the exec took the snapshot');

    const quietBuild = await mvmctl(['image', 'build', '--force', '--no-snapshot'], env);
    assert.equal(quietBuild.code, 0, quietBuild.stderr);
    assert.equal(quietBuild.stderr, '');
    assert.equal(currentImage().snapshot, undefined);
    const quiet = await mvmctl(['exec', '--', 'echo', 'ok'], env);
    assert.equal(quiet.code, 0, quiet.stderr);
    assert.equal(quiet.stdout.toString(), 'ok\n');
    assert.equal(quiet.stderr, '', 'taking the snapshot prints nothing when piped without -v');
    assert.ok(currentImage().snapshot, 'the exec took the snapshot');
    await assertNoVmLeft(stateDir);
  });
});

describe('a rw --add-dir is not synced back', () => {
  const discarded = (dir: string) => `mvmctl: --add-dir ${dir}:/work:rw: guest changes discarded, ${dir} left as it was`;
  // The changes are on the guest's disk (sync) before the run ends: a sync-back would bring them.
  const change = 'rm /work/a.txt; echo x > /work/new; echo changed >> /work/sub/b.txt; sync';
  let counter = 0;
  function hostDir(): string {
    const dir = join(work, `host${counter++}`);
    mkdirSync(join(dir, 'sub'), { recursive: true });
    writeFileSync(join(dir, 'a.txt'), 'a\n');
    writeFileSync(join(dir, 'sub', 'b.txt'), 'b\n');
    return dir;
  }

  test('SIGTERM to mvmctl: exit 143, HOST untouched, one line says the changes were discarded', async () => {
    await imageReady();
    const dir = hostDir();
    const before = treeDigest(dir);
    const child = startMvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', `${change}; echo ready; sleep 100`], env);
    const done = collect(child);
    await waitForOutput(child, 'ready\n');
    child.kill('SIGTERM');
    const result = await done;
    assert.equal(result.code, 143, result.stderr);
    assert.deepEqual(lines(result.stderr), [discarded(dir)]);
    assert.equal(treeDigest(dir), before);
    assert.deepEqual(readdirSync(dir).sort(), ['a.txt', 'sub'], 'no .mvm-sync-* staging left in HOST');
    await assertNoVmLeft(stateDir);
  });

  test('an unclean unmount (a process of its own session keeps a file open): the command’s exit code, HOST untouched, both lines', async () => {
    await imageReady();
    const dir = hostDir();
    const before = treeDigest(dir);
    // setsid takes the holder out of the command's process group, which the agent kills when the
    // command exits; the marker file says it holds the descriptor before the command ends.
    const holder = 'setsid sh -c "exec 3</work/sub/b.txt; echo held > /tmp/held; exec sleep 1000" </dev/null >/dev/null 2>&1 &';
    const script = `${change}; ${holder} until [ -e /tmp/held ]; do sleep 0.05; done; echo done; exit 3`;
    const result = await mvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', script], env);
    assert.equal(result.code, 3, result.stderr);
    assert.equal(result.stdout.toString(), 'done\n');
    const [unmount, ...rest] = lines(result.stderr);
    assert.match(unmount ?? '', new RegExp(`^mvmctl: --add-dir ${dir}:/work:rw: the guest could not unmount it cleanly \\(umount /work: [^)]*busy\\)$`, 'i'), result.stderr);
    assert.deepEqual(rest, [discarded(dir)]);
    assert.equal(treeDigest(dir), before);
    assert.deepEqual(readdirSync(dir).sort(), ['a.txt', 'sub']);
    await assertNoVmLeft(stateDir);
  });
});
