import { MvmError } from '../errors.js';

/** Environment variable names accepted from launch plans and from `-e/--env`: POSIX portable names. */
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
 * Parses one `-e/--env KEY=VALUE` argument. The value is everything after the first `=` and may be
 * empty or contain further `=`; a bare `KEY` is refused rather than copied from the host environment,
 * so that nothing from the host leaks into the VM implicitly.
 */
export function parseEnvAssignment(assignment: string): [key: string, value: string] {
  const eq = assignment.indexOf('=');
  if (eq < 0) {
    throw new MvmError(`--env ${JSON.stringify(assignment)}: expected KEY=VALUE`);
  }
  const key = assignment.slice(0, eq);
  if (!isValidEnvKey(key)) {
    throw new MvmError(`--env ${JSON.stringify(assignment)}: variable name ${JSON.stringify(key)} ${ENV_KEY_RULE}`);
  }
  return [key, assignment.slice(eq + 1)];
}

/**
 * Layers environments, lowest precedence first: `mergeEnv(plan.env, cliEnv)` lets the CLI win.
 * Built with `Object.fromEntries`, which defines keys rather than assigning them, so no key can
 * reach `Object.prototype`.
 */
export function mergeEnv(...layers: Readonly<Record<string, string>>[]): Record<string, string> {
  return Object.fromEntries(layers.flatMap((layer) => Object.entries(layer)));
}
