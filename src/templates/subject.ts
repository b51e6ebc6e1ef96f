import { join } from 'node:path';
import type { SnapshotSubject } from '../snapshots/index.js';
import type { Template } from './store.js';

/** A template as its snapshot sees it. */
export function templateSubject(template: Template): SnapshotSubject {
  const meta = template.meta;
  return {
    label: `template ${template.name}`,
    retake: `mvmctl template snapshot ${template.name}`,
    dir: template.dir,
    kernel: { path: join(template.dir, meta.kernel.file), sha256: meta.kernel.sha256 },
    initrd: { path: join(template.dir, meta.initrd.file), sha256: meta.initrd.sha256 },
    ...(meta.rootfs ? { rootfs: { path: join(template.dir, meta.rootfs.file), sha256: meta.rootfs.sha256 } } : {}),
    kernelArgs: meta.kernelArgs,
    cpus: meta.cpus,
    memoryMiB: meta.memoryMiB,
    ...(meta.agentVersion ? { agentVersion: meta.agentVersion } : {}),
    layoutVersion: meta.layoutVersion,
  };
}

