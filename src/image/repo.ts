/**
 * Files of the mvmctl checkout the image is built from, located relative to this module (compiled
 * to dist/src/image/*.js, three levels below the repository root; src/image/*.ts is two levels, for
 * tools that run the sources directly).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findRepoRoot(): string {
  const here = fileURLToPath(new URL('.', import.meta.url));
  for (const up of ['../../..', '../..']) {
    const candidate = join(here, up);
    if (existsSync(join(candidate, 'package.json'))) return candidate;
  }
  return join(here, '../../..');
}

export const REPO_ROOT = findRepoRoot();
/** The guest kernel's config fragment, applied on top of `make tinyconfig`. */
export const KERNEL_FRAGMENT_PATH = join(REPO_ROOT, 'kernel', 'guest.config');
/** The static guest agent, built by `make -C guest`. */
export const AGENT_BINARY_PATH = join(REPO_ROOT, 'guest', 'build', 'mvm-agent');
/** The host's static busybox (Debian package busybox-static). */
export const BUSYBOX_PATH = '/bin/busybox';
/** Debian's kernel source (package linux-source-6.1). */
export const KERNEL_SOURCE_TARBALL = '/usr/src/linux-source-6.1.tar.xz';
