// The short version of `npm run soak` (soak/): each signal case at one moment per phase, triggered by
// what the run shows (QEMU up, the command's marker, HOST being written), and a 200 MB output flood.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { flood, formatFlood } from '../../soak/flood.js';
import { describeMoment, formatSignalBatch, phaseMoments, SIGNAL_CASES, signalBatch, signalProblems } from '../../soak/signals.js';
import { assertNoVmLeft, collect, isolatedEnv, startMvmctl } from './helpers.js';

describe('soak, short', () => {
  for (const signal of SIGNAL_CASES) {
    const moments = phaseMoments(signal);
    test(`${signal} at ${moments.map(describeMoment).join(', ')}: no VMM, no state dir, HOST never mixed`, async (t) => {
      const { env, stateDir, cleanup } = isolatedEnv();
      try {
        const report = await signalBatch({ launch: startMvmctl, signal, moments, env, stateDir });
        const figures = formatSignalBatch(report);
        t.diagnostic(figures);
        assert.ok(report.ok, [figures, ...signalProblems(report)].join('\n'));
        assert.deepEqual(report.runs.map((r) => r.delivered), moments.map(() => true), `every moment is reached before mvmctl exits\n${figures}`);
        await assertNoVmLeft(stateDir);
        const listed = await collect(startMvmctl(['ls', '--json'], env));
        assert.deepEqual(JSON.parse(listed.stdout.toString()), [], 'mvmctl ls lists no VM after the batch');
      } finally {
        cleanup();
      }
    });
  }

  test('200 MB of guest stdout into a reader that stalls 2 s: mvmctl stays under 100 MB RSS, every byte arrives in order', async (t) => {
    const { env, cleanup } = isolatedEnv();
    try {
      const report = await flood({ launch: startMvmctl, env, bytes: 200_000_000, stallMs: 2000 });
      const figures = formatFlood(report);
      t.diagnostic(figures);
      assert.ok(report.ok, figures);
    } finally {
      cleanup();
    }
  });
});
