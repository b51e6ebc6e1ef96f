const MIN_DEADLINE_MS = 5 * 60_000;
/** A slow disk: the deadline is for a tool that hangs, never for one that is merely slow. */
const SLOW_BYTES_PER_SECOND = 16 * 1024 ** 2;

/** How long mke2fs, debugfs, e2fsck or touch may take to work through `bytes` of image or tree. */
export function toolDeadlineMs(bytes: number): number {
  return MIN_DEADLINE_MS + Math.ceil(bytes / SLOW_BYTES_PER_SECOND) * 1000;
}
