/**
 * The default guest image, `default-microvm`: the kernel built from kernel/guest.config (or the
 * user's, via MVM_KERNEL) plus an initramfs holding busybox and the mvm guest agent.
 *
 * `ensureDefaultImage()` runs before every `mvmctl exec`, so its up-to-date check is cheap: it stats
 * the kernel and busybox (re-hashing them only when the stat changed), hashes the agent (small) and
 * compares with `manifest.json`. Anything changed rebuilds the initramfs (well under a second) or,
 * when the kernel's inputs changed, the kernel (minutes, once).
 *
 * Layout under `<cacheDir>/default-microvm/`:
 *   manifest.json        the current image with the kernel mvmctl builds (replaced atomically)
 *   manifest-user-kernel.json  the current image with a user's kernel (--kernel, MVM_KERNEL)
 *   <id>/initramfs.cpio  one directory per image id (sha256 of all inputs), renamed into place whole
 *   <id>/manifest.json
 *   .lock                held by the process building
 */
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';

import { MvmError } from '../errors.js';
import { writeFileAtomic } from '../fs-atomic.js';
import { runTool } from '../run-tool.js';
import { cacheDir } from '../paths.js';
import { type Progress, silentProgress } from '../progress.js';
import { type InitramfsCompression, buildInitramfsFromFiles, GUEST_INIT_PATH, INITRAMFS_LAYOUT_VERSION } from './initramfs.js';
import { type BuiltKernel, cachedKernel, ensureKernel, type KernelBuildOptions } from './kernel.js';
import { fingerprint, type FileFingerprint } from './fingerprint.js';
import { withLock } from './lock.js';
import { AGENT_BINARY_PATH, BUSYBOX_PATH } from './repo.js';

export { AGENT_BINARY_PATH, BUSYBOX_PATH, KERNEL_FRAGMENT_PATH, KERNEL_SOURCE_TARBALL } from './repo.js';
export { fingerprint, sha256File, type FileFingerprint } from './fingerprint.js';
export { GUEST_AGENT_PATH, GUEST_INIT_PATH, INITRAMFS_LAYOUT_VERSION } from './initramfs.js';


export const DEFAULT_IMAGE_NAME = 'default-microvm';

/**
 * Kernel command line for this image: how it boots. The backend adds what belongs to the machine:
 * the serial console, reboot/panic behaviour matching how it runs the VMM, timer hints under TCG
 * (`noapictimer`, `tsc_early_khz`), and the agent transport (`mvm.agent=...`).
 */
export const DEFAULT_KERNEL_ARGS: readonly string[] = ['quiet', `rdinit=${GUEST_INIT_PATH}`];

/**
 * The initramfs is written uncompressed (2.0 MiB; gzip -9 would make it 1.0 MiB): under TCG, boot to
 * power-off measured median 945 ms / best 810 ms uncompressed against 960 ms / 880 ms gzipped
 * (10 interleaved runs each), so decompression costs more than reading the larger file saves.
 */
export const INITRAMFS_COMPRESSION: InitramfsCompression = 'none';

export interface ImageManifest {
  format: 1;
  name: typeof DEFAULT_IMAGE_NAME;
  /** sha256 over every input below: equal ids mean identical images. */
  id: string;
  layoutVersion: number;
  createdAt: string;
  kernel: FileFingerprint & {
    origin: 'built' | 'user';
    /** Cache key of a kernel built by mvmctl (`<cacheDir>/kernels/<key>/vmlinux`). */
    buildKey?: string;
  };
  agent: FileFingerprint & {
    /** What `mvm-agent --version` printed when the image was built. */
    version?: string;
  };
  busybox: FileFingerprint;
  initrd: { file: string; size: number; sha256: string; compression: InitramfsCompression };
  kernelArgs: string[];
}

export interface GuestImage {
  name: typeof DEFAULT_IMAGE_NAME;
  /** This image's directory (`<cacheDir>/default-microvm/<id>`). */
  dir: string;
  /** Uncompressed ELF vmlinux (QEMU boots it via PVH; Firecracker wants this form). */
  kernel: string;
  kernelSha256: string;
  /** newc cpio initramfs. */
  initrd: string;
  /** Kernel command line for this image (the backend appends tsc_early_khz and the agent transport). */
  kernelArgs: readonly string[];
  /** `mvm-agent --version` at build time (e.g. `mvm-agent 0.1.0`); the agent also reports it in HELLO. */
  agentVersion?: string;
  manifest: ImageManifest;
}

export interface EnsureImageOptions {
  progress?: Progress;
  signal?: AbortSignal;
  /** A vmlinux to use instead of the built one (also `MVM_KERNEL`). */
  kernelPath?: string;
  /** Rebuild the initramfs even when the manifest matches (the kernel is rebuilt only if its inputs changed). */
  force?: boolean;
  /** Defaults: cacheDir() from src/paths.ts, guest/build/mvm-agent, /bin/busybox. */
  cacheRoot?: string;
  agentPath?: string;
  busyboxPath?: string;
  /** Passed to the kernel build (fragment, source tarball, jobs). */
  kernelBuild?: Pick<KernelBuildOptions, 'fragmentPath' | 'sourceTarball' | 'jobs'>;
  /** Replaces the kernel build (tests). */
  ensureKernel?: (options: KernelBuildOptions) => Promise<BuiltKernel>;
}

export function imageRoot(cacheRoot = cacheDir()): string {
  return join(cacheRoot, DEFAULT_IMAGE_NAME);
}

/** The user's kernel the image is to boot (--kernel, else MVM_KERNEL), or undefined for mvmctl's own. */
function userKernelPath(options: EnsureImageOptions): string | undefined {
  return options.kernelPath ?? (process.env.MVM_KERNEL || undefined);
}

/**
 * An image with a user's kernel has a manifest of its own beside the one with mvmctl's kernel, so
 * that moving between them (a template built with --kernel, then a plain exec) rebuilds neither
 * image, nor retakes its snapshot.
 */
const MANIFEST_FILES = { built: 'manifest.json', user: 'manifest-user-kernel.json' } as const;

function manifestPath(root: string, options: EnsureImageOptions): string {
  return join(root, userKernelPath(options) ? MANIFEST_FILES.user : MANIFEST_FILES.built);
}

/** The image id: a hash of everything the image is made from. */
export function imageId(inputs: {
  layoutVersion: number;
  kernelSha256: string;
  agentSha256: string;
  busyboxSha256: string;
  compression: InitramfsCompression;
  kernelArgs: readonly string[];
}): string {
  return createHash('sha256')
    .update(
      JSON.stringify([
        DEFAULT_IMAGE_NAME,
        inputs.layoutVersion,
        inputs.kernelSha256,
        inputs.agentSha256,
        inputs.busyboxSha256,
        inputs.compression,
        inputs.kernelArgs,
      ]),
    )
    .digest('hex');
}

/** Why `manifest` does not describe the image `wanted` would produce; empty when it does. */
export function staleReasons(
  manifest: ImageManifest | undefined,
  wanted: { id: string; kernel: FileFingerprint; agent: FileFingerprint; busybox: FileFingerprint; layoutVersion: number },
): string[] {
  if (!manifest) return ['not built yet'];
  const reasons: string[] = [];
  if (manifest.layoutVersion !== wanted.layoutVersion) reasons.push(`initramfs layout changed (${manifest.layoutVersion} → ${wanted.layoutVersion})`);
  if (manifest.kernel.sha256 !== wanted.kernel.sha256 || manifest.kernel.path !== wanted.kernel.path) reasons.push('kernel changed');
  if (manifest.agent.sha256 !== wanted.agent.sha256) reasons.push('guest agent changed');
  if (manifest.busybox.sha256 !== wanted.busybox.sha256) reasons.push('busybox changed');
  if (reasons.length === 0 && manifest.id !== wanted.id) reasons.push('image recipe changed');
  return reasons;
}

async function readManifest(path: string): Promise<ImageManifest | undefined> {
  try {
    const m = JSON.parse(await readFile(path, 'utf8')) as ImageManifest;
    return m && m.format === 1 && m.name === DEFAULT_IMAGE_NAME && typeof m.id === 'string' ? m : undefined;
  } catch {
    return undefined;
  }
}

function toImage(root: string, manifest: ImageManifest): GuestImage {
  const dir = join(root, manifest.id);
  return {
    name: DEFAULT_IMAGE_NAME,
    dir,
    kernel: manifest.kernel.path,
    kernelSha256: manifest.kernel.sha256,
    initrd: join(dir, manifest.initrd.file),
    kernelArgs: manifest.kernelArgs,
    ...(manifest.agent.version ? { agentVersion: manifest.agent.version } : {}),
    manifest,
  };
}

// ---------------------------------------------------------------------------------------------
// Resolving inputs

interface ResolvedInputs {
  kernel: ImageManifest['kernel'];
  agent: FileFingerprint;
  busybox: FileFingerprint;
  id: string;
}

async function resolveKernel(
  options: EnsureImageOptions,
  cacheRoot: string,
  previous: ImageManifest | undefined,
): Promise<ImageManifest['kernel']> {
  const given = userKernelPath(options);
  if (given) {
    const userKernel = resolve(given);
    const fp = await fingerprint(userKernel, previous?.kernel).catch((err: Error) => {
      throw new MvmError(`cannot use the kernel ${userKernel}${options.kernelPath ? '' : ' (from MVM_KERNEL)'}: ${err.message}`);
    });
    return { ...fp, origin: 'user' };
  }
  const built = await (options.ensureKernel ?? ensureKernel)({
    cacheRoot,
    progress: options.progress,
    signal: options.signal,
    ...options.kernelBuild,
  });
  const fp = await fingerprint(built.vmlinux, previous?.kernel);
  return { ...fp, origin: 'built', buildKey: built.key };
}

async function resolveInputs(options: EnsureImageOptions, cacheRoot: string, previous: ImageManifest | undefined): Promise<ResolvedInputs> {
  const agentPath = options.agentPath ?? AGENT_BINARY_PATH;
  const busyboxPath = options.busyboxPath ?? BUSYBOX_PATH;
  const agent = await fingerprint(agentPath, previous?.agent, true).catch(() => {
    throw new MvmError(`the guest agent ${agentPath} is missing: build it with \`make -C guest\` (or \`npm run build\`)`);
  });
  const busybox = await fingerprint(busyboxPath, previous?.busybox).catch(() => {
    throw new MvmError(`${busyboxPath} is missing: install the Debian package busybox-static`);
  });
  const kernel = await resolveKernel(options, cacheRoot, previous);
  const id = imageId({
    layoutVersion: INITRAMFS_LAYOUT_VERSION,
    kernelSha256: kernel.sha256,
    agentSha256: agent.sha256,
    busyboxSha256: busybox.sha256,
    compression: INITRAMFS_COMPRESSION,
    kernelArgs: DEFAULT_KERNEL_ARGS,
  });
  return { kernel, agent, busybox, id };
}

async function usable(root: string, manifest: ImageManifest): Promise<boolean> {
  const initrd = await stat(join(root, manifest.id, manifest.initrd.file)).catch(() => undefined);
  return initrd !== undefined && initrd.isFile() && initrd.size === manifest.initrd.size;
}

// ---------------------------------------------------------------------------------------------
// Public API

/** The default image, building (or rebuilding) whatever is missing or out of date. */
export async function ensureDefaultImage(options: EnsureImageOptions = {}): Promise<GuestImage> {
  const progress = options.progress ?? silentProgress;
  const cacheRoot = options.cacheRoot ?? cacheDir();
  const root = imageRoot(cacheRoot);
  const current = manifestPath(root, options);

  const previous = await readManifest(current);
  const inputs = await resolveInputs(options, cacheRoot, previous);
  const wanted = { ...inputs, layoutVersion: INITRAMFS_LAYOUT_VERSION };
  if (!options.force && previous && staleReasons(previous, wanted).length === 0 && (await usable(root, previous))) {
    if (statsMoved(previous, inputs)) {
      // Same contents, new stat (touched, copied): refresh the stat cache so the next check is cheap again.
      await writeFileAtomic(current, JSON.stringify(withInputStats(previous, inputs), null, 2) + '\n').catch(() => {});
    }
    return toImage(root, previous);
  }

  await mkdir(root, { recursive: true });
  return withLock(
    join(root, '.lock'),
    async () => {
      // Someone may have built it while we waited.
      const latest = await readManifest(current);
      if (!options.force && latest && latest.id === inputs.id && (await usable(root, latest))) return toImage(root, latest);
      // The same image made for the other manifest (one kernel, named both ways): shared, rather than
      // replaced along with its snapshot.
      const same = options.force ? undefined : await readManifest(join(root, inputs.id, 'manifest.json'));
      if (same && same.id === inputs.id && (await usable(root, same))) {
        const shared = withInputStats(same, inputs);
        await writeFileAtomic(current, JSON.stringify(shared, null, 2) + '\n');
        return toImage(root, shared);
      }
      const reasons = options.force ? ['rebuild forced'] : staleReasons(previous, wanted);
      progress(`building the ${DEFAULT_IMAGE_NAME} initramfs (${reasons.join(', ') || 'missing files'})`);
      const manifest = await buildImage(root, inputs);
      await writeFileAtomic(current, JSON.stringify(manifest, null, 2) + '\n');
      await removeOldImages(root);
      progress(`${DEFAULT_IMAGE_NAME} image ready: ${join(root, manifest.id)} (initramfs ${(manifest.initrd.size / 1048576).toFixed(1)} MiB)`);
      return toImage(root, manifest);
    },
    { signal: options.signal, progress, what: `building the ${DEFAULT_IMAGE_NAME} image` },
  );
}

/** The manifest with the inputs' paths and stats (their contents are the manifest's). */
function withInputStats(manifest: ImageManifest, inputs: ResolvedInputs): ImageManifest {
  return { ...manifest, kernel: inputs.kernel, agent: { ...manifest.agent, ...inputs.agent }, busybox: inputs.busybox };
}

function statsMoved(previous: ImageManifest, inputs: ResolvedInputs): boolean {
  const same = (a: FileFingerprint, b: FileFingerprint): boolean => a.size === b.size && a.mtimeMs === b.mtimeMs && a.ino === b.ino;
  return !same(previous.kernel, inputs.kernel) || !same(previous.agent, inputs.agent) || !same(previous.busybox, inputs.busybox);
}

/** `mvm-agent --version` (the agent is a static Linux binary, so it runs on the host too); undefined if that fails. */
export async function agentVersion(agentPath: string): Promise<string | undefined> {
  try {
    const { code, stdout } = await runTool(agentPath, ['--version'], { timeoutMs: 2000 });
    if (code !== 0) return undefined;
    const line = stdout.split('\n')[0]!.trim();
    return line.length > 0 && line.length < 200 ? line : undefined;
  } catch {
    return undefined;
  }
}

async function buildImage(root: string, inputs: ResolvedInputs): Promise<ImageManifest> {
  const [archive, version] = await Promise.all([
    buildInitramfsFromFiles({ busyboxPath: inputs.busybox.path, agentPath: inputs.agent.path, compression: INITRAMFS_COMPRESSION }),
    agentVersion(inputs.agent.path),
  ]);
  const manifest: ImageManifest = {
    format: 1,
    name: DEFAULT_IMAGE_NAME,
    id: inputs.id,
    layoutVersion: INITRAMFS_LAYOUT_VERSION,
    createdAt: new Date().toISOString(),
    kernel: inputs.kernel,
    agent: { ...inputs.agent, ...(version ? { version } : {}) },
    busybox: inputs.busybox,
    initrd: {
      file: INITRAMFS_COMPRESSION === 'gzip' ? 'initramfs.cpio.gz' : 'initramfs.cpio',
      size: archive.length,
      sha256: createHash('sha256').update(archive).digest('hex'),
      compression: INITRAMFS_COMPRESSION,
    },
    kernelArgs: [...DEFAULT_KERNEL_ARGS],
  };
  const tmp = join(root, `.tmp-${inputs.id.slice(0, 16)}-${process.pid}`);
  const final = join(root, inputs.id);
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp);
  try {
    await writeFile(join(tmp, manifest.initrd.file), archive);
    await writeFile(join(tmp, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    // Replace a stale or damaged directory of the same id (we hold the lock; readers only follow manifest.json).
    await rm(final, { recursive: true, force: true });
    await rename(tmp, final);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return manifest;
}

/** Deletes image directories neither manifest names that are over a minute old (a VM may be starting from one right now). */
async function removeOldImages(root: string): Promise<void> {
  const now = Date.now();
  const named = await Promise.all(Object.values(MANIFEST_FILES).map((file) => readManifest(join(root, file))));
  const keep = new Set(named.map((manifest) => manifest?.id));
  for (const name of await readdir(root).catch(() => [] as string[])) {
    const isImage = /^[0-9a-f]{64}$/.test(name) && !keep.has(name);
    const isStaleTmp = name.startsWith('.tmp-');
    if (!isImage && !isStaleTmp) continue;
    const info = await stat(join(root, name)).catch(() => undefined);
    if (info && now - info.mtimeMs > 60_000) await rm(join(root, name), { recursive: true, force: true }).catch(() => {});
  }
}

export interface ImageStatus {
  image?: GuestImage;
  /** Empty when the image is built and current. */
  staleReasons: string[];
}

/**
 * The current image and whether it is up to date, without building anything (for `mvmctl image info`).
 * A kernel that would need building is reported as stale rather than built.
 */
export async function defaultImageStatus(options: Omit<EnsureImageOptions, 'force' | 'ensureKernel'> = {}): Promise<ImageStatus> {
  const cacheRoot = options.cacheRoot ?? cacheDir();
  const root = imageRoot(cacheRoot);
  const manifest = await readManifest(manifestPath(root, options));
  const image = manifest && (await usable(root, manifest)) ? toImage(root, manifest) : undefined;
  let inputs: ResolvedInputs;
  try {
    inputs = await resolveInputs(
      {
        ...options,
        ensureKernel: async (o) => {
          const k = await cachedKernel(o);
          if (!k) throw new MvmError('the guest kernel is not built yet');
          return k;
        },
      },
      cacheRoot,
      manifest,
    );
  } catch (err) {
    return { image, staleReasons: [err instanceof Error ? err.message : String(err)] };
  }
  const reasons = image ? staleReasons(manifest, { ...inputs, layoutVersion: INITRAMFS_LAYOUT_VERSION }) : ['not built yet'];
  return { image, staleReasons: reasons };
}
