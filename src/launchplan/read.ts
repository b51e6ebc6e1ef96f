/**
 * Reading a launch-plan file into one of the two validated shapes, with every failure as a one-line
 * MvmError prefixed by `label` (e.g. `launch plan ./x.json`), so exec and compile report alike.
 */
import type * as z from 'zod';
import { MvmError } from '../errors.js';
import { readText } from './text.js';
import { AppSchema, type Artifact, ArtifactSchema, EntrypointSchema, type WorkloadIr, WorkloadIrSchema } from './schema.js';

const ACCEPTED_SHAPES =
  'a launch.json artifact (top-level "entrypoint") or a Workload IR manifest (top-level "apps")';

export type ParsedPlanFile =
  | { shape: 'artifact'; artifact: Artifact; ignoredFields: string[] }
  | { shape: 'workload-ir'; manifest: WorkloadIr; ignoredFields: string[] };

export async function readPlanFile(path: string, label: string): Promise<ParsedPlanFile> {
  const json = parseJson(await readText(path, label), label);
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    const got = json === null ? 'null' : Array.isArray(json) ? 'an array' : `a ${typeof json}`;
    throw new MvmError(`${label}: expected a JSON object, got ${got}; accepted shapes: ${ACCEPTED_SHAPES}`);
  }
  const hasEntrypoint = Object.hasOwn(json, 'entrypoint');
  const hasApps = Object.hasOwn(json, 'apps');
  if (hasEntrypoint && hasApps) {
    throw new MvmError(`${label}: has both "entrypoint" and "apps", so its shape is ambiguous; expected either ${ACCEPTED_SHAPES}`);
  }
  if (!hasEntrypoint && !hasApps) {
    throw new MvmError(`${label}: has neither "entrypoint" nor "apps"; expected ${ACCEPTED_SHAPES}`);
  }
  if (hasEntrypoint) {
    const artifact = validate(ArtifactSchema, json, label);
    return { shape: 'artifact', artifact, ignoredFields: unknownArtifactFields(json as Record<string, unknown>) };
  }
  const manifest = validate(WorkloadIrSchema, json, label);
  return { shape: 'workload-ir', manifest, ignoredFields: unknownIrFields(json as Record<string, unknown>) };
}

function parseJson(text: string, label: string): unknown {
  // Editors on some platforms prepend a byte-order mark, which JSON.parse rejects.
  const body = text.startsWith('\uFEFF') ? text.slice(1) : text;
  if (body.trim() === '') throw new MvmError(`${label}: file is empty; expected a JSON object`);
  try {
    return JSON.parse(body);
  } catch (err) {
    // V8 quotes a snippet of the input in some messages, newlines included; the error must stay one line.
    const message = (err as Error).message.replace(/\s+/g, ' ');
    const position = /at position (\d+)/.exec(message);
    const where = position && !/\bline \d+/.test(message) ? ` (${lineAndColumn(body, Number(position[1]))})` : '';
    throw new MvmError(`${label}: invalid JSON: ${message}${where}`);
  }
}

function lineAndColumn(text: string, offset: number): string {
  const before = text.slice(0, offset);
  const line = before.split('\n').length;
  return `line ${line}, column ${offset - before.lastIndexOf('\n')}`;
}

function validate<T>(schema: z.ZodType<T>, json: unknown, label: string): T {
  const result = schema.safeParse(json);
  if (result.success) return result.data;
  const [first, ...rest] = result.error.issues;
  const more = rest.length > 0 ? ` (and ${rest.length} more problem${rest.length > 1 ? 's' : ''})` : '';
  throw new MvmError(`${label}: ${formatJsonPath(first!.path)}: ${first!.message}${more}`);
}

/** `["apps", 0, "entrypoint", "env", "1X"]` → `apps[0].entrypoint.env["1X"]`. */
export function formatJsonPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const segment of path) {
    if (typeof segment === 'number') out += `[${segment}]`;
    else if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(String(segment))) out += out === '' ? String(segment) : `.${String(segment)}`;
    else out += `[${JSON.stringify(String(segment))}]`;
  }
  return out;
}

/** Fields the schemas do not consume, as JSON paths. Only for input the schema accepted: the casts rely on it. */
function unknownArtifactFields(json: Record<string, unknown>): string[] {
  return [
    ...unknownKeys(json, ArtifactSchema.shape, []),
    ...unknownKeys(json.entrypoint as Record<string, unknown>, EntrypointSchema.shape, ['entrypoint']),
  ];
}

/** As `unknownArtifactFields`, for a Workload IR manifest. */
function unknownIrFields(json: Record<string, unknown>): string[] {
  const apps = json.apps as Record<string, unknown>[];
  return [
    ...unknownKeys(json, WorkloadIrSchema.shape, []),
    ...apps.flatMap((app, i) => [
      ...unknownKeys(app, AppSchema.shape, ['apps', i]),
      ...unknownKeys(app.entrypoint as Record<string, unknown>, EntrypointSchema.shape, ['apps', i, 'entrypoint']),
    ]),
  ];
}

function unknownKeys(object: Record<string, unknown>, shape: object, at: PropertyKey[]): string[] {
  return Object.keys(object)
    .filter((key) => !Object.hasOwn(shape, key))
    .map((key) => formatJsonPath([...at, key]));
}
