/**
 * `mvmctl template build`: turns the default image or a user's root file system (a directory, e.g.
 * made by debootstrap, or a tar, e.g. `docker export`) into a template. See store.ts for the layout
 * and initramfs.ts for how a template with a root file system boots.
 */
import type { NetMode } from '../net/spec.js';
import { copyFile, lstat, mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { AccelChoice } from '../accel/index.js';
import type { Backend } from '../backends/types.js';
import { debugfsErrors } from '../dirsync/debugfs-errors.js';
import { lastLine, runTool } from '../run-tool.js';
import { MvmError } from '../errors.js';
import { agentVersion, DEFAULT_KERNEL_ARGS, ensureDefaultImage, sha256File } from '../image/index.js';
import { silentProgress, type Progress } from '../progress.js';
import { buildTemplateInitramfs, MOUNT_POINTS, RESERVED_DIR, TEMPLATE_LAYOUT_VERSION } from './initramfs.js';
import { planBootAccel } from '../vm/index.js';
import { swapSymlink } from '../fs-atomic.js';
import { captureSnapshot } from '../snapshots/index.js';
import { templateSubject } from './subject.js';
import {
  collectGarbage,
  ensureTemplatesDir,
  findTemplate,
  TEMPLATE_META_FILE,
  validateTemplateName,
  versionDirName,
  vmsUsing,
  type FileRecord,
  type Template,
  type TemplateMeta,
  type TemplateSource,
} from './store.js';

export interface BuildOptions {
  name: string;
  rootfsDir?: string;
  rootfsTar?: string;
  kernel?: string;
  cpus: number;
  memoryMiB: number;
  /** The network exec gives the template's guests by default. */
  net?: NetMode;
  /** Free space in the root file system beyond its contents (the image file is sparse). Default 1 GiB. */
  freeBytes?: number;
  snapshot: boolean;
  backend: Backend;
  progress?: Progress;
  signal: AbortSignal;
  bootTimeoutMs: number;
  /** The accelerator of the snapshot boot. */
  accel: AccelChoice;
  log: (line: string) => void;
}

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
const BLOCK = 4096;

async function record(dir: string, file: string): Promise<FileRecord> {
  const path = join(dir, file);
  return { file, size: (await stat(path)).size, sha256: await sha256File(path) };
}

export async function buildTemplate(options: BuildOptions): Promise<Template> {
  const progress = options.progress ?? silentProgress;
  validateTemplateName(options.name);
  if (options.rootfsDir && options.rootfsTar) throw new MvmError('give --rootfs-dir or --rootfs-tar, not both');
  const source: TemplateSource = options.rootfsDir
    ? { kind: 'rootfs-dir', path: resolve(options.rootfsDir) }
    : options.rootfsTar
      ? { kind: 'rootfs-tar', path: resolve(options.rootfsTar) }
      : { kind: 'default' };
  if (source.kind !== 'default') {
    const info = await stat(source.path).catch(() => undefined);
    const wanted = source.kind === 'rootfs-dir' ? 'a directory' : 'a file';
    if (!info || (source.kind === 'rootfs-dir' ? !info.isDirectory() : !info.isFile())) {
      throw new MvmError(`--${source.kind} ${source.path}: not ${wanted}`);
    }
  }

  const root = await ensureTemplatesDir();
  await collectGarbage();
  // Kernel, busybox and agent come from the default image (which also resolves --kernel / MVM_KERNEL).
  const image = await ensureDefaultImage({ progress, signal: options.signal, ...(options.kernel ? { kernelPath: options.kernel } : {}) });
  const versionName = versionDirName(options.name);
  const dir = join(root, versionName);
  await mkdir(dir);
  let published = false;
  try {
    progress(`template ${options.name}: copying the kernel and building the initramfs`);
    await copyFile(image.kernel, join(dir, 'vmlinux'));
    if (source.kind === 'default') {
      await copyFile(image.initrd, join(dir, 'initramfs.cpio'));
    } else {
      await writeFile(join(dir, 'initramfs.cpio'), await buildTemplateInitramfs(image.manifest.busybox.path, image.manifest.agent.path));
    }
    let rootfs: TemplateMeta['rootfs'];
    if (source.kind !== 'default') {
      rootfs = await buildRootfs(source, dir, options, progress);
    }
    options.signal.throwIfAborted();
    progress(`template ${options.name}: checksumming`);
    const version = image.agentVersion ?? (await agentVersion(image.manifest.agent.path));
    const meta: TemplateMeta = {
      format: 1,
      name: options.name,
      createdAt: new Date().toISOString(),
      source,
      cpus: options.cpus,
      memoryMiB: options.memoryMiB,
      ...(options.net && options.net !== 'none' ? { net: options.net } : {}),
      kernel: { ...(await record(dir, 'vmlinux')), origin: image.manifest.kernel.origin === 'user' ? image.kernel : 'built' },
      initrd: await record(dir, 'initramfs.cpio'),
      ...(rootfs ? { rootfs } : {}),
      kernelArgs: [...DEFAULT_KERNEL_ARGS],
      ...(version ? { agentVersion: version } : {}),
      layoutVersion: TEMPLATE_LAYOUT_VERSION,
    };
    await writeFile(join(dir, TEMPLATE_META_FILE), JSON.stringify(meta, null, 2) + '\n');
    const template: Template = { name: options.name, dir, meta };
    if (options.snapshot) {
      await captureSnapshot(templateSubject(template), {
        backend: options.backend,
        progress,
        signal: options.signal,
        bootTimeoutMs: options.bootTimeoutMs,
        accel: await planBootAccel(options.backend, options.accel, meta.kernel.sha256, options.log),
        log: options.log,
      });
    }
    options.signal.throwIfAborted();
    const previous = await findTemplate(options.name);
    await swapSymlink(join(root, options.name), versionName);
    published = true;
    if (previous) {
      // VMs running from the old version keep their files open; anything starting from it right
      // now would lose its files, so an old version in use is left for the garbage collector.
      if ((await vmsUsing(previous.dir)).length === 0) await rm(previous.dir, { recursive: true, force: true });
    }
    progress(`template ${options.name} ready${options.snapshot ? ' (with snapshot)' : ''}`);
    return template;
  } finally {
    if (!published) await rm(dir, { recursive: true, force: true });
  }
}

interface TreeSize {
  entries: number;
  contentBytes: number;
  allocatedBytes: number;
  hasReserved: boolean;
  hasLostFound: boolean;
  missingMountPoints: string[];
}

async function measureTree(top: string, signal: AbortSignal): Promise<TreeSize> {
  const size: TreeSize = { entries: 0, contentBytes: 0, allocatedBytes: 0, hasReserved: false, hasLostFound: false, missingMountPoints: [] };
  const topEntries = new Set(await readdir(top));
  size.hasReserved = topEntries.has(RESERVED_DIR);
  size.hasLostFound = topEntries.has('lost+found');
  size.missingMountPoints = MOUNT_POINTS.filter((m) => m !== RESERVED_DIR && !topEntries.has(m));
  const stack = [top];
  while (stack.length > 0) {
    signal.throwIfAborted();
    const dir = stack.pop()!;
    for (const name of await readdir(dir)) {
      const path = join(dir, name);
      const info = await lstat(path);
      size.entries++;
      if (info.isDirectory()) {
        stack.push(path);
        size.allocatedBytes += BLOCK;
      } else if (info.isFile()) {
        size.contentBytes += info.size;
        size.allocatedBytes += Math.ceil(Math.min(info.size, info.blocks * 512) / BLOCK) * BLOCK + BLOCK;
      } else {
        size.allocatedBytes += 256;
      }
    }
  }
  return size;
}

async function buildRootfs(
  source: Extract<TemplateSource, { path: string }>,
  dir: string,
  options: BuildOptions,
  progress: Progress,
): Promise<NonNullable<TemplateMeta['rootfs']>> {
  let tree = source.path;
  const extracted = join(dir, '.work-rootfs');
  try {
    if (source.kind === 'rootfs-tar') {
      progress(`template ${options.name}: unpacking ${source.path}`);
      await mkdir(extracted);
      // As root, tar keeps owners and modes (device nodes too); otherwise files become ours.
      const res = await runTool('tar', ['-x', '-f', source.path, '-C', extracted, '--numeric-owner', '-p', '--delay-directory-restore'], { signal: options.signal });
      if (res.code !== 0) throw new MvmError(`--rootfs-tar ${source.path}: tar failed: ${lastLine(res.stderr)}`);
      tree = extracted;
    }
    const size = await measureTree(tree, options.signal);
    if (size.hasReserved) {
      throw new MvmError(`the root file system ${source.path} has /${RESERVED_DIR}, a path mvmctl reserves for its agent: remove or rename it`);
    }
    progress(`template ${options.name}: building the root drive (${size.entries} entries, ${(size.contentBytes / MiB).toFixed(0)} MB)`);
    const freeBytes = options.freeBytes ?? GiB;
    const inodes = size.entries + 1024 + Math.ceil(freeBytes / 16384);
    const image = join(dir, 'rootfs.ext4');
    let bytes = Math.ceil((size.allocatedBytes * 1.1 + inodes * 256 + 16 * MiB + freeBytes) / (4 * MiB)) * 4 * MiB;
    for (let attempt = 0; ; attempt++) {
      await rm(image, { force: true });
      // No journal: every VM writes to its own throwaway overlay, so there is nothing to recover.
      const res = await runTool(
        'mke2fs',
        ['-q', '-F', '-t', 'ext4', '-b', String(BLOCK), '-I', '256', '-m', '0', '-N', String(inodes), '-O', '^has_journal,^resize_inode', '-L', 'mvm-root', '-d', tree, image, `${bytes / 1024}k`],
        { signal: options.signal },
      );
      if (res.code === 0) break;
      if (attempt >= 3 || !/allocate|space|inode/i.test(res.stderr)) {
        throw new MvmError(`building the root drive from ${source.path} failed: ${lastLine(res.stderr)}`);
      }
      bytes = Math.ceil((bytes * 1.5) / (4 * MiB)) * 4 * MiB;
    }
    // Our mount points, added to the image only: the user's tree is left as it was.
    const commands = [...size.missingMountPoints, RESERVED_DIR].map((m) => `mkdir /${m}`);
    // lost+found is mke2fs's, not the user's.
    if (!size.hasLostFound) commands.unshift('rmdir /lost+found');
    const script = join(dir, '.work-debugfs');
    await writeFile(script, commands.join('\n') + '\n');
    const res = await runTool('debugfs', ['-w', '-f', script, image], { signal: options.signal });
    await rm(script, { force: true });
    const errors = debugfsErrors(res.stderr);
    if (res.code !== 0 || errors.length > 0) throw new MvmError(`adding mount points to the root drive failed: ${errors[0] ?? lastLine(res.stderr)}`);
    progress(`template ${options.name}: checksumming the root drive`);
    return { ...(await record(dir, 'rootfs.ext4')), entries: size.entries, contentBytes: size.contentBytes };
  } finally {
    await rm(extracted, { recursive: true, force: true });
  }
}
