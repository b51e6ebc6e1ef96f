/** decideSnapshot: every reason a snapshot is not restored, against a snapshot laid out on disk by hand. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync, unlinkSync, renameSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import type { AccelPlan } from '../../src/accel/index.js';
import type { Backend } from '../../src/backends/types.js';
import { decideSnapshot, type SnapshotMeta, type SnapshotRequest, type SnapshotSubject } from '../../src/snapshots/index.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-decide-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
let counter = 0;

const vmm = { binary: '/usr/bin/qemu', size: 100, mtimeMs: 1 };
function backend(version = 'QEMU 7.2', identity = vmm): Backend {
  return {
    name: 'qemu',
    nicUnavailable: () => undefined,
    capabilities: () => ({ accels: ['kvm', 'tcg'], snapshots: true, restoredDrivesReadOnly: true }),
    start: () => Promise.reject(new Error('not in this test')),
    vmmVersion: async () => version,
    vmmIdentity: async () => identity,
  };
}

const tcg: AccelPlan = { choice: 'auto', accel: 'tcg' };
const request: SnapshotRequest = { cpus: 2, memoryMiB: 512, addDirs: 0, nic: false, noSnapshot: false, accel: tcg };

/**
 * A subject with kernel and initrd files and a valid snapshot of it; with `rootfs`, a template with a
 * root drive (rootfs.ext4) whose snapshot keeps the captured guest's disk overlay (disk.qcow2).
 */
function laidOut(options: { rootfs?: boolean } = {}): { subject: SnapshotSubject; snap: string; meta: SnapshotMeta } {
  const dir = join(scratch, `s${counter++}`);
  const snap = join(dir, 'snap-1-a');
  mkdirSync(snap, { recursive: true });
  const inputs: [string, string][] = [['vmlinux', 'kernel'], ['initrd', 'initrd'], ...(options.rootfs ? ([['rootfs.ext4', 'rootfs']] as [string, string][]) : [])];
  for (const [file, content] of inputs) writeFileSync(join(dir, file), content);
  if (options.rootfs) writeFileSync(join(snap, 'disk.qcow2'), 'QFI\xfb overlay');
  writeFileSync(join(snap, 'ram'), 'ram');
  for (const slot of ['slot0', 'slot1']) writeFileSync(join(snap, slot), Buffer.alloc(1024));
  writeFileSync(join(snap, 'state'), 'state');
  symlinkSync('snap-1-a', join(dir, 'snapshot'));
  const subject: SnapshotSubject = {
    label: 'template t',
    retake: 'mvmctl template snapshot t',
    dir,
    kernel: { path: join(dir, 'vmlinux'), sha256: 'k1' },
    initrd: { path: join(dir, 'initrd'), sha256: 'i1' },
    kernelArgs: [],
    cpus: 2,
    memoryMiB: 512,
    agentVersion: 'mvm-agent 0.1.0',
    layoutVersion: 3,
    ...(options.rootfs ? { rootfs: { path: join(dir, 'rootfs.ext4'), sha256: 'r1' } } : {}),
  };
  const record = (path: string, file: string) => {
    const st = statSync(path);
    return { file, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, sha256: 'x' };
  };
  const meta: SnapshotMeta = {
    format: 3,
    subject: 'template t',
    createdAt: 'then',
    backend: 'qemu',
    accel: 'tcg',
    kernelSha256: 'k1',
    initrdSha256: 'i1',
    ...(options.rootfs ? { rootfsSha256: 'r1' } : {}),
    layoutVersion: 3,
    agentVersion: 'mvm-agent 0.1.0',
    vmm: { version: 'QEMU 7.2', ...vmm },
    cpus: 2,
    memoryMiB: 512,
    inputs: inputs.map(([file]) => ({ file, size: statSync(join(dir, file)).size, mtimeMs: statSync(join(dir, file)).mtimeMs })),
    files: {
      ram: record(join(snap, 'ram'), 'ram'),
      state: record(join(snap, 'state'), 'state'),
      ...(options.rootfs ? { disk: record(join(snap, 'disk.qcow2'), 'disk.qcow2') } : {}),
    },
    driveSlots: { files: ['slot0', 'slot1'], slotBytes: 1024 },
    bootSeconds: 1,
  };
  writeFileSync(join(snap, 'snapshot.json'), JSON.stringify(meta));
  return { subject, snap, meta };
}

/** Runs `change` on `path`, then puts its atime and mtime back exactly (to the nanosecond, as `touch -r` does). */
function keepingTimes(path: string, change: () => void): void {
  const reference = `${path}.times`;
  writeFileSync(reference, '');
  assert.equal(spawnSync('touch', ['-r', path, reference]).status, 0);
  change();
  assert.equal(spawnSync('touch', ['-r', reference, path]).status, 0);
  unlinkSync(reference);
}

const warning = (why: string) => `template t: not using its snapshot (${why}); booting cold. Retake it with 'mvmctl template snapshot t'`;

describe('decideSnapshot', () => {
  test('a snapshot that fits gives a restore plan of its files', async () => {
    const { subject, snap } = laidOut();
    assert.deepEqual(await decideSnapshot(subject, backend(), request), {
      plan: { accel: 'tcg', dir: snap, driveSlots: { paths: [join(snap, 'slot0'), join(snap, 'slot1')], slotBytes: 1024 } },
    });
    // --add-dir images take the drive slots, as many as there are.
    assert.ok((await decideSnapshot(subject, backend(), { ...request, addDirs: 2 })).plan);
  });

  test('what the request rules out is a note, not a warning', async () => {
    const { subject } = laidOut();
    const note = async (changes: Partial<SnapshotRequest>) => (await decideSnapshot(subject, backend(), { ...request, ...changes })).note;
    assert.equal(await note({ noSnapshot: true }), 'snapshot not used: --no-snapshot');
    assert.equal(await note({ addDirs: 3 }), 'snapshot not used: it has 2 drive slots for --add-dir, this run needs 3');
    assert.match((await note({ memoryMiB: 1024 }))!, /taken with 2 CPUs and 512 MiB, this run asks for 2 and 1024 MiB/);
    assert.match((await note({ cpus: 1 }))!, /this run asks for 1 and 512 MiB/);
    assert.match((await note({ nic: true }))!, /taken without a NIC, and this run asks for one/);
    assert.match((await note({ accel: { choice: 'auto', accel: 'tcg', probe: { bootId: 'b', vmm: 'v', kernelSha256: 'k' } } }))!, /KVM has not yet been proven/);
  });

  test('no snapshot at all is a note that says so', async () => {
    const { subject } = laidOut();
    unlinkSync(join(subject.dir, 'snapshot'));
    assert.deepEqual(await decideSnapshot(subject, backend(), request), { note: 'template t has no snapshot: booting cold', missing: true });
  });

  for (const [why, change] of [
    ['the kernel changed', (s: SnapshotSubject) => ({ ...s, kernel: { ...s.kernel, sha256: 'k2' } })],
    ['the initramfs changed', (s: SnapshotSubject) => ({ ...s, initrd: { ...s.initrd, sha256: 'i2' } })],
    ['the root file system changed', (s: SnapshotSubject) => ({ ...s, rootfs: { path: '/r', sha256: 'r' } })],
    ['the image layout changed', (s: SnapshotSubject) => ({ ...s, layoutVersion: 4 })],
    ['the agent changed (mvm-agent 0.1.0 → mvm-agent 0.2.0)', (s: SnapshotSubject) => ({ ...s, agentVersion: 'mvm-agent 0.2.0' })],
  ] as const) {
    test(`a stale snapshot is one warning: ${why}`, async () => {
      const { subject } = laidOut();
      assert.deepEqual(await decideSnapshot(change(subject), backend(), request), { warning: warning(why) });
    });
  }

  test('a snapshot taken under the other accelerator is a warning', async () => {
    const { subject } = laidOut();
    assert.deepEqual(await decideSnapshot(subject, backend(), { ...request, accel: { choice: 'kvm', accel: 'kvm' } }), {
      warning: warning('taken under TCG, this run uses KVM'),
    });
  });

  test('modified, replaced or missing files, a changed VMM and unreadable metadata are warnings', async () => {
    const touched = laidOut();
    utimesSync(touched.subject.kernel.path, new Date(), new Date(2000, 1, 1));
    assert.deepEqual(await decideSnapshot(touched.subject, backend(), request), { warning: warning('vmlinux was modified') });

    const replaced = laidOut();
    copyFileSync(join(replaced.snap, 'state'), join(replaced.snap, 'state.new'));
    const st = statSync(join(replaced.snap, 'state'));
    renameSync(join(replaced.snap, 'state.new'), join(replaced.snap, 'state'));
    utimesSync(join(replaced.snap, 'state'), st.atime, st.mtime);
    assert.deepEqual(await decideSnapshot(replaced.subject, backend(), request), { warning: warning('state was modified or replaced') });

    const slotGone = laidOut();
    unlinkSync(join(slotGone.snap, 'slot1'));
    assert.deepEqual(await decideSnapshot(slotGone.subject, backend(), request), { warning: warning('its drive slot slot1 is missing or resized') });

    const missing = laidOut();
    unlinkSync(join(missing.snap, 'ram'));
    assert.deepEqual(await decideSnapshot(missing.subject, backend(), request), { warning: warning('ram is missing') });

    const vmmChanged = laidOut();
    assert.deepEqual(await decideSnapshot(vmmChanged.subject, backend('QEMU 8.0', { ...vmm, size: 200 }), request), {
      warning: warning('the VMM changed: taken with QEMU 7.2, now QEMU 8.0'),
    });
    // Another binary that reports the same version is the same VMM build.
    assert.ok((await decideSnapshot(vmmChanged.subject, backend('QEMU 7.2', { ...vmm, size: 200 }), request)).plan);

    const unreadable = laidOut();
    writeFileSync(join(unreadable.snap, 'snapshot.json'), '{');
    assert.match((await decideSnapshot(unreadable.subject, backend(), request)).warning!, /its metadata is unreadable/);
  });
  test('a root file system template: its snapshot restores with the disk overlay it recorded, copy-on-write', async () => {
    const { subject, snap } = laidOut({ rootfs: true });
    const decision = await decideSnapshot(subject, backend(), request);
    assert.deepEqual(decision.plan?.rootDrive, { path: join(snap, 'disk.qcow2'), copyOnWrite: true });
    // Another root image hash than the one the snapshot was taken of.
    assert.deepEqual(await decideSnapshot({ ...subject, rootfs: { ...subject.rootfs!, sha256: 'r2' } }, backend(), request), {
      warning: warning('the root file system changed'),
    });
  });

  test('an input whose size changed (its mtime kept) or that is gone is a warning naming it', async () => {
    for (const file of ['vmlinux', 'initrd', 'rootfs.ext4']) {
      const grown = laidOut({ rootfs: true });
      const path = join(grown.subject.dir, file);
      const st = statSync(path);
      keepingTimes(path, () => writeFileSync(path, 'a different length'));
      assert.equal(statSync(path).mtimeMs, st.mtimeMs, 'only the size tells');
      assert.deepEqual(await decideSnapshot(grown.subject, backend(), request), { warning: warning(`${file} was modified`) }, file);

      const gone = laidOut({ rootfs: true });
      unlinkSync(join(gone.subject.dir, file));
      assert.deepEqual(await decideSnapshot(gone.subject, backend(), request), { warning: warning(`${file} was modified`) }, file);
    }
  });

  test('a missing, resized, touched or replaced disk overlay is a warning', async () => {
    const gone = laidOut({ rootfs: true });
    unlinkSync(join(gone.snap, 'disk.qcow2'));
    assert.deepEqual(await decideSnapshot(gone.subject, backend(), request), { warning: warning('disk.qcow2 is missing') });

    const resized = laidOut({ rootfs: true });
    const disk = join(resized.snap, 'disk.qcow2');
    const st = statSync(disk);
    keepingTimes(disk, () => writeFileSync(disk, 'QFI\xfb a corrupt overlay of another size'));
    assert.deepEqual([statSync(disk).ino, statSync(disk).mtimeMs], [st.ino, st.mtimeMs], 'only the size tells');
    assert.deepEqual(await decideSnapshot(resized.subject, backend(), request), { warning: warning('disk.qcow2 was modified or replaced') });

    const touched = laidOut({ rootfs: true });
    utimesSync(join(touched.snap, 'disk.qcow2'), new Date(), new Date(2001, 1, 1));
    assert.deepEqual(await decideSnapshot(touched.subject, backend(), request), { warning: warning('disk.qcow2 was modified or replaced') });

    // Same size and mtime, another inode: a copy put in its place.
    const replaced = laidOut({ rootfs: true });
    const original = join(replaced.snap, 'disk.qcow2');
    const before = statSync(original);
    keepingTimes(original, () => {
      copyFileSync(original, `${original}.new`);
      renameSync(`${original}.new`, original);
    });
    assert.notEqual(statSync(original).ino, before.ino);
    assert.deepEqual([statSync(original).size, statSync(original).mtimeMs], [before.size, before.mtimeMs], 'only the inode tells');
    assert.deepEqual(await decideSnapshot(replaced.subject, backend(), request), { warning: warning('disk.qcow2 was modified or replaced') });
  });

  test('snapshot.json missing, of an unknown format or without its files is a warning that it is unreadable', async () => {
    const missing = laidOut();
    unlinkSync(join(missing.snap, 'snapshot.json'));
    assert.match((await decideSnapshot(missing.subject, backend(), request)).warning ?? '', /^template t: not using its snapshot \(its metadata is unreadable: .*ENOENT.*\); booting cold/);

    for (const change of [{ format: 2 }, { files: {} }]) {
      const odd = laidOut();
      writeFileSync(join(odd.snap, 'snapshot.json'), JSON.stringify({ ...odd.meta, ...change }));
      assert.deepEqual(await decideSnapshot(odd.subject, backend(), request), { warning: warning('its metadata is unreadable: unknown snapshot format') }, JSON.stringify(change));
    }
  });

  test('the VMM: the same binary (path, size, mtime) is not asked its version; one that cannot be asked is a warning', async () => {
    const { subject } = laidOut();
    const unasked: Backend = { ...backend(), vmmVersion: () => Promise.reject(new Error('--version must not be run')) };
    assert.ok((await decideSnapshot(subject, unasked, request)).plan);
    for (const identity of [{ ...vmm, binary: '/opt/qemu' }, { ...vmm, mtimeMs: 2 }]) {
      const asked: Backend = { ...backend('QEMU 7.2', identity), vmmVersion: () => Promise.reject(new Error('qemu-system-x86_64 --version failed')) };
      assert.deepEqual(await decideSnapshot(subject, asked, request), { warning: warning('qemu-system-x86_64 --version failed') }, JSON.stringify(identity));
    }
    const gone: Backend = { ...backend(), vmmIdentity: () => Promise.reject(new Error('qemu-system-x86_64 is not on PATH')) };
    assert.deepEqual(await decideSnapshot(subject, gone, request), { warning: warning('qemu-system-x86_64 is not on PATH') });
  });

  test('--memory or --cpus other than the snapshot recorded is a note, also when the template defaults say otherwise', async () => {
    const { subject, meta, snap } = laidOut();
    // The template's defaults were changed after the snapshot was taken at 256 MiB.
    writeFileSync(join(snap, 'snapshot.json'), JSON.stringify({ ...meta, memoryMiB: 256 }));
    assert.deepEqual(await decideSnapshot(subject, backend(), request), {
      note: 'snapshot not used: it was taken with 2 CPUs and 256 MiB, this run asks for 2 and 512 MiB',
    });
    assert.ok((await decideSnapshot({ ...subject, memoryMiB: 256 }, backend(), { ...request, memoryMiB: 256 })).plan, 'a run at the size it was taken at restores');
  });
});
