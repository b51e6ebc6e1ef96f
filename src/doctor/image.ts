import { constants } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { AGENT_BINARY_PATH, BUSYBOX_PATH, defaultImageStatus, KERNEL_SOURCE_TARBALL } from '../image/index.js';
import { cachedKernel, checkKernelBuildPrerequisites } from '../image/kernel.js';
import { cacheDir } from '../paths.js';
import type { Check } from './checks.js';

async function readable(path: string): Promise<boolean> {
  return access(path, constants.R_OK).then(
    () => true,
    () => false,
  );
}

/**
 * exec builds the image on first use, so an image not built yet is only a warning; it fails when
 * exec could not build it: an input it does not make itself is missing, or the kernel would need
 * compiling and the source or the tools for that are not there.
 */
export async function checkDefaultImage(env: NodeJS.ProcessEnv = process.env): Promise<Check> {
  const name = 'default image';
  if (!(await readable(AGENT_BINARY_PATH))) {
    return { name, status: 'fail', summary: `the guest agent ${AGENT_BINARY_PATH} is missing`, fix: 'make -C guest (or npm run build)' };
  }
  if (!(await readable(BUSYBOX_PATH))) return { name, status: 'fail', summary: `${BUSYBOX_PATH} is missing`, fix: 'apt-get install busybox-static' };
  const userKernel = env.MVM_KERNEL ? resolve(env.MVM_KERNEL) : undefined;
  if (userKernel && !(await readable(userKernel))) {
    return { name, status: 'fail', summary: `cannot read the kernel ${userKernel} (from MVM_KERNEL)`, fix: 'point MVM_KERNEL at an uncompressed vmlinux, or unset it' };
  }

  const status = await defaultImageStatus();
  if (status.image && status.staleReasons.length === 0) {
    const [kernel, initrd] = await Promise.all([stat(status.image.kernel), stat(status.image.initrd)]);
    return { name, status: 'ok', summary: `${status.image.dir} (kernel + initrd ${((kernel.size + initrd.size) / 1048576).toFixed(1)} MiB)` };
  }
  const kernelToBuild = !userKernel && !(await cachedKernel({ cacheRoot: cacheDir() }));
  if (!kernelToBuild) {
    const state = status.image ? `out of date (${status.staleReasons.join('; ')})` : 'not built yet';
    return { name, status: 'warn', summary: `${state}; the kernel is ready`, fix: 'built on first use in about a second (or run mvmctl image build)' };
  }
  try {
    await checkKernelBuildPrerequisites(KERNEL_SOURCE_TARBALL);
  } catch (error) {
    return { name, status: 'fail', summary: `the guest kernel is not built and cannot be built here: ${(error as Error).message}` };
  }
  return { name, status: 'warn', summary: 'not built yet, kernel included', fix: 'built on first use (or run mvmctl image build); kernel build takes 11-20 min' };
}
