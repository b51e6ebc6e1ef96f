// End to end, as a user gets the package: `npm pack`, `npm install` of the tarball in a fresh
// project, then `import { exec } from 'mvmctl'` in that project boots a real VM.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runTool, type ToolResult } from '../../src/run-tool.js';
import { assertNoVmLeft, isolatedEnv, mvmctl, repoRoot } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
const work = mkdtempSync(join(tmpdir(), 'mvm-sdk-pack-'));
const project = join(work, 'project');
after(() => {
  cleanup();
  rmSync(work, { recursive: true, force: true });
});

const NPM_TIMEOUT_MS = 180_000;

async function npm(args: string[], cwd: string): Promise<ToolResult> {
  const result = await runTool('npm', args, { cwd, timeoutMs: NPM_TIMEOUT_MS });
  assert.equal(result.code, 0, `npm ${args.join(' ')}: ${result.stderr}`);
  return result;
}

/**
 * What a user's script does: iterate stdout, await the exit; then kill a command that would run on.
 * The host env (the state dir) comes from the spawn; `env` would be the guest's.
 */
const USER_SCRIPT = `
import { exec, MicroVm } from 'mvmctl';
const run = exec(['sh', '-c', 'echo hi; echo to-err >&2; exit 3'], { timeout: 60 });
let err = '';
run.stderr.on('data', (chunk) => (err += chunk));
for await (const chunk of run.stdout) process.stdout.write(chunk);
const result = await run.exited;

const sleeper = exec(['sh', '-c', 'echo ready; exec sleep 100'], { timeout: 60 });
sleeper.stderr.resume();
for await (const chunk of sleeper.stdout) sleeper.kill('SIGTERM');
const killed = await sleeper.exited;

// A VM that stays up: the second command sees the first one's file; stop() ends it.
const vm = await MicroVm.start({ name: 'sdk-vm' });
const first = vm.exec(['sh', '-c', 'echo kept > /tmp/f']);
const second = vm.exec(['cat', '/tmp/f']);
let kept = '';
for await (const chunk of second.stdout) kept += chunk;
const both = [(await first.exited).exitCode, (await second.exited).exitCode];
await vm.stop();
await vm.closed;
console.log(JSON.stringify({ result, err, killed, name: vm.name, kept, both }));
`;

/** The package's types as a TypeScript user sees them through its `exports` map. */
const USER_TYPES = `
import { exec, MicroVm, MvmError, type ExecOptions, type ExecResult, type VmOptions } from 'mvmctl';
const options: ExecOptions = { memory: '1G', addDirs: [{ host: '.', guest: '/work', mode: 'rw' }], accel: 'tcg' };
const run = exec(['true'], options);
const vmOptions: VmOptions = { name: 'x', net: 'user' };
export const started: Promise<MicroVm> = MicroVm.start(vmOptions);
const result: Promise<ExecResult> = run.exited;
run.kill('SIGTERM');
export const failed = (error: unknown): number | undefined => (error instanceof MvmError ? error.exitCode : undefined);
export { result };
`;

describe('the packed package', () => {
  before(async () => {
    // Builds the default image if a previous step has not; the installed copy finds it in the same cache.
    const result = await mvmctl(['image', 'build'], env);
    assert.equal(result.code, 0, result.stderr);
  });

  test("npm pack, npm install of the tarball, then import { exec, MicroVm } from 'mvmctl' runs commands in VMs, kills one, and keeps a VM up for two", async () => {
    const packed = await npm(['pack', '--json', '--pack-destination', work], repoRoot);
    const [{ filename }] = JSON.parse(packed.stdout) as { filename: string }[];
    mkdirSync(project);
    await npm(['init', '-y'], project);
    // Offline: commander and zod are in the npm cache since this checkout's own install.
    const install = ['install', join(work, filename), '--no-audit', '--no-fund'];
    const offline = await runTool('npm', [...install, '--offline'], { cwd: project, timeoutMs: NPM_TIMEOUT_MS });
    if (offline.code !== 0) await npm([...install, '--prefer-offline'], project);

    writeFileSync(join(project, 'check.mts'), USER_TYPES);
    const tsc = join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc');
    const types = await runTool(
      process.execPath,
      [tsc, '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--typeRoots', join(repoRoot, 'node_modules', '@types'), '--types', 'node', 'check.mts'],
      { cwd: project, timeoutMs: NPM_TIMEOUT_MS },
    );
    assert.equal(types.code, 0, `the types do not check: ${types.stdout}${types.stderr}`);

    writeFileSync(join(project, 'script.mjs'), USER_SCRIPT);
    const run = await runTool(process.execPath, ['script.mjs'], { cwd: project, env, timeoutMs: 300_000 });
    assert.equal(run.code, 0, run.stdout + run.stderr);
    const [output, summary] = run.stdout.split(/\n(?=\{)/);
    assert.equal(output, 'hi');
    assert.deepEqual(JSON.parse(summary!), {
      result: { exitCode: 3, timedOut: false },
      err: 'to-err\n',
      killed: { exitCode: 143, signal: 'SIGTERM', timedOut: false },
      name: 'sdk-vm',
      kept: 'kept\n',
      both: [0, 0],
    });
    await assertNoVmLeft(stateDir);
  });
});
