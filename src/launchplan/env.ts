import { MvmError } from '../errors.js';
import { readText } from './text.js';

/** Environment variable names accepted from launch plans, `-e/--env` and `--env-file`: POSIX portable names. */
export const ENV_KEY_PATTERN = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * Whether `key` may name a variable. `__proto__` fits the pattern but is refused: a JS object built
 * from parsed JSON silently drops it, so accepting it would lose the variable without a word.
 */
export function isValidEnvKey(key: string): boolean {
  return ENV_KEY_PATTERN.test(key) && key !== '__proto__';
}

/** The rule a refused variable name broke, phrased to follow the name in a message. */
export const ENV_KEY_RULE = `must match ${ENV_KEY_PATTERN.source.slice(1, -1)} (and not be __proto__)`;

/**
 * One `KEY=VALUE` or bare `KEY`, as docker run's `-e` and `--env-file` take them. The value is
 * everything after the first `=` and may be empty or contain further `=`. A bare KEY takes KEY's
 * value from `environment` (mvmctl's own), and is left out (undefined) when unset there, as docker
 * does: only variables the user names reach the guest. `fail` reports a problem with the entry.
 */
export function parseEnvEntry(entry: string, environment: NodeJS.ProcessEnv, fail: (problem: string) => never): [key: string, value: string] | undefined {
  const eq = entry.indexOf('=');
  const key = eq < 0 ? entry : entry.slice(0, eq);
  if (!isValidEnvKey(key)) fail(`variable name ${JSON.stringify(key)} ${ENV_KEY_RULE}`);
  const value = eq >= 0 ? entry.slice(eq + 1) : Object.hasOwn(environment, key) ? environment[key] : undefined;
  if (value === undefined) return undefined;
  // The guest agent's wire strings cannot carry NUL; refusing here names the entry before any VM boots.
  if (value.includes('\0')) fail(`the value of ${key} contains a NUL byte, which cannot reach the guest`);
  return [key, value];
}

/** One `-e/--env KEY[=VALUE]` argument (parseEnvEntry); undefined for a bare KEY that mvmctl's environment lacks. */
export function parseEnvAssignment(assignment: string, environment: NodeJS.ProcessEnv = process.env): [key: string, value: string] | undefined {
  return parseEnvEntry(assignment, environment, (problem) => {
    throw new MvmError(`--env ${JSON.stringify(assignment)}: ${problem}`);
  });
}

/**
 * An env file in docker's `--env-file` format: one parseEnvEntry per line, taken literally (no quote
 * processing, no trimming of values, as docker does); leading whitespace, blank lines and lines
 * starting with `#` are skipped. A problem is one MvmError naming `label` and the line number.
 */
/** `-e` flags as variables: KEY=VALUE, or KEY alone for `environment`'s value (left out when unset there). */
export function envFromAssignments(assignments: readonly string[], environment: NodeJS.ProcessEnv = process.env): Record<string, string> {
  return Object.fromEntries(assignments.map((assignment) => parseEnvAssignment(assignment, environment)).filter((entry) => entry !== undefined));
}

export function parseEnvFile(text: string, label: string, environment: NodeJS.ProcessEnv): Record<string, string> {
  const entries: [string, string][] = [];
  // An editor's byte-order mark and CRLF line ends are the file's encoding, not part of its first key or its values.
  text.replace(/^\uFEFF/, '').split('\n').forEach((raw, index) => {
    const line = raw.replace(/\r$/, '').replace(/^\s+/, '');
    if (line === '' || line.startsWith('#')) return;
    const entry = parseEnvEntry(line, environment, (problem) => {
      throw new MvmError(`${label}, line ${index + 1}: ${problem}`);
    });
    if (entry) entries.push(entry);
  });
  return Object.fromEntries(entries);
}

/** Reads and parses each `--env-file`; later files win. */
export async function readEnvFiles(paths: readonly string[], environment: NodeJS.ProcessEnv): Promise<Record<string, string>> {
  const layers: Record<string, string>[] = [];
  for (const path of paths) {
    const label = `env file ${path}`;
    layers.push(parseEnvFile(await readText(path, label), label, environment));
  }
  return mergeEnv(...layers);
}

/**
 * Layers environments, lowest precedence first: `mergeEnv(plan.env, cliEnv)` lets the CLI win.
 * Built with `Object.fromEntries`, which defines keys rather than assigning them, so no key can
 * reach `Object.prototype`.
 */
export function mergeEnv(...layers: Readonly<Record<string, string>>[]): Record<string, string> {
  return Object.fromEntries(layers.flatMap((layer) => Object.entries(layer)));
}
