/**
 * An error meant for the user: `message` is one line that names the cause and, where there is one,
 * the fix. The CLI prints it as `mvmctl: <message>` and exits with `exitCode` (125 unless the failure
 * has a more specific documented code), never with a stack trace.
 */
export class MvmError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = 125,
    /** Extra lines shown after the message, e.g. the tail of a guest console after a failed boot. */
    readonly details: readonly string[] = [],
  ) {
    super(message);
    this.name = 'MvmError';
  }
}

/** Exit status when mvmctl itself fails (bad flags, missing QEMU, failed boot), as `docker run` does. */
export const EXIT_MVM_FAILURE = 125;

/**
 * `--flake` on a host without a working Nix: no `nix` binary, or nix failed (it could not fetch, the
 * build failed, it ran past its deadline). Exit 125, and the message names the way round that needs
 * no Nix, a template (`--template`/`--manifest`), as the seed spec asks.
 */
export class NixUnavailableError extends MvmError {
  constructor(message: string) {
    super(message, EXIT_MVM_FAILURE);
    this.name = 'NixUnavailableError';
  }
}
