import { InvalidArgumentError, Option } from 'commander';
import { ACCEL_CHOICES } from '../accel/index.js';
import { flakeRefProblem } from '../flake/nix.js';
import { checkGuestString, integerIn, InvalidOptionError, parseMemory as memoryMiB, parseUser } from '../sdk/parse.js';
import { terminalSafe } from './terminal-text.js';

export { bootTimeoutFromEnv } from '../sdk/parse.js';

/** Commander prints an InvalidArgumentError after the flag's own name, so only the problem goes in. */
function asFlagParser<T>(parse: (value: string) => T): (value: string) => T {
  return (value) => {
    try {
      return parse(value);
    } catch (error) {
      if (error instanceof InvalidOptionError) throw new InvalidArgumentError(error.problem);
      throw error;
    }
  };
}

/** `--memory`: a size with a K/M/G suffix (binary units), or a bare number of MiB. Returns MiB. */
export const parseMemory = asFlagParser((value) => memoryMiB(value, 'size'));

export function parseIntegerIn(min: number, max: number): (value: string) => number {
  return asFlagParser((value) => integerIn(value, { min, max }, 'value'));
}

/** `-w/--workdir`: an absolute guest path. */
export const parseGuestDir = asFlagParser((value) => {
  checkGuestString('value', value, { absolute: true });
  return value;
});

/** `-u/--user`: checked here, passed on as written. */
export const parseUserFlag = asFlagParser((value) => {
  parseUser(value, 'value');
  return value;
});

/** `-u/--user`, as exec and console take it. */
export const USER_FLAG_HELP = "run the command as UID[:GID] (numeric; without GID, the user's group in the guest's /etc/passwd, else GID = UID)";

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** `--accel`: no commander default, so that `MVM_ACCEL` applies when the flag is absent (accelChoice). */
export function accelOption(): Option {
  return new Option('--accel <mode>', 'auto: KVM when it can run the guest, else TCG emulation; kvm; tcg (default: $MVM_ACCEL, else auto)').choices(ACCEL_CHOICES);
}

/** One line on stderr for warnings and notes, as every mvmctl command prints them. */
export function logLine(line: string): void {
  process.stderr.write(`mvmctl: ${terminalSafe(line)}\n`);
}

/** `--flake`: a flake reference (checked for shape only; nix says the rest when it runs). */
export function parseFlakeRefFlag(value: string): string {
  const problem = flakeRefProblem(value);
  if (problem) throw new InvalidArgumentError(problem);
  return value;
}
