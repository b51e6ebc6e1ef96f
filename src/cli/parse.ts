import { InvalidArgumentError, Option } from 'commander';
import { ACCEL_CHOICES } from '../accel/index.js';
import { MvmError } from '../errors.js';

/** `--memory`: a size with a K/M/G suffix (binary units), or a bare number of MiB. Returns MiB. */
export function parseMemory(value: string): number {
  const match = /^(\d+)([KMG]?)(i?B)?$/i.exec(value.trim());
  if (!match) throw new InvalidArgumentError(`'${value}' is not a size (examples: 512M, 2G, 1024)`);
  const amount = Number(match[1]);
  const unit = match[2].toUpperCase();
  const mib = unit === 'K' ? amount / 1024 : unit === 'G' ? amount * 1024 : amount;
  if (!Number.isInteger(mib)) throw new InvalidArgumentError(`'${value}' is not a whole number of MiB`);
  if (mib < 64) throw new InvalidArgumentError(`'${value}' is too small: the guest needs at least 64M`);
  if (mib > 1024 * 1024) throw new InvalidArgumentError(`'${value}' is more than 1T`);
  return mib;
}

export function parseIntegerIn(min: number, max: number): (value: string) => number {
  return (value) => {
    if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError(`'${value}' is not a whole number`);
    const number = Number(value);
    if (number < min || number > max) throw new InvalidArgumentError(`'${value}' is not between ${min} and ${max}`);
    return number;
  };
}

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
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

/** `--accel`: no commander default, so that `MVM_ACCEL` applies when the flag is absent (accelChoice). */
export function accelOption(): Option {
  return new Option('--accel <mode>', 'auto: KVM when it can run the guest, else TCG emulation; kvm; tcg (default: $MVM_ACCEL, else auto)').choices(ACCEL_CHOICES);
}

/** One line on stderr for warnings and notes, as every mvmctl command prints them. */
export function logLine(line: string): void {
  process.stderr.write(`mvmctl: ${line}\n`);
}
