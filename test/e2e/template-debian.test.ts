// End to end: a template from a real Debian root file system (debootstrap --variant=minbase plus
// python3) running the spec's launch-plan example, restored from its snapshot and booted cold.
//
// The debootstrap tree is cached under the cache dir (MVM_CACHE_DIR, else ~/.cache/mvm) in
// rootfs/debian-bookworm-minbase-python3, so only the first run pays for it (about 5 minutes).
// Skipped, saying why, when debootstrap is missing or must run and cannot (not root, no mirror).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { isolatedEnv, mvmctl, vmmPidsMentioning } from './helpers.js';

const SUITE = 'bookworm';
const cacheRoot = process.env.MVM_CACHE_DIR || join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'mvm');
const rootfs = join(cacheRoot, 'rootfs', `debian-${SUITE}-minbase-python3`);

/** The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org. */
function mirror(): string {
  const files = ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'];
  for (const file of files) {
    let text = '';
    try {
      text = readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    const uri = /^URIs:\s*(\S+)/m.exec(text)?.[1] ?? /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+/m.exec(text)?.[1];
    if (uri && !uri.includes('security')) return uri;
  }
  return 'http://deb.debian.org/debian';
}

function whySkip(): string | false {
  if (existsSync(join(rootfs, 'usr', 'bin', 'python3'))) return false;
  if (spawnSync('sh', ['-c', 'command -v debootstrap'], { env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` } }).status !== 0) {
    return 'debootstrap is not installed (apt-get install debootstrap)';
  }
  if (process.getuid?.() !== 0) return 'debootstrap needs root to build the Debian root file system';
  return false;
}

function debootstrap(target: string): Promise<{ code: number | null; log: string }> {
  return new Promise((resolve) => {
    const child = spawn('debootstrap', ['--variant=minbase', '--include=python3', SUITE, target, mirror()], {
      env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let log = '';
    child.stdout.on('data', (c: Buffer) => (log = (log + c.toString()).slice(-4000)));
    child.stderr.on('data', (c: Buffer) => (log = (log + c.toString()).slice(-4000)));
    child.on('close', (code) => resolve({ code, log }));
  });
}

async function ensureRootfs(): Promise<void> {
  if (existsSync(join(rootfs, 'usr', 'bin', 'python3'))) return;
  mkdirSync(join(cacheRoot, 'rootfs'), { recursive: true });
  const tmp = `${rootfs}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  const result = await debootstrap(tmp);
  if (result.code !== 0) {
    rmSync(tmp, { recursive: true, force: true });
    throw new Error(`debootstrap failed (mirror ${mirror()}): ${result.log}`);
  }
  renameSync(tmp, rootfs);
}

const skip = whySkip();
const isolated = isolatedEnv();
const dataDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-data-'));
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-deb-'));
const env = { ...isolated.env, MVM_DATA_DIR: dataDir };

after(() => {
  isolated.cleanup();
  rmSync(dataDir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

describe('a Debian (debootstrap minbase + python3) template', { skip }, () => {
  test('build with snapshot; the launch-plan example runs python3 restored and cold, same output', { timeout: 30 * 60_000 }, async () => {
    await ensureRootfs();
    const built = await mvmctl(['template', 'build', 'debian', '--rootfs-dir', rootfs, '--snapshot'], env);
    assert.equal(built.code, 0, built.stderr);

    const plan = join(work, 'launch.json');
    writeFileSync(
      plan,
      JSON.stringify({
        artifact_format_version: '1.0',
        workload_id: 'hello',
        entrypoint: {
          command: ['python3', '-c', "import os; print(os.getcwd(), os.environ['PORT'], os.environ['LOG_LEVEL'])"],
          working_dir: '/app',
          env: { PORT: '8080' },
        },
        env: { LOG_LEVEL: 'info' },
      }),
    );
    const warm = await mvmctl(['exec', '-v', '--manifest', 'debian', '--launch-plan', plan], env);
    assert.equal(warm.code, 0, warm.stderr);
    assert.match(warm.stderr, /\[timing\] restored from snapshot/);
    assert.equal(warm.stdout.toString(), '/app 8080 info\n');

    const cold = await mvmctl(['exec', '-v', '--no-snapshot', '--manifest', 'debian', '--launch-plan', plan], env);
    assert.equal(cold.code, 0, cold.stderr);
    assert.doesNotMatch(cold.stderr, /restored from snapshot/);
    assert.equal(cold.stdout.toString(), warm.stdout.toString());

    const debian = await mvmctl(['exec', '--manifest', 'debian', '--', 'sh', '-c', 'cat /etc/debian_version; python3 -c "import ssl, json; print(json.dumps([1]))"'], env);
    assert.equal(debian.code, 0, debian.stderr);
    assert.match(debian.stdout.toString(), /^12\.\d+\n\[1\]\n$/);
    assert.deepEqual(vmmPidsMentioning(isolated.stateDir), []);
  });
});

if (skip) console.log(`# template-debian: skipped: ${skip}`);
