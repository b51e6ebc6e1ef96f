/**
 * The two Nix calls `--flake` makes, each through runTool with a deadline: `nix flake metadata`
 * (which pins the flake: its locked URL and the hash the cache is keyed on) and `nix build` of that
 * locked URL. Any way Nix is missing or fails becomes one NixUnavailableError line.
 */
import { createHash } from 'node:crypto';
import { MvmError, NixUnavailableError } from '../errors.js';
import type { Progress } from '../progress.js';
import { lastLine, runTool } from '../run-tool.js';
import { findExecutable } from '../which.js';

/** Flakes and the `nix` command are still experimental in Nix 2.8 (Debian 12's nix-bin): switched on per call, not in the user's config. */
export const NIX_FEATURES: readonly string[] = ['--extra-experimental-features', 'nix-command flakes'];

/** Metadata may fetch the flake (a github: ref) but builds nothing. */
const METADATA_TIMEOUT_MS = 5 * 60_000;
const DEFAULT_BUILD_TIMEOUT_S = 30 * 60;

/** The way round, in every Nix failure's line. */
export const WAY_ROUND = 'boot a template instead (--template NAME, or -m/--manifest), which needs no Nix';

/** A flake reference split at `#`: nix flake metadata takes the flake alone, nix build the output too. */
export interface FlakeRef {
  /** As the user gave it. */
  ref: string;
  flake: string;
  /** `#attr` or empty (nix build then takes `packages.<system>.default`). */
  fragment: string;
}

/** Why `ref` cannot be a flake reference (nothing before `#`, or it would read as a nix option), or undefined. */
export function flakeRefProblem(ref: string): string | undefined {
  const flake = ref.split('#')[0]!;
  if (flake.trim() === '' || flake.startsWith('-')) return `'${ref}' is not a flake reference: expected e.g. ./dir, path:/abs/dir, github:owner/repo, ./dir#attr`;
  return undefined;
}

export function parseFlakeRef(ref: string): FlakeRef {
  const problem = flakeRefProblem(ref);
  if (problem) throw new MvmError(`--flake: ${problem}`);
  const hash = ref.indexOf('#');
  return { ref, flake: hash < 0 ? ref : ref.slice(0, hash), fragment: hash < 0 ? '' : ref.slice(hash) };
}

/** What `nix flake metadata --json` says that mvmctl uses. */
export interface FlakeMetadata {
  /** The locked URL (e.g. `path:/dir?lastModified=…&narHash=…`): building it builds exactly what was keyed. */
  url: string;
  locked: Record<string, unknown>;
  /** The lock graph (the flake's inputs, locked): part of the key, so an input that moves is a new build. */
  locks: unknown;
}

/** The cache key: a flake's locked source, its locked inputs, and which output; the same key is the same build. */
export function flakeCacheKey(meta: FlakeMetadata, fragment: string, layoutVersion: number): string {
  return createHash('sha256').update(JSON.stringify([layoutVersion, meta.locked, meta.locks ?? null, fragment])).digest('hex');
}

/** `nix` on PATH, or the one-line error that says there is none. */
export function findNix(): string {
  const nix = findExecutable('nix');
  if (!nix) throw new NixUnavailableError(`--flake needs Nix, and there is no nix on PATH: install it (Debian: apt-get install nix-bin), or ${WAY_ROUND}`);
  return nix;
}

/** Nix's own error, on one line: its first `error:` line (the rest is indented detail or build log), else its last line. */
export function nixErrorLine(stderr: string): string {
  const plain = stderr.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
  const error = plain.split('\n').find((line) => line.startsWith('error:'));
  return (error ? error.slice('error:'.length).trim() : lastLine(plain)).replace(/\s+/g, ' ');
}

/** After its deadline nix gets SIGTERM (so it stops its builders) and this long to go before runTool's SIGKILL. */
const STOP_GRACE_MS = 30_000;

async function runNix(nix: string, what: string, ref: string, args: readonly string[], options: { signal: AbortSignal; timeoutMs: number; onLine?: (line: string) => void }) {
  // Our own deadline rather than runTool's: runTool's SIGKILL would leave nix's builder processes running.
  const deadline = new AbortController();
  const timer = setTimeout(
    () => deadline.abort(new NixUnavailableError(`--flake ${ref}: ${what} did not finish within ${Math.round(options.timeoutMs / 1000)} s and was stopped; ${WAY_ROUND}`)),
    options.timeoutMs,
  );
  let result;
  try {
    result = await runTool(nix, [...NIX_FEATURES, ...args], {
      signal: AbortSignal.any([options.signal, deadline.signal]),
      // Interrupted (Ctrl-C) or past the deadline, nix gets SIGTERM, so that it stops the builders it started.
      abortSignal: 'SIGTERM',
      timeoutMs: options.timeoutMs + STOP_GRACE_MS,
      ...(options.onLine ? { onLine: options.onLine } : {}),
    });
  } catch (error) {
    if (options.signal.aborted) throw error;
    if (deadline.signal.aborted) throw deadline.signal.reason;
    // It could not be started at all, or ignored SIGTERM.
    throw new NixUnavailableError(`--flake ${ref}: ${what}: ${(error as Error).message}; ${WAY_ROUND}`);
  } finally {
    clearTimeout(timer);
  }
  if (result.code !== 0) throw new NixUnavailableError(`--flake ${ref}: ${what} failed: ${nixErrorLine(result.stderr)}; ${WAY_ROUND}`);
  return result.stdout;
}

export async function flakeMetadata(nix: string, ref: FlakeRef, signal: AbortSignal): Promise<FlakeMetadata> {
  const stdout = await runNix(nix, 'nix flake metadata', ref.ref, ['flake', 'metadata', '--json', ref.flake], { signal, timeoutMs: METADATA_TIMEOUT_MS });
  let parsed: Partial<FlakeMetadata> | undefined;
  try {
    parsed = JSON.parse(stdout) as Partial<FlakeMetadata>;
  } catch {
    // reported below
  }
  if (!parsed || typeof parsed.url !== 'string' || typeof parsed.locked !== 'object' || parsed.locked === null) {
    throw new NixUnavailableError(`--flake ${ref.ref}: nix flake metadata --json gave no locked URL (is this Nix 2.8 or later?); ${WAY_ROUND}`);
  }
  return { url: parsed.url, locked: parsed.locked, locks: parsed.locks };
}

/** `MVM_FLAKE_BUILD_TIMEOUT` seconds, default 30 minutes: how long one nix build may run. */
export function buildTimeoutMs(): number {
  const raw = process.env.MVM_FLAKE_BUILD_TIMEOUT;
  if (!raw) return DEFAULT_BUILD_TIMEOUT_S * 1000;
  const seconds = Number(raw);
  if (!Number.isInteger(seconds) || seconds < 1) throw new MvmError(`MVM_FLAKE_BUILD_TIMEOUT='${raw}': expected a whole number of seconds`);
  return seconds * 1000;
}

/**
 * Builds the locked flake's output with an out-link at `outLink` (a GC root, so nix-collect-garbage
 * keeps what the cache points at) and returns the output's store path. Nix's progress lines
 * (`building …`, `copying …`) go to `progress`, which shows them only on a terminal.
 */
export async function nixBuild(nix: string, ref: FlakeRef, meta: FlakeMetadata, outLink: string, options: { signal: AbortSignal; progress: Progress }): Promise<string> {
  const stdout = await runNix(nix, 'nix build', ref.ref, ['build', '--json', '--out-link', outLink, `${meta.url}${ref.fragment}`], {
    signal: options.signal,
    timeoutMs: buildTimeoutMs(),
    onLine: (line) => {
      if (line.trim() !== '' && !line.startsWith('[{')) options.progress(`nix: ${line.trim()}`);
    },
  });
  let out: string | undefined;
  try {
    const built = JSON.parse(stdout) as Array<{ outputs?: Record<string, string> }>;
    const outputs = built[0]?.outputs ?? {};
    out = outputs.out ?? Object.values(outputs)[0];
  } catch {
    // reported below
  }
  if (typeof out !== 'string' || !out.startsWith('/')) throw new NixUnavailableError(`--flake ${ref.ref}: nix build --json named no output path; ${WAY_ROUND}`);
  return out;
}
