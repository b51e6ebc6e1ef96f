/**
 * Template snapshots: capture (boot the template once, wait for the agent, save) and the checks a
 * snapshot passes before `exec --manifest` restores it.
 *
 * A snapshot directory holds:
 *   ram          guest RAM: the VM ran with its memory in this file (memory-backend-file, share=on)
 *   state        device state, written by QEMU's migration with x-ignore-shared (RAM not copied)
 *   disk.qcow2   the root drive as the captured guest left it (qcow2 over ../rootfs.ext4); a
 *                restored guest's page cache and ext4 state match this disk, not the pristine image
 *   snapshot.json SnapshotMeta
 * Restores map `ram` privately (share=off) and open `disk.qcow2` with snapshot=on: neither file is
 * ever written, so any number of restores can run from one snapshot at once.
 */
import { mkdir, readFile, realpath, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Backend, RunningVm } from '../backends/types.js';
import { lastLine, runTool } from '../run-tool.js';
import { MvmError } from '../errors.js';
import type { RestorePlan } from '../exec/run.js';
import { silentProgress, type Progress } from '../progress.js';
import type { AgentSession } from '../protocol/index.js';
import { bootVm, planBootAccel } from '../exec/boot.js';
import type { Accel, AccelChoice } from '../accel/index.js';
import { createVmDir, newVmName, ownVmRecord, recordVmm, removeVmDir, writeVmRecord } from '../state/registry.js';
import { sha256File } from '../image/index.js';
import { SNAPSHOT_LINK, SNAPSHOT_META_FILE, swapSymlink, workName, type Template } from './store.js';

export const SNAPSHOT_FORMAT = 1;

interface SnapshotFile {
  file: string;
  size: number;
  mtimeMs: number;
  sha256: string;
}

export interface SnapshotMeta {
  format: typeof SNAPSHOT_FORMAT;
  template: string;
  createdAt: string;
  backend: string;
  /** The accelerator the snapshot was taken under: its CPU state only loads under the same one. */
  accel: Accel;
  /** What the snapshot was taken from: all must still match for a restore. */
  kernelSha256: string;
  initrdSha256: string;
  rootfsSha256?: string;
  templateLayoutVersion: number;
  /** As the agent reported it in HELLO. */
  agentVersion: string;
  vmm: { version: string; binary: string; size: number; mtimeMs: number };
  cpus: number;
  memoryMiB: number;
  /** The template's own files (size + mtime: a cheap check that they were not replaced or changed). */
  inputs: Array<{ file: string; size: number; mtimeMs: number }>;
  files: { ram: SnapshotFile; state: SnapshotFile; disk?: SnapshotFile };
  /** Seconds from VMM start until the agent answered, when captured (for `template info`). */
  bootSeconds: number;
}

/** Files up to this size are re-hashed before every restore; larger ones (the RAM) are checked by size and mtime. */
const REHASH_LIMIT = 32 * 1024 * 1024;

export interface CaptureOptions {
  backend: Backend;
  progress?: Progress;
  signal: AbortSignal;
  bootTimeoutMs: number;
  accel: AccelChoice;
  /** Warnings (the accelerator's fallback to TCG). */
  log: (line: string) => void;
}

function inputFiles(template: Template): string[] {
  return [template.meta.kernel.file, template.meta.initrd.file, ...(template.meta.rootfs ? [template.meta.rootfs.file] : [])];
}

async function fileRecord(dir: string, file: string): Promise<SnapshotFile> {
  const path = join(dir, file);
  const info = await stat(path);
  return { file, size: info.size, mtimeMs: info.mtimeMs, sha256: await sha256File(path) };
}

/** Boots the template, waits until its agent answers, and saves a snapshot (replacing any previous one). */
export async function captureSnapshot(template: Template, options: CaptureOptions): Promise<SnapshotMeta> {
  const { backend, signal } = options;
  const progress = options.progress ?? silentProgress;
  if (!backend.capabilities().snapshots) throw new MvmError(`the ${backend.name} backend cannot take snapshots`);
  if (!backend.vmmVersion || !backend.vmmIdentity) throw new MvmError(`the ${backend.name} backend cannot tell its version, so its snapshots could not be checked`);
  const work = workName('snap-');
  const snapDir = join(template.dir, work);
  await mkdir(snapDir);
  const name = newVmName();
  const runDir = await createVmDir(name);
  let vm: RunningVm | undefined;
  let published = false;
  try {
    progress(`template ${template.name}: booting it to take a snapshot`);
    if (template.meta.rootfs) {
      // Relative backing path: the template directory may be renamed or moved as a whole.
      const res = await runTool(
        'qemu-img',
        ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', `../${template.meta.rootfs.file}`, join(snapDir, 'disk.qcow2')],
        { signal },
      ).catch((error: Error) => {
        throw new MvmError(`${error.message.includes('not found') ? 'qemu-img not found: install qemu-utils' : error.message}`);
      });
      if (res.code !== 0) throw new MvmError(`qemu-img create failed: ${lastLine(res.stderr)}`);
    }
    const record = ownVmRecord({ name, backend: backend.name, command: ['(template snapshot)', template.name], runDir });
    await writeVmRecord(record);
    const accel = await planBootAccel(backend, options.accel, template.meta.kernel.sha256, options.log);
    const started = performance.now();
    const booted = await bootVm(
      backend,
      {
        name,
        runDir,
        kernel: join(template.dir, template.meta.kernel.file),
        initrd: join(template.dir, template.meta.initrd.file),
        kernelArgs: template.meta.kernelArgs,
        cpus: template.meta.cpus,
        memoryMiB: template.meta.memoryMiB,
        drives: [],
        ...(template.meta.rootfs ? { rootDrive: { path: join(snapDir, 'disk.qcow2'), format: 'qcow2' as const, copyOnWrite: false } } : {}),
        memoryFile: { path: join(snapDir, 'ram'), shared: true },
      },
      {
        accel,
        signal,
        timeoutMs: options.bootTimeoutMs,
        guest: "the template's guest",
        log: options.log,
        onVmmStarted: (started) => recordVmm(record, started.vmmPid),
      },
    );
    vm = booted.vm;
    const running = booted.vm;
    const session: AgentSession = booted.session;
    const bootSeconds = (performance.now() - started) / 1000;
    const agentVersion = session.agentVersion;
    if (!running.saveSnapshot) throw new MvmError(`the ${backend.name} backend cannot take snapshots`);
    progress(`template ${template.name}: agent ready after ${bootSeconds.toFixed(2)} s; saving the snapshot`);
    await running.saveSnapshot.call(running, join(snapDir, 'state'), signal);
    session.close();

    const [vmmVersion, identity] = await Promise.all([backend.vmmVersion(), backend.vmmIdentity()]);
    progress(`template ${template.name}: checksumming the snapshot`);
    const meta: SnapshotMeta = {
      format: SNAPSHOT_FORMAT,
      template: template.name,
      createdAt: new Date().toISOString(),
      backend: backend.name,
      accel: booted.accel,
      kernelSha256: template.meta.kernel.sha256,
      initrdSha256: template.meta.initrd.sha256,
      ...(template.meta.rootfs ? { rootfsSha256: template.meta.rootfs.sha256 } : {}),
      templateLayoutVersion: template.meta.layoutVersion,
      agentVersion,
      vmm: { version: vmmVersion, ...identity },
      cpus: template.meta.cpus,
      memoryMiB: template.meta.memoryMiB,
      inputs: await Promise.all(
        inputFiles(template).map(async (file) => {
          const info = await stat(join(template.dir, file));
          return { file, size: info.size, mtimeMs: info.mtimeMs };
        }),
      ),
      files: {
        ram: await fileRecord(snapDir, 'ram'),
        state: await fileRecord(snapDir, 'state'),
        ...(template.meta.rootfs ? { disk: await fileRecord(snapDir, 'disk.qcow2') } : {}),
      },
      bootSeconds,
    };
    await writeFile(join(snapDir, SNAPSHOT_META_FILE), JSON.stringify(meta, null, 2) + '\n');
    signal.throwIfAborted();
    const previous = await swapSymlink(join(template.dir, SNAPSHOT_LINK), work);
    published = true;
    // Restores running from the previous snapshot keep its files open; unlinking them is safe.
    if (previous && previous !== work && /^snap-[\w-]+$/.test(previous)) await rm(join(template.dir, previous), { recursive: true, force: true });
    return meta;
  } finally {
    await vm?.kill();
    await removeVmDir(runDir);
    if (!published) await rm(snapDir, { recursive: true, force: true });
  }
}

export async function readSnapshotMeta(template: Template): Promise<{ dir: string; meta: SnapshotMeta } | undefined> {
  const dir = await realpath(join(template.dir, SNAPSHOT_LINK)).catch(() => undefined);
  if (!dir) return undefined;
  const meta = JSON.parse(await readFile(join(dir, SNAPSHOT_META_FILE), 'utf8')) as SnapshotMeta;
  if (!meta || meta.format !== SNAPSHOT_FORMAT || !meta.files?.ram || !meta.files?.state) throw new Error('unknown snapshot format');
  return { dir, meta };
}

export interface SnapshotRequest {
  cpus: number;
  memoryMiB: number;
  addDirs: number;
  noSnapshot: boolean;
}

export interface SnapshotDecision {
  plan?: RestorePlan;
  /** The snapshot is unusable (damaged, stale, VMM changed): one warning line, then a cold boot. */
  warning?: string;
  /** The request rules the snapshot out (shown with -v). */
  note?: string;
}

/** Whether `exec --manifest` may restore the template's snapshot for this request, and from what. */
export async function decideSnapshot(template: Template, backend: Backend, request: SnapshotRequest): Promise<SnapshotDecision> {
  const warn = (why: string): SnapshotDecision => ({
    warning: `template ${template.name}: not using its snapshot (${why}); booting cold. Retake it with 'mvmctl template snapshot ${template.name}'`,
  });
  let found: Awaited<ReturnType<typeof readSnapshotMeta>>;
  try {
    found = await readSnapshotMeta(template);
  } catch (error) {
    return warn(`its metadata is unreadable: ${(error as Error).message}`);
  }
  if (!found) return { note: `template ${template.name} has no snapshot: booting cold` };
  const { dir, meta } = found;
  if (request.noSnapshot) return { note: 'snapshot not used: --no-snapshot' };
  if (request.addDirs > 0) return { note: 'snapshot not used: --add-dir needs a cold boot (the snapshot has no drive for it)' };
  if (request.cpus !== meta.cpus || request.memoryMiB !== meta.memoryMiB) {
    return { note: `snapshot not used: it was taken with ${meta.cpus} CPUs and ${meta.memoryMiB} MiB, this run asks for ${request.cpus} and ${request.memoryMiB} MiB` };
  }
  if (!backend.capabilities().snapshots || backend.name !== meta.backend) return { note: `snapshot not used: the ${backend.name} backend cannot restore it` };

  const t = template.meta;
  if (meta.kernelSha256 !== t.kernel.sha256) return warn('the kernel changed');
  if (meta.initrdSha256 !== t.initrd.sha256) return warn('the initramfs changed');
  if (meta.rootfsSha256 !== t.rootfs?.sha256) return warn('the root file system changed');
  if (meta.templateLayoutVersion !== t.layoutVersion) return warn('the template layout changed');
  if (t.agentVersion && meta.agentVersion !== t.agentVersion) return warn(`the agent changed (${meta.agentVersion} → ${t.agentVersion})`);
  for (const input of meta.inputs) {
    const info = await stat(join(template.dir, input.file)).catch(() => undefined);
    if (!info || info.size !== input.size || info.mtimeMs !== input.mtimeMs) return warn(`the template's ${input.file} was modified`);
  }
  for (const file of [meta.files.ram, meta.files.state, ...(meta.files.disk ? [meta.files.disk] : [])]) {
    const path = join(dir, file.file);
    const info = await stat(path).catch(() => undefined);
    if (!info) return warn(`${file.file} is missing`);
    if (info.size !== file.size || info.mtimeMs !== file.mtimeMs) return warn(`${file.file} was modified`);
    if (file.size <= REHASH_LIMIT && (await sha256File(path).catch(() => '')) !== file.sha256) return warn(`${file.file} is corrupt (checksum mismatch)`);
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
      memoryFile: join(dir, meta.files.ram.file),
      stateFile: join(dir, meta.files.state.file),
      ...(meta.files.disk ? { rootDrive: { path: join(dir, meta.files.disk.file), format: 'qcow2' as const, copyOnWrite: true } } : {}),
    },
  };
}

/** Recomputes every checksum of the snapshot (the RAM file included); returns the problems found. */
export async function verifySnapshot(template: Template): Promise<string[]> {
  const found = await readSnapshotMeta(template);
  if (!found) return ['no snapshot'];
  const problems: string[] = [];
  for (const file of Object.values(found.meta.files)) {
    if (!file) continue;
    const sum = await sha256File(join(found.dir, file.file)).catch(() => 'missing');
    if (sum !== file.sha256) problems.push(`${file.file}: ${sum === 'missing' ? 'missing' : 'checksum mismatch'}`);
  }
  return problems;
}

export async function removeSnapshot(template: Template): Promise<boolean> {
  const found = await readSnapshotMeta(template).catch(() => undefined);
  const link = join(template.dir, SNAPSHOT_LINK);
  const existed = (await stat(link).catch(() => undefined)) !== undefined || found !== undefined;
  await rm(link, { force: true });
  if (found) await rm(found.dir, { recursive: true, force: true });
  return existed;
}
