/**
 * What a snapshot is taken of and checked against: a template, or the default image. A subject's
 * directory holds `snapshot` (a symlink to the current `snap-*` directory) and those directories:
 *   ram, state   guest RAM and device state, written by the backend (SNAPSHOT_FILES)
 *   disk.*       with a root drive: the drive as the captured guest left it (the backend's
 *                createSnapshotDisk); a restored guest's page cache and ext4 state match this disk
 *   slot0…       empty drives the captured guest saw, for --add-dir images at restore
 *   snapshot.json SnapshotMeta
 * Restores never write any of these files, so any number of them can run from one snapshot at once.
 */
import { readFile, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import type { Accel } from '../accel/index.js';

export interface SnapshotSubject {
  /** Starts every line about it: `template NAME`, `the default image`. */
  label: string;
  /** The command that takes the snapshot again, named in warnings. */
  retake: string;
  /** Where its snapshots live. */
  dir: string;
  kernel: { path: string; sha256: string };
  initrd: { path: string; sha256: string };
  /** A root drive image; its snapshot keeps the disk the captured guest wrote (the backend's createSnapshotDisk). */
  rootfs?: { path: string; sha256: string };
  kernelArgs: readonly string[];
  cpus: number;
  memoryMiB: number;
  agentVersion?: string;
  layoutVersion: number;
}

export const SNAPSHOT_FORMAT = 3;
/**
 * Empty drives every snapshot is taken with, so that a restore can attach `--add-dir` images in
 * their place: the guest saw these devices (writable, this size) at capture, so the images take
 * their slots by being exactly this big (sparse: an image is extended to it), and read-only ones are
 * attached read-only at the host's block layer.
 */
export const DRIVE_SLOTS = 4;
export const DRIVE_SLOT_BYTES = 16 * 1024 ** 3;
export const SNAPSHOT_LINK = 'snapshot';
export const SNAPSHOT_META_FILE = 'snapshot.json';

export interface SnapshotFile {
  file: string;
  size: number;
  mtimeMs: number;
  ino: number;
  sha256: string;
}

export interface SnapshotMeta {
  format: typeof SNAPSHOT_FORMAT;
  subject: string;
  createdAt: string;
  backend: string;
  /** The accelerator the snapshot was taken under: its device state only loads under the same one. */
  accel: Accel;
  /** What the snapshot was taken from: all must still match for a restore. */
  kernelSha256: string;
  initrdSha256: string;
  rootfsSha256?: string;
  layoutVersion: number;
  /** As the agent reported it in HELLO. */
  agentVersion: string;
  vmm: { version: string; binary: string; size: number; mtimeMs: number };
  cpus: number;
  memoryMiB: number;
  /** The subject's files, relative to its directory (size + mtime: a cheap check that they were not replaced). */
  inputs: Array<{ file: string; size: number; mtimeMs: number }>;
  files: { ram: SnapshotFile; state: SnapshotFile; disk?: SnapshotFile };
  /** The empty drive slots (`slot0`…), all `slotBytes` big: checked by size, inode and mtime, never hashed. */
  driveSlots: { files: string[]; slotBytes: number };
  /** Seconds from VMM start until the agent answered, when captured (for `template info`). */
  bootSeconds: number;
}

export function subjectInputs(subject: SnapshotSubject): string[] {
  return [subject.kernel.path, subject.initrd.path, ...(subject.rootfs ? [subject.rootfs.path] : [])];
}

export async function readSnapshotMeta(subjectDir: string): Promise<{ dir: string; meta: SnapshotMeta } | undefined> {
  const dir = await realpath(join(subjectDir, SNAPSHOT_LINK)).catch(() => undefined);
  if (!dir) return undefined;
  const meta = JSON.parse(await readFile(join(dir, SNAPSHOT_META_FILE), 'utf8')) as SnapshotMeta;
  if (!meta || meta.format !== SNAPSHOT_FORMAT || !meta.files?.ram || !meta.files?.state) throw new Error('unknown snapshot format');
  return { dir, meta };
}
