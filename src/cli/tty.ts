/**
 * The host side of `-t`: the terminal's size for the guest's pty, raw mode while the command runs
 * (so that keys such as Ctrl-C reach the guest as bytes, and its line discipline acts on them),
 * and the terminal restored whichever way mvmctl leaves.
 */
import { MvmError } from '../errors.js';
import type { TtySize } from '../protocol/index.js';
import { DEFAULT_TTY_SIZE } from '../sdk/options.js';

/** The size of mvmctl's terminal, or 24x80 when stdout is not one (`-t` in a script, or piped). */
export function hostTtySize(): TtySize {
  const { rows, columns } = process.stdout;
  return process.stdout.isTTY && rows > 0 && columns > 0 ? { rows, cols: columns } : { ...DEFAULT_TTY_SIZE };
}

/** `--json` keeps stdout and stderr apart; a terminal has one output stream. */
export function refuseJsonWithTty(flags: { json?: boolean; tty?: boolean }): void {
  if (flags.json && flags.tty) throw new MvmError('--json and -t/--tty do not go together: a terminal merges stdout and stderr into one stream');
}

/**
 * While the command runs: with `raw`, stdin (when it is a terminal) in raw mode; and the guest told
 * of every size change of stdout's terminal. The returned function undoes both; it is idempotent,
 * and a process 'exit' runs it too, so an uncaught error or process.exit() leaves no raw terminal.
 */
export function attachHostTerminal(raw: boolean, resize: (size: TtySize) => void): () => void {
  const stdin = process.stdin;
  const wasRaw = stdin.isTTY ? stdin.isRaw : false;
  const makeRaw = raw && stdin.isTTY === true && !wasRaw;
  const onResize = () => resize(hostTtySize());
  let restored = false;
  const restore = () => {
    if (restored) return;
    restored = true;
    process.stdout.removeListener('resize', onResize);
    process.removeListener('exit', restore);
    if (makeRaw) {
      try {
        stdin.setRawMode(false);
      } catch {
        // The terminal is gone (hung up): nothing to restore.
      }
    }
  };
  if (makeRaw) stdin.setRawMode(true);
  process.once('exit', restore);
  // Node emits 'resize' on a terminal stdout when it gets SIGWINCH.
  if (process.stdout.isTTY) process.stdout.on('resize', onResize);
  return restore;
}
