/**
 * Drive IDs every backend gives its virtio block devices (QEMU `serial=`, Firecracker `drive_id`).
 * The guest finds a drive by the ID in /sys/block/vdX/serial, because no VMM promises the order in
 * which drives become /dev/vdX.
 */

/** Serial of a template's root drive. */
export const ROOT_DRIVE_SERIAL = 'mvmroot';

/** Serial of the index-th extra drive (`--add-dir` images, in order). */
export function driveSerial(index: number): string {
  return `mvm${index}`;
}
