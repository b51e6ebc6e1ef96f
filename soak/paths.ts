import { fileURLToPath } from 'node:url';

/** The repository root: compiled soak files live in dist/soak/ (or another out dir one level down). */
export const repoRoot = fileURLToPath(new URL('../../', import.meta.url));
