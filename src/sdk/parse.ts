/**
 * Checks of exec's sizes, limits and guest strings, shared by the TypeScript API (src/sdk/options.ts) and the CLI's
 * flags (src/cli/parse.ts, which turns InvalidOptionError into commander's own usage error).
 */
import { MvmError } from '../errors.js';
import { GID_OF_USER, type ExecUser } from '../protocol/index.js';

/** An option (or flag) whose value cannot be used; nothing was started. Exit code 125. */
export class InvalidOptionError extends MvmError {
  constructor(
    /** The option as the caller knows it: `memory`, `env`, `--memory`. */
    readonly option: string,
    /** What is wrong with the value, without the option's name. */
    readonly problem: string,
  ) {
    super(`${option}: ${problem}`);
    this.name = 'InvalidOptionError';
  }
}

export const CPUS_RANGE = { min: 1, max: 64 } as const;
export const TIMEOUT_SECONDS_RANGE = { min: 1, max: 7 * 24 * 3600 } as const;
export const DEFAULT_TIMEOUT_SECONDS = 60;

const MIN_MEMORY_MIB = 64;
const MAX_MEMORY_MIB = 1024 * 1024;

/**
 * Guest memory in MiB: a size with a K/M/G suffix (binary units), or a bare number (a string of
 * digits or a number) of MiB.
 */
export function parseMemory(value: string | number, option: string): number {
  let mib: number;
  if (typeof value === 'number') {
    mib = value;
  } else {
    const match = /^(\d+)([KMG]?)(i?B)?$/i.exec(String(value).trim());
    if (!match) throw new InvalidOptionError(option, `'${value}' is not a size (examples: 512M, 2G, 1024)`);
    const amount = Number(match[1]);
    const unit = match[2].toUpperCase();
    mib = unit === 'K' ? amount / 1024 : unit === 'G' ? amount * 1024 : amount;
  }
  if (!Number.isInteger(mib)) throw new InvalidOptionError(option, `'${value}' is not a whole number of MiB`);
  if (mib < MIN_MEMORY_MIB) throw new InvalidOptionError(option, `'${value}' is too small: the guest needs at least ${MIN_MEMORY_MIB}M`);
  if (mib > MAX_MEMORY_MIB) throw new InvalidOptionError(option, `'${value}' is more than 1T`);
  return mib;
}

/** A whole number (or a string of digits) within `range`, both ends included. */
export function integerIn(value: string | number, range: { min: number; max: number }, option: string): number {
  const whole = typeof value === 'number' ? Number.isInteger(value) : /^\d+$/.test(String(value).trim());
  if (!whole) throw new InvalidOptionError(option, `'${value}' is not a whole number`);
  const number = Number(value);
  if (number < range.min || number > range.max) throw new InvalidOptionError(option, `'${value}' is not between ${range.min} and ${range.max}`);
  return number;
}

/** Who a command runs as: `'UID[:GID]'` as `-u` takes it, a UID, or both ids. */
export type UserSpec = string | number | { uid: number; gid?: number };

/** uid_t's largest value is (uid_t)-1, which setuid(2) takes as "leave unchanged". */
const ID_RANGE = { min: 0, max: 0xffff_fffe } as const;

/**
 * Numeric ids only: names would be looked up in the guest's /etc/passwd, which is guest data. Without a
 * GID the guest agent takes the user's primary group from /etc/passwd, or the UID's own number,
 * never root's group 0 as docker does for a user it cannot find.
 */
export function parseUser(value: UserSpec, option: string): ExecUser {
  if (typeof value === 'object' && value !== null) {
    return { uid: integerIn(value.uid, ID_RANGE, `${option}.uid`), gid: value.gid === undefined ? GID_OF_USER : integerIn(value.gid, ID_RANGE, `${option}.gid`) };
  }
  const text = String(value).trim();
  const match = /^(\d+)(?::(\d+))?$/.exec(text);
  if (!match) throw new InvalidOptionError(option, `'${value}' is not UID[:GID] (numeric ids; names are not looked up)`);
  return { uid: integerIn(match[1]!, ID_RANGE, option), gid: match[2] === undefined ? GID_OF_USER : integerIn(match[2], ID_RANGE, option) };
}

/** Strings travel to the guest agent as C strings: a NUL would be refused only once the VM is up. */
export function checkGuestString(option: string, value: unknown, { absolute = false } = {}): void {
  if (typeof value !== 'string') throw new InvalidOptionError(option, `expected a string, got ${value === null ? 'null' : typeof value}`);
  if (value.includes('\0')) throw new InvalidOptionError(option, 'contains a NUL byte, which cannot reach the guest');
  if (absolute && !value.startsWith('/')) throw new InvalidOptionError(option, `'${value}' is not an absolute guest path`);
}

const DEFAULT_BOOT_TIMEOUT_S = 60;

/** How long a guest may take from VMM start to its agent's answer: `MVM_BOOT_TIMEOUT` seconds, default 60. */
export function bootTimeoutFromEnv(): number {
  const raw = process.env.MVM_BOOT_TIMEOUT;
  if (!raw) return DEFAULT_BOOT_TIMEOUT_S * 1000;
  const seconds = Number(raw);
  if (!(seconds > 0)) throw new MvmError(`MVM_BOOT_TIMEOUT=${raw} is not a number of seconds (e.g. 120)`);
  return seconds * 1000;
}
