/**
 * Templates: registered guest images (`mvmctl template …`) that `exec --template NAME` (or `-m`/`--manifest`) boots, or
 * restores from a snapshot (src/snapshots/). See store.ts (layout), build.ts and initramfs.ts (boot).
 */
import type { Backend } from '../backends/types.js';
import type { BootImage } from '../vm/index.js';
import { decideSnapshot, type SnapshotRequest } from '../snapshots/index.js';
import type { Template } from './store.js';
import { templateSubject } from './subject.js';

export { buildTemplate, type BuildOptions } from './build.js';
export { collectGarbage, findTemplate, listTemplates, openTemplate, removeTemplate, requireTemplate, templatesDir, vmsUsing, type Template, type TemplateMeta } from './store.js';
export { RESERVED_DIR } from './initramfs.js';
export { templateSubject } from './subject.js';

/** What `exec --manifest` boots for this template and request: its files, and its snapshot when one fits. */
export function templateBootImage(template: Template, backend: Backend, request: Omit<SnapshotRequest, 'accel'>): BootImage {
  const subject = templateSubject(template);
  return {
    kernel: subject.kernel.path,
    kernelSha256: subject.kernel.sha256,
    initrd: subject.initrd.path,
    kernelArgs: subject.kernelArgs,
    ...(subject.rootfs ? { rootDrive: { path: subject.rootfs.path, copyOnWrite: true } } : {}),
    label: subject.label,
    template: { name: template.name, dir: template.dir },
    chooseSnapshot: (accel) => decideSnapshot(subject, backend, { ...request, accel }),
  };
}
