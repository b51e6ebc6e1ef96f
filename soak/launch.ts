import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** Starts the real mvmctl CLI with `args`; stdout and stderr are pipes, stdin is /dev/null. */
export type LaunchMvmctl = (args: string[], env: NodeJS.ProcessEnv) => ChildProcess;

/** The CLI as it ships (bin/mvmctl, which loads the bundle of the build this file belongs to), or `mainJs`. */
export function builtMvmctl(mainJs = fileURLToPath(new URL('../../bin/mvmctl', import.meta.url))): LaunchMvmctl {
  return (args, env) => spawn(process.execPath, [mainJs, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
}
