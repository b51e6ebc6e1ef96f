/** What a VM boots, and the snapshot it may restore instead: shared by exec, the default image and templates. */
import type { Accel, AccelPlan } from '../accel/index.js';
import type { RootDriveSpec } from '../backends/types.js';

/**
 * What to boot: the default image (src/exec/default-image.ts) or a template (src/templates/), which
 * adds a root drive; either may offer a snapshot to restore instead of booting.
 */
export interface BootImage {
  kernel: string;
  /** The kernel's sha256: KVM's verdict on a host is kept per guest kernel. */
  kernelSha256: string;
  initrd?: string;
  kernelArgs: readonly string[];
  rootDrive?: RootDriveSpec;
  /** Starts lines about the image: `template NAME`, `the default image`. */
  label?: string;
  /** Name and directory of the template, recorded in the VM's directory so `template rm` sees it is in use. */
  template?: { name: string; dir: string };
  /** Whether a snapshot fits this run under `accel`; tried before a cold boot. */
  chooseSnapshot?: (accel: AccelPlan, signal: AbortSignal) => Promise<SnapshotChoice>;
}

export interface SnapshotChoice {
  plan?: RestorePlan;
  /** The snapshot is unusable (damaged, stale, another accelerator): one warning line, then a cold boot. */
  warning?: string;
  /** This request rules a snapshot out (--no-snapshot, --add-dir, other sizes): shown with -v. */
  note?: string;
}

export interface RestorePlan {
  /** The accelerator the snapshot was taken under. */
  accel: Accel;
  /** The snapshot's directory (SNAPSHOT_FILES, in the backend's format); a restore never writes it. */
  dir: string;
  /** The root drive as the snapshot saw it (its disk state at capture time), copy-on-write. */
  rootDrive?: RootDriveSpec;
  /** Empty drives the snapshot was taken with; `--add-dir` images take their places, in order. */
  driveSlots: { paths: string[]; slotBytes: number };
}
