/**
 * The two JSON shapes `--launch-plan` accepts, as zod schemas. Every message here is phrased to follow
 * a JSON path (`apps[0].entrypoint.command: must be ...`); `read.ts` adds the path and the file name.
 *
 * Objects are parsed in zod's default "strip" mode: unknown fields are not errors, since producers
 * (mvmforge, the SDK) add fields this version does not consume. `read.ts` lists them for `-v`.
 */
import * as z from 'zod';
import { ENV_KEY_RULE, isValidEnvKey } from './env.js';

/** The guest agent's wire strings cannot carry NUL; refusing here keeps the failure before any VM boots. */
const hasNoNul = (s: string): boolean => !s.includes('\0');
const NO_NUL = { error: 'must not contain a NUL byte' };

const BAD_ENV_NAME = `is not a valid variable name: names ${ENV_KEY_RULE}`;

const EnvMap = z
  .unknown()
  // z.record skips a "__proto__" key without a word, so it has to be refused before the record sees it.
  .refine((input) => typeof input !== 'object' || input === null || !Object.hasOwn(input, '__proto__'), {
    error: BAD_ENV_NAME,
    path: ['__proto__'],
    abort: true,
  })
  .pipe(
    z.record(z.string().refine(isValidEnvKey), z.string({ error: 'must be a string' }).refine(hasNoNul, NO_NUL), {
      error: (issue) => (issue.code === 'invalid_key' ? BAD_ENV_NAME : 'must be an object of string values'),
    }),
  );

const COMMAND_RULE = 'must be a non-empty array of strings';

export const EntrypointSchema = z.object(
  {
    command: z
      .array(z.string({ error: 'must be a string' }).refine(hasNoNul, NO_NUL), { error: COMMAND_RULE })
      .min(1, { error: COMMAND_RULE })
      .refine((argv) => argv[0] !== '', { error: 'the program name must not be empty', path: [0] }),
    /**
     * Absolute; when absent the command runs in `/`. A working_dir that does not exist in the image is
     * created (with its parents) before the command starts, as container runtimes do for WORKDIR, so a
     * plan does not depend on the image having the directory already.
     */
    working_dir: z
      .string({ error: 'must be a string holding an absolute path' })
      .refine((dir) => dir.startsWith('/'), { error: 'must be an absolute path (starting with "/")' })
      .refine(hasNoNul, NO_NUL)
      .optional(),
    env: EnvMap.optional(),
  },
  { error: 'must be an object with a "command" array' },
);

const VERSION_FORMAT = /^\d+(\.\d+)*$/;

export const ArtifactSchema = z.object({
  artifact_format_version: z
    .string({ error: 'must be a version string such as "1.0"' })
    .regex(VERSION_FORMAT, { error: 'must be a version string such as "1.0"', abort: true })
    .refine((version) => Number(version.split('.')[0]) === 1, {
      error: (issue) => `${JSON.stringify(issue.input)} is not supported: this mvmctl reads version 1.x launch plans`,
    }),
  workload_id: z.string({ error: 'must be a non-empty string' }).min(1, { error: 'must be a non-empty string' }),
  entrypoint: EntrypointSchema,
  env: EnvMap.optional(),
});

/**
 * What an app without a `name` is called (its launch plan's workload id, its compiled workload_id).
 * Upstream mvmctl's single-app manifests leave the name out; the Workload IR has no workload id of
 * its own to fall back on, so the name is the generic one.
 */
export const UNNAMED_APP = 'app';

export const AppSchema = z.object(
  {
    name: z.string({ error: 'must be a non-empty string' }).min(1, { error: 'must be a non-empty string' }).optional(),
    entrypoint: EntrypointSchema,
    env: EnvMap.optional(),
  },
  { error: 'must be an object with an "entrypoint"' },
);

export const WorkloadIrSchema = z.object({
  apps: z.array(AppSchema, { error: 'must be an array of apps' }).min(1, { error: 'must list at least one app' }),
});

export type Entrypoint = z.infer<typeof EntrypointSchema>;
export type Artifact = z.infer<typeof ArtifactSchema>;
export type App = z.infer<typeof AppSchema>;
export type WorkloadIr = z.infer<typeof WorkloadIrSchema>;
