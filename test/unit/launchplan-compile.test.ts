import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { compileCommand } from '../../src/cli/compile.js';
import { MvmError } from '../../src/errors.js';
import { compileManifest, loadLaunchPlan } from '../../src/launchplan/index.js';
import { SPEC_IR } from './launchplan-fixtures.js';

const TWO_APPS = {
  apps: [
    { name: 'web', entrypoint: { command: ['python', 'main.py'], working_dir: '/app', env: { PORT: '8080' } }, env: { K: 'web' } },
    { name: 'worker', entrypoint: { command: ['python', 'worker.py'] }, replicas: 3 },
  ],
};

let root: string;
let counter = 0;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'mvm-compile-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A fresh directory holding `manifest.json`; returns the manifest path and an `out` path inside it. */
async function workspace(manifest: unknown): Promise<{ manifest: string; out: string }> {
  const dir = join(root, `case-${counter++}`);
  await mkdir(dir);
  const path = join(dir, 'manifest.json');
  await writeFile(path, typeof manifest === 'string' ? manifest : JSON.stringify(manifest));
  return { manifest: path, out: join(dir, 'build') };
}

async function assertRefused(action: Promise<unknown>, expected: string): Promise<void> {
  await assert.rejects(action, (err: unknown) => {
    assert.ok(err instanceof MvmError, `expected an MvmError, got ${String(err)}`);
    assert.equal(err.exitCode, 125);
    assert.equal(err.message, expected);
    return true;
  });
}

describe('compileManifest', () => {
  it('writes DIR/launch.json for a single-app manifest', async () => {
    const { manifest, out } = await workspace(SPEC_IR);
    const result = await compileManifest(manifest, out);
    assert.deepEqual(result, { files: [join(out, 'launch.json')], ignoredFields: [] });
    assert.deepEqual(JSON.parse(await readFile(join(out, 'launch.json'), 'utf8')), {
      artifact_format_version: '1.0',
      workload_id: 'hello',
      entrypoint: { command: ['python', 'main.py'], working_dir: '/app', env: { PORT: '8080' } },
      env: { LOG_LEVEL: 'info' },
    });
  });

  it('round-trips: the compiled artifact loads to the manifest plan', async () => {
    const { manifest, out } = await workspace(SPEC_IR);
    await compileManifest(manifest, out);
    const fromIr = await loadLaunchPlan(manifest);
    const fromArtifact = await loadLaunchPlan(join(out, 'launch.json'));
    assert.equal(fromArtifact.source, 'artifact');
    assert.deepEqual({ ...fromArtifact, source: 'workload-ir' }, fromIr);
  });

  it('keeps an absent working_dir absent, so the artifact still runs in /', async () => {
    const { manifest, out } = await workspace({ apps: [{ name: 'a', entrypoint: { command: ['true'] } }] });
    await compileManifest(manifest, out);
    const written = JSON.parse(await readFile(join(out, 'launch.json'), 'utf8'));
    assert.deepEqual(written.entrypoint, { command: ['true'], env: {} });
    assert.equal((await loadLaunchPlan(join(out, 'launch.json'))).cwd, '/');
  });

  it('writes DIR/<app>/launch.json per app for a multi-app manifest, dropping unknown fields', async () => {
    const { manifest, out } = await workspace(TWO_APPS);
    const result = await compileManifest(manifest, out);
    assert.deepEqual(result, {
      files: [join(out, 'web', 'launch.json'), join(out, 'worker', 'launch.json')],
      ignoredFields: ['apps[1].replicas'],
    });
    const web = await loadLaunchPlan(join(out, 'web', 'launch.json'));
    assert.deepEqual(web, {
      source: 'artifact',
      workloadId: 'web',
      argv: ['python', 'main.py'],
      cwd: '/app',
      env: { K: 'web', PORT: '8080' },
      ignoredFields: [],
    });
    const worker = await loadLaunchPlan(join(out, 'worker', 'launch.json'));
    assert.deepEqual([worker.workloadId, worker.argv, worker.cwd], ['worker', ['python', 'worker.py'], '/']);
    assert.deepEqual((await readdir(out)).sort(), ['web', 'worker']);
  });

  it('is idempotent: a re-run leaves the same bytes and no temporary files', async () => {
    const { manifest, out } = await workspace(TWO_APPS);
    await compileManifest(manifest, out);
    const first = await readFile(join(out, 'web', 'launch.json'));
    const firstInode = (await stat(join(out, 'web', 'launch.json'))).ino;
    await compileManifest(manifest, out);
    assert.deepEqual(await readFile(join(out, 'web', 'launch.json')), first);
    // A new inode shows the file was replaced by rename, not rewritten in place.
    assert.notEqual((await stat(join(out, 'web', 'launch.json'))).ino, firstInode);
    assert.deepEqual(await readdir(join(out, 'web')), ['launch.json']);
    assert.deepEqual(await readdir(join(out, 'worker')), ['launch.json']);
  });

  it('calls a single app without a name "app" in its workload_id', async () => {
    const { manifest, out } = await workspace({ apps: [{ entrypoint: { command: ['true'] } }] });
    await compileManifest(manifest, out);
    assert.equal(JSON.parse(await readFile(join(out, 'launch.json'), 'utf8')).workload_id, 'app');
    assert.equal((await loadLaunchPlan(join(out, 'launch.json'))).workloadId, 'app');
  });

  it('needs a name for each app of several, since it names the output directory', async () => {
    const { manifest, out } = await workspace({ apps: [TWO_APPS.apps[0], { entrypoint: { command: ['x'] } }] });
    await assertRefused(
      compileManifest(manifest, out),
      `manifest ${manifest}: apps[1].name: required when the manifest has several apps (each app's name is its output directory)`,
    );
    await assert.rejects(stat(out), { code: 'ENOENT' });
  });

  it('creates missing parents of --out', async () => {
    const { manifest, out } = await workspace(SPEC_IR);
    const nested = join(out, 'a', 'b');
    assert.deepEqual((await compileManifest(manifest, nested)).files, [join(nested, 'launch.json')]);
  });

  it('refuses an existing --out that is not a directory', async () => {
    const { manifest, out } = await workspace(SPEC_IR);
    await writeFile(out, 'not a directory');
    await assertRefused(compileManifest(manifest, out), `output directory ${out}: exists and is not a directory`);
    assert.equal(await readFile(out, 'utf8'), 'not a directory');
  });

  it('refuses an app directory that exists as a file', async () => {
    const { manifest, out } = await workspace(TWO_APPS);
    await mkdir(out);
    await writeFile(join(out, 'worker'), '');
    await assertRefused(
      compileManifest(manifest, out),
      `output directory ${join(out, 'worker')}: exists and is not a directory`,
    );
  });

  it('refuses a launch.json artifact as input', async () => {
    const { manifest, out } = await workspace({
      artifact_format_version: '1.0',
      workload_id: 'w',
      entrypoint: { command: ['x'] },
    });
    await assertRefused(
      compileManifest(manifest, out),
      `manifest ${manifest}: is a launch.json artifact (top-level "entrypoint"), not a Workload IR manifest ` +
        '(top-level "apps"); it needs no compiling: pass it to `mvmctl exec --launch-plan`',
    );
  });

  it('validates like --launch-plan and writes nothing when any app is invalid', async () => {
    const { manifest, out } = await workspace({
      apps: [TWO_APPS.apps[0], { name: 'bad', entrypoint: { command: ['x'], working_dir: 'rel' } }],
    });
    await assertRefused(
      compileManifest(manifest, out),
      `manifest ${manifest}: apps[1].entrypoint.working_dir: must be an absolute path (starting with "/")`,
    );
    await assert.rejects(stat(out), { code: 'ENOENT' });
  });

  it('refuses multi-app names that are not safe, unique directory names', async () => {
    const rule = 'cannot name the app\'s output directory (no "/", "\\" or NUL; not "." or "..")';
    for (const name of ['a/b', '..', '.', 'a\\b']) {
      const { manifest, out } = await workspace({
        apps: [TWO_APPS.apps[0], { name, entrypoint: { command: ['x'] } }],
      });
      await assertRefused(compileManifest(manifest, out), `manifest ${manifest}: apps[1].name: ${JSON.stringify(name)} ${rule}`);
      await assert.rejects(stat(out), { code: 'ENOENT' });
    }
    const { manifest, out } = await workspace({ apps: [TWO_APPS.apps[0], TWO_APPS.apps[1], TWO_APPS.apps[0]] });
    await assertRefused(
      compileManifest(manifest, out),
      `manifest ${manifest}: apps[2].name: "web" is also the name of apps[0]; app names must be unique`,
    );
  });

  it('refuses a missing manifest', async () => {
    const missing = join(root, 'missing.json');
    await assertRefused(compileManifest(missing, join(root, 'out')), `manifest ${missing}: no such file`);
  });
});

describe('mvmctl compile', () => {
  async function run(args: string[]): Promise<{ stdout: string; stderr: string }> {
    const out: string[] = [];
    const err: string[] = [];
    const { stdout, stderr } = process;
    const realOut = stdout.write;
    const realErr = stderr.write;
    stdout.write = ((chunk: string) => out.push(chunk) > 0) as typeof stdout.write;
    stderr.write = ((chunk: string) => err.push(chunk) > 0) as typeof stderr.write;
    try {
      await compileCommand().parseAsync(args, { from: 'user' });
    } finally {
      stdout.write = realOut;
      stderr.write = realErr;
    }
    return { stdout: out.join(''), stderr: err.join('') };
  }

  it('prints one line per file written', async () => {
    const { manifest, out } = await workspace(TWO_APPS);
    const result = await run([manifest, '--out', out]);
    assert.equal(result.stdout, `wrote ${join(out, 'web', 'launch.json')}\nwrote ${join(out, 'worker', 'launch.json')}\n`);
    assert.equal(result.stderr, '');
  });

  it('lists fields it did not carry over with -v', async () => {
    const { manifest, out } = await workspace(TWO_APPS);
    const result = await run([manifest, '--out', out, '-v']);
    assert.equal(result.stderr, 'mvmctl: ignored field apps[1].replicas\n');
  });
});
