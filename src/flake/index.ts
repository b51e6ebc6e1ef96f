/**
 * `--flake REF`: a guest image built by Nix from the user's flake, and cached under the flake's
 * locked hash. See nix.ts for the Nix calls. The flake's output (`nix build REF`) must hold:
 *
 *   $out/vmlinux       the guest kernel, an uncompressed ELF vmlinux (QEMU's microvm boots it via
 *                      PVH; Firecracker takes this form too); needs what kernel/guest.config enables
 *   and exactly one of
 *   $out/initrd        a newc cpio initramfs booted as it is, as the default image is: its /sbin/init
 *                      must start mvm's agent (guest/build/mvm-agent), e.g. the default image's own
 *                      initramfs.cpio, or one built the same way
 *   $out/rootfs.ext4   an ext4 root file system, booted as a template's is (src/templates/initramfs.ts):
 *                      mvmctl's own first stage (busybox + its agent) mounts it copy-on-write and runs
 *                      the agent chrooted into it, so the flake needs no agent of its own
 *
 * Layout under `<cacheDir>/flakes/`:
 *   <key>/result -> /nix/store/…   nix build's out-link: a GC root, so the store keeps the output
 *   <key>/initramfs.cpio           mvm's first stage, for a rootfs.ext4 output (rebuilt when the agent changes)
 *   <key>/flake.json               FlakeRecord, written last (atomically)
 *   <key>.lock                     held by the process building
 */
import { mkdir, open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { MvmError } from '../errors.js';
import { writeFileAtomic } from '../fs-atomic.js';
import { DEFAULT_KERNEL_ARGS, fingerprint, sha256File, type FileFingerprint } from '../image/index.js';
import { withLock } from '../image/lock.js';
import { AGENT_BINARY_PATH, BUSYBOX_PATH } from '../image/repo.js';
import { cacheDir } from '../paths.js';
import type { Progress } from '../progress.js';
import { buildTemplateInitramfs, TEMPLATE_LAYOUT_VERSION } from '../templates/initramfs.js';
import type { BootImage } from '../vm/index.js';
import { findNix, flakeCacheKey, flakeMetadata, nixBuild, parseFlakeRef } from './nix.js';

export { flakeRefProblem, NIX_FEATURES, parseFlakeRef } from './nix.js';

/** Bump when the output layout or how it boots changes: part of the cache key. */
export const FLAKE_LAYOUT_VERSION = 1;
export const FLAKE_OUTPUT_FILES = { kernel: 'vmlinux', initrd: 'initrd', rootfs: 'rootfs.ext4' } as const;
const FIRST_STAGE_FILE = 'initramfs.cpio';
const RECORD_FILE = 'flake.json';

export interface FlakeRecord {
  format: 1;
  ref: string;
  /** The locked URL that was built. */
  lockedUrl: string;
  key: string;
  storePath: string;
  kind: 'initrd' | 'rootfs';
  kernelSha256: string;
  createdAt: string;
  /** mvm's first stage, for a rootfs output: built from these, with the template layout of that version. */
  firstStage?: { sha256: string; agent: FileFingerprint; busybox: FileFingerprint; layoutVersion: number };
}

export interface FlakeImage {
  dir: string;
  kernel: string;
  kernelSha256: string;
  initrd: string;
  rootfs?: string;
  kernelArgs: readonly string[];
  record: FlakeRecord;
}

export interface FlakeImageOptions {
  progress: Progress;
  signal: AbortSignal;
  /** Defaults: cacheDir(), guest/build/mvm-agent, /bin/busybox (tests give their own). */
  cacheRoot?: string;
  agentPath?: string;
  busyboxPath?: string;
}

export function flakesDir(cacheRoot = cacheDir()): string {
  return join(cacheRoot, 'flakes');
}

/** The flake's image: from the cache when its locked hash was built before, else built now (once, under a lock). */
export async function ensureFlakeImage(refText: string, options: FlakeImageOptions): Promise<FlakeImage> {
  const ref = parseFlakeRef(refText);
  const nix = findNix();
  const meta = await flakeMetadata(nix, ref, options.signal);
  const key = flakeCacheKey(meta, ref.fragment, FLAKE_LAYOUT_VERSION);
  const root = flakesDir(options.cacheRoot);
  const dir = join(root, key);
  const recordPath = join(dir, RECORD_FILE);
  const agentPath = options.agentPath ?? AGENT_BINARY_PATH;
  const busyboxPath = options.busyboxPath ?? BUSYBOX_PATH;

  const cached = await readRecord(recordPath, key);
  if (cached && (await outputUsable(cached)) && (await firstStageFresh(cached, dir, agentPath, busyboxPath))) return toImage(dir, cached);

  await mkdir(root, { recursive: true });
  return withLock(
    join(root, `${key}.lock`),
    async () => {
      // Someone may have built it while we waited.
      const current = await readRecord(recordPath, key);
      if (current && (await outputUsable(current)) && (await firstStageFresh(current, dir, agentPath, busyboxPath))) return toImage(dir, current);
      await mkdir(dir, { recursive: true });
      // An output still in the store (only the first stage is stale) is not built again.
      let storePath = current && (await outputUsable(current)) ? current.storePath : undefined;
      if (!storePath) {
        options.progress(`--flake ${ref.ref}: building it with nix (${meta.url}${ref.fragment})`);
        storePath = await nixBuild(nix, ref, meta, join(dir, 'result'), options);
      }
      const layout = await readLayout(storePath, ref.ref);
      const kernelSha256 = current?.storePath === storePath ? current.kernelSha256 : await sha256File(layout.kernel);
      const record: FlakeRecord = {
        format: 1,
        ref: ref.ref,
        lockedUrl: meta.url,
        key,
        storePath,
        kind: layout.rootfs ? 'rootfs' : 'initrd',
        kernelSha256,
        createdAt: new Date().toISOString(),
        ...(layout.rootfs ? { firstStage: await buildFirstStage(dir, agentPath, busyboxPath) } : {}),
      };
      await writeFileAtomic(recordPath, JSON.stringify(record, null, 2) + '\n');
      options.progress(`--flake ${ref.ref}: image ready (${storePath})`);
      return toImage(dir, record);
    },
    { signal: options.signal, progress: options.progress, what: `building --flake ${ref.ref}` },
  );
}

/** `ensureImage` for exec --flake: boots cold (a flake's image has no snapshot). */
export function flakeBootImage(ref: string): (io: { progress: Progress; signal: AbortSignal }) => Promise<BootImage> {
  return async ({ progress, signal }) => {
    const image = await ensureFlakeImage(ref, { progress, signal });
    return {
      kernel: image.kernel,
      kernelSha256: image.kernelSha256,
      initrd: image.initrd,
      kernelArgs: image.kernelArgs,
      ...(image.rootfs ? { rootDrive: { path: image.rootfs, copyOnWrite: true } } : {}),
      label: `flake ${ref}`,
    };
  };
}

async function readRecord(path: string, key: string): Promise<FlakeRecord | undefined> {
  try {
    const record = JSON.parse(await readFile(path, 'utf8')) as FlakeRecord;
    return record.format === 1 && record.key === key && typeof record.storePath === 'string' ? record : undefined;
  } catch {
    return undefined;
  }
}

function toImage(dir: string, record: FlakeRecord): FlakeImage {
  const out = (file: string) => join(record.storePath, file);
  return {
    dir,
    kernel: out(FLAKE_OUTPUT_FILES.kernel),
    kernelSha256: record.kernelSha256,
    initrd: record.kind === 'rootfs' ? join(dir, FIRST_STAGE_FILE) : out(FLAKE_OUTPUT_FILES.initrd),
    ...(record.kind === 'rootfs' ? { rootfs: out(FLAKE_OUTPUT_FILES.rootfs) } : {}),
    kernelArgs: DEFAULT_KERNEL_ARGS,
    record,
  };
}

const isFile = async (path: string): Promise<boolean> => (await stat(path).catch(() => undefined))?.isFile() ?? false;

/** The store output is still there (nix-collect-garbage spares it only while the out-link lives). */
async function outputUsable(record: FlakeRecord): Promise<boolean> {
  const files = [FLAKE_OUTPUT_FILES.kernel, record.kind === 'rootfs' ? FLAKE_OUTPUT_FILES.rootfs : FLAKE_OUTPUT_FILES.initrd];
  for (const file of files) if (!(await isFile(join(record.storePath, file)))) return false;
  return true;
}

/** A rootfs output's first stage was built from this agent and busybox, with this layout. */
async function firstStageFresh(record: FlakeRecord, dir: string, agentPath: string, busyboxPath: string): Promise<boolean> {
  if (record.kind !== 'rootfs') return true;
  const stage = record.firstStage;
  if (!stage || stage.layoutVersion !== TEMPLATE_LAYOUT_VERSION || !(await isFile(join(dir, FIRST_STAGE_FILE)))) return false;
  const [agent, busybox] = await Promise.all([fingerprint(agentPath, stage.agent, true), fingerprint(busyboxPath, stage.busybox)]).catch(() => []);
  return agent?.sha256 === stage.agent.sha256 && busybox?.sha256 === stage.busybox.sha256;
}

async function buildFirstStage(dir: string, agentPath: string, busyboxPath: string): Promise<NonNullable<FlakeRecord['firstStage']>> {
  const agent = await fingerprint(agentPath, undefined, true).catch(() => {
    throw new MvmError(`the guest agent ${agentPath} is missing: build it with \`make -C guest\` (or \`npm run build\`)`);
  });
  const busybox = await fingerprint(busyboxPath).catch(() => {
    throw new MvmError(`${busyboxPath} is missing: install the Debian package busybox-static`);
  });
  const path = join(dir, FIRST_STAGE_FILE);
  await writeFileAtomic(path, await buildTemplateInitramfs(busyboxPath, agentPath));
  return { sha256: await sha256File(path), agent, busybox, layoutVersion: TEMPLATE_LAYOUT_VERSION };
}

/** What the output holds, checked against the layout above; a mismatch is one line naming what is wrong. */
export async function readLayout(out: string, ref: string): Promise<{ kernel: string; initrd?: string; rootfs?: string }> {
  const expected = `a --flake output must hold vmlinux and one of initrd, rootfs.ext4 (README: "--flake")`;
  const kernel = join(out, FLAKE_OUTPUT_FILES.kernel);
  if (!(await isFile(kernel))) {
    const bzImage = (await isFile(join(out, 'bzImage'))) ? ' (it has a bzImage: give the uncompressed vmlinux instead)' : '';
    throw new MvmError(`--flake ${ref}: ${out} has no vmlinux${bzImage}; ${expected}`);
  }
  const head = Buffer.alloc(4);
  const file = await open(kernel, 'r');
  try {
    await file.read(head, 0, 4, 0);
  } finally {
    await file.close();
  }
  if (!head.equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) throw new MvmError(`--flake ${ref}: ${kernel} is not an ELF vmlinux; ${expected}`);
  const [initrd, rootfs] = [join(out, FLAKE_OUTPUT_FILES.initrd), join(out, FLAKE_OUTPUT_FILES.rootfs)];
  const [hasInitrd, hasRootfs] = await Promise.all([isFile(initrd), isFile(rootfs)]);
  if (hasInitrd === hasRootfs) throw new MvmError(`--flake ${ref}: ${out} has ${hasInitrd ? 'both initrd and rootfs.ext4' : 'neither initrd nor rootfs.ext4'}; ${expected}`);
  return hasRootfs ? { kernel, rootfs } : { kernel, initrd };
}
