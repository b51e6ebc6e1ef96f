// `--launch-plan` and `mvmctl compile` end to end: real VMs for the runs, and no VM for refusals.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { isolatedEnv, mvmctl } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-plan-'));
after(() => {
  cleanup();
  rmSync(work, { recursive: true, force: true });
});

// The spec's two example files, verbatim but for the command: the default image has no python, so
// `sh -c 'pwd; env'` stands in for `python main.py`, in the same shapes.
const command = ['sh', '-c', 'pwd; env | sort'];
const artifact = {
  artifact_format_version: '1.0',
  workload_id: 'hello',
  entrypoint: { command, working_dir: '/app', env: { PORT: '8080' } },
  env: { LOG_LEVEL: 'info' },
};
const manifest = {
  apps: [{ name: 'hello', entrypoint: { command, working_dir: '/app', env: { PORT: '8080' } }, env: { LOG_LEVEL: 'info' } }],
};

function writeJson(name: string, value: unknown): string {
  const path = join(work, name);
  writeFileSync(path, typeof value === 'string' ? value : JSON.stringify(value, null, 2));
  return path;
}

function vmDirs(): string[] {
  const dir = join(stateDir, 'vms');
  return existsSync(dir) ? readdirSync(dir) : [];
}

describe('mvmctl exec --launch-plan', () => {
  for (const [shape, body] of [['launch.json artifact', artifact], ['Workload IR manifest', manifest]] as const) {
    test(`the spec's ${shape} runs its entrypoint in working_dir with its env`, async () => {
      const result = await mvmctl(['exec', '--launch-plan', writeJson(`${shape.split(' ')[0]}.json`, body)], env);
      assert.equal(result.code, 0, result.stderr);
      const lines = result.stdout.toString().split('\n');
      assert.equal(lines[0], '/app', 'runs in working_dir, created when missing');
      assert.ok(lines.includes('PORT=8080'));
      assert.ok(lines.includes('LOG_LEVEL=info'));
    });
  }

  test('env precedence: app env < entrypoint env < --env', async () => {
    const plan = {
      apps: [
        {
          name: 'p',
          entrypoint: { command: ['sh', '-c', 'echo "$A $B $C"'], env: { A: 'entry', B: 'entry' } },
          env: { A: 'app', B: 'app', C: 'app' },
        },
      ],
    };
    const result = await mvmctl(['exec', '-e', 'A=cli', '--launch-plan', writeJson('precedence.json', plan)], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'cli entry app\n');
  });

  test('compile -> exec round trip', async () => {
    const out = join(work, 'build');
    const compiled = await mvmctl(['compile', writeJson('manifest.json', manifest), '--out', out], env);
    assert.equal(compiled.code, 0, compiled.stderr);
    const result = await mvmctl(['exec', '--launch-plan', join(out, 'launch.json')], env);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout.toString(), /^\/app\n[\s\S]*PORT=8080/);
  });

  test('every refusal: one line naming the problem, exit 125, no VM started', async () => {
    mkdirSync(join(work, 'a-directory'), { recursive: true });
    const cases: [string[], RegExp][] = [
      [['--launch-plan', writeJson('both.json', { ...artifact, apps: manifest.apps })], /entrypoint.*apps|apps.*entrypoint/],
      [['--launch-plan', writeJson('neither.json', { env: {} })], /entrypoint|apps/],
      [['--launch-plan', writeJson('multi.json', { apps: [manifest.apps[0], { ...manifest.apps[0], name: 'other' }] })], /2 apps \(hello, other\)/],
      [['--launch-plan', writeJson('trailing.json', artifact), '--', 'true'], /not both/],
      [['--launch-plan', writeJson('bad.json', '{"apps": [')], /JSON/],
      [['--launch-plan', join(work, 'missing.json')], /missing\.json/],
      [['--launch-plan', join(work, 'a-directory')], /director/],
      [['--launch-plan', writeJson('v2.json', { ...artifact, artifact_format_version: '2.0' })], /2\.0/],
      [['--launch-plan', writeJson('empty-cmd.json', { ...artifact, entrypoint: { command: [] } })], /entrypoint\.command/],
      [['--launch-plan', writeJson('rel.json', { ...artifact, entrypoint: { command, working_dir: 'app' } })], /working_dir/],
      [['--launch-plan', writeJson('badkey.json', { ...artifact, env: { 'BAD-KEY': 'x' } })], /BAD-KEY/],
    ];
    for (const [args, message] of cases) {
      const result = await mvmctl(['exec', ...args], env);
      assert.equal(result.code, 125, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /^mvmctl: [^\n]+\n$/, args.join(' '));
      assert.match(result.stderr, message, args.join(' '));
      assert.deepEqual(vmDirs(), []);
    }
  });
});
