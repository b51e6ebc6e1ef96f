// The short version of `npm run soak -- --only fuzz` (soak/fuzz.ts) for the host side of the protocol.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatHostFuzz, fuzzHost } from '../../soak/fuzz.js';

test('50,000 generated inputs to FrameDecoder, HostFrameDecoder and AgentSession: only typed errors, bounded memory', async (t) => {
  const report = await fuzzHost({ inputs: 50_000, seed: 0x50ac });
  const figures = formatHostFuzz(report);
  t.diagnostic(figures);
  assert.equal(report.crashes, 0, [figures, ...report.crashMessages].join('\n'));
  assert.ok(report.ok, figures);
});
