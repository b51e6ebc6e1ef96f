import assert from 'node:assert/strict';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, it } from 'node:test';

import { MvmError } from '../../src/errors.js';
import { parseCpio } from '../../src/image/cpio.js';
import {
  DEFAULT_KERNEL_ARGS,
  defaultImageStatus,
  ensureDefaultImage,
  type EnsureImageOptions,
  type ImageManifest,
  staleReasons,
} from '../../src/image/index.js';
import { REQUIRED_APPLETS } from '../../src/image/initramfs.js';

// A stand-in busybox: a script that answers --list-full (the image only runs it for that).
const fakeBusybox = (tag: string) => `#!/bin/sh
# ${tag}
for a in ${REQUIRED_APPLETS.join(' ')}; do echo "bin/$a"; done
`;
const fakeAgent = (version: string) => `#!/bin/sh
[ "$1" = --version ] && echo "mvm-agent ${version}"
`;

describe('default image manifest', () => {
  let dir: string;
  let options: EnsureImageOptions & { cacheRoot: string };
  let lines: string[];

  before(async () => {
    delete process.env.MVM_KERNEL;
    dir = await mkdtemp(join(tmpdir(), 'mvm-image-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    const run = await mkdtemp(join(dir, 'run-'));
    lines = [];
    options = {
      cacheRoot: join(run, 'cache'),
      agentPath: join(run, 'mvm-agent'),
      busyboxPath: join(run, 'busybox'),
      kernelPath: join(run, 'vmlinux'),
      progress: (line) => lines.push(line),
    };
    await writeFile(options.agentPath!, fakeAgent('0.1.0'), { mode: 0o755 });
    await writeFile(options.busyboxPath!, fakeBusybox('v1'), { mode: 0o755 });
    await writeFile(options.kernelPath!, 'kernel v1');
  });

  const built = () => lines.filter((l) => l.startsWith('building')).length;

  it('builds on first use and then takes the fast path', async () => {
    const first = await ensureDefaultImage(options);
    assert.equal(built(), 1);
    assert.match(lines[0]!, /not built yet/);
    assert.equal(first.name, 'default-microvm');
    assert.equal(first.dir, join(options.cacheRoot, 'default-microvm', first.manifest.id));
    assert.equal(first.kernel, options.kernelPath);
    assert.equal(first.initrd, join(first.dir, 'initramfs.cpio'));
    assert.deepEqual(first.kernelArgs, DEFAULT_KERNEL_ARGS);
    assert.equal(first.agentVersion, 'mvm-agent 0.1.0');
    assert.equal(first.manifest.kernel.origin, 'user');
    const records = parseCpio(await readFile(first.initrd));
    assert.equal(records.find((r) => r.path === 'sbin/mvm-agent')!.data.toString(), fakeAgent('0.1.0'));
    const top = JSON.parse(await readFile(join(options.cacheRoot, 'default-microvm', 'manifest-user-kernel.json'), 'utf8')) as ImageManifest;
    assert.deepEqual(top, first.manifest);
    for (const key of ['kernel', 'agent', 'busybox'] as const) assert.match(top[key].sha256, /^[0-9a-f]{64}$/);

    const initrdMtime = (await stat(first.initrd)).mtimeMs;
    const second = await ensureDefaultImage(options);
    assert.equal(built(), 1, 'no rebuild');
    assert.deepEqual(second, first);
    assert.equal((await stat(second.initrd)).mtimeMs, initrdMtime);
  });

  it('rebuilds when the agent changes', async () => {
    const first = await ensureDefaultImage(options);
    await writeFile(options.agentPath!, fakeAgent('0.2.0'));
    const second = await ensureDefaultImage(options);
    assert.equal(built(), 2);
    assert.match(lines.filter((l) => l.startsWith('building'))[1]!, /guest agent changed/);
    assert.notEqual(second.manifest.id, first.manifest.id);
    assert.equal(second.agentVersion, 'mvm-agent 0.2.0');
    assert.ok(parseCpio(await readFile(second.initrd)).some((r) => r.data.toString() === fakeAgent('0.2.0')));
  });

  it('rebuilds when the kernel or busybox content changes, not when they are only touched', async () => {
    const first = await ensureDefaultImage(options);
    const later = new Date(Date.now() + 5000);
    await utimes(options.kernelPath!, later, later);
    await utimes(options.busyboxPath!, later, later);
    const touched = await ensureDefaultImage(options);
    assert.equal(built(), 1, 'same contents: no rebuild');
    assert.equal(touched.manifest.id, first.manifest.id);
    // ...but the stat cache was refreshed, so the next check does not re-hash.
    const top = JSON.parse(await readFile(join(options.cacheRoot, 'default-microvm', 'manifest-user-kernel.json'), 'utf8')) as ImageManifest;
    assert.equal(top.kernel.mtimeMs, (await stat(options.kernelPath!)).mtimeMs);

    await writeFile(options.kernelPath!, 'kernel v2');
    const k2 = await ensureDefaultImage(options);
    assert.equal(built(), 2);
    assert.match(lines.filter((l) => l.startsWith('building'))[1]!, /kernel changed/);

    await writeFile(options.busyboxPath!, fakeBusybox('v2'));
    const b2 = await ensureDefaultImage(options);
    assert.equal(built(), 3);
    assert.match(lines.filter((l) => l.startsWith('building'))[2]!, /busybox changed/);
    assert.equal(new Set([first.manifest.id, k2.manifest.id, b2.manifest.id]).size, 3);
  });

  it('rebuilds when forced or when the initrd went missing', async () => {
    const first = await ensureDefaultImage(options);
    await ensureDefaultImage({ ...options, force: true });
    assert.equal(built(), 2);
    await unlink(first.initrd);
    const again = await ensureDefaultImage(options);
    assert.equal(built(), 3);
    assert.equal(again.manifest.id, first.manifest.id);
    assert.ok((await stat(again.initrd)).isFile());
  });

  it('uses the built kernel when no kernel is given', async () => {
    const vmlinux = join(options.cacheRoot, 'kernels', 'k'.repeat(8), 'vmlinux');
    let calls = 0;
    const image = await ensureDefaultImage({
      ...options,
      kernelPath: undefined,
      ensureKernel: async (o) => {
        calls++;
        assert.equal(o.cacheRoot, options.cacheRoot);
        const { mkdir } = await import('node:fs/promises');
        await mkdir(join(vmlinux, '..'), { recursive: true });
        await writeFile(vmlinux, 'built kernel');
        return { vmlinux, key: 'k'.repeat(8), built: true };
      },
    });
    assert.equal(calls, 1);
    assert.equal(image.kernel, vmlinux);
    assert.equal(image.manifest.kernel.origin, 'built');
    assert.equal(image.manifest.kernel.buildKey, 'k'.repeat(8));
  });

  it('keeps an image for a user kernel and one for the built kernel: moving between them rebuilds neither', async () => {
    const vmlinux = join(options.cacheRoot, 'kernels', 'k'.repeat(8), 'vmlinux');
    const builtKernel = {
      ...options,
      kernelPath: undefined,
      ensureKernel: async () => {
        await mkdir(join(vmlinux, '..'), { recursive: true });
        await writeFile(vmlinux, 'built kernel');
        return { vmlinux, key: 'k'.repeat(8), built: false };
      },
    };
    const user = await ensureDefaultImage(options);
    // Old enough to be removed, were it not named by a manifest.
    const longAgo = new Date(Date.now() - 120_000);
    await utimes(user.dir, longAgo, longAgo);
    const own = await ensureDefaultImage(builtKernel);
    assert.equal(built(), 2);
    assert.notEqual(user.manifest.id, own.manifest.id);
    assert.equal((await ensureDefaultImage(options)).manifest.id, user.manifest.id);
    assert.equal((await ensureDefaultImage(builtKernel)).manifest.id, own.manifest.id);
    assert.equal(built(), 2, 'no rebuild when moving back');
    assert.ok((await stat(user.initrd)).isFile() && (await stat(own.initrd)).isFile(), 'both images are kept');
    assert.equal((await defaultImageStatus({ ...options })).image?.manifest.id, user.manifest.id);
  });

  it('shares one image, and what is kept in it, when the built kernel is also given as a user kernel', async () => {
    const vmlinux = join(options.cacheRoot, 'kernels', 'k'.repeat(8), 'vmlinux');
    await mkdir(join(vmlinux, '..'), { recursive: true });
    await writeFile(vmlinux, 'built kernel');
    const own = await ensureDefaultImage({ ...options, kernelPath: undefined, ensureKernel: async () => ({ vmlinux, key: 'k'.repeat(8), built: false }) });
    await writeFile(join(own.dir, 'kept'), 'a snapshot lives here');
    const user = await ensureDefaultImage({ ...options, kernelPath: vmlinux });
    assert.equal(built(), 1, 'not built again for the other manifest');
    assert.equal(user.dir, own.dir);
    assert.equal(user.manifest.kernel.origin, 'user', 'each manifest says how its kernel was named');
    assert.equal(await readFile(join(own.dir, 'kept'), 'utf8'), 'a snapshot lives here');
  });

  it('MVM_KERNEL selects a kernel too', async () => {
    process.env.MVM_KERNEL = options.kernelPath!;
    try {
      const image = await ensureDefaultImage({ ...options, kernelPath: undefined, ensureKernel: () => assert.fail('must not build') });
      assert.equal(image.kernel, options.kernelPath);
    } finally {
      delete process.env.MVM_KERNEL;
    }
  });

  it('concurrent builders agree and leave one consistent image', async () => {
    const images = await Promise.all([ensureDefaultImage(options), ensureDefaultImage(options), ensureDefaultImage(options)]);
    assert.equal(new Set(images.map((i) => i.manifest.id)).size, 1);
    assert.equal(built(), 1, 'the lock made the others wait and reuse it');
    const entries = (await readdir(join(options.cacheRoot, 'default-microvm'))).sort();
    assert.deepEqual(entries, [images[0]!.manifest.id, 'manifest-user-kernel.json']);
  });

  it('says what to do when the agent or the kernel is missing', async () => {
    await unlink(options.agentPath!);
    await assert.rejects(ensureDefaultImage(options), (err: unknown) => err instanceof MvmError && /make -C guest/.test(err.message));
    await writeFile(options.agentPath!, fakeAgent('0.1.0'), { mode: 0o755 });
    await assert.rejects(ensureDefaultImage({ ...options, kernelPath: join(dir, 'nope') }), (err: unknown) => err instanceof MvmError && /cannot use the kernel/.test(err.message));
  });

  it('reports status without building', async () => {
    const before = await defaultImageStatus(options);
    assert.equal(before.image, undefined);
    assert.deepEqual(before.staleReasons, ['not built yet']);
    await ensureDefaultImage(options);
    assert.deepEqual((await defaultImageStatus(options)).staleReasons, []);
    await writeFile(options.agentPath!, fakeAgent('0.3.0'));
    await chmod(options.agentPath!, 0o755);
    const stale = await defaultImageStatus(options);
    assert.ok(stale.image);
    assert.deepEqual(stale.staleReasons, ['guest agent changed']);
    assert.equal(built(), 1);
  });
});

describe('staleReasons', () => {
  const fp = (sha256: string) => ({ path: '/x', size: 1, mtimeMs: 1, ino: 1, sha256 });
  const manifest = {
    format: 1,
    name: 'default-microvm',
    id: 'id1',
    layoutVersion: 1,
    createdAt: '',
    kernel: { ...fp('k'), origin: 'user' },
    agent: fp('a'),
    busybox: fp('b'),
    initrd: { file: 'initramfs.cpio', size: 1, sha256: 'i', compression: 'none' },
    kernelArgs: [],
  } as ImageManifest;
  const wanted = { id: 'id1', kernel: fp('k'), agent: fp('a'), busybox: fp('b'), layoutVersion: 1 };

  it('lists each changed input', () => {
    assert.deepEqual(staleReasons(manifest, wanted), []);
    assert.deepEqual(staleReasons(undefined, wanted), ['not built yet']);
    assert.deepEqual(staleReasons(manifest, { ...wanted, id: 'id2', agent: fp('a2'), kernel: fp('k2') }), ['kernel changed', 'guest agent changed']);
    assert.deepEqual(staleReasons(manifest, { ...wanted, id: 'id2', layoutVersion: 2 }), ['initramfs layout changed (1 → 2)']);
    assert.deepEqual(staleReasons(manifest, { ...wanted, id: 'id2' }), ['image recipe changed']);
  });
});
