import { mkdir, readdir, readlink, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import type { AccelPlan } from '../accel/index.js';
import { SNAPSHOT_FILES, type Backend } from '../backends/types.js';
import { MvmError } from '../errors.js';
import { swapSymlink, workName } from '../fs-atomic.js';
import { sha256File } from '../image/index.js';
import { pidAlive } from '../image/lock.js';
import { silentProgress, type Progress } from '../progress.js';
import { bootVm, OwnedVm } from '../vm/index.js';
import { DRIVE_SLOT_BYTES, DRIVE_SLOTS, SNAPSHOT_FORMAT, SNAPSHOT_LINK, SNAPSHOT_META_FILE, subjectInputs, type SnapshotFile, type SnapshotMeta, type SnapshotSubject } from './subject.js';

/** The guest did not boot to its agent: nothing snapshot-specific went wrong, and a cold boot would fail alike. */
export class SnapshotBootError extends MvmError {
  constructor(readonly original: unknown) {
    const error = original instanceof MvmError ? original : undefined;
    super(error?.message ?? String(original), error?.exitCode, error?.details);
  }
}

export interface CaptureOptions {
  backend: Backend;
  progress?: Progress;
  signal: AbortSignal;
  bootTimeoutMs: number;
  /** Planned by the caller (planBootAccel), so that a run plans and warns once. */
  accel: AccelPlan;
  /** Warnings (the accelerator's fallback to TCG). */
  log: (line: string) => void;
}

async function fileRecord(dir: string, file: string): Promise<SnapshotFile> {
  const path = join(dir, file);
  const info = await stat(path);
  return { file, size: info.size, mtimeMs: info.mtimeMs, ino: info.ino, sha256: await sha256File(path) };
}

/** Boots the subject, waits until its agent answers, and saves a snapshot (replacing any previous one). */
export async function captureSnapshot(subject: SnapshotSubject, options: CaptureOptions): Promise<SnapshotMeta> {
  const { backend, signal } = options;
  const progress = options.progress ?? silentProgress;
  if (!backend.capabilities().snapshots) throw new MvmError(`the ${backend.name} backend cannot take snapshots`);
  if (!backend.vmmVersion || !backend.vmmIdentity || (subject.rootfs && !backend.createSnapshotDisk)) throw new MvmError(`the ${backend.name} backend cannot tell its version, so its snapshots could not be checked`);
  await removeSnapshotLeftovers(subject.dir);
  const work = workName('snap-');
  const snapDir = join(subject.dir, work);
  await mkdir(snapDir);
  let owned: OwnedVm | undefined;
  let published = false;
  try {
    progress(`${subject.label}: booting it to take a snapshot`);
    const disk = subject.rootfs ? await backend.createSnapshotDisk!(subject.rootfs.path, snapDir, signal) : undefined;
    const slots = Array.from({ length: DRIVE_SLOTS }, (_, index) => `slot${index}`);
    for (const slot of slots) {
      await writeFile(join(snapDir, slot), '');
      await truncate(join(snapDir, slot), DRIVE_SLOT_BYTES);
    }
    owned = await OwnedVm.create(backend, { command: ['(snapshot)', subject.label] });
    const started = performance.now();
    const booted = await bootVm(
      owned,
      {
        kernel: subject.kernel.path,
        initrd: subject.initrd.path,
        kernelArgs: subject.kernelArgs,
        cpus: subject.cpus,
        memoryMiB: subject.memoryMiB,
        // Writable at capture, or the guest would treat the devices as read-only for good.
        drives: slots.map((slot) => ({ path: join(snapDir, slot), readOnly: false })),
        ...(disk ? { rootDrive: { path: disk, copyOnWrite: false } } : {}),
        snapshot: { mode: 'capture', dir: snapDir },
      },
      {
        accel: options.accel,
        signal,
        timeoutMs: options.bootTimeoutMs,
        guest: `the guest of ${subject.label}`,
        timeoutHint: 'raise MVM_BOOT_TIMEOUT if the host is very slow',
        log: options.log,
      },
    ).catch((error: unknown) => {
      throw signal.aborted ? error : new SnapshotBootError(error);
    });
    const bootSeconds = (performance.now() - started) / 1000;
    const running = booted.vm;
    if (!running.saveSnapshot) throw new MvmError(`the ${backend.name} backend cannot take snapshots`);
    progress(`${subject.label}: agent ready after ${bootSeconds.toFixed(2)} s; saving the snapshot`);
    await running.saveSnapshot.call(running, signal);
    booted.session.close();

    const [vmmVersion, identity] = await Promise.all([backend.vmmVersion(), backend.vmmIdentity()]);
    progress(`${subject.label}: checksumming the snapshot`);
    const meta: SnapshotMeta = {
      format: SNAPSHOT_FORMAT,
      subject: subject.label,
      createdAt: new Date().toISOString(),
      backend: backend.name,
      accel: booted.accel,
      kernelSha256: subject.kernel.sha256,
      initrdSha256: subject.initrd.sha256,
      ...(subject.rootfs ? { rootfsSha256: subject.rootfs.sha256 } : {}),
      layoutVersion: subject.layoutVersion,
      agentVersion: booted.session.agentVersion,
      vmm: { version: vmmVersion, ...identity },
      cpus: subject.cpus,
      memoryMiB: subject.memoryMiB,
      inputs: await Promise.all(
        subjectInputs(subject).map(async (path) => {
          const info = await stat(path);
          return { file: relative(subject.dir, path), size: info.size, mtimeMs: info.mtimeMs };
        }),
      ),
      files: {
        ram: await fileRecord(snapDir, SNAPSHOT_FILES.memory),
        state: await fileRecord(snapDir, SNAPSHOT_FILES.state),
        ...(disk ? { disk: await fileRecord(snapDir, relative(snapDir, disk)) } : {}),
      },
      driveSlots: { files: slots, slotBytes: DRIVE_SLOT_BYTES },
      bootSeconds,
    };
    await writeFile(join(snapDir, SNAPSHOT_META_FILE), JSON.stringify(meta, null, 2) + '\n');
    signal.throwIfAborted();
    const previous = await swapSymlink(join(subject.dir, SNAPSHOT_LINK), work);
    published = true;
    // Restores running from the previous snapshot keep its files open; unlinking them is safe.
    if (previous && previous !== work && /^snap-[\w-]+$/.test(previous)) await rm(join(subject.dir, previous), { recursive: true, force: true });
    return meta;
  } finally {
    await owned?.release();
    if (!published) await rm(snapDir, { recursive: true, force: true });
  }
}

/** Removes `snap-<pid>-…` directories and half-made links that no link points to and whose creating process is gone. */
export async function removeSnapshotLeftovers(dir: string): Promise<void> {
  const current = await readlink(join(dir, SNAPSHOT_LINK)).catch(() => undefined);
  for (const entry of await readdir(dir).catch(() => [] as string[])) {
    const owner = /^(?:snap-|.*\.new-)(\d+)-/.exec(entry);
    if (!owner || entry === current || pidAlive(Number(owner[1]))) continue;
    await rm(join(dir, entry), { recursive: true, force: true }).catch(() => {});
  }
}
