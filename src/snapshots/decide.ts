import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { AccelPlan } from '../accel/index.js';
import type { Backend } from '../backends/types.js';
import type { RestorePlan } from '../vm/index.js';
import { sha256File } from '../image/index.js';
import { readSnapshotMeta, SNAPSHOT_LINK, subjectInputs, type SnapshotSubject } from './subject.js';

export interface SnapshotRequest {
  cpus: number;
  memoryMiB: number;
  addDirs: number;
  /** The run gives the guest a NIC (--net user, --allow-host, -p); snapshots are taken without one. */
  nic: boolean;
  noSnapshot: boolean;
  accel: AccelPlan;
}

export interface SnapshotDecision {
  plan?: RestorePlan;
  /** The snapshot is unusable (damaged, stale, VMM changed): one warning line, then a cold boot. */
  warning?: string;
  /** The request rules the snapshot out, or there is none (shown with -v). */
  note?: string;
  /** There is no snapshot at all. */
  missing?: true;
}

const accelName = (accel: string) => (accel === 'kvm' ? 'KVM' : 'TCG');

function requestRulesOut(subject: SnapshotSubject, request: SnapshotRequest): string | undefined {
  if (request.noSnapshot) return 'snapshot not used: --no-snapshot';
  if (request.nic) return 'snapshot not used: it was taken without a NIC, and this run asks for one (--net user, --allow-host or -p)';
  if (request.cpus !== subject.cpus || request.memoryMiB !== subject.memoryMiB) {
    return `snapshot not used: it was taken with ${subject.cpus} CPUs and ${subject.memoryMiB} MiB, this run asks for ${request.cpus} and ${request.memoryMiB} MiB`;
  }
  return undefined;
}

/**
 * Whether this run may restore the subject's snapshot, and from what. Every restore checks that what
 * the snapshot was taken from is unchanged (hashes recorded for kernel, initramfs, root image; size and
 * mtime of those files) and that its own files are the ones written (inode, size, mtime): cheap enough
 * for every run. `verifySnapshot` rehashes everything.
 */
export async function decideSnapshot(subject: SnapshotSubject, backend: Backend, request: SnapshotRequest): Promise<SnapshotDecision> {
  const warn = (why: string): SnapshotDecision => ({
    warning: `${subject.label}: not using its snapshot (${why}); booting cold. Retake it with '${subject.retake}'`,
  });
  // What the request rules out needs no snapshot to tell: nor is one taken for such a run.
  const ruledOut = requestRulesOut(subject, request);
  if (ruledOut) return { note: ruledOut };
  let found: Awaited<ReturnType<typeof readSnapshotMeta>>;
  try {
    found = await readSnapshotMeta(subject.dir);
  } catch (error) {
    return warn(`its metadata is unreadable: ${(error as Error).message}`);
  }
  if (!found) return { note: `${subject.label} has no snapshot: booting cold`, missing: true };
  const { dir, meta } = found;
  if (request.addDirs > meta.driveSlots.files.length) {
    return { note: `snapshot not used: it has ${meta.driveSlots.files.length} drive slots for --add-dir, this run needs ${request.addDirs}` };
  }
  if (request.cpus !== meta.cpus || request.memoryMiB !== meta.memoryMiB) {
    return { note: `snapshot not used: it was taken with ${meta.cpus} CPUs and ${meta.memoryMiB} MiB, this run asks for ${request.cpus} and ${request.memoryMiB} MiB` };
  }
  if (!backend.capabilities().snapshots || backend.name !== meta.backend) return { note: `snapshot not used: the ${backend.name} backend cannot restore it` };
  // A snapshot's device state only loads under the accelerator it was taken under (QEMU refuses a
  // TCG-taken state under KVM); a KVM not yet proven since the host booted is proven cold first.
  if (meta.accel !== request.accel.accel) return warn(`taken under ${accelName(meta.accel)}, this run uses ${accelName(request.accel.accel)}`);
  if (request.accel.probe) return { note: 'snapshot not used: KVM has not yet been proven on this host since it booted' };

  if (meta.kernelSha256 !== subject.kernel.sha256) return warn('the kernel changed');
  if (meta.initrdSha256 !== subject.initrd.sha256) return warn('the initramfs changed');
  if (meta.rootfsSha256 !== subject.rootfs?.sha256) return warn('the root file system changed');
  if (meta.layoutVersion !== subject.layoutVersion) return warn('the image layout changed');
  if (subject.agentVersion && meta.agentVersion !== subject.agentVersion) return warn(`the agent changed (${meta.agentVersion} → ${subject.agentVersion})`);
  const expectedInputs = subjectInputs(subject).length;
  if (meta.inputs.length !== expectedInputs) return warn('its inputs changed');
  for (const input of meta.inputs) {
    const info = await stat(join(subject.dir, input.file)).catch(() => undefined);
    if (!info || info.size !== input.size || info.mtimeMs !== input.mtimeMs) return warn(`${input.file} was modified`);
  }
  for (const slot of meta.driveSlots.files) {
    const info = await stat(join(dir, slot)).catch(() => undefined);
    if (!info || info.size !== meta.driveSlots.slotBytes) return warn(`its drive slot ${slot} is missing or resized`);
  }
  for (const file of [meta.files.ram, meta.files.state, ...(meta.files.disk ? [meta.files.disk] : [])]) {
    const info = await stat(join(dir, file.file)).catch(() => undefined);
    if (!info) return warn(`${file.file} is missing`);
    if (info.size !== file.size || info.mtimeMs !== file.mtimeMs || info.ino !== file.ino) return warn(`${file.file} was modified or replaced`);
  }
  if (!backend.vmmIdentity || !backend.vmmVersion) return { note: `snapshot not used: the ${backend.name} backend cannot tell its version` };
  try {
    const identity = await backend.vmmIdentity();
    const same = identity.binary === meta.vmm.binary && identity.size === meta.vmm.size && identity.mtimeMs === meta.vmm.mtimeMs;
    if (!same) {
      const version = await backend.vmmVersion();
      if (version !== meta.vmm.version) return warn(`the VMM changed: taken with ${meta.vmm.version}, now ${version}`);
    }
  } catch (error) {
    return warn((error as Error).message);
  }
  return {
    plan: {
      accel: meta.accel,
      dir,
      driveSlots: { paths: meta.driveSlots.files.map((slot) => join(dir, slot)), slotBytes: meta.driveSlots.slotBytes },
      ...(meta.files.disk ? { rootDrive: { path: join(dir, meta.files.disk.file), copyOnWrite: true } } : {}),
    },
  };
}

/** Recomputes every checksum of the snapshot (the RAM file included); returns the problems found. */
export async function verifySnapshot(subjectDir: string): Promise<string[]> {
  const found = await readSnapshotMeta(subjectDir);
  if (!found) return ['no snapshot'];
  const problems: string[] = [];
  for (const file of Object.values(found.meta.files)) {
    if (!file) continue;
    const sum = await sha256File(join(found.dir, file.file)).catch(() => 'missing');
    if (sum !== file.sha256) problems.push(`${file.file}: ${sum === 'missing' ? 'missing' : 'checksum mismatch'}`);
  }
  return problems;
}

export async function removeSnapshot(subjectDir: string): Promise<boolean> {
  const found = await readSnapshotMeta(subjectDir).catch(() => undefined);
  const link = join(subjectDir, SNAPSHOT_LINK);
  const existed = (await stat(link).catch(() => undefined)) !== undefined || found !== undefined;
  await rm(link, { force: true });
  if (found) await rm(found.dir, { recursive: true, force: true });
  return existed;
}
