/**
 * The default image as exec boots it: built on first use (src/image/), and with a snapshot of its
 * booted guest kept in the image's own directory, so that it is invalidated whenever the image is.
 * The snapshot is taken by `mvmctl image build`, or by the first exec that can use it.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { AccelPlan } from '../accel/index.js';
import type { Backend } from '../backends/types.js';
import { ensureDefaultImage, type GuestImage } from '../image/index.js';
import { withLock } from '../image/lock.js';
import type { Progress } from '../progress.js';
import { captureSnapshot, decideSnapshot, SnapshotBootError, type SnapshotRequest, type SnapshotSubject } from '../snapshots/index.js';
import type { BootImage, SnapshotChoice } from '../vm/index.js';

/** exec's sizes when none are given; the default image's snapshot is taken at these. */
export const DEFAULT_CPUS = 2;
export const DEFAULT_MEMORY_MIB = 512;

/**
 * Each backend keeps its own snapshot of the default image, whose format is its own: QEMU's in the
 * image's directory, any other's in a directory of its own there. All go when the image does.
 */
function defaultImageSubject(image: GuestImage, backend: Backend): SnapshotSubject {
  return {
    label: 'the default image',
    retake: 'mvmctl image build --force',
    dir: backend.name === 'qemu' ? image.dir : join(image.dir, `snapshots-${backend.name}`),
    kernel: { path: image.kernel, sha256: image.kernelSha256 },
    initrd: { path: image.initrd, sha256: image.manifest.initrd.sha256 },
    kernelArgs: image.kernelArgs,
    cpus: DEFAULT_CPUS,
    memoryMiB: DEFAULT_MEMORY_MIB,
    ...(image.agentVersion ? { agentVersion: image.agentVersion } : {}),
    layoutVersion: image.manifest.layoutVersion,
  };
}

export interface DefaultImageOptions {
  backend: Backend;
  request: Omit<SnapshotRequest, 'accel'>;
  bootTimeoutMs: number;
  log: (line: string) => void;
}

/**
 * Takes the default image's snapshot under `accel` unless one that fits is there already; others
 * waiting on the lock then find it. Returns why it could not, as a warning line.
 */
export async function ensureDefaultSnapshot(image: GuestImage, accel: AccelPlan, options: DefaultImageOptions & { progress: Progress; signal: AbortSignal }): Promise<SnapshotChoice> {
  const subject = defaultImageSubject(image, options.backend);
  const request = { ...options.request, accel };
  const first = await decideSnapshot(subject, options.backend, request);
  // A request that rules snapshots out, or a KVM not yet proven, boots cold without taking one.
  if (first.plan || (first.note && !first.missing)) return first;
  try {
    await mkdir(subject.dir, { recursive: true });
    await withLock(
      join(subject.dir, '.snapshot.lock'),
      async () => {
        const again = await decideSnapshot(subject, options.backend, request);
        if (again.plan) return;
        await captureSnapshot(subject, { ...options, accel });
      },
      { signal: options.signal, progress: options.progress, what: 'taking the default image snapshot' },
    );
  } catch (error) {
    if (options.signal.aborted) throw error;
    // The guest cannot boot at all: the cold boot would fail the same way, so say it once.
    if (error instanceof SnapshotBootError) throw error.original;
    return { warning: `the default image: taking its snapshot failed (${(error as Error).message.split('\n')[0]}); booting cold` };
  }
  return decideSnapshot(subject, options.backend, request);
}

/** `ensureImage` for exec without --manifest. */
export function defaultBootImage(options: DefaultImageOptions): (io: { progress: Progress; signal: AbortSignal }) => Promise<BootImage> {
  return async ({ progress, signal }) => {
    const image = await ensureDefaultImage({ progress, signal });
    return {
      kernel: image.kernel,
      kernelSha256: image.kernelSha256,
      initrd: image.initrd,
      kernelArgs: image.kernelArgs,
      label: 'the default image',
      chooseSnapshot: (accel, guestSignal) => ensureDefaultSnapshot(image, accel, { ...options, progress, signal: guestSignal }),
    };
  };
}
