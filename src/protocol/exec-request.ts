import { ExecFlag } from './constants.js';
import { encodeFrame } from './encode.js';
import { InvalidRequestError } from './errors.js';
import type { ExecUser, TtySize } from './messages.js';

export interface ExecOptions {
  /** Exact argv, run with execvp in the guest (no shell). */
  argv: readonly string[];
  /** Overlaid on the agent's base environment (PATH, HOME). */
  env?: Readonly<Record<string, string>>;
  /** Working directory; default `/`. */
  cwd?: string;
  /** Deadline after which the agent SIGKILLs the command's process group; default none. */
  timeoutMs?: number;
  /** Give the command a stdin stream; otherwise its stdin is /dev/null. */
  stdin?: boolean;
  /** Create `cwd` and its parents if missing. */
  mkdirCwd?: boolean;
  /**
   * Run on a pseudo-terminal of this size: everything the command writes comes on `stdout` (stderr
   * stays empty), and stdin goes through the terminal (a Ctrl-C byte interrupts its foreground job).
   * Needs an agent with the TTY capability, else TtyUnavailableError.
   */
  tty?: TtySize;
  /** Run as this user (`gid` may be GID_OF_USER); needs the agent's USER capability. Default: root. */
  user?: ExecUser;
  /** Aborting it ends the whole session, which kills the command. */
  signal?: AbortSignal;
}

/** The EXEC frame for `options`; throws InvalidRequestError for an environment name the guest could not take. */
export function encodeExecRequest(options: ExecOptions): Buffer {
  return encodeFrame({
    type: 'exec',
    timeoutMs: options.timeoutMs === undefined ? 0 : Math.ceil(options.timeoutMs),
    flags: (options.stdin ? ExecFlag.STDIN : 0) | (options.mkdirCwd ? ExecFlag.MKDIR_CWD : 0),
    cwd: options.cwd ?? '',
    argv: options.argv,
    ...(options.user ? { user: options.user } : {}),
    env: Object.entries(options.env ?? {}).map(([key, value]) => {
      if (key === '' || key.includes('=')) throw new InvalidRequestError(`invalid environment variable name ${JSON.stringify(key)}`);
      return `${key}=${value}`;
    }),
    ...(options.tty ? { tty: options.tty } : {}),
  });
}
