// End to end: README promises about templates that no other e2e file pins down: the defaults
// `template build --kernel/--cpus/--memory` record and exec uses, a snapshot whose disk overlay is
// missing or corrupt, rebuilding a template while a VM of it runs, and what killed builds leave
// behind. Each test fails when its promise breaks.
import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, realpathSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureDefaultImage } from '../../src/image/index.js';
import { assertNoVmLeft, collect, isolatedEnv, mvmctl, startMvmctl, vmmPidsMentioning, waitForOutput, type RunResult } from './helpers.js';

const isolated = isolatedEnv();
const { stateDir } = isolated;
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-tpl-promises-'));
const dataDir = join(work, 'data');
const templatesDir = join(dataDir, 'templates');
let env: NodeJS.ProcessEnv = {};
let defaultKernel = '';

after(() => {
  isolated.cleanup();
  rmSync(work, { recursive: true, force: true });
});

const hasBusybox = existsSync('/bin/busybox');
const noBusybox = hasBusybox ? false : 'no /bin/busybox on this host to build the tiny root file systems from';

before(async () => {
  if (!hasBusybox) return;
  const image = await ensureDefaultImage({});
  defaultKernel = image.kernel;
  // A private cache with the shared cache's kernel (MVM_KERNEL: no kernel build): `template build
  // --kernel` makes the default image there its own. The QEMU backend, whatever accelerator auto picks.
  env = { ...isolated.env, MVM_DATA_DIR: dataDir, MVM_CACHE_DIR: join(work, 'cache'), MVM_KERNEL: image.kernel };
  for (const name of ['MVM_BACKEND', 'MVM_ACCEL', 'MVM_KVM_PRECHECK', 'MVM_FIRECRACKER', 'MVM_QEMU', 'MVM_BOOT_TIMEOUT', 'MVM_QEMU_VSOCK']) delete env[name];
});

const lines = (text: string | Buffer) => text.toString().split('\n').filter((line) => line !== '');
const restored = (stderr: string) => /\[timing\] restored from snapshot/.test(stderr);
const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
/** Lines on stderr that are neither -v's [timing]/[console] lines nor its notes. */
const warnings = (stderr: string) => lines(stderr).filter((line) => !/^mvmctl: (\[|network: |snapshot not used)/.test(line));

/** A root file system of a static busybox and an /etc/motd (and more files) of ours. */
function tinyRootfs(name: string, files: Record<string, string>): string {
  const dir = join(work, name);
  mkdirSync(join(dir, 'bin'), { recursive: true });
  mkdirSync(join(dir, 'etc'));
  copyFileSync('/bin/busybox', join(dir, 'bin', 'busybox'));
  for (const applet of ['sh', 'cat', 'head', 'nproc', 'sleep']) symlinkSync('busybox', join(dir, 'bin', applet));
  for (const [file, content] of Object.entries(files)) writeFileSync(join(dir, 'etc', file), content);
  return dir;
}

async function built(name: string, args: string[]): Promise<void> {
  const result = await mvmctl(['template', 'build', name, ...args, '--disk-free', '64M'], env);
  assert.equal(result.code, 0, result.stderr);
}

/** nproc, then MemTotal in kB. */
const SIZE_PROBE = ['sh', '-c', 'nproc; head -n 1 /proc/meminfo'];
function assertSize(result: RunResult, cpus: number, mib: number): void {
  assert.equal(result.code, 0, result.stderr);
  const [nproc, mem] = lines(result.stdout);
  assert.equal(nproc, String(cpus), result.stdout.toString());
  const kib = Number(/^MemTotal: +(\d+) kB$/.exec(mem ?? '')?.[1]);
  // MemTotal is RAM less what the kernel reserves for itself: a little under the size asked for.
  assert.ok(kib > mib * 1024 * 0.75 && kib <= mib * 1024, `${mib} MiB guest: ${mem}`);
}

describe('template build --kernel/--cpus/--memory: recorded, the snapshot taken at that size, used unless exec says otherwise', { skip: noBusybox }, () => {
  let kernel = '';
  before(async () => {
    // The default kernel with bytes appended (the ELF loader ignores them): it boots, and its hash is its own.
    kernel = join(work, 'vmlinux-other');
    copyFileSync(defaultKernel, kernel);
    writeFileSync(kernel, 'trailing bytes of a kernel of our own', { flag: 'a' });
    await built('sized', ['--rootfs-dir', tinyRootfs('sized-root', { motd: 'sized\n' }), '--kernel', kernel, '--cpus', '1', '--memory', '256M', '--snapshot']);
  });

  test('info records the defaults and the given kernel, which the template boots', async () => {
    const info = await mvmctl(['template', 'info', 'sized', '--json'], env);
    assert.equal(info.code, 0, info.stderr);
    const meta = JSON.parse(info.stdout.toString()) as {
      directory: string;
      cpus: number;
      memoryMiB: number;
      kernel: { sha256: string; origin: string };
      snapshot: { cpus: number; memoryMiB: number } | null;
    };
    assert.deepEqual([meta.cpus, meta.memoryMiB], [1, 256]);
    assert.deepEqual([meta.snapshot?.cpus, meta.snapshot?.memoryMiB], [1, 256], 'the snapshot is taken at the template’s size');
    assert.notEqual(sha256(kernel), sha256(defaultKernel));
    assert.deepEqual(meta.kernel, { ...meta.kernel, sha256: sha256(kernel), origin: kernel });
    assert.equal(sha256(join(meta.directory, 'vmlinux')), sha256(kernel), 'the template boots a copy of the given kernel');
  });

  test('exec uses the defaults (restored); --memory or --cpus of its own boot cold at that size, noted with -v', async () => {
    const [defaults, memory, cpus] = await Promise.all([
      mvmctl(['exec', '-v', '-m', 'sized', '--', ...SIZE_PROBE], env),
      mvmctl(['exec', '-v', '-m', 'sized', '--memory', '512M', '--', ...SIZE_PROBE], env),
      mvmctl(['exec', '-v', '-m', 'sized', '--cpus', '2', '--', ...SIZE_PROBE], env),
    ]);
    assertSize(defaults, 1, 256);
    assert.ok(restored(defaults.stderr), defaults.stderr);
    assertSize(memory, 1, 512);
    assert.ok(!restored(memory.stderr));
    assert.ok(lines(memory.stderr).includes('mvmctl: snapshot not used: it was taken with 1 CPUs and 256 MiB, this run asks for 1 and 512 MiB'), memory.stderr);
    assertSize(cpus, 2, 256);
    assert.ok(!restored(cpus.stderr));
    assert.ok(lines(cpus.stderr).includes('mvmctl: snapshot not used: it was taken with 1 CPUs and 256 MiB, this run asks for 2 and 256 MiB'), cpus.stderr);
    for (const result of [defaults, memory, cpus]) assert.deepEqual(warnings(result.stderr), [], result.stderr);
    await assertNoVmLeft(stateDir);
  });

  test('a corrupt or missing disk overlay: one warning line, a cold boot, and the command still runs', async () => {
    const disk = join(templatesDir, 'sized', 'snapshot', 'disk.qcow2');
    const times = join(work, 'disk.times');
    writeFileSync(times, '');
    assert.equal(spawnSync('touch', ['-r', disk, times]).status, 0);
    const before = statSync(disk);
    // Its qcow2 header overwritten in place: inode, size and mtime as recorded, so only QEMU can tell.
    const fd = openSync(disk, 'r+');
    const header = Buffer.alloc(512);
    readSync(fd, header, 0, header.length, 0);
    try {
      writeSync(fd, Buffer.alloc(header.length, 0x5a), 0, header.length, 0);
      assert.equal(spawnSync('touch', ['-r', times, disk]).status, 0);
      assert.deepEqual([statSync(disk).ino, statSync(disk).size, statSync(disk).mtimeMs], [before.ino, before.size, before.mtimeMs]);
      const corrupt = await mvmctl(['exec', '-m', 'sized', '--', 'cat', '/etc/motd'], env);
      assert.equal(corrupt.code, 0, corrupt.stderr);
      assert.equal(corrupt.stdout.toString(), 'sized\n');
      assert.equal(lines(corrupt.stderr).length, 1, corrupt.stderr);
      assert.match(corrupt.stderr, /^mvmctl: template sized: restoring the snapshot failed \(.+\); booting cold instead\n$/);
    } finally {
      writeSync(fd, header, 0, header.length, 0);
      closeSync(fd);
      spawnSync('touch', ['-r', times, disk]);
    }
    renameSync(disk, `${disk}.away`);
    try {
      const missing = await mvmctl(['exec', '-m', 'sized', '--', 'cat', '/etc/motd'], env);
      assert.equal(missing.code, 0, missing.stderr);
      assert.equal(missing.stdout.toString(), 'sized\n');
      assert.equal(missing.stderr, "mvmctl: template sized: not using its snapshot (disk.qcow2 is missing); booting cold. Retake it with 'mvmctl template snapshot sized'\n");
    } finally {
      renameSync(`${disk}.away`, disk);
    }
    // Put back as it was, the snapshot restores again.
    const intact = await mvmctl(['exec', '-v', '-m', 'sized', '--', 'cat', '/etc/motd'], env);
    assert.equal(intact.stdout.toString(), 'sized\n', intact.stderr);
    assert.ok(restored(intact.stderr), intact.stderr);
    await assertNoVmLeft(stateDir);
  });
});

describe('replacing templates', { skip: noBusybox }, () => {
  const versions = (name: string) => readdirSync(templatesDir).filter((entry) => entry.startsWith(`.${name}.v-`)).sort();

  test('template build NAME while a VM of NAME runs: that VM goes on with the old template, new runs get the new one, the old version goes once unused', async () => {
    await built('swap', ['--rootfs-dir', tinyRootfs('swap-one', { motd: 'one\n', extra: 'one-extra\n' }), '--snapshot']);
    const oldVersion = realpathSync(join(templatesDir, 'swap'));
    // It waits for a line, then reads a file from the root drive that it had not read before.
    const child = startMvmctl(['exec', '-v', '-i', '-m', 'swap', '--', 'sh', '-c', 'cat /etc/motd; read line; cat /etc/extra'], env, 'pipe');
    const done = collect(child);
    await waitForOutput(child, 'one\n');

    await built('swap', ['--rootfs-dir', tinyRootfs('swap-two', { motd: 'two\n', extra: 'two-extra\n' }), '--snapshot']);
    assert.notEqual(realpathSync(join(templatesDir, 'swap')), oldVersion, 'the new version is published');
    assert.ok(existsSync(oldVersion), 'the old version is kept while a VM runs from it');
    const fresh = await mvmctl(['exec', '-v', '-m', 'swap', '--', 'cat', '/etc/motd', '/etc/extra'], env);
    assert.equal(fresh.code, 0, fresh.stderr);
    assert.equal(fresh.stdout.toString(), 'two\ntwo-extra\n');
    assert.ok(restored(fresh.stderr), 'from the new snapshot');

    child.stdin!.end('go\n');
    const result = await done;
    assert.equal(result.code, 0, result.stderr);
    assert.ok(restored(result.stderr), result.stderr);
    assert.equal(result.stdout.toString(), 'one\none-extra\n', 'the running VM saw only the old template');
    await assertNoVmLeft(stateDir);

    const ls = await mvmctl(['template', 'ls'], env);
    assert.equal(ls.code, 0, ls.stderr);
    assert.ok(!existsSync(oldVersion), 'the next template command removes the old version once no VM uses it');
    assert.deepEqual(versions('swap'), [realpathSync(join(templatesDir, 'swap')).split('/').pop()]);
  });

  /** Starts `args`, SIGKILLs it once a VMM whose command line mentions `marker` runs, and waits for it to end. */
  async function killedWhileBooting(args: string[], marker: () => string | undefined): Promise<void> {
    const child: ChildProcess = startMvmctl(args, env);
    const done = collect(child);
    let ended: RunResult | undefined;
    void done.then((result) => (ended = result));
    for (;;) {
      const seen = marker();
      if (seen && vmmPidsMentioning(seen).length > 0) break;
      assert.equal(ended, undefined, `the command ended before its VM was seen: ${ended?.stderr}`);
      await sleep(20);
    }
    child.kill('SIGKILL');
    assert.equal((await done).signal, 'SIGKILL');
    // The VMM dies with mvmctl (parent-death signal); `ls` removes the state the run left.
    assert.equal((await mvmctl(['ls'], env)).code, 0);
    await assertNoVmLeft(stateDir);
  }

  test('a build killed part way leaves the template as it was, and the next template command (ls, build) removes its .NAME.v-* directory', async () => {
    const root = tinyRootfs('killed-root', { motd: 'kept\n' });
    await built('killed', ['--rootfs-dir', root]);
    const published = realpathSync(join(templatesDir, 'killed'));
    const unpublished = () => versions('killed').map((entry) => join(templatesDir, entry)).find((dir) => dir !== published);

    for (const next of [['template', 'ls'], ['template', 'build', 'killed', '--rootfs-dir', root, '--disk-free', '64M']]) {
      await killedWhileBooting(['template', 'build', 'killed', '--rootfs-dir', root, '--disk-free', '64M', '--snapshot'], unpublished);
      const leftover = unpublished();
      assert.ok(leftover && existsSync(leftover), 'the killed build left its version directory');
      assert.equal(realpathSync(join(templatesDir, 'killed')), published, 'the template is as it was');
      const after = await mvmctl(next, env);
      assert.equal(after.code, 0, after.stderr);
      assert.ok(!existsSync(leftover), `${next.join(' ')} removed ${leftover}`);
    }
    const run = await mvmctl(['exec', '-m', 'killed', '--', 'cat', '/etc/motd'], env);
    assert.equal(run.stdout.toString(), 'kept\n', run.stderr);
    assert.deepEqual(versions('killed'), [realpathSync(join(templatesDir, 'killed')).split('/').pop()], 'one version directory: the published one');
  });

  test('a template snapshot killed part way leaves no snapshot; the next template command removes its snap-* directory', async () => {
    await built('snapkill', ['--rootfs-dir', tinyRootfs('snapkill-root', { motd: 'snap\n' })]);
    const dir = realpathSync(join(templatesDir, 'snapkill'));
    const snapDirs = () => readdirSync(dir).filter((entry) => entry.startsWith('snap-'));
    await killedWhileBooting(['template', 'snapshot', 'snapkill'], () => (snapDirs()[0] ? join(dir, snapDirs()[0]!) : undefined));
    assert.equal(snapDirs().length, 1, 'the killed capture left its directory');
    assert.ok(!existsSync(join(dir, 'snapshot')), 'and published no snapshot');
    const info = await mvmctl(['template', 'info', 'snapkill'], env);
    assert.equal(info.code, 0, info.stderr);
    assert.match(info.stdout.toString(), /^snapshot: +none /m);
    assert.deepEqual(snapDirs(), [], 'template info removed it');
  });
});
