/**
 * mvmctl's TypeScript API: `exec()` runs one command in a fresh microVM and tears the VM down, as
 * `mvmctl exec` does (the CLI is built on it); `MicroVm.start()` keeps one up for many commands, as
 * `mvmctl up` does. See docs/sdk.md.
 */
export { exec, type ExecHandle, type ExecResult, type ExecStarted } from './sdk/exec.js';
export { MicroVm } from './sdk/microvm.js';
export type { AddDir, CommandOptions, ExecOptions, VmOptions } from './sdk/options.js';
export { InvalidOptionError } from './sdk/parse.js';
export { MvmError, NixUnavailableError } from './errors.js';
export { AgentConnectionError, AgentRequestError, AgentTimeoutError, AgentVersionError, ExecUnavailableError, ProtocolError, TtyUnavailableError } from './protocol/errors.js';
export type { AccelChoice } from './accel/index.js';
export type { BackendChoice } from './backends/index.js';
