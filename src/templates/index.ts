/**
 * Templates: registered guest images (`mvmctl template …`) that `exec --manifest NAME` boots, or
 * restores from a snapshot. See store.ts (layout), build.ts, initramfs.ts (boot) and snapshot.ts.
 */
import { join } from 'node:path';
import type { Backend } from '../backends/types.js';
import type { BootImage } from '../exec/run.js';
import { decideSnapshot, type SnapshotRequest } from './snapshot.js';
import type { Template } from './store.js';

export { buildTemplate, type BuildOptions } from './build.js';
export { captureSnapshot, decideSnapshot, readSnapshotMeta, removeSnapshot, verifySnapshot, type SnapshotMeta } from './snapshot.js';
export { findTemplate, listTemplates, removeTemplate, requireTemplate, templatesDir, vmsUsing, type Template, type TemplateMeta } from './store.js';
export { RESERVED_DIR } from './initramfs.js';

/** What `exec --manifest` boots for this template and request: its files, and a snapshot when one fits. */
export async function templateBootImage(template: Template, backend: Backend, request: SnapshotRequest): Promise<BootImage> {
  const decision = await decideSnapshot(template, backend, request);
  const meta = template.meta;
  return {
    kernel: join(template.dir, meta.kernel.file),
    kernelSha256: meta.kernel.sha256,
    initrd: join(template.dir, meta.initrd.file),
    kernelArgs: meta.kernelArgs,
    ...(meta.rootfs ? { rootDrive: { path: join(template.dir, meta.rootfs.file), format: 'raw' as const, copyOnWrite: true } } : {}),
    template: { name: template.name, dir: template.dir },
    ...(decision.plan ? { snapshot: decision.plan } : {}),
    ...(decision.warning ? { snapshotWarning: decision.warning } : {}),
    ...(decision.note ? { snapshotNote: decision.note } : {}),
  };
}
