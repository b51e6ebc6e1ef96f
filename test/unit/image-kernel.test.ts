import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { MvmError } from '../../src/errors.js';
import {
  cachedKernel,
  checkKernelBuildPrerequisites,
  describeMismatches,
  ensureKernel,
  KERNEL_RECIPE_VERSION,
  kernelCacheKey,
  parseKconfig,
  sourceIdentity,
  verifyKconfig,
} from '../../src/image/kernel.js';
import { withLock } from '../../src/image/lock.js';
import { KERNEL_FRAGMENT_PATH } from '../../src/image/repo.js';

const FRAGMENT = `# comment
CONFIG_VIRTIO_CONSOLE=y
CONFIG_NR_CPUS=4
CONFIG_LOCALVERSION="-micro"
CONFIG_PCI=n
# CONFIG_MODULES is not set
CONFIG_VSOCKETS=y
`;

describe('kernel config fragment verification', () => {
  it('parses set, unset and =n options', () => {
    const m = parseKconfig(FRAGMENT);
    assert.equal(m.get('CONFIG_VIRTIO_CONSOLE'), 'y');
    assert.equal(m.get('CONFIG_LOCALVERSION'), '"-micro"');
    assert.equal(m.get('CONFIG_PCI'), 'n');
    assert.equal(m.get('CONFIG_MODULES'), 'n');
    assert.equal(m.size, 6);
  });

  it('accepts a .config that has every option as asked (absent counts as not set)', () => {
    const config = `#
# Automatically generated file; DO NOT EDIT.
CONFIG_VIRTIO_CONSOLE=y
CONFIG_NR_CPUS=4
CONFIG_LOCALVERSION="-micro"
# CONFIG_PCI is not set
CONFIG_VSOCKETS=y
CONFIG_OTHER=y
`;
    assert.deepEqual(verifyKconfig(FRAGMENT, config), []);
  });

  it('names every option that did not end up as asked', () => {
    const config = `CONFIG_VIRTIO_CONSOLE=m
CONFIG_NR_CPUS=64
CONFIG_LOCALVERSION=""
CONFIG_PCI=y
CONFIG_MODULES=y
# CONFIG_VSOCKETS is not set
`;
    const mismatches = verifyKconfig(FRAGMENT, config);
    assert.deepEqual(
      mismatches.map((m) => m.option),
      ['CONFIG_VIRTIO_CONSOLE', 'CONFIG_NR_CPUS', 'CONFIG_LOCALVERSION', 'CONFIG_PCI', 'CONFIG_MODULES', 'CONFIG_VSOCKETS'],
    );
    const text = describeMismatches(mismatches);
    assert.match(text, /CONFIG_VIRTIO_CONSOLE \(wanted y, got m\)/);
    assert.match(text, /CONFIG_PCI \(wanted not set, got y\)/);
    assert.match(text, /CONFIG_VSOCKETS \(wanted y, got not set\)/);
  });

  it("the repository's kernel/guest.config asks for what the image needs", async () => {
    const m = parseKconfig(await readFile(KERNEL_FRAGMENT_PATH, 'utf8'));
    for (const option of [
      'CONFIG_PVH', 'CONFIG_64BIT', 'CONFIG_BLK_DEV_INITRD', 'CONFIG_DEVTMPFS', 'CONFIG_TMPFS', 'CONFIG_PROC_FS', 'CONFIG_SYSFS',
      'CONFIG_BINFMT_ELF', 'CONFIG_BINFMT_SCRIPT', 'CONFIG_SERIAL_8250_CONSOLE', 'CONFIG_VIRTIO_MMIO', 'CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES',
      'CONFIG_VIRTIO_CONSOLE', 'CONFIG_VIRTIO_BLK', 'CONFIG_EXT4_FS', 'CONFIG_HW_RANDOM_VIRTIO', 'CONFIG_VSOCKETS',
      'CONFIG_VIRTIO_VSOCKETS', 'CONFIG_EPOLL', 'CONFIG_SIGNALFD', 'CONFIG_UNIX98_PTYS',
    ]) {
      assert.equal(m.get(option), 'y', option);
    }
    assert.equal(m.get('CONFIG_MODULES'), 'n');
  });
});

describe('kernel cache', () => {
  let dir: string;
  let tarball: string;
  let fragmentPath: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mvm-kernel-'));
    tarball = join(dir, 'linux-source-6.1.tar.xz');
    fragmentPath = join(dir, 'guest.config');
    await writeFile(tarball, Buffer.alloc(3 << 20, 7));
    await writeFile(fragmentPath, FRAGMENT);
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('keys on the fragment and the source identity', async () => {
    const source = await sourceIdentity(tarball);
    assert.equal(source.size, 3 << 20);
    assert.equal(source.headSha256, createHash('sha256').update(Buffer.alloc(1 << 20, 7)).digest('hex'));
    const key = kernelCacheKey(FRAGMENT, source);
    assert.match(key, /^[0-9a-f]{64}$/);
    assert.equal(kernelCacheKey(FRAGMENT, { ...source }), key);
    assert.notEqual(kernelCacheKey(FRAGMENT + 'CONFIG_X=y\n', source), key);
    assert.notEqual(kernelCacheKey(FRAGMENT, { ...source, size: source.size + 1 }), key);
    assert.notEqual(kernelCacheKey(FRAGMENT, { ...source, headSha256: '0'.repeat(64) }), key);
  });

  it('uses a cached vmlinux without building', async () => {
    const cacheRoot = join(dir, 'cache1');
    const key = kernelCacheKey(FRAGMENT, await sourceIdentity(tarball));
    await mkdir(join(cacheRoot, 'kernels', key), { recursive: true });
    await writeFile(join(cacheRoot, 'kernels', key, 'vmlinux'), 'ELF');
    const k = await ensureKernel({ cacheRoot, fragmentPath, sourceTarball: tarball });
    assert.deepEqual(k, { vmlinux: join(cacheRoot, 'kernels', key, 'vmlinux'), key, built: false });
  });

  it('falls back to a kernel built from the same fragment when the source tarball is gone', async () => {
    const cacheRoot = join(dir, 'cache2');
    const key = 'a'.repeat(64);
    await mkdir(join(cacheRoot, 'kernels', key), { recursive: true });
    await writeFile(join(cacheRoot, 'kernels', key, 'vmlinux'), 'ELF');
    await writeFile(
      join(cacheRoot, 'kernels', key, 'kernel.json'),
      JSON.stringify({ key, recipeVersion: KERNEL_RECIPE_VERSION, fragmentSha256: createHash('sha256').update(FRAGMENT).digest('hex'), builtAt: '2026-01-01T00:00:00Z' }),
    );
    const k = await cachedKernel({ cacheRoot, fragmentPath, sourceTarball: join(dir, 'missing.tar.xz') });
    assert.equal(k?.key, key);
    // A different fragment does not match it.
    await writeFile(join(dir, 'other.config'), 'CONFIG_OTHER=y\n');
    assert.equal(await cachedKernel({ cacheRoot, fragmentPath: join(dir, 'other.config'), sourceTarball: join(dir, 'missing.tar.xz') }), undefined);
  });

  it('names the Debian package when the kernel source is missing', async () => {
    await assert.rejects(checkKernelBuildPrerequisites(join(dir, 'missing.tar.xz')), (err: unknown) => {
      assert.ok(err instanceof MvmError);
      assert.equal(err.exitCode, 125);
      assert.match(err.message, /linux-source-6\.1/);
      assert.match(err.message, /MVM_KERNEL/);
      return true;
    });
    await assert.rejects(
      ensureKernel({ cacheRoot: join(dir, 'cache3'), fragmentPath, sourceTarball: join(dir, 'missing.tar.xz') }),
      /install the Debian package linux-source-6\.1/,
    );
  });
});

describe('build lock', () => {
  it('serializes holders and takes over a lock whose owner is gone', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'mvm-lock-'));
    try {
      const lock = join(dir, 'x.lock');
      const order: string[] = [];
      const holder = (name: string) =>
        withLock(lock, async () => {
          order.push(`${name}+`);
          await new Promise((r) => setTimeout(r, 30));
          order.push(`${name}-`);
        }, { pollMs: 5 });
      await Promise.all([holder('a'), holder('b')]);
      assert.ok(order.join(' ') === 'a+ a- b+ b-' || order.join(' ') === 'b+ b- a+ a-', order.join(' '));

      await writeFile(lock, '999999999\n'); // no such process
      assert.equal(await withLock(lock, async () => 'took over', { pollMs: 5 }), 'took over');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('stops waiting when aborted', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'mvm-lock-'));
    try {
      const lock = join(dir, 'x.lock');
      await writeFile(lock, `${process.pid}\n`); // held by a live process (us)
      const controller = new AbortController();
      setTimeout(() => controller.abort(new Error('stop')), 30);
      await assert.rejects(withLock(lock, async () => 'never', { pollMs: 5, signal: controller.signal }), /stop/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
