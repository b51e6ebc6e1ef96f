import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { MvmError } from '../../src/errors.js';
import { loadLaunchPlan, mergeEnv } from '../../src/launchplan/index.js';
import { SPEC_ARTIFACT, SPEC_IR } from './launchplan-fixtures.js';


let dir: string;
let counter = 0;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'mvm-launchplan-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function planFile(content: unknown): Promise<string> {
  const path = join(dir, `plan-${counter++}.json`);
  await writeFile(path, typeof content === 'string' ? content : JSON.stringify(content));
  return path;
}

function artifact(entrypoint: unknown, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { artifact_format_version: '1.0', workload_id: 'w', entrypoint, ...extra };
}

/** Asserts a one-line MvmError with exit 125 whose message is exactly `expected` (or matches it). */
async function assertRefused(load: Promise<unknown>, expected: string | RegExp): Promise<void> {
  await assert.rejects(load, (err: unknown) => {
    assert.ok(err instanceof MvmError, `expected an MvmError, got ${String(err)}`);
    assert.equal(err.exitCode, 125);
    assert.ok(!err.message.includes('\n'), `message spans lines: ${JSON.stringify(err.message)}`);
    if (typeof expected === 'string') assert.equal(err.message, expected);
    else assert.match(err.message, expected);
    return true;
  });
}

async function assertPlanRefused(content: unknown, problem: string): Promise<void> {
  const path = await planFile(content);
  await assertRefused(loadLaunchPlan(path), `launch plan ${path}: ${problem}`);
}

describe('loadLaunchPlan: the spec examples', () => {
  it('loads the launch.json artifact', async () => {
    assert.deepEqual(await loadLaunchPlan(await planFile(SPEC_ARTIFACT)), {
      source: 'artifact',
      workloadId: 'hello',
      argv: ['python', 'main.py'],
      cwd: '/app',
      env: { LOG_LEVEL: 'info', PORT: '8080' },
      ignoredFields: [],
    });
  });

  it('loads the Workload IR manifest to the same plan', async () => {
    const fromArtifact = await loadLaunchPlan(await planFile(SPEC_ARTIFACT));
    const fromIr = await loadLaunchPlan(await planFile(SPEC_IR));
    assert.equal(fromIr.source, 'workload-ir');
    assert.deepEqual({ ...fromIr, source: 'artifact' }, fromArtifact);
  });
});

describe('loadLaunchPlan: env precedence', () => {
  it('artifact: top-level env < entrypoint.env < CLI', async () => {
    const plan = await loadLaunchPlan(
      await planFile(
        artifact({ command: ['env'], env: { K: 'entrypoint', E: 'e' } }, { env: { K: 'top-level', T: 't' } }),
      ),
    );
    assert.deepEqual(plan.env, { K: 'entrypoint', T: 't', E: 'e' });
    assert.deepEqual(mergeEnv(plan.env, { K: 'cli', C: 'c' }), { K: 'cli', T: 't', E: 'e', C: 'c' });
  });

  it('IR: apps[].env < apps[].entrypoint.env < CLI', async () => {
    const plan = await loadLaunchPlan(
      await planFile({
        apps: [{ name: 'a', entrypoint: { command: ['env'], env: { K: 'entrypoint' } }, env: { K: 'app', A: 'a' } }],
      }),
    );
    assert.deepEqual(plan.env, { K: 'entrypoint', A: 'a' });
    assert.deepEqual(mergeEnv(plan.env, { K: 'cli' }), { K: 'cli', A: 'a' });
  });

  it('mergeEnv leaves its inputs alone', () => {
    const planEnv = { K: 'plan' };
    mergeEnv(planEnv, { K: 'cli' });
    assert.deepEqual(planEnv, { K: 'plan' });
  });
});

describe('loadLaunchPlan: optional and ignored fields', () => {
  it('runs in / when working_dir is absent, with empty env when none is given', async () => {
    const plan = await loadLaunchPlan(await planFile(artifact({ command: ['true'] })));
    assert.equal(plan.cwd, '/');
    assert.deepEqual(plan.env, {});
  });

  it('collects unknown fields as JSON paths instead of refusing them', async () => {
    const ir = await loadLaunchPlan(
      await planFile({
        apps: [{ name: 'a', entrypoint: { command: ['x'], user: 'root' }, resources: { cpus: 2 } }],
        version: 3,
        'x-producer': 'sdk',
      }),
    );
    assert.deepEqual(ir.ignoredFields, ['version', '["x-producer"]', 'apps[0].resources', 'apps[0].entrypoint.user']);
    const art = await loadLaunchPlan(await planFile(artifact({ command: ['x'], ports: [80] }, { flake: '.' })));
    assert.deepEqual(art.ignoredFields, ['flake', 'entrypoint.ports']);
  });

  it('accepts any 1.x artifact_format_version', async () => {
    for (const version of ['1', '1.0', '1.3', '1.10.2']) {
      const plan = await loadLaunchPlan(await planFile(artifact({ command: ['x'] }, { artifact_format_version: version })));
      assert.deepEqual(plan.argv, ['x']);
    }
  });
});

describe('loadLaunchPlan: refusals', () => {
  const shapes =
    'a launch.json artifact (top-level "entrypoint") or a Workload IR manifest (top-level "apps")';

  it('refuses a file with both shapes or neither', async () => {
    await assertPlanRefused(
      { entrypoint: { command: ['x'] }, apps: [] },
      `has both "entrypoint" and "apps", so its shape is ambiguous; expected either ${shapes}`,
    );
    await assertPlanRefused({ command: ['x'] }, `has neither "entrypoint" nor "apps"; expected ${shapes}`);
    await assertPlanRefused([1], `expected a JSON object, got an array; accepted shapes: ${shapes}`);
    await assertPlanRefused('null', `expected a JSON object, got null; accepted shapes: ${shapes}`);
  });

  it('refuses unsupported or malformed artifact_format_version', async () => {
    await assertPlanRefused(
      artifact({ command: ['x'] }, { artifact_format_version: '2.0' }),
      'artifact_format_version: "2.0" is not supported: this mvmctl reads version 1.x launch plans',
    );
    await assertPlanRefused(
      artifact({ command: ['x'] }, { artifact_format_version: '0.9' }),
      'artifact_format_version: "0.9" is not supported: this mvmctl reads version 1.x launch plans',
    );
    for (const version of ['v1', 1, undefined]) {
      await assertPlanRefused(
        artifact({ command: ['x'] }, { artifact_format_version: version }),
        'artifact_format_version: must be a version string such as "1.0"',
      );
    }
  });

  it('refuses a bad command, naming its JSON path', async () => {
    const rule = 'must be a non-empty array of strings';
    await assertPlanRefused(artifact({}), `entrypoint.command: ${rule}`);
    await assertPlanRefused(artifact({ command: 'python main.py' }), `entrypoint.command: ${rule}`);
    await assertPlanRefused({ apps: [{ name: 'a', entrypoint: { command: [] } }] }, `apps[0].entrypoint.command: ${rule}`);
    await assertPlanRefused(artifact({ command: ['sleep', 5] }), 'entrypoint.command[1]: must be a string');
    await assertPlanRefused(artifact({ command: ['', 'x'] }), 'entrypoint.command[0]: the program name must not be empty');
    await assertPlanRefused(artifact({ command: ['a\u0000b'] }), 'entrypoint.command[0]: must not contain a NUL byte');
    await assertPlanRefused(artifact('x'), 'entrypoint: must be an object with a "command" array');
  });

  it('refuses a working_dir that is not an absolute path', async () => {
    await assertPlanRefused(
      artifact({ command: ['x'], working_dir: 'app' }),
      'entrypoint.working_dir: must be an absolute path (starting with "/")',
    );
    await assertPlanRefused(
      { apps: [{ name: 'a', entrypoint: { command: ['x'], working_dir: '' } }] },
      'apps[0].entrypoint.working_dir: must be an absolute path (starting with "/")',
    );
    await assertPlanRefused(
      artifact({ command: ['x'], working_dir: 7 }),
      'entrypoint.working_dir: must be a string holding an absolute path',
    );
  });

  it('refuses bad env names and values', async () => {
    const badName = 'is not a valid variable name: names must match [A-Za-z_][A-Za-z0-9_]* (and not be __proto__)';
    await assertPlanRefused(artifact({ command: ['x'], env: { '1X': 'v' } }), `entrypoint.env["1X"]: ${badName}`);
    await assertPlanRefused(artifact({ command: ['x'] }, { env: { 'A-B': 'v' } }), `env["A-B"]: ${badName}`);
    await assertPlanRefused(
      { apps: [{ name: 'a', entrypoint: { command: ['x'] }, env: { 'A\nB': 'v' } }] },
      `apps[0].env["A\\nB"]: ${badName}`,
    );
    await assertPlanRefused(
      '{"artifact_format_version":"1.0","workload_id":"w","entrypoint":{"command":["x"],"env":{"__proto__":"v"}}}',
      `entrypoint.env.__proto__: ${badName}`,
    );
    await assertPlanRefused(artifact({ command: ['x'], env: { PORT: 8080 } }), 'entrypoint.env.PORT: must be a string');
    await assertPlanRefused(artifact({ command: ['x'] }, { env: { A: 'a\u0000' } }), 'env.A: must not contain a NUL byte');
    await assertPlanRefused(artifact({ command: ['x'] }, { env: ['A=1'] }), 'env: must be an object of string values');
  });

  it('refuses bad workload_id, apps and app entries', async () => {
    await assertPlanRefused(artifact({ command: ['x'] }, { workload_id: '' }), 'workload_id: must be a non-empty string');
    await assertPlanRefused({ apps: [] }, 'apps: must list at least one app');
    await assertPlanRefused({ apps: {} }, 'apps: must be an array of apps');
    await assertPlanRefused({ apps: ['x'] }, 'apps[0]: must be an object with an "entrypoint"');
    await assertPlanRefused({ apps: [{ name: '', entrypoint: { command: ['x'] } }] }, 'apps[0].name: must be a non-empty string');
    await assertPlanRefused({ apps: [{ name: 5, entrypoint: { command: ['x'] } }] }, 'apps[0].name: must be a non-empty string');
  });

  it('takes a single app without a name, as upstream mvmctl writes them, calling it "app"', async () => {
    const plan = await loadLaunchPlan(await planFile({ apps: [{ entrypoint: { command: ['x'] } }] }));
    assert.equal(plan.workloadId, 'app');
    assert.deepEqual(plan.argv, ['x']);
  });

  it('reports the first problem and counts the rest', async () => {
    await assertPlanRefused(
      artifact({ command: [], working_dir: 'rel' }, { workload_id: 5 }),
      'workload_id: must be a non-empty string (and 2 more problems)',
    );
  });

  it('refuses a multi-app Workload IR manifest', async () => {
    const path = await planFile({
      apps: [
        { name: 'a', entrypoint: { command: ['x'] } },
        { name: 'b', entrypoint: { command: ['y'] } },
      ],
    });
    await assertRefused(
      loadLaunchPlan(path),
      `launch plan ${path} has 2 apps (a, b): exec runs one workload; orchestrating several belongs to a ` +
        `long-running host such as mvmd (to run one, \`mvmctl compile ${path} --out DIR\` and pass DIR/<app>/launch.json)`,
    );
  });

  it('names an unnamed app of several by its place', async () => {
    const path = await planFile({ apps: [{ name: 'a', entrypoint: { command: ['x'] } }, { entrypoint: { command: ['y'] } }] });
    await assertRefused(loadLaunchPlan(path), /^launch plan .+ has 2 apps \(a, apps\[1\]\): exec runs one workload/);
  });

  it('refuses unreadable files with one clear line each', async () => {
    const missing = join(dir, 'missing.json');
    await assertRefused(loadLaunchPlan(missing), `launch plan ${missing}: no such file`);
    const sub = join(dir, 'a-directory');
    await mkdir(sub);
    await assertRefused(loadLaunchPlan(sub), `launch plan ${sub}: is a directory, not a file`);
    await assertPlanRefused('', 'file is empty; expected a JSON object');
    // Node 20 reports only the offset, so mvmctl adds line and column; newer Nodes add them themselves.
    const trailingComma = await planFile('{\n  "apps": [],\n}');
    await assertRefused(
      loadLaunchPlan(trailingComma),
      /^launch plan .+\.json: invalid JSON: Expected double-quoted property name in JSON at position 16 \(line 3,? column 1\)$/,
    );
    // V8 quotes the input in this message, newline included; the error must still be one line.
    const path = await planFile('[1,\n]x');
    await assertRefused(loadLaunchPlan(path), /^launch plan .+\.json: invalid JSON: Unexpected token .+$/);
  });

  it('accepts a file starting with a byte-order mark', async () => {
    const plan = await loadLaunchPlan(await planFile(`\uFEFF${SPEC_ARTIFACT}`));
    assert.equal(plan.workloadId, 'hello');
  });
});
