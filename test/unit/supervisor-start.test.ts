// `up`'s wait for its supervisor, against stand-in supervisors: a start that takes longer than the
// quiet timeout is fine while the supervisor keeps saying it is alive; one that goes quiet is killed.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startSupervised } from '../../src/supervisor/client.js';
import { scratchTree } from './scratch.js';

const { base } = scratchTree('supervisor-start-');

/** A stand-in for `mvmctl __supervise`: runs `body` (plain JS; `say(obj)` writes a StartReport line). */
function standIn(name: string, body: string): string {
  const path = join(base, `${name}.mjs`);
  writeFileSync(path, `const say = (o) => process.stdout.write(JSON.stringify(o) + '\\n');\nprocess.stdin.resume();\n${body}\n`);
  return path;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

test('a slow start that keeps saying it is alive comes up; progress and lines reach their callbacks; no clock runs once it is up', async () => {
  const pidFile = join(base, 'slow.pid');
  const script = standIn('slow', `
    (await import('node:fs')).writeFileSync(${JSON.stringify(pidFile)}, String(process.pid));
    process.stderr.write('mvmctl: a warning\\n');
    say({ progress: 'building the image' });
    const beat = setInterval(() => say({ alive: true }), 100);
    setTimeout(() => {
      clearInterval(beat);
      // a line after the last report, in the same chunk
      process.stdout.write(JSON.stringify({ ready: 'vm-1' }) + '\\n' + JSON.stringify({ alive: true }) + '\\n');
      setTimeout(() => process.exit(0), 3000);
    }, 4000);
  `);
  const lines: string[] = [];
  const progress: string[] = [];
  const name = await startSupervised(script, {}, { onLine: (l) => lines.push(l), onProgress: (l) => progress.push(l), signal: new AbortController().signal, quietTimeoutMs: 1500 });
  assert.equal(name, 'vm-1');
  assert.deepEqual(lines, ['mvmctl: a warning']);
  assert.deepEqual(progress, ['building the image']);
  await sleep(2000);
  assert.equal(pidAlive(Number(readFileSync(pidFile, 'utf8'))), true, 'the supervisor of a VM that is up is left alone');
});

test('a supervisor that goes quiet is killed, and up fails with one line', async () => {
  const pidFile = join(base, 'hung.pid');
  const script = standIn('hung', `
    (await import('node:fs')).writeFileSync(${JSON.stringify(pidFile)}, String(process.pid));
    say({ alive: true });
    setTimeout(() => {}, 60_000);
  `);
  const started = Date.now();
  await assert.rejects(
    startSupervised(script, {}, { onLine: () => {}, onProgress: () => {}, signal: new AbortController().signal, quietTimeoutMs: 1500 }),
    /the VM's supervisor stopped answering while the VM started \(nothing for 1.5 s\), and was killed/,
  );
  assert.ok(Date.now() - started < 8000);
  const pid = Number(readFileSync(pidFile, 'utf8'));
  for (let i = 0; i < 50 && pidAlive(pid); i++) await sleep(20);
  assert.equal(pidAlive(pid), false, 'the hung supervisor is gone');
});
