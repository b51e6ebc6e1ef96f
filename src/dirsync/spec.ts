import { realpathSync, statSync } from 'node:fs';
import { isAbsolute, posix, resolve } from 'node:path';
import { MvmError } from '../errors.js';
import { expandHome } from '../paths.js';

export interface AddDirSpec {
  /** The flag value as the user typed it, for messages. */
  spec: string;
  /** Real path of the host directory (symlinks resolved). */
  hostPath: string;
  /** Normalized absolute guest path, no trailing slash. */
  guestPath: string;
  readOnly: boolean;
}

const FORBIDDEN_GUEST_ROOTS = ['/proc', '/sys', '/dev'];

/** The spec as typed, with control characters escaped so the message stays one line. */
export function showSpec(spec: string): string {
  return spec.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

function fail(spec: string, problem: string): never {
  throw new MvmError(`--add-dir '${showSpec(spec)}': ${problem}`);
}

/** A `HOST:GUEST[:ro|rw]` spec taken apart, before anything on disk is looked at. */
export interface AddDirParts {
  /** The spec as the user typed it (or as the SDK's `{ host, guest, mode }` reads), for messages. */
  spec: string;
  host: string;
  guest: string;
  readOnly: boolean;
}

/**
 * Splits `HOST:GUEST[:ro|rw]` as upstream mvmctl does: HOST ends at the first `:`, and the mode is
 * read only from a final `:ro` or `:rw`, so a GUEST path may itself contain colons (`/data:v1`).
 * A HOST path with a colon needs the SDK's `{ host, guest }` form.
 */
export function splitAddDirSpec(spec: string): AddDirParts {
  const colon = spec.indexOf(':');
  if (colon < 0) fail(spec, 'expected HOST:GUEST[:ro|rw], e.g. ./src:/work:rw');
  const host = spec.slice(0, colon);
  let guest = spec.slice(colon + 1);
  let readOnly = true;
  const mode = /:([^:/]*)$/.exec(guest);
  if (mode && (mode[1] === 'ro' || mode[1] === 'rw')) {
    readOnly = mode[1] === 'ro';
    guest = guest.slice(0, mode.index);
  } else if (mode && (mode[1] === '' || /^r[ow]$/i.test(mode[1]!))) {
    // A trailing ':' or ':RO' is a mistyped mode, not a mount point anyone means.
    fail(spec, `mode must be ro or rw, got '${mode[1]}'`);
  }
  return { spec, host, guest, readOnly };
}

/** Resolves HOST (relative to `cwd`, `~/` from the home directory) and checks GUEST. */
export function resolveAddDir({ spec, host, guest, readOnly }: AddDirParts, cwd: string): AddDirSpec {
  if (host === '') fail(spec, 'HOST is empty; write HOST:GUEST, e.g. .:/work');
  if (guest === '') fail(spec, 'GUEST is empty; write HOST:GUEST with an absolute GUEST path, e.g. .:/work');
  return { spec, hostPath: resolveHost(spec, host, cwd), guestPath: checkGuest(spec, guest), readOnly };
}

export function parseAddDirSpec(spec: string, cwd: string): AddDirSpec {
  return resolveAddDir(splitAddDirSpec(spec), cwd);
}

function resolveHost(spec: string, hostRaw: string, cwd: string): string {
  if (/^~[^/]/.test(hostRaw)) fail(spec, `'~user' paths are not supported; write the full path instead of '${hostRaw}'`);
  const home = expandHome(hostRaw);
  const path = isAbsolute(home) ? home : resolve(cwd, home);
  let real: string;
  try {
    real = realpathSync(path);
  } catch {
    fail(spec, `host directory ${path} does not exist; create it or fix the path`);
  }
  if (!statSync(real).isDirectory()) fail(spec, `host path ${path} is not a directory; --add-dir takes directories only`);
  return real;
}

function checkGuest(spec: string, guestRaw: string): string {
  if (!guestRaw.startsWith('/')) fail(spec, `GUEST path '${guestRaw}' must be absolute, e.g. /work`);
  // The path travels to the guest agent and into mount(2); control characters have no business there.
  if (/[\x00-\x1f\x7f]/.test(guestRaw)) fail(spec, 'GUEST path contains control characters');
  const guest = posix.normalize(guestRaw).replace(/\/+$/, '') || '/';
  if (guest === '/') fail(spec, 'GUEST may not be / (it would hide the guest root filesystem); pick a directory such as /work');
  for (const root of FORBIDDEN_GUEST_ROOTS) {
    if (guest === root || guest.startsWith(root + '/')) {
      fail(spec, `GUEST may not be ${root} or inside it (kernel filesystems live there); pick a directory such as /work`);
    }
  }
  return guest;
}

/** Whether real path `inner` is `outer` or lies inside it. */
function within(inner: string, outer: string): boolean {
  return inner === outer || inner.startsWith(outer.endsWith('/') ? outer : `${outer}/`);
}

/**
 * Checks a whole set of --add-dir flags. Nested GUEST paths (/work and /work/sub) are refused: the
 * inner mount point would have to be created inside the outer image (impossible when it is ro),
 * and a rw outer dir would sync back an empty stand-in directory over HOST's copy. HOST directories
 * that are equal or nested are refused when either is rw: syncing one back rewrites the other's
 * tree (the guest can turn x/sub into a symlink, and the sync of x/sub would then write through it).
 */
export function validateAddDirs(specs: readonly AddDirSpec[]): void {
  for (let i = 0; i < specs.length; i++) {
    for (let j = 0; j < i; j++) {
      const a = specs[j]!;
      const b = specs[i]!;
      if (a.guestPath === b.guestPath) {
        throw new MvmError(
          `--add-dir '${showSpec(b.spec)}': GUEST ${b.guestPath} is already used by --add-dir '${showSpec(a.spec)}'; give each directory its own GUEST path`,
        );
      }
      const [outer, inner] = a.guestPath.length < b.guestPath.length ? [a, b] : [b, a];
      if (inner.guestPath.startsWith(outer.guestPath + '/')) {
        throw new MvmError(
          `--add-dir '${showSpec(inner.spec)}': GUEST ${inner.guestPath} is inside ${outer.guestPath} of --add-dir '${showSpec(outer.spec)}'; mount them at separate, non-nested paths`,
        );
      }
      const [hostOuter, hostInner] = a.hostPath.length <= b.hostPath.length ? [a, b] : [b, a];
      if ((!a.readOnly || !b.readOnly) && within(hostInner.hostPath, hostOuter.hostPath)) {
        const relation = hostInner.hostPath === hostOuter.hostPath ? 'is the same directory as' : 'is inside';
        throw new MvmError(
          `--add-dir '${showSpec(hostInner.spec)}': HOST ${hostInner.hostPath} ${relation} HOST ${hostOuter.hostPath} of --add-dir '${showSpec(hostOuter.spec)}', and a rw directory's sync-back would change the other; use separate, non-overlapping host directories or make both :ro`,
        );
      }
    }
  }
}
